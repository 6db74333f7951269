/* Embedding moe.h: models in caller-owned memory (no allocation while loading into it or in
   10,000 forwards), model and tensor files saved to memory buffers, the private formatter, and
   (with a file argument) a digest of inference results that the MOE_NO_TRAINING and
   MOE_NO_STDIO builds of this program must reproduce bit for bit (tests/run_tests.sh compares). */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "test.h"

typedef struct counter { long allocs, frees; } counter;

static void *counted_alloc(size_t size, void *user) { ((counter *)user)->allocs++; return malloc(size); }
static void counted_free(void *ptr, void *user) { if (ptr) ((counter *)user)->frees++; free(ptr); }

static moe_ctx counted_ctx(counter *c, int threads) {
    moe_ctx ctx;
    moe_ctx_desc d;
    memset(&d, 0, sizeof d);
    d.seed = 7;
    d.n_threads = threads;
    d.allocator.alloc = counted_alloc;
    d.allocator.free = counted_free;
    d.allocator.user = c;
    moe_ctx_init(&ctx, &d);
    return ctx;
}

#define D_IN 16
#define MAX_T 16

/* MoE (MLP, top-k, a shared expert) -> LayerNorm -> MoE (SwiGLU, sigmoid router) -> dense 5,
   parameters moved off their initial values so that routing has no ties. */
static moe_model *make_model(moe_ctx *ctx) {
    moe_layer_desc layers[4];
    moe_model_desc md;
    moe_model *m = NULL;
    int64_t i;
    int t;
    memset(layers, 0, sizeof layers);
    memset(&md, 0, sizeof md);
    layers[0].kind = MOE_LAYER_MOE; layers[0].n_experts = 4; layers[0].top_k = 2; layers[0].max_top_k = 3;
    layers[0].d_hidden = 24; layers[0].n_shared_experts = 1; layers[0].residual = 1;
    layers[1].kind = MOE_LAYER_LAYERNORM;
    layers[2].kind = MOE_LAYER_MOE; layers[2].n_experts = 4; layers[2].top_k = 2; layers[2].expert = MOE_EXPERT_SWIGLU;
    layers[2].router = MOE_ROUTER_SIGMOID; layers[2].d_hidden = 20; layers[2].d_out = 12;
    layers[2].max_top_k = 3;
    layers[3].kind = MOE_LAYER_DENSE; layers[3].d_out = 5;
    md.d_in = D_IN; md.n_layers = 4; md.layers = layers; md.max_tokens = MAX_T;
    if (moe_model_create(ctx, &md, &m) != MOE_OK) return NULL;
    for (t = 0; t < moe_model_tensor_count(m); t++) {
        moe_tensor view;
        moe_model_tensor(m, t, &view);
        for (i = 0; i < view.size; i++) view.data[i] += 0.05f * sinf(0.37f * (float)(view.offset + i));
    }
    return m;
}

static void make_input(float *x, int64_t T, int seed) {
    int64_t i;
    for (i = 0; i < T * D_IN; i++) x[i] = cosf(0.11f * (float)(i + 1) * (float)(seed + 1));
}

/* The model's file in a new buffer (free it). */
static unsigned char *save_to_memory(moe_model *m, size_t *size) {
    unsigned char *buf;
    if (moe_model_save_memory(m, NULL, 0, size) != MOE_OK) return NULL;
    buf = (unsigned char *)malloc(*size);
    if (buf && moe_model_save_memory(m, buf, *size, size) != MOE_OK) { free(buf); return NULL; }
    return buf;
}

static int test_save_memory(void) {
    counter c = {0, 0};
    moe_ctx ctx = counted_ctx(&c, 1);
    moe_model *m = make_model(&ctx), *back = NULL;
    size_t size = 0, size2 = 0, i;
    unsigned char *buf, *small;
    CHECK(m != NULL, "%s", moe_ctx_error(&ctx));
    if (!m) return 0;
    CHECK_OK(moe_model_save_memory(m, NULL, 0, &size), &ctx);
    CHECK(size > 1000, "size %zu", size);
    buf = (unsigned char *)malloc(size);
    small = (unsigned char *)malloc(size);
    memset(small, 0xAB, size);
    CHECK_RESULT(moe_model_save_memory(m, small, size - 1, &size2), MOE_ERR_OUT_OF_MEMORY, &ctx);
    CHECK(size2 == size, "too small: size %zu, expected %zu", size2, size);
    CHECK(strstr(moe_ctx_error(&ctx), "bytes") != NULL, "message: %s", moe_ctx_error(&ctx));
    for (i = 0; i < size; i++) if (small[i] != 0xAB) break;
    CHECK(i == size, "a refused save wrote byte %zu", i);
    CHECK_RESULT(moe_model_save_memory(m, buf, size, NULL), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_OK(moe_model_save_memory(m, buf, size, &size2), &ctx);
    CHECK(size2 == size, "%zu vs %zu", size2, size);
    CHECK_OK(moe_model_load_memory(&ctx, buf, size, 0, &back), &ctx);
    if (back) {
        int64_t n, k;
        const float *a = moe_model_params(m, &n), *b = moe_model_params(back, NULL);
        for (k = 0; k < n && a[k] == b[k]; k++) {}
        CHECK(k == n, "parameter %lld differs after the round trip", (long long)k);
    }
#ifndef MOE_NO_STDIO
    {   /* the same bytes as a file save */
        char path[512];
        FILE *f;
        unsigned char *file = (unsigned char *)malloc(size + 1);
        size_t got = 0;
        snprintf(path, sizeof path, "%s/embed_save.safetensors", TMP_DIR);
        TEST_MKDIR(TMP_DIR);
        CHECK_OK(moe_model_save(m, path), &ctx);
        f = fopen(path, "rb");
        if (f) { got = fread(file, 1, size + 1, f); fclose(f); }
        CHECK(got == size && memcmp(file, buf, size) == 0, "file of %zu bytes differs from the %zu bytes saved to memory", got, size);
        remove(path);
        free(file);
    }
#endif
#ifndef MOE_NO_TRAINING
    {   /* checkpoints too: a resumed model trains on bit for bit */
        float x[4 * D_IN];
        int32_t labels[4] = {0, 3, 1, 4};
        moe_target target;
        moe_model *resumed = NULL;
        unsigned char *ck;
        size_t ck_size = 0;
        int64_t n, k;
        memset(&target, 0, sizeof target);
        target.labels = labels;
        make_input(x, 4, 1);
        CHECK_OK(moe_model_train_step(m, x, &target, 4, NULL), &ctx);
        CHECK_OK(moe_model_save_checkpoint_memory(m, NULL, 0, &ck_size), &ctx);
        ck = (unsigned char *)malloc(ck_size);
        CHECK_OK(moe_model_save_checkpoint_memory(m, ck, ck_size, &ck_size), &ctx);
        CHECK_OK(moe_model_load_checkpoint_memory(&ctx, ck, ck_size, 0, &resumed), &ctx);
        if (resumed) {
            const float *a = moe_model_params(m, &n), *b;
            CHECK_OK(moe_model_train_step(m, x, &target, 4, NULL), &ctx);
            CHECK_OK(moe_model_train_step(resumed, x, &target, 4, NULL), &ctx);
            b = moe_model_params(resumed, NULL);
            for (k = 0; k < n && a[k] == b[k]; k++) {}
            CHECK(k == n, "the resumed model differs at parameter %lld", (long long)k);
        }
        moe_model_destroy(resumed);
        free(ck);
    }
#endif
    {   /* the tensor writer alone */
        moe_tensor_writer *w = NULL;
        moe_tensor_file *f = NULL;
        float v[3] = {1.5f, -2.0f, 3.25f}, out[3] = {0, 0, 0};
        int64_t shape[1] = {3};
        unsigned char tb[256];
        size_t tsize = 0;
        CHECK_OK(moe_tensor_writer_create(&ctx, &w), &ctx);
        CHECK_OK(moe_tensor_writer_add(w, "v", MOE_DTYPE_F32, 1, shape, v), &ctx);
        CHECK_OK(moe_tensor_writer_save_memory(w, NULL, 0, &tsize), &ctx);
        CHECK(tsize > 8 && tsize <= sizeof tb, "size %zu", tsize);
        CHECK_RESULT(moe_tensor_writer_save_memory(w, tb, 8, &tsize), MOE_ERR_OUT_OF_MEMORY, &ctx);
        CHECK_OK(moe_tensor_writer_save_memory(w, tb, sizeof tb, &tsize), &ctx);
        CHECK_OK(moe_tensor_file_parse(&ctx, tb, tsize, &f), &ctx);
        if (f) CHECK_OK(moe_file_tensor_to_f32(&ctx, moe_tensor_file_find(f, "v"), out, 3), &ctx);
        CHECK(out[0] == 1.5f && out[1] == -2.0f && out[2] == 3.25f, "read back %g %g %g", out[0], out[1], out[2]);
        moe_tensor_file_close(f);
        moe_tensor_writer_destroy(w);
    }
    moe_model_destroy(back);
    moe_model_destroy(m);
    free(buf);
    free(small);
    CHECK(c.allocs == c.frees, "%ld allocations, %ld frees", c.allocs, c.frees);
    return 0;
}

/* Caller-owned memory: init and 10,000 forwards without one allocator call, results equal to a
   model loaded on the heap, and clear errors for a buffer too small or misaligned. */
static int test_caller_memory(void) {
    counter c = {0, 0};
    moe_ctx ctx = counted_ctx(&c, 1);
    moe_model *m = make_model(&ctx), *heap = NULL, *mine = NULL, *bad = NULL;
    size_t size = 0, need = 0;
    unsigned char *file = m ? save_to_memory(m, &size) : NULL;
    char *memory;
    long allocs, frees, f;
    float x[MAX_T * D_IN], y_heap[MAX_T * 5], y_mine[MAX_T * 5];
    int32_t cls_heap[MAX_T], cls_mine[MAX_T];
    int diffs = 0;
    CHECK(file != NULL, "%s", moe_ctx_error(&ctx));
    if (!file) { moe_model_destroy(m); return 0; }
    CHECK_OK(moe_model_memory_size(&ctx, file, size, 0, &need), &ctx);
    CHECK(need > size, "needs %zu bytes for a file of %zu", need, size);
    memory = (char *)malloc(need + 64);
    CHECK_OK(moe_model_load_memory(&ctx, file, size, 0, &heap), &ctx);
    /* too small, misaligned: refused with a message, nothing allocated */
    allocs = c.allocs;
    CHECK_RESULT(moe_model_init_memory(&ctx, file, size, 0, memory, need - 1, &bad), MOE_ERR_OUT_OF_MEMORY, &ctx);
    CHECK(strstr(moe_ctx_error(&ctx), "too small") != NULL, "message: %s", moe_ctx_error(&ctx));
    CHECK_RESULT(moe_model_init_memory(&ctx, file, size, 0, memory + 8, need, &bad), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK(strstr(moe_ctx_error(&ctx), "aligned") != NULL, "message: %s", moe_ctx_error(&ctx));
    CHECK_RESULT(moe_model_init_memory(&ctx, file, size, 0, NULL, need, &bad), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(moe_model_init_memory(&ctx, file, 100, 0, memory, need, &bad), MOE_ERR_FORMAT, &ctx);
    CHECK(bad == NULL, "a failed init returned a model");
    /* exactly the size asked for */
    CHECK_OK(moe_model_init_memory(&ctx, file, size, 0, memory, need, &mine), &ctx);
    CHECK(c.allocs == allocs, "%ld allocations while loading into caller memory", c.allocs - allocs);
    if (!mine || !heap) goto done;
    make_input(x, MAX_T, 2);
    CHECK_OK(moe_model_forward(heap, x, MAX_T, y_heap, NULL), &ctx);
    CHECK_OK(moe_model_forward(mine, x, MAX_T, y_mine, NULL), &ctx);
    CHECK(memcmp(y_heap, y_mine, sizeof y_heap) == 0, "caller-memory forward differs from the heap model's");
    CHECK_OK(moe_model_predict(heap, x, MAX_T, cls_heap), &ctx);
    CHECK_OK(moe_model_predict(mine, x, MAX_T, cls_mine), &ctx);
    CHECK(memcmp(cls_heap, cls_mine, sizeof cls_heap) == 0, "predictions differ");
    {
        moe_stats a, b;
        CHECK_OK(moe_model_stats(heap, 2, &a), &ctx);
        CHECK_OK(moe_model_stats(mine, 2, &b), &ctx);
        CHECK(a.load_cv == b.load_cv && a.router_entropy == b.router_entropy && a.tokens_per_expert[1] == b.tokens_per_expert[1], "stats differ");
    }
    /* the game loop: 10,000 single-token inferences, k changing per call */
    allocs = c.allocs;
    frees = c.frees;
    for (f = 0; f < 10000; f++) {
        moe_forward_opts opts;
        memset(&opts, 0, sizeof opts);
        opts.top_k = (int)(1 + f % 3);
        if (moe_model_forward(mine, x + (f % MAX_T) * D_IN, 1, NULL, &opts) != MOE_OK) { diffs++; break; }
        if (f % 1000 == 0) {
            float y1[5];
            moe_model_forward(heap, x + (f % MAX_T) * D_IN, 1, y1, &opts);
            if (memcmp(y1, moe_model_output(mine), sizeof y1) != 0) diffs++;
        }
    }
    CHECK(diffs == 0, "%d of the sampled frames differ or failed: %s", diffs, moe_ctx_error(&ctx));
    CHECK(c.allocs - allocs == 0 && c.frees - frees == 0, "%ld allocations, %ld frees in 10,000 forwards",
          c.allocs - allocs, c.frees - frees);
    CHECK_RESULT(moe_model_quantize(mine, MOE_DTYPE_BF16), MOE_ERR_STATE, &ctx);
    CHECK_RESULT(moe_model_forward(mine, x, MAX_T + 1, NULL, NULL), MOE_ERR_TOO_MANY_TOKENS, &ctx);
    frees = c.frees;
    moe_model_destroy(mine);
    CHECK(c.frees == frees, "destroy freed caller memory");
    {   /* two threads: a block of its own size, the same bits */
        counter c2 = {0, 0};
        moe_ctx ctx2 = counted_ctx(&c2, 2);
        moe_model *two = NULL;
        size_t need2 = 0;
        char *mem2;
        CHECK_OK(moe_model_memory_size(&ctx2, file, size, 0, &need2), &ctx2);
        mem2 = (char *)malloc(need2);
        CHECK_OK(moe_model_init_memory(&ctx2, file, size, 0, mem2, need2, &two), &ctx2);
        if (two) {
            CHECK_OK(moe_model_forward(heap, x, MAX_T, y_heap, NULL), &ctx);
            CHECK_OK(moe_model_forward(two, x, MAX_T, y_mine, NULL), &ctx2);
            CHECK(memcmp(y_heap, y_mine, sizeof y_heap) == 0, "2 threads in caller memory differ from 1 thread");
        }
        moe_model_destroy(two);
        free(mem2);
        CHECK(c2.allocs == c2.frees, "%ld allocations, %ld frees", c2.allocs, c2.frees);
    }
    {   /* a file with reduced-precision expert weights runs as the quantized heap model */
        unsigned char *qfile;
        size_t qsize = 0, qneed = 0;
        char *qmem;
        moe_model *q = NULL;
        CHECK_OK(moe_model_quantize(heap, MOE_DTYPE_I8), &ctx);
        qfile = save_to_memory(heap, &qsize);
        CHECK(qfile != NULL, "%s", moe_ctx_error(&ctx));
        if (qfile && moe_model_memory_size(&ctx, qfile, qsize, 4, &qneed) == MOE_OK) {
            qmem = (char *)malloc(qneed);
            allocs = c.allocs;
            CHECK_OK(moe_model_init_memory(&ctx, qfile, qsize, 4, qmem, qneed, &q), &ctx);
            CHECK(c.allocs == allocs, "allocations while loading into caller memory");
            if (q) {
                CHECK_OK(moe_model_forward(heap, x, 4, y_heap, NULL), &ctx);
                CHECK_OK(moe_model_forward(q, x, 4, y_mine, NULL), &ctx);
                CHECK(memcmp(y_heap, y_mine, 4 * 5 * sizeof(float)) == 0, "int8 model in caller memory differs");
            }
            moe_model_destroy(q);
            free(qmem);
        }
        free(qfile);
    }
done:
    moe_model_destroy(heap);
    moe_model_destroy(m);
    free(memory);
    free(file);
    CHECK(c.allocs == c.frees, "%ld allocations, %ld frees", c.allocs, c.frees);
    return 0;
}

/* moe__format against the C library's snprintf on what moe.h formats. */
static int test_format(void) {
    char a[160], b[160];
    double v[] = {0.0, -0.0, 1e-8, 0.001, 0.9, 0.999, 1.25, 123456.5, 1e21, -3.5e-7, 1.0 / 3.0, 2.5, 1e-300, 65536.0};
    int i, p;
    for (i = 0; i < (int)(sizeof v / sizeof v[0]); i++)
        for (p = 1; p <= 9; p++) {
            snprintf(a, sizeof a, "%.*g|%g|%.3g", p, v[i], v[i], v[i]);
            moe__format(b, sizeof b, "%.*g|%g|%.3g", p, v[i], v[i], v[i]);
            CHECK(strcmp(a, b) == 0, "\"%s\" vs libc \"%s\"", b, a);
        }
    for (i = 0; i < 20000; i++) {   /* floats as the config writer prints them */
        uint32_t bits = (uint32_t)moe_rng_u64(1, 2, (uint64_t)i);
        float f;
        memcpy(&f, &bits, sizeof f);
        if (!moe__finite(f)) continue;
        snprintf(a, sizeof a, "%.*g", 6 + i % 4, (double)f);
        moe__format(b, sizeof b, "%.*g", 6 + i % 4, (double)f);
        if (strcmp(a, b) != 0) { CHECK(0, "\"%s\" vs libc \"%s\"", b, a); break; }
    }
    snprintf(a, sizeof a, "%d %5d|%-4d|%04x %lld %llu %zu %lu %s %.3s|%c%%", -7, 42, 3, 0x1fu, -9000000000LL,
             18446744073709551615ULL, (size_t)77, 123456ul, "str", "abcdef", 'z');
    moe__format(b, sizeof b, "%d %5d|%-4d|%04x %lld %llu %zu %lu %s %.3s|%c%%", -7, 42, 3, 0x1fu, -9000000000LL,
                18446744073709551615ULL, (size_t)77, 123456ul, "str", "abcdef", 'z');
    CHECK(strcmp(a, b) == 0, "\"%s\" vs libc \"%s\"", b, a);
    CHECK(moe__format(b, 6, "%s", "0123456789") == 10 && strcmp(b, "01234") == 0, "cut: \"%s\"", b);
    return 0;
}

/* 64-bit FNV-1a */
static uint64_t fnv(uint64_t h, const void *data, size_t n) {
    const unsigned char *p = (const unsigned char *)data;
    size_t i;
    for (i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

/* Inference results of this build, for the comparison between builds. */
static const char *digest_path;

static int test_digest(void) {
    counter c = {0, 0};
    moe_ctx ctx = counted_ctx(&c, 1);
    moe_model *m = make_model(&ctx), *loaded = NULL;
    size_t size = 0;
    unsigned char *file = m ? save_to_memory(m, &size) : NULL;
    uint64_t h[6] = {0, 0, 0, 0, 0, 0};
    float x[7 * D_IN], y[7 * 5];
    int32_t cls[7];
    int q;
    moe_forward_opts opts;
    CHECK(file != NULL, "%s", moe_ctx_error(&ctx));
    if (!file) { moe_model_destroy(m); return 0; }
    h[0] = fnv(0xcbf29ce484222325ull, file, size);
    CHECK_OK(moe_model_load_memory(&ctx, file, size, 8, &loaded), &ctx);
    if (!loaded) goto done;
    make_input(x, 7, 3);
    CHECK_OK(moe_model_forward(loaded, x, 7, y, NULL), &ctx);
    h[1] = fnv(0xcbf29ce484222325ull, y, sizeof y);
    CHECK_OK(moe_model_predict(loaded, x, 7, cls), &ctx);
    h[2] = fnv(0xcbf29ce484222325ull, cls, sizeof cls);
    for (q = 0; q < 4; q += 2) {
        moe_stats s;
        CHECK_OK(moe_model_stats(loaded, q, &s), &ctx);
        h[3] = fnv(h[3] ? h[3] : 0xcbf29ce484222325ull, s.tokens_per_expert, (size_t)s.n_experts * sizeof(int64_t));
        h[3] = fnv(h[3], &s.load_cv, sizeof s.load_cv);
        h[3] = fnv(h[3], &s.router_entropy, sizeof s.router_entropy);
    }
    memset(&opts, 0, sizeof opts);
    opts.top_k = 3;
    opts.training = 1;
#ifdef MOE_NO_TRAINING
    CHECK_RESULT(moe_model_forward(loaded, x, 7, y, &opts), MOE_ERR_UNSUPPORTED, &ctx);
#endif
    opts.training = 0;
    CHECK_OK(moe_model_forward(loaded, x, 7, y, &opts), &ctx);
    h[4] = fnv(0xcbf29ce484222325ull, y, sizeof y);
    CHECK_OK(moe_model_quantize(loaded, MOE_DTYPE_BF16), &ctx);
    CHECK_OK(moe_model_forward(loaded, x, 7, y, NULL), &ctx);
    h[5] = fnv(0xcbf29ce484222325ull, y, sizeof y);
    CHECK_OK(moe_model_quantize(loaded, MOE_DTYPE_I8), &ctx);
    CHECK_OK(moe_model_forward(loaded, x, 7, y, NULL), &ctx);
    h[5] = fnv(h[5], y, sizeof y);
    printf("    file %016llx forward %016llx predict %016llx stats %016llx k=3 %016llx quantized %016llx\n",
           (unsigned long long)h[0], (unsigned long long)h[1], (unsigned long long)h[2], (unsigned long long)h[3],
           (unsigned long long)h[4], (unsigned long long)h[5]);
    if (digest_path) {
        FILE *f = fopen(digest_path, "w");
        CHECK(f != NULL, "cannot write %s", digest_path);
        if (f) {
            for (q = 0; q < 6; q++) fprintf(f, "%016llx\n", (unsigned long long)h[q]);
            fclose(f);
        }
    }
done:
    moe_model_destroy(loaded);
    moe_model_destroy(m);
    free(file);
    return 0;
}

int main(int argc, char **argv) {
    digest_path = argc > 1 ? argv[1] : NULL;
    RUN(test_save_memory);
    RUN(test_caller_memory);
    RUN(test_format);
    RUN(test_digest);
    TEST_END();
}
