/* Hugging Face MoE blocks (moe_layer_import_hf, moe_model_import_hf): the fixtures of
   tests/ref/gen_hf.py, PyTorch re-implementations of Mixtral, Qwen2-MoE and DeepSeek-V3 blocks
   from the models' published equations, against our forward; hyper-parameters from config.json or
   the desc; block prefixes; and every kind of bad file or configuration. */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "test.h"

#ifndef TMP_DIR
#define TMP_DIR "build/tmp_test_hf"
#endif
#define FIXTURE_DIR "tests/ref/hf"
/* fixture outputs are float64 results stored as float32 (|y| < 1); our float32 forward differs by
   rounding only (measured: <= 1.2e-7) */
#define HF_RTOL 1e-4
#define HF_ATOL 1e-5

static const char *const cases[3] = {"mixtral", "qwen2_moe", "deepseek_v3"};

static moe_ctx ctx;

static char *read_text(const char *path) {
    size_t n;
    unsigned char *b = test_read_file(path, &n);
    if (b) b[n] = 0;
    return (char *)b;
}

/* The fixture of case c: its checkpoint (parsed), config.json text, x, y and T. */
typedef struct fixture {
    moe_tensor_file *file, *io;
    char *config;
    float *x, *y;
    int64_t T, d;
} fixture;

static int fixture_open(int c, fixture *fx) {
    char path[256];
    const moe_file_tensor *x, *y;
    memset(fx, 0, sizeof *fx);
    snprintf(path, sizeof path, "%s/%s.safetensors", FIXTURE_DIR, cases[c]);
    if (moe_tensor_file_read(&ctx, path, &fx->file) != MOE_OK) { fprintf(stderr, "%s\n", moe_ctx_error(&ctx)); return 0; }
    snprintf(path, sizeof path, "%s/%s.io.safetensors", FIXTURE_DIR, cases[c]);
    if (moe_tensor_file_read(&ctx, path, &fx->io) != MOE_OK) return 0;
    snprintf(path, sizeof path, "%s/%s.config.json", FIXTURE_DIR, cases[c]);
    if (!(fx->config = read_text(path))) return 0;
    x = moe_tensor_file_find(fx->io, "x");
    y = moe_tensor_file_find(fx->io, "y");
    if (!x || !y || x->ndim != 2) return 0;
    fx->T = x->shape[0];
    fx->d = x->shape[1];
    fx->x = (float *)malloc(sizeof(float) * (size_t)(fx->T * fx->d));
    fx->y = (float *)malloc(sizeof(float) * (size_t)(fx->T * fx->d));
    return moe_file_tensor_to_f32(&ctx, x, fx->x, fx->T * fx->d) == MOE_OK && moe_file_tensor_to_f32(&ctx, y, fx->y, fx->T * fx->d) == MOE_OK;
}

static void fixture_close(fixture *fx) {
    moe_tensor_file_close(fx->file);
    moe_tensor_file_close(fx->io);
    free(fx->config);
    free(fx->x);
    free(fx->y);
}

/* Import with hd, run the forward, compare with the fixture; out (may be NULL) gets y. */
static void check_block(const fixture *fx, const moe_hf_desc *hd, const char *what, float *out) {
    moe_layer *l = NULL;
    float *y = (float *)malloc(sizeof(float) * (size_t)(fx->T * fx->d));
    long where;
    double worst;
    CHECK_OK(moe_layer_import_hf(&ctx, fx->file, hd, fx->T, &l), &ctx);
    if (l) {
        CHECK(moe_layer_get_desc(l)->d_in == fx->d && moe_layer_get_desc(l)->d_out == fx->d, "%s: widths", what);
        CHECK_OK(moe_layer_forward(l, fx->x, fx->T, y, NULL), &ctx);
        worst = test_worst(y, fx->y, (long)(fx->T * fx->d), HF_RTOL, HF_ATOL, &where);
        CHECK(worst <= 1.0, "%s: y[%ld] = %.8f, PyTorch %.8f (%.2f x tolerance)", what, where, where >= 0 ? y[where] : 0.0,
              where >= 0 ? fx->y[where] : 0.0, worst);
        if (out) memcpy(out, y, sizeof(float) * (size_t)(fx->T * fx->d));
    }
    moe_layer_destroy(l);
    free(y);
}

/* Each block with its config.json, on 1 and 2 threads (bitwise the same), and as a model. */
static int test_blocks(void) {
    int c;
    for (c = 0; c < 3; c++) {
        fixture fx;
        moe_hf_desc hd;
        moe_model *m = NULL;
        float *y1, *y2, *ym;
        int threads;
        if (!fixture_open(c, &fx)) { CHECK(0, "fixture %s missing (run tests/ref/gen_hf.py)", cases[c]); fixture_close(&fx); continue; }
        y1 = (float *)calloc((size_t)(fx.T * fx.d), sizeof(float));
        y2 = (float *)calloc((size_t)(fx.T * fx.d), sizeof(float));
        ym = (float *)calloc((size_t)(fx.T * fx.d), sizeof(float));
        memset(&hd, 0, sizeof hd);
        hd.config_json = fx.config;
        for (threads = 1; threads <= 2; threads++) {
            moe_ctx_init(&ctx, &(moe_ctx_desc){.n_threads = threads});
            check_block(&fx, &hd, cases[c], threads == 1 ? y1 : y2);
        }
        CHECK(memcmp(y1, y2, sizeof(float) * (size_t)(fx.T * fx.d)) == 0, "%s: 1 and 2 threads differ", cases[c]);
        CHECK_OK(moe_model_import_hf(&ctx, fx.file, &hd, fx.T, &m), &ctx);
        if (m) {
            CHECK(moe_model_get_desc(m)->loss == MOE_LOSS_MSE && moe_model_get_desc(m)->n_layers == 1, "%s: model desc", cases[c]);
            CHECK_OK(moe_model_forward(m, fx.x, fx.T, ym, NULL), &ctx);
            CHECK(memcmp(y2, ym, sizeof(float) * (size_t)(fx.T * fx.d)) == 0, "%s: the model differs from the layer", cases[c]);
        }
        moe_model_destroy(m);
        free(y1);
        free(y2);
        free(ym);
        fixture_close(&fx);
    }
    return 0;
}

/* Our tensor (and expert index) for a block tensor named rel relative to the block prefix. */
static int our_tensor(const char *rel, char *ours, size_t cap, int *index) {
    static const char *const projs[6] = {"w1", "w3", "w2", "gate_proj", "up_proj", "down_proj"};
    static const char *const mine[3] = {"w1", "w3", "w2"};
    char proj[32];
    int e, n = 0, j;
    *index = 0;
    if (strcmp(rel, "gate.weight") == 0) { snprintf(ours, cap, "router.weight"); return 1; }
    if (strcmp(rel, "gate.e_score_correction_bias") == 0) { snprintf(ours, cap, "router.selection_bias"); return 1; }
    if (strcmp(rel, "shared_expert_gate.weight") == 0) { snprintf(ours, cap, "shared.gate.weight"); return 1; }
    if (sscanf(rel, "experts.%d.%31[a-z_0-9].weight%n", &e, proj, &n) == 2 && rel[n] == 0) *index = e;
    else if (sscanf(rel, "shared_expert.%31[a-z_0-9].weight%n", proj, &n) == 1 && rel[n] == 0) e = -1;
    else if (sscanf(rel, "shared_experts.%31[a-z_0-9].weight%n", proj, &n) == 1 && rel[n] == 0) e = -1;
    else return 0;
    for (j = 0; j < 6; j++)
        if (strcmp(proj, projs[j]) == 0) { snprintf(ours, cap, "%s.%s.weight", e >= 0 ? "experts" : "shared", mine[j % 3]); return 1; }
    return 0;
}

/* Backward of sum(y * dy) after an inference forward: dx and every parameter gradient against
   PyTorch's autograd through the same block (routing choices constant). */
static int test_gradients(void) {
    int c;
    for (c = 0; c < 3; c++) {
        fixture fx;
        moe_hf_desc hd;
        moe_layer *l = NULL;
        int64_t n = 0, i;
        long where;
        float *y, *dy, *dx, *want;
        int checked = 0;
        if (!fixture_open(c, &fx)) { CHECK(0, "fixture %s missing", cases[c]); fixture_close(&fx); continue; }
        memset(&hd, 0, sizeof hd);
        hd.config_json = fx.config;
        n = fx.T * fx.d;
        y = (float *)malloc(sizeof(float) * (size_t)n);
        dy = (float *)malloc(sizeof(float) * (size_t)n);
        dx = (float *)malloc(sizeof(float) * (size_t)n);
        want = (float *)malloc(sizeof(float) * 4096);
        CHECK_OK(moe_layer_import_hf(&ctx, fx.file, &hd, fx.T, &l), &ctx);
        CHECK_OK(moe_file_tensor_to_f32(&ctx, moe_tensor_file_find(fx.io, "dy"), dy, n), &ctx);
        if (l) {
            CHECK_OK(moe_layer_forward(l, fx.x, fx.T, y, NULL), &ctx);
            CHECK_OK(moe_layer_backward(l, dy, dx, 0), &ctx);
            CHECK_OK(moe_file_tensor_to_f32(&ctx, moe_tensor_file_find(fx.io, "dx"), want, n), &ctx);
            CHECK(test_worst(dx, want, (long)n, HF_RTOL, HF_ATOL, &where) <= 1.0, "%s: dx[%ld] %.8f, PyTorch %.8f", cases[c], where,
                  where >= 0 ? dx[where] : 0.0, where >= 0 ? want[where] : 0.0);
            for (i = 0; i < moe_tensor_file_count(fx.io); i++) {
                const moe_file_tensor *t = moe_tensor_file_get(fx.io, i);
                char ours[64];
                int index, k;
                int64_t m = t->ndim == 2 ? t->shape[0] * t->shape[1] : t->shape[0];
                if (strncmp(t->name, "grad.", 5) != 0) continue;
                CHECK(our_tensor(t->name + 5, ours, sizeof ours, &index), "%s: %s maps to no tensor", cases[c], t->name);
                if (m > 4096 || moe_file_tensor_to_f32(&ctx, t, want, m) != MOE_OK) { CHECK(0, "%s: %s", cases[c], t->name); continue; }
                for (k = 0; k < moe_layer_tensor_count(l); k++) {
                    moe_tensor lt;
                    moe_layer_tensor(l, k, &lt);
                    if (strcmp(lt.name, ours) != 0) continue;
                    CHECK(test_worst(lt.grad + index * m, want, (long)m, HF_RTOL, HF_ATOL, &where) <= 1.0,
                          "%s: d/d %s[%d] (%s) element %ld: %.8f, PyTorch %.8f", cases[c], ours, index, t->name, where,
                          where >= 0 ? lt.grad[index * m + where] : 0.0, where >= 0 ? want[where] : 0.0);
                    checked++;
                }
            }
            CHECK(checked >= 3 * moe_layer_get_desc(l)->n_experts + 1, "%s: only %d gradients compared", cases[c], checked);
        }
        moe_layer_destroy(l);
        free(y);
        free(dy);
        free(dx);
        free(want);
        fixture_close(&fx);
    }
    return 0;
}

/* What maps to what: the layer's desc and a few tensors against the file's. */
static int test_mapping(void) {
    fixture fx;
    moe_hf_desc hd;
    moe_layer *l = NULL;
    moe_tensor t;
    float v[32];
    int i;
    memset(&hd, 0, sizeof hd);
    if (!fixture_open(2, &fx)) { CHECK(0, "fixture missing"); fixture_close(&fx); return 0; }
    hd.config_json = fx.config;
    CHECK_OK(moe_layer_import_hf(&ctx, fx.file, &hd, 4, &l), &ctx);
    if (l) {
        const moe_layer_desc *d = moe_layer_get_desc(l);
        CHECK(d->router == MOE_ROUTER_SIGMOID && d->n_experts == 8 && d->top_k == 2 && d->n_groups == 4 && d->top_k_groups == 2 &&
              d->routed_scaling_factor == 2.5f && d->renormalize == MOE_FLAG_ON && d->expert == MOE_EXPERT_SWIGLU && d->d_hidden == 4 &&
              d->n_shared_experts == 1 && d->d_shared_hidden == 8 && d->shared_gate == MOE_FLAG_OFF && d->bias == MOE_FLAG_OFF &&
              d->bias_update_rate == 0.0f, "deepseek_v3 desc");
        for (i = 0; i < moe_layer_tensor_count(l); i++) {
            CHECK_OK(moe_layer_tensor(l, i, &t), &ctx);
            if (strcmp(t.name, "router.selection_bias") == 0) {
                CHECK_OK(moe_file_tensor_to_f32(&ctx, moe_tensor_file_find(fx.file, "model.layers.1.mlp.gate.e_score_correction_bias"), v, 8), &ctx);
                CHECK(memcmp(v, t.data, 8 * sizeof(float)) == 0, "selection bias = e_score_correction_bias");
            }
            if (strcmp(t.name, "experts.w2.weight") == 0) {
                CHECK_OK(moe_file_tensor_to_f32(&ctx, moe_tensor_file_find(fx.file, "model.layers.1.mlp.experts.5.down_proj.weight"), v, 32), &ctx);
                CHECK(memcmp(v, t.data + 5 * 8 * 4, sizeof v) == 0, "experts.w2.weight[5] = experts.5.down_proj.weight");
            }
        }
    }
    moe_layer_destroy(l);
    fixture_close(&fx);
    return 0;
}

/* No config.json: the arch from the tensor names and the hyper-parameters from the desc. */
static int test_without_config(void) {
    fixture fx;
    moe_hf_desc hd;
    moe_layer *l = NULL;
    if (fixture_open(0, &fx)) {
        memset(&hd, 0, sizeof hd);
        CHECK_RESULT(moe_layer_import_hf(&ctx, fx.file, &hd, fx.T, &l), MOE_ERR_INVALID_ARGUMENT, &ctx);  /* top_k unknown */
        CHECK(l == NULL && strstr(moe_ctx_error(&ctx), "top_k"), "error names top_k: %s", moe_ctx_error(&ctx));
        CHECK_RESULT(moe_layer_import_hf(&ctx, fx.file, NULL, fx.T, &l), MOE_ERR_INVALID_ARGUMENT, &ctx);
        hd.top_k = 2;
        check_block(&fx, &hd, "mixtral, top_k from the desc", NULL);
        hd.prefix = "model.layers.1.";
        check_block(&fx, &hd, "mixtral, decoder-layer prefix", NULL);
        hd.prefix = "model.layers.1.block_sparse_moe.";
        hd.arch = MOE_HF_MIXTRAL;
        check_block(&fx, &hd, "mixtral, block prefix", NULL);
        hd.prefix = "model.layers.7.";
        CHECK_RESULT(moe_layer_import_hf(&ctx, fx.file, &hd, fx.T, &l), MOE_ERR_FORMAT, &ctx);
        hd.prefix = NULL;
        hd.n_groups = 2;
        CHECK_RESULT(moe_layer_import_hf(&ctx, fx.file, &hd, fx.T, &l), MOE_ERR_INVALID_ARGUMENT, &ctx);  /* groups: deepseek only */
    } else CHECK(0, "fixture missing");
    fixture_close(&fx);
    if (fixture_open(2, &fx)) {
        memset(&hd, 0, sizeof hd);
        hd.top_k = 2;
        hd.n_groups = 4;
        hd.top_k_groups = 2;
        hd.routed_scaling_factor = 2.5f;
        check_block(&fx, &hd, "deepseek_v3, everything from the desc", NULL);
        hd.prefix = "model.layers.0.";  /* the dense layer */
        CHECK_RESULT(moe_layer_import_hf(&ctx, fx.file, &hd, fx.T, &l), MOE_ERR_FORMAT, &ctx);
        hd.prefix = NULL;
        hd.top_k_groups = 1;  /* one group of 2 experts cannot hold k = 3 */
        hd.top_k = 3;
        CHECK_RESULT(moe_layer_import_hf(&ctx, fx.file, &hd, fx.T, &l), MOE_ERR_INVALID_ARGUMENT, &ctx);
    } else CHECK(0, "fixture missing");
    fixture_close(&fx);
    if (fixture_open(1, &fx)) {
        memset(&hd, 0, sizeof hd);
        hd.top_k = 2;  /* norm_topk_prob defaults to off for qwen2_moe, as the fixture */
        check_block(&fx, &hd, "qwen2_moe, arch from the names", NULL);
    } else CHECK(0, "fixture missing");
    fixture_close(&fx);
    return 0;
}

/* config.json that disagrees with the tensors or is not for this import. */
static int test_bad_config(void) {
    static const struct { const char *json; moe_result want; } bad[] = {
        {"{\"model_type\":\"mixtral\",\"num_experts_per_tok\":2,\"num_local_experts\":5}", MOE_ERR_SHAPE},
        {"{\"model_type\":\"mixtral\",\"num_experts_per_tok\":2,\"hidden_size\":9}", MOE_ERR_SHAPE},
        {"{\"model_type\":\"mixtral\",\"num_experts_per_tok\":2,\"intermediate_size\":11}", MOE_ERR_SHAPE},
        {"{\"model_type\":\"mixtral\",\"num_experts_per_tok\":2,\"hidden_act\":\"gelu\"}", MOE_ERR_UNSUPPORTED},
        {"{\"model_type\":\"mixtral\",\"num_experts_per_tok\":5}", MOE_ERR_FORMAT},
        {"{\"model_type\":\"mixtral\",\"num_experts_per_tok\":1.5}", MOE_ERR_FORMAT},
        {"{\"model_type\":\"mixtral\",\"num_experts_per_tok\":\"2\"}", MOE_ERR_FORMAT},
        {"{\"model_type\":\"llama\",\"num_experts_per_tok\":2}", MOE_ERR_UNSUPPORTED},
        {"{\"model_type\":\"mixtral\",\"num_experts_per_tok\":2", MOE_ERR_FORMAT},
        {"[1, 2]", MOE_ERR_FORMAT},
        {"{\"model_type\":\"deepseek_v3\",\"num_experts_per_tok\":2}", MOE_ERR_FORMAT},  /* no e_score_correction_bias */
        {"{\"model_type\":\"qwen2_moe\",\"num_experts_per_tok\":2}", MOE_ERR_FORMAT},    /* no gate_proj */
    };
    fixture fx;
    moe_hf_desc hd;
    moe_layer *l = NULL;
    size_t i;
    if (!fixture_open(0, &fx)) { CHECK(0, "fixture missing"); fixture_close(&fx); return 0; }
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        memset(&hd, 0, sizeof hd);
        hd.config_json = bad[i].json;
        CHECK_RESULT(moe_layer_import_hf(&ctx, fx.file, &hd, 4, &l), bad[i].want, &ctx);
        CHECK(l == NULL && moe_ctx_error(&ctx)[0], "case %d: no layer, a message", (int)i);
    }
    memset(&hd, 0, sizeof hd);
    hd.config_json = fx.config;
    hd.arch = (moe_hf_arch)9;
    CHECK_RESULT(moe_layer_import_hf(&ctx, fx.file, &hd, 4, &l), MOE_ERR_INVALID_ARGUMENT, &ctx);
    hd.arch = MOE_HF_ARCH_DEFAULT;
    CHECK_RESULT(moe_layer_import_hf(&ctx, NULL, &hd, 4, &l), MOE_ERR_INVALID_ARGUMENT, &ctx);
    fixture_close(&fx);
    if (fixture_open(2, &fx)) {  /* DeepSeek-V3: config.json against the shared experts and the routing it needs */
        static const struct { const char *from, *to; moe_result want; } edits[] = {
            {"\"n_shared_experts\": 2", "\"n_shared_experts\": 3", MOE_ERR_SHAPE},
            {"\"scoring_func\": \"sigmoid\"", "\"scoring_func\": \"softmax\"", MOE_ERR_UNSUPPORTED},
            {"\"topk_method\": \"noaux_tc\"", "\"topk_method\": \"greedy\"", MOE_ERR_UNSUPPORTED},
            {"\"n_group\": 4", "\"n_group\": 3", MOE_ERR_INVALID_ARGUMENT},
            {"\"routed_scaling_factor\": 2.5", "\"routed_scaling_factor\": -1", MOE_ERR_FORMAT},
        };
        char text[4096];
        for (i = 0; i < sizeof edits / sizeof edits[0]; i++) {
            const char *at = strstr(fx.config, edits[i].from);
            CHECK(at != NULL && strlen(fx.config) + 16 < sizeof text, "config.json lacks %s", edits[i].from);
            if (!at) continue;
            snprintf(text, sizeof text, "%.*s%s%s", (int)(at - fx.config), fx.config, edits[i].to, at + strlen(edits[i].from));
            memset(&hd, 0, sizeof hd);
            hd.config_json = text;
            CHECK_RESULT(moe_layer_import_hf(&ctx, fx.file, &hd, 4, &l), edits[i].want, &ctx);
        }
    } else CHECK(0, "fixture missing");
    fixture_close(&fx);
    return 0;
}

/* Rewrite the qwen2_moe checkpoint with one tensor changed: dropped (new_ndim 0), reshaped or retyped. */
static moe_result import_modified(const fixture *fx, const char *victim, int new_ndim, const int64_t *new_shape, moe_dtype new_dtype) {
    char path[256];
    moe_tensor_writer *w = NULL;
    moe_tensor_file *f = NULL;
    moe_layer *l = NULL;
    moe_hf_desc hd;
    moe_result r;
    int i;
    static const int32_t ints[64];
    snprintf(path, sizeof path, "%s/modified.safetensors", TMP_DIR);
    if (moe_tensor_writer_create(&ctx, &w) != MOE_OK) return MOE_ERR_STATE;
    for (i = 0; i < moe_tensor_file_count(fx->file); i++) {
        const moe_file_tensor *t = moe_tensor_file_get(fx->file, i);
        if (strcmp(t->name, victim) != 0) moe_tensor_writer_add(w, t->name, t->dtype, t->ndim, t->shape, t->data);
        else if (new_ndim && new_dtype == MOE_DTYPE_I32) moe_tensor_writer_add(w, t->name, new_dtype, new_ndim, new_shape, ints);
        else if (new_ndim) moe_tensor_writer_add(w, t->name, t->dtype, new_ndim, new_shape, t->data);
    }
    r = moe_tensor_writer_save(w, path);
    moe_tensor_writer_destroy(w);
    if (r != MOE_OK) return MOE_ERR_STATE;
    if (moe_tensor_file_read(&ctx, path, &f) != MOE_OK) return MOE_ERR_STATE;
    memset(&hd, 0, sizeof hd);
    hd.config_json = fx->config;
    r = moe_layer_import_hf(&ctx, f, &hd, 4, &l);
    CHECK(r == MOE_OK || (l == NULL && strstr(moe_ctx_error(&ctx), victim)), "the error names %s: %s", victim, moe_ctx_error(&ctx));
    moe_layer_destroy(l);
    moe_tensor_file_close(f);
    return r;
}

static int test_bad_files(void) {
    fixture fx;
    const int64_t swapped[2] = {8, 6}, flat[1] = {48}, gate3[2] = {3, 8}, router_i32[2] = {6, 8};
    const char *P = "model.layers.0.mlp.";
    char name[128];
    unsigned char *bytes;
    size_t size, cut;
    moe_tensor_file *f = NULL;
    if (!fixture_open(1, &fx)) { CHECK(0, "fixture missing"); fixture_close(&fx); return 0; }
    snprintf(name, sizeof name, "%sexperts.3.down_proj.weight", P);
    CHECK_RESULT(import_modified(&fx, name, 0, NULL, MOE_DTYPE_F32), MOE_ERR_FORMAT, &ctx);
    snprintf(name, sizeof name, "%sexperts.2.gate_proj.weight", P);
    CHECK_RESULT(import_modified(&fx, name, 2, swapped, MOE_DTYPE_F32), MOE_ERR_SHAPE, &ctx);
    CHECK_RESULT(import_modified(&fx, name, 1, flat, MOE_DTYPE_F32), MOE_ERR_SHAPE, &ctx);
    snprintf(name, sizeof name, "%sshared_expert_gate.weight", P);
    CHECK_RESULT(import_modified(&fx, name, 0, NULL, MOE_DTYPE_F32), MOE_ERR_FORMAT, &ctx);
    snprintf(name, sizeof name, "%sshared_expert.up_proj.weight", P);
    CHECK_RESULT(import_modified(&fx, name, 0, NULL, MOE_DTYPE_F32), MOE_ERR_FORMAT, &ctx);
    snprintf(name, sizeof name, "%sshared_expert.gate_proj.weight", P);  /* config.json says there is one */
    CHECK_RESULT(import_modified(&fx, name, 0, NULL, MOE_DTYPE_F32), MOE_ERR_FORMAT, &ctx);
    snprintf(name, sizeof name, "%sgate.weight", P);
    CHECK_RESULT(import_modified(&fx, name, 2, gate3, MOE_DTYPE_F32), MOE_ERR_SHAPE, &ctx);  /* config says 6 experts */
    CHECK_RESULT(import_modified(&fx, name, 2, router_i32, MOE_DTYPE_I32), MOE_ERR_FORMAT, &ctx);
    CHECK_RESULT(import_modified(&fx, "model.norm.weight", 0, NULL, MOE_DTYPE_F32), MOE_OK, &ctx);  /* not part of the block */
    /* truncated and damaged files never get as far as the importer */
    {
        char path[256];
        snprintf(path, sizeof path, "%s/qwen2_moe.safetensors", FIXTURE_DIR);
        bytes = test_read_file(path, &size);
    }
    CHECK(bytes != NULL, "read the fixture");
    for (cut = 1; bytes && cut < size; cut += size / 7 + 1) {
        CHECK(moe_tensor_file_parse(&ctx, bytes, size - cut, &f) != MOE_OK, "a file cut by %zu bytes parsed", cut);
        moe_tensor_file_close(f);
        f = NULL;
    }
    free(bytes);
    fixture_close(&fx);
    return 0;
}

int main(void) {
    printf("test_hf\n");
    test_make_dir(TMP_DIR);
    moe_ctx_init(&ctx, NULL);
    RUN(test_blocks);
    moe_ctx_init(&ctx, NULL);
    RUN(test_mapping);
    RUN(test_gradients);
    RUN(test_without_config);
    RUN(test_bad_config);
    RUN(test_bad_files);
    TEST_END();
}
