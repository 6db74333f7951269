/* Model files: round trips, byte-identical saves, the configuration JSON, PyTorch-style dtypes,
   malformed and truncated files (exact codes, no crash, no leak), atomic saves, and directories
   given as files. */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "test.h"

#ifndef TMP_DIR
#define TMP_DIR "build/tmp_io"
#endif

static moe_ctx ctx;
static char path_buf[512];

static const char *tmp(const char *name) {
    snprintf(path_buf, sizeof path_buf, "%s/%s", TMP_DIR, name);
    return path_buf;
}

static const moe_layer_desc layers[] = {
    {.kind = MOE_LAYER_MOE, .d_out = 6, .router = MOE_ROUTER_NOISY_TOPK, .n_experts = 3, .top_k = 2, .expert = MOE_EXPERT_MLP,
     .n_hidden_layers = 2, .activation = MOE_ACT_GELU, .n_shared_experts = 1, .d_shared_hidden = 3, .router_bias = MOE_FLAG_ON,
     .importance_loss = 0.25f, .load_loss = 0.125f, .jitter = 0.01f, .shared_gate = MOE_FLAG_ON},
    {.kind = MOE_LAYER_LAYERNORM, .eps = 1e-3f, .residual = 1},
    {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_SWITCH, .n_experts = 2, .expert = MOE_EXPERT_SWIGLU, .d_hidden = 5, .residual = 1,
     .capacity_factor = 1.5f, .balance_loss = 0.01f, .z_loss = 0.001f},
    {.kind = MOE_LAYER_RMSNORM},
    {.kind = MOE_LAYER_DENSE, .d_out = 4, .activation = MOE_ACT_TANH, .bias = MOE_FLAG_OFF},
};
static const moe_model_desc model_desc = {.d_in = 5, .n_layers = 5, .layers = layers, .loss = MOE_LOSS_BCE, .max_tokens = 32,
                                          .optimizer = {.kind = MOE_OPTIMIZER_SGD, .lr = 0.05f, .momentum = 0.5f, .clip_norm = 2.0f, .warmup_steps = 3}};

static moe_model *new_model(void) {
    moe_model *m = NULL;
    CHECK_OK(moe_model_create(&ctx, &model_desc, &m), &ctx);
    return m;
}

static int test_round_trip(void) {
    moe_model *a = new_model(), *b = NULL;
    float x[10 * 5], ya[10 * 4], yb[10 * 4];
    unsigned char *f1, *f2;
    size_t n1 = 0, n2 = 0;
    int i;
    char json1[4096], json2[4096];
    if (!a) return 0;
    for (i = 0; i < 50; i++) x[i] = (float)((i * 37) % 11) / 5.0f - 1.0f;
    CHECK_OK(moe_model_save(a, tmp("a.safetensors")), &ctx);
    CHECK_OK(moe_model_load(&ctx, tmp("a.safetensors"), 0, &b), &ctx);
    if (!b) { moe_model_destroy(a); return 0; }
    CHECK(moe_model_get_desc(b)->max_tokens == 32, "max_tokens from the file");
    moe_model_forward(a, x, 10, ya, NULL);
    moe_model_forward(b, x, 10, yb, NULL);
    CHECK(memcmp(ya, yb, sizeof ya) == 0, "loaded model computes the same bits");
    CHECK(moe_model_config_json(a, json1, sizeof json1) < sizeof json1, "config fits");
    moe_model_config_json(b, json2, sizeof json2);
    CHECK(strcmp(json1, json2) == 0, "configuration survives:\n%s\n%s", json1, json2);
    CHECK(strstr(json1, "\"capacity_factor\":1.5") && strstr(json1, "\"load_loss\":0.125") && strstr(json1, "\"eps\":0.001"),
          "floats are written shortest: %s", json1);
    CHECK_OK(moe_model_save(b, tmp("b.safetensors")), &ctx);
    f1 = test_read_file(tmp("a.safetensors"), &n1);
    f2 = test_read_file(tmp("b.safetensors"), &n2);
    CHECK(f1 && f2 && n1 == n2 && memcmp(f1, f2, n1) == 0, "save(load(file)) is byte-identical (%zu vs %zu bytes)", n1, n2);
    if (f1) CHECK(((size_t)f1[0] | (size_t)f1[1] << 8) % 8 == 0, "header padded to 8 bytes");
    free(f1);
    free(f2);
    /* the same configuration through moe_model_from_config */
    moe_model_destroy(b);
    b = NULL;
    CHECK_OK(moe_model_from_config(&ctx, json1, 7, &b), &ctx);
    if (b) {
        CHECK(moe_model_get_desc(b)->max_tokens == 7, "max_tokens override");
        moe_model_destroy(b);
    }
    /* loading into another max_tokens */
    CHECK_OK(moe_model_load(&ctx, tmp("a.safetensors"), 3, &b), &ctx);
    if (b) {
        CHECK_RESULT(moe_model_forward(b, x, 4, yb, NULL), MOE_ERR_TOO_MANY_TOKENS, &ctx);
        /* a batch of at most 8 tokens takes the decode path: compare like with like */
        CHECK_OK(moe_model_forward(a, x, 3, ya, NULL), &ctx);
        CHECK_OK(moe_model_forward(b, x, 3, yb, NULL), &ctx);
        CHECK(memcmp(ya, yb, sizeof(float) * 12) == 0, "same rows");
        moe_model_destroy(b);
    }
    moe_model_destroy(a);
    return 0;
}

/* A file written the way a PyTorch user would (other dtypes, other order, extra tensors) loads. */
static int test_foreign_dtypes_and_extras(void) {
    moe_model *a = new_model(), *b = NULL;
    moe_tensor_writer *w = NULL;
    char json[4096];
    int i;
    void *bufs[64] = {0};
    static const int32_t notes[3] = {1, 2, 3};  /* the writer reads the data when it saves */
    static const int64_t notes_shape[1] = {3};
    float x[3 * 5] = {0.1f, -0.2f, 0.3f, 0.4f, -0.5f, 1, 2, 3, 4, 5, -1, 0, 1, 0, -1}, ya[12], yb[12];
    if (!a) return 0;
    moe_model_config_json(a, json, sizeof json);
    CHECK_OK(moe_tensor_writer_create(&ctx, &w), &ctx);
    CHECK_OK(moe_tensor_writer_metadata(w, "moe.config", json), &ctx);
    CHECK_OK(moe_tensor_writer_add(w, "notes.something", MOE_DTYPE_I32, 1, notes_shape, notes), &ctx);
    for (i = moe_model_tensor_count(a) - 1; i >= 0; i--) {  /* reverse order, rotating dtypes */
        moe_tensor t;
        int64_t k;
        moe_model_tensor(a, i, &t);
        if (i % 3 == 0) {
            double *d = (double *)malloc(sizeof(double) * (size_t)t.size);
            for (k = 0; k < t.size; k++) d[k] = t.data[k];
            bufs[i] = d;
            CHECK_OK(moe_tensor_writer_add(w, t.name, MOE_DTYPE_F64, t.ndim, t.shape, d), &ctx);
        } else if (i % 3 == 1) {
            uint16_t *h = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)t.size);
            for (k = 0; k < t.size; k++) {  /* bf16 by truncation; make the model match it */
                uint32_t u;
                memcpy(&u, &t.data[k], 4);
                h[k] = (uint16_t)(u >> 16);
                u &= 0xFFFF0000u;
                memcpy(&t.data[k], &u, 4);
            }
            bufs[i] = h;
            CHECK_OK(moe_tensor_writer_add(w, t.name, MOE_DTYPE_BF16, t.ndim, t.shape, h), &ctx);
        } else {
            CHECK_OK(moe_tensor_writer_add(w, t.name, MOE_DTYPE_F32, t.ndim, t.shape, t.data), &ctx);
        }
    }
    CHECK_RESULT(moe_tensor_writer_add(w, "notes.something", MOE_DTYPE_F32, 0, NULL, x), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_OK(moe_tensor_writer_save(w, tmp("foreign.safetensors")), &ctx);
    moe_tensor_writer_destroy(w);
    for (i = 0; i < 64; i++) free(bufs[i]);
    CHECK_OK(moe_model_load(&ctx, tmp("foreign.safetensors"), 0, &b), &ctx);
    if (b) {
        moe_model_forward(a, x, 3, ya, NULL);
        moe_model_forward(b, x, 3, yb, NULL);
        CHECK(memcmp(ya, yb, sizeof ya) == 0, "F64/BF16/F32 mix loads to the same model");
        moe_model_destroy(b);
    }
    {   /* half precision conversion */
        const uint16_t h[4] = {0x3C00, 0xC000, 0x0001, 0x7BFF};  /* 1, -2, smallest subnormal, 65504 */
        moe_file_tensor t;
        float out[4];
        memset(&t, 0, sizeof t);
        t.dtype = MOE_DTYPE_F16; t.ndim = 1; t.shape[0] = 4; t.data = h; t.nbytes = 8;
        CHECK_OK(moe_file_tensor_to_f32(&ctx, &t, out, 4), &ctx);
        CHECK(out[0] == 1.0f && out[1] == -2.0f && out[2] == ldexpf(1.0f, -24) && out[3] == 65504.0f, "f16 %g %g %g %g", out[0], out[1], out[2], out[3]);
    }
    moe_model_destroy(a);
    return 0;
}

/* Build a safetensors file from a header text and n data bytes. */
static size_t craft(unsigned char *out, const char *header, size_t data_bytes) {
    size_t h = strlen(header), i;
    for (i = 0; i < 8; i++) out[i] = (unsigned char)((uint64_t)h >> (8 * i));
    memcpy(out + 8, header, h);
    memset(out + 8 + h, 0, data_bytes);
    return 8 + h + data_bytes;
}

static int test_malformed_files(void) {
    static unsigned char buf[8192];
    moe_model *m = NULL;
    moe_tensor_file *f = NULL;
    size_t n;
    struct { const char *header; size_t data; moe_result code; const char *what; } cases[] = {
        {"[]", 0, MOE_ERR_FORMAT, "header is not an object"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}", 8, MOE_ERR_FORMAT, "unterminated JSON"},
        {"{\"a\":{\"dtype\":\"F33\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, MOE_ERR_FORMAT, "unknown dtype"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, MOE_ERR_FORMAT, "size does not match shape"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,16]}}", 8, MOE_ERR_FORMAT, "offsets past the end"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8, MOE_ERR_FORMAT, "reversed offsets"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, MOE_ERR_FORMAT, "negative size"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1e3],\"data_offsets\":[0,8]}}", 8, MOE_ERR_FORMAT, "non-integer size"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,8]}}", 8, MOE_ERR_FORMAT, "huge shape"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, MOE_ERR_FORMAT, "duplicate name"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8, MOE_ERR_FORMAT, "no offsets"},
        {"{\"__metadata__\":{\"k\":3}}", 0, MOE_ERR_FORMAT, "metadata value not a string"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}} x", 8, MOE_ERR_FORMAT, "trailing garbage"},
        {"{\"a\\u0000b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, MOE_ERR_FORMAT, "NUL in a name"},
        {"{\"a\":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}", 0, MOE_ERR_FORMAT, "nested too deeply"},
    };
    struct { const char *config; moe_result code; const char *what; } configs[] = {
        {"{\"format\":\"moe.h\",\"version\":1,\"d_in\":4,\"layers\":[{\"kind\":\"dense\",\"d_out\":2}]}", MOE_ERR_FORMAT, "missing tensors"},
        {"{\"format\":\"moe.h\",\"version\":99,\"d_in\":4,\"layers\":[{\"kind\":\"dense\"}]}", MOE_ERR_UNSUPPORTED, "newer version"},
        {"{\"format\":\"other\",\"version\":1,\"d_in\":4,\"layers\":[{\"kind\":\"dense\"}]}", MOE_ERR_FORMAT, "wrong format"},
        {"{\"format\":\"moe.h\",\"version\":1,\"d_in\":4,\"layers\":[{\"kind\":\"dense\",\"experts\":3}]}", MOE_ERR_FORMAT, "field of another kind"},
        {"{\"format\":\"moe.h\",\"version\":1,\"d_in\":4,\"layers\":[{\"kind\":\"dense\",\"actvation\":\"relu\"}]}", MOE_ERR_FORMAT, "misspelt field"},
        {"{\"format\":\"moe.h\",\"version\":1,\"d_in\":4,\"layers\":[{\"kind\":\"moe\",\"experts\":2,\"top_k\":3}]}", MOE_ERR_INVALID_ARGUMENT, "k > E"},
        {"{\"format\":\"moe.h\",\"version\":1,\"d_in\":4,\"layers\":[{\"kind\":\"dense\",\"d_out\":3,\"residual\":true}]}", MOE_ERR_SHAPE, "residual width"},
        {"{\"format\":\"moe.h\",\"version\":1,\"d_in\":4,\"layers\":[]}", MOE_ERR_FORMAT, "no layers"},
        {"{\"format\":\"moe.h\",\"version\":1,\"d_in\":4,\"layers\":[{\"kind\":\"conv\"}]}", MOE_ERR_FORMAT, "unknown kind"},
        {"{\"format\":\"moe.h\",\"version\":1,\"d_in\":4,\"layers\":[{\"kind\":\"dense\",\"d_out\":1e400}]}", MOE_ERR_FORMAT, "number out of range"},
        {"not json", MOE_ERR_FORMAT, "not JSON"},
    };
    size_t i;
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        n = craft(buf, cases[i].header, cases[i].data);
        f = (moe_tensor_file *)&n;
        CHECK_RESULT(moe_tensor_file_parse(&ctx, buf, n, &f), cases[i].code, &ctx);
        CHECK(f == NULL, "%s: no file object on failure", cases[i].what);
        CHECK(strlen(moe_ctx_error(&ctx)) > 20, "%s: a message (%s)", cases[i].what, moe_ctx_error(&ctx));
    }
    /* sizes */
    CHECK_RESULT(moe_tensor_file_parse(&ctx, buf, 5, &f), MOE_ERR_FORMAT, &ctx);
    memset(buf, 0xFF, 16);
    CHECK_RESULT(moe_tensor_file_parse(&ctx, buf, 16, &f), MOE_ERR_FORMAT, &ctx);
    CHECK(strstr(moe_ctx_error(&ctx), "exceeds") != NULL, "header length checked against the file first: %s", moe_ctx_error(&ctx));
    /* configurations inside otherwise valid files */
    for (i = 0; i < sizeof configs / sizeof configs[0]; i++) {
        moe_tensor_writer *w = NULL;
        moe_tensor_writer_create(&ctx, &w);
        moe_tensor_writer_metadata(w, "moe.config", configs[i].config);
        moe_tensor_writer_save(w, tmp("cfg.safetensors"));
        moe_tensor_writer_destroy(w);
        m = (moe_model *)&n;
        CHECK_RESULT(moe_model_load(&ctx, tmp("cfg.safetensors"), 0, &m), configs[i].code, &ctx);
        CHECK(m == NULL, "%s: no model on failure", configs[i].what);
        CHECK(strstr(moe_ctx_error(&ctx), "cfg.safetensors") != NULL, "%s: the message names the file: %s", configs[i].what, moe_ctx_error(&ctx));
    }
    /* no metadata at all; a missing file; a shape mismatch */
    n = craft(buf, "{}", 0);
    CHECK_RESULT(moe_model_load_memory(&ctx, buf, n, 0, &m), MOE_ERR_FORMAT, &ctx);
    CHECK_RESULT(moe_model_load(&ctx, tmp("does-not-exist.safetensors"), 0, &m), MOE_ERR_IO, &ctx);
    {
        moe_model *a = new_model();
        moe_tensor_writer *w = NULL;
        char json[4096];
        float big[64] = {0};
        int k;
        moe_model_config_json(a, json, sizeof json);
        moe_tensor_writer_create(&ctx, &w);
        moe_tensor_writer_metadata(w, "moe.config", json);
        for (k = 0; k < moe_model_tensor_count(a); k++) {
            moe_tensor t;
            moe_model_tensor(a, k, &t);
            if (k == 1) { int64_t s[2] = {t.shape[0], t.shape[1] + 1}; moe_tensor_writer_add(w, t.name, MOE_DTYPE_F32, 2, s, big); }
            else moe_tensor_writer_add(w, t.name, MOE_DTYPE_F32, t.ndim, t.shape, t.data);
        }
        moe_tensor_writer_add(w, "layers.0.extra", MOE_DTYPE_F32, 1, (int64_t[]){1}, big);
        moe_tensor_writer_save(w, tmp("shape.safetensors"));
        moe_tensor_writer_destroy(w);
        CHECK_RESULT(moe_model_load(&ctx, tmp("shape.safetensors"), 0, &m), MOE_ERR_SHAPE, &ctx);
        moe_model_destroy(a);
    }
    return 0;
}

/* Every prefix of a valid file, and thousands of random byte edits: an error code or a valid model,
   never a crash (the ASan run of this test checks memory and leaks). */
static int test_truncation_and_mutation(void) {
    moe_model *a = new_model(), *m = NULL;
    unsigned char *f, *g;
    size_t n = 0, k;
    int i, ok = 0, bad = 0;
    if (!a) return 0;
    moe_model_save(a, tmp("fuzz.safetensors"));
    moe_model_destroy(a);
    f = test_read_file(tmp("fuzz.safetensors"), &n);
    if (!f) return 0;
    g = (unsigned char *)malloc(n);
    for (k = 0; k < n; k++) {
        moe_result r = moe_model_load_memory(&ctx, f, k, 0, &m);
        CHECK(r == MOE_ERR_FORMAT && m == NULL, "prefix of %zu of %zu bytes: %s", k, n, moe_result_string(r));
        if (m) { moe_model_destroy(m); m = NULL; }
    }
    for (i = 0; i < 3000; i++) {
        uint64_t r = moe_rng_u64(77, 1, (uint64_t)i);
        moe_result res;
        int edits = 1 + (int)(r % 4), e;
        memcpy(g, f, n);
        for (e = 0; e < edits; e++) {
            uint64_t q = moe_rng_u64(77, 2 + (uint64_t)e, (uint64_t)i);
            size_t at = (size_t)(q % (uint64_t)(q & 1 ? 600 : n));  /* favour the header */
            g[at] = (unsigned char)(q >> 32);
        }
        res = moe_model_load_memory(&ctx, g, n, 0, &m);
        if (res == MOE_OK) {
            float x[5] = {1, 2, 3, 4, 5}, y[4];
            ok++;
            moe_model_forward(m, x, 1, y, NULL);  /* must not crash either */
            moe_model_destroy(m);
            m = NULL;
        } else {
            bad++;
            CHECK(res == MOE_ERR_FORMAT || res == MOE_ERR_SHAPE || res == MOE_ERR_INVALID_ARGUMENT || res == MOE_ERR_UNSUPPORTED ||
                  res == MOE_ERR_OUT_OF_MEMORY, "mutation %d: %s", i, moe_result_string(res));
            CHECK(m == NULL, "mutation %d left a model", i);
        }
    }
    printf("    3000 mutated files: %d loaded, %d rejected\n", ok, bad);
    CHECK(bad > 500, "most mutations of the header are rejected (%d)", bad);
    free(f);
    free(g);
    return 0;
}

/* A path that names a directory is an I/O error, found before anything file-sized is allocated
   (such a "file" sizes to LONG_MAX on Linux). */
static size_t largest_allocation;
static void *tracking_alloc(size_t size, void *user) {
    (void)user;
    if (size > largest_allocation) largest_allocation = size;
    return malloc(size);
}
static void tracking_free(void *ptr, void *user) { (void)user; free(ptr); }

static int test_directory_path(void) {
    moe_ctx c;
    moe_model *m = NULL;
    moe_tensor_file *f = NULL;
    moe_ctx_init(&c, &(moe_ctx_desc){.allocator = {tracking_alloc, tracking_free, NULL}});
    largest_allocation = 0;
    CHECK_RESULT(moe_model_load(&c, TMP_DIR, 0, &m), MOE_ERR_IO, &c);
    CHECK_RESULT(moe_tensor_file_read(&c, TMP_DIR, &f), MOE_ERR_IO, &c);
    CHECK(m == NULL && f == NULL, "no object on failure");
    CHECK(largest_allocation < 4096, "reading a directory asked for %zu bytes", largest_allocation);
    return 0;
}

/* A failed save never touches the existing file. */
static int test_atomic_save(void) {
    moe_model *a = new_model();
    unsigned char *before, *after;
    size_t nb = 0, na = 0;
    if (!a) return 0;
    CHECK_OK(moe_model_save(a, tmp("keep.safetensors")), &ctx);
    before = test_read_file(tmp("keep.safetensors"), &nb);
    /* the temporary file cannot be created: a directory sits where it would go */
    remove(tmp("keep.safetensors.tmp"));
    if (test_make_dir(tmp("keep.safetensors.tmp")) != 0) return TEST_SKIP;
    moe_model_params(a, NULL)[0] += 1.0f;
    CHECK_RESULT(moe_model_save(a, tmp("keep.safetensors")), MOE_ERR_IO, &ctx);
    after = test_read_file(tmp("keep.safetensors"), &na);
    CHECK(before && after && na == nb && memcmp(before, after, nb) == 0, "the old file is intact after a failed save");
    CHECK(strstr(moe_ctx_error(&ctx), "unchanged") != NULL, "message says the file is unchanged: %s", moe_ctx_error(&ctx));
    TEST_RMDIR(tmp("keep.safetensors.tmp"));
    CHECK_RESULT(moe_model_save(a, TMP_DIR "/no/such/dir/m.safetensors"), MOE_ERR_IO, &ctx);
    /* a successful save replaces it and leaves no temporary file */
    CHECK_OK(moe_model_save(a, tmp("keep.safetensors")), &ctx);
    free(after);
    after = test_read_file(tmp("keep.safetensors"), &na);
    CHECK(after && memcmp(before, after, nb < na ? nb : na) != 0, "the new file replaced the old");
    {
        FILE *t = fopen(tmp("keep.safetensors.tmp"), "rb");
        CHECK(t == NULL, "no temporary file is left behind");
        if (t) fclose(t);
    }
    free(before);
    free(after);
    moe_model_destroy(a);
    return 0;
}

int main(void) {
    printf("test_io\n");
    if (test_make_dir(TMP_DIR) != 0) return 1;
    moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = 99});
    RUN(test_round_trip);
    RUN(test_foreign_dtypes_and_extras);
    RUN(test_malformed_files);
    RUN(test_truncation_and_mutation);
    RUN(test_atomic_save);
    RUN(test_directory_path);
    TEST_END();
}
