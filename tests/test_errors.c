/* Bad input gets an exact code and a message, never a crash; failed calls leave state alone;
   an allocator failing at any point of create + train + save + load leaks nothing. */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "test.h"

#ifndef TMP_DIR
#define TMP_DIR "build/tmp_errors"
#endif

static moe_ctx ctx;

static moe_result create(int64_t d_in, moe_layer_desc l0, moe_layer_desc l1, int n) {
    moe_layer_desc layers[2];
    moe_model *m = (moe_model *)&ctx;
    moe_result r;
    layers[0] = l0;
    layers[1] = l1;
    r = moe_model_create(&ctx, &(moe_model_desc){.d_in = d_in, .n_layers = n, .layers = layers}, &m);
    CHECK(r == MOE_OK ? m != NULL : m == NULL, "output pointer is set only on success");
    moe_model_destroy(r == MOE_OK ? m : NULL);
    return r;
}

#define MOE_L(...) ((moe_layer_desc){__VA_ARGS__})
static const moe_layer_desc head = {.kind = MOE_LAYER_DENSE, .d_out = 3};

static int test_bad_descs(void) {
    moe_model *m = NULL;
    CHECK_RESULT(moe_model_create(&ctx, NULL, &m), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(moe_model_create(&ctx, &(moe_model_desc){.d_in = 4, .n_layers = 0, .layers = &head}, &m), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(create(0, head, head, 1), MOE_ERR_SHAPE, &ctx);
    CHECK_RESULT(create(4, MOE_L(.kind = MOE_LAYER_DENSE, .d_out = 5), MOE_L(.kind = MOE_LAYER_DENSE, .d_in = 6), 2), MOE_ERR_SHAPE, &ctx);
    CHECK(strstr(moe_ctx_error(&ctx), "layer 1") != NULL, "message names the layer: %s", moe_ctx_error(&ctx));
    CHECK_RESULT(create(4, MOE_L(.kind = MOE_LAYER_DENSE, .d_out = 5, .residual = 1), head, 2), MOE_ERR_SHAPE, &ctx);
    CHECK_RESULT(create(4, MOE_L(.kind = MOE_LAYER_RMSNORM, .d_out = 5), head, 2), MOE_ERR_SHAPE, &ctx);
    CHECK_RESULT(create(4, MOE_L(.kind = MOE_LAYER_MOE, .n_experts = 3, .top_k = 4), head, 2), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK(strstr(moe_ctx_error(&ctx), "top_k") != NULL, "k > E message: %s", moe_ctx_error(&ctx));
    CHECK_RESULT(create(4, MOE_L(.kind = MOE_LAYER_MOE, .n_experts = 3, .top_k = -1), head, 2), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(create(4, MOE_L(.kind = MOE_LAYER_MOE, .n_experts = -2), head, 2), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(create(4, MOE_L(.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_SWITCH, .top_k = 2), head, 2), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(create(4, MOE_L(.kind = MOE_LAYER_MOE, .n_hidden_layers = 9), head, 2), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(create(4, MOE_L(.kind = MOE_LAYER_MOE, .capacity_factor = -1), head, 2), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(create(4, MOE_L(.kind = MOE_LAYER_MOE, .jitter = 1.0f), head, 2), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(create(4, MOE_L(.kind = MOE_LAYER_MOE, .z_loss = -0.1f), head, 2), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(create(4, MOE_L(.kind = MOE_LAYER_MOE, .balance_loss = NAN), head, 2), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(create(4, MOE_L(.kind = MOE_LAYER_MOE, .router = (moe_router)42), head, 2), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(create(4, MOE_L(.kind = (moe_layer_kind)-3), head, 2), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(create(4, MOE_L(.kind = MOE_LAYER_DENSE, .activation = MOE_ACT_COUNT), head, 2), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(create(4, MOE_L(.kind = MOE_LAYER_DENSE, .bias = (moe_flag)9), head, 2), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(create(4, MOE_L(.kind = MOE_LAYER_LAYERNORM, .eps = -1e-5f), head, 2), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(moe_model_create(&ctx, &(moe_model_desc){.d_in = 4, .n_layers = 1, .layers = &head, .max_tokens = -5}, &m), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(moe_model_create(&ctx, &(moe_model_desc){.d_in = 4, .n_layers = 1, .layers = &head, .loss = (moe_loss)7}, &m), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(moe_model_create(&ctx, &(moe_model_desc){.d_in = 4, .n_layers = 1, .layers = &head, .optimizer = {.lr = -1}}, &m), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(moe_model_create(&ctx, &(moe_model_desc){.d_in = 4, .n_layers = 1, .layers = &head, .optimizer = {.beta2 = 1.5f}}, &m), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(moe_model_create(&ctx, &(moe_model_desc){.d_in = (int64_t)1 << 40, .n_layers = 1, .layers = &head}, &m), MOE_ERR_SHAPE, &ctx);
    /* sizes that overflow the arena are refused before anything is allocated */
    CHECK_RESULT(moe_model_create(&ctx, &(moe_model_desc){.d_in = 1 << 30, .n_layers = 1, .layers = &head, .max_tokens = 1 << 28}, &m), MOE_ERR_OUT_OF_MEMORY, &ctx);
    CHECK(m == NULL, "no model");
    return 0;
}

static int test_bad_calls(void) {
    moe_model *m = NULL;
    moe_layer_desc layers[2] = {{.kind = MOE_LAYER_MOE, .n_experts = 3, .top_k = 2}, {.kind = MOE_LAYER_DENSE, .d_out = 3}};
    float x[8 * 4] = {0}, y[8 * 3], dy[8 * 3] = {0};
    int32_t labels[8] = {0};
    moe_stats st;
    moe_tensor t;
    int64_t n;
    float *before;
    CHECK_OK(moe_model_create(&ctx, &(moe_model_desc){.d_in = 4, .n_layers = 2, .layers = layers, .max_tokens = 8}, &m), &ctx);
    if (!m) return 0;
    CHECK_RESULT(moe_model_backward(m, dy, NULL, 0), MOE_ERR_STATE, &ctx);
    CHECK_RESULT(moe_model_loss(m, &(moe_target){.labels = labels}, NULL, NULL), MOE_ERR_STATE, &ctx);
    CHECK_RESULT(moe_model_stats(m, 0, &st), MOE_ERR_STATE, &ctx);
    CHECK_RESULT(moe_model_forward(m, x, 0, y, NULL), MOE_ERR_SHAPE, &ctx);
    CHECK_RESULT(moe_model_forward(m, x, -1, y, NULL), MOE_ERR_SHAPE, &ctx);
    CHECK_RESULT(moe_model_forward(m, x, 9, y, NULL), MOE_ERR_TOO_MANY_TOKENS, &ctx);
    CHECK_RESULT(moe_model_forward(m, NULL, 2, y, NULL), MOE_ERR_INVALID_ARGUMENT, &ctx);
    x[5] = NAN;
    CHECK_RESULT(moe_model_forward(m, x, 2, y, NULL), MOE_ERR_NONFINITE, &ctx);
    x[5] = INFINITY;
    CHECK_RESULT(moe_model_train_step(m, x, &(moe_target){.labels = labels}, 2, NULL), MOE_ERR_NONFINITE, &ctx);
    x[5] = 0;
    CHECK_OK(moe_model_forward(m, x, 2, y, NULL), &ctx);
    CHECK_RESULT(moe_model_stats(m, 1, &st), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(moe_model_stats(m, 2, &st), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_OK(moe_model_stats(m, 0, &st), &ctx);
    CHECK_RESULT(moe_model_loss(m, NULL, NULL, NULL), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(moe_model_loss(m, &(moe_target){.values = y}, NULL, NULL), MOE_ERR_INVALID_ARGUMENT, &ctx);
    labels[1] = -1;
    CHECK_RESULT(moe_model_train_step(m, x, &(moe_target){.labels = labels}, 2, NULL), MOE_ERR_INVALID_ARGUMENT, &ctx);
    labels[1] = 0;
    CHECK_RESULT(moe_model_tensor(m, 99, &t), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(moe_model_find_tensor(m, "layers.0.nothing", &t), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(moe_model_save(m, NULL), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(moe_model_predict(m, x, 2, NULL), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK(moe_model_forward(NULL, x, 2, y, NULL) == MOE_ERR_INVALID_ARGUMENT, "NULL model");
    /* a step that would diverge: the loss is not finite, nothing changes */
    before = (float *)malloc(sizeof(float) * 4096);
    moe_model_params(m, &n);
    memcpy(before, moe_model_params(m, NULL), sizeof(float) * (size_t)n);
    moe_model_find_tensor(m, "layers.1.weight", &t);
    t.data[0] = 1e38f;
    before[t.offset] = 1e38f;
    x[0] = 1e10f;
    CHECK_RESULT(moe_model_train_step(m, x, &(moe_target){.labels = labels}, 2, NULL), MOE_ERR_NONFINITE, &ctx);
    CHECK(memcmp(before, moe_model_params(m, NULL), sizeof(float) * (size_t)n) == 0, "parameters unchanged after a non-finite step");
    free(before);
    moe_model_destroy(m);
    moe_model_destroy(NULL);
    return 0;
}

/* An allocator that fails its N-th call, for every N of a whole create + train + save + load run
   (model files and checkpoints). */
typedef struct failing { long calls, live, fail_at; } failing;
static void *fail_alloc(size_t size, void *user) {
    failing *f = (failing *)user;
    void *p;
    if (++f->calls == f->fail_at) return NULL;
    p = malloc(size);
    if (p) f->live++;
    return p;
}
static void fail_free(void *ptr, void *user) {
    if (ptr) ((failing *)user)->live--;
    free(ptr);
}

static moe_result whole_run(moe_ctx *c) {
    moe_layer_desc layers[3] = {{.kind = MOE_LAYER_MOE, .d_out = 6, .n_experts = 3, .top_k = 2, .n_shared_experts = 1, .balance_loss = 0.1f},
                                {.kind = MOE_LAYER_LAYERNORM},
                                {.kind = MOE_LAYER_DENSE, .d_out = 3}};
    moe_model *m = NULL, *back = NULL, *resumed = NULL;
    float x[8 * 4];
    int32_t labels[8] = {0, 1, 2, 0, 1, 2, 0, 1};
    moe_result r;
    int i;
    for (i = 0; i < 32; i++) x[i] = (float)(i % 5) - 2.0f;
    r = moe_model_create(c, &(moe_model_desc){.d_in = 4, .n_layers = 3, .layers = layers, .max_tokens = 8}, &m);
    for (i = 0; r == MOE_OK && i < 3; i++) r = moe_model_train_step(m, x, &(moe_target){.labels = labels}, 8, NULL);
    if (r == MOE_OK) r = moe_model_save(m, TMP_DIR "/alloc.safetensors");
    if (r == MOE_OK) r = moe_model_load(c, TMP_DIR "/alloc.safetensors", 0, &back);
    if (r == MOE_OK) r = moe_model_save_checkpoint(m, TMP_DIR "/alloc.ckpt");
    if (r == MOE_OK) r = moe_model_load_checkpoint(c, TMP_DIR "/alloc.ckpt", 0, &resumed);
    moe_model_destroy(m);
    moe_model_destroy(back);
    moe_model_destroy(resumed);
    return r;
}

static int test_every_allocation_failure(void) {
    failing probe = {0, 0, 0};
    moe_ctx c;
    long total, n;
    moe_ctx_init(&c, &(moe_ctx_desc){.allocator = {fail_alloc, fail_free, &probe}});
    CHECK_OK(whole_run(&c), &c);
    total = probe.calls;
    CHECK(probe.live == 0, "a clean run leaks %ld blocks", probe.live);
    for (n = 1; n <= total; n++) {
        failing f = {0, 0, n};
        moe_result r;
        moe_ctx_init(&c, &(moe_ctx_desc){.allocator = {fail_alloc, fail_free, &f}});
        r = whole_run(&c);
        CHECK(r == MOE_ERR_OUT_OF_MEMORY, "allocation %ld of %ld failed: %s (%s)", n, total, moe_result_string(r), moe_ctx_error(&c));
        CHECK(f.live == 0, "allocation %ld failed: %ld blocks leaked", n, f.live);
    }
    printf("    %ld allocation points, each failed once\n", total);
    return 0;
}

int main(void) {
    printf("test_errors\n");
    if (test_make_dir(TMP_DIR) != 0) return 1;
    moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = 5});
    RUN(test_bad_descs);
    RUN(test_bad_calls);
    RUN(test_every_allocation_failure);
    TEST_END();
}
