/* Embedding layers: token ids in, rows of the table out; bad ids refused with a message; hash
   routers behind an embedding take each row's last id, in forward and in train_step; training is
   bitwise identical on 1, 2 and 3 threads; the configuration and weights survive save and load.
   (Gradients: tests/test_grad.c; PyTorch: tests/ref fixture "embedding_hash".) */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "test.h"

#ifndef TMP_DIR
#define TMP_DIR "build/tmp_embedding"
#endif

static moe_ctx ctx;

#define N_CTX 4
#define VOCAB 11
static const moe_layer_desc layers[] = {
    {.kind = MOE_LAYER_EMBEDDING, .vocab_size = VOCAB, .d_embedding = 6},
    {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_HASH, .n_experts = 4, .top_k = 2, .d_hidden = 16, .hash_seed = 3},
    {.kind = MOE_LAYER_MOE, .n_experts = 4, .top_k = 1, .d_hidden = 16, .residual = 1, .balance_loss = 0.01f},
    {.kind = MOE_LAYER_DENSE, .d_out = VOCAB},
};
static const moe_model_desc model_desc = {.d_in = N_CTX, .n_layers = 4, .layers = layers, .max_tokens = 64,
                                          .optimizer = {.lr = 3e-3f}};

static void make_ids(float *x, int32_t *labels, int64_t T) {
    int64_t i;
    for (i = 0; i < T * N_CTX; i++) x[i] = (float)(moe_rng_u64(5, 1, (uint64_t)i) % VOCAB);
    for (i = 0; i < T; i++) labels[i] = (int32_t)(moe_rng_u64(5, 2, (uint64_t)i) % VOCAB);
}

static int test_forward_rows(void) {
    moe_layer *l = NULL;
    float x[2 * 3] = {0, 4, 2, 4, 4, 1}, y[2 * 3 * 5], dy[2 * 3 * 5], dx[6];
    moe_tensor w;
    int64_t t, p, j;
    CHECK_OK(moe_layer_create(&ctx, &(moe_layer_desc){.kind = MOE_LAYER_EMBEDDING, .d_in = 3, .vocab_size = 5, .d_out = 15}, 8, &l), &ctx);
    if (!l) return 0;
    CHECK(moe_layer_get_desc(l)->d_embedding == 5, "d_embedding from d_out / d_in: %lld", (long long)moe_layer_get_desc(l)->d_embedding);
    CHECK_OK(moe_layer_tensor(l, 0, &w), &ctx);
    CHECK(strcmp(w.name, "weight") == 0 && w.ndim == 2 && w.shape[0] == 5 && w.shape[1] == 5, "weight [vocab, d_embedding]");
    CHECK_OK(moe_layer_forward(l, x, 2, y, NULL), &ctx);
    for (t = 0; t < 2; t++)
        for (p = 0; p < 3; p++)
            for (j = 0; j < 5; j++)
                CHECK(y[(t * 3 + p) * 5 + j] == w.data[(int64_t)x[t * 3 + p] * 5 + j], "y[%lld] is row %g", (long long)t, (double)x[t * 3 + p]);
    for (j = 0; j < 30; j++) dy[j] = (float)j;
    memset(moe_layer_grads(l, NULL), 0, sizeof(float) * 25);
    CHECK_OK(moe_layer_backward(l, dy, dx, 0), &ctx);
    /* id 4 appears three times: positions (0,1), (1,0), (1,1) */
    for (j = 0; j < 5; j++) CHECK(w.grad[4 * 5 + j] == dy[5 + j] + dy[15 + j] + dy[20 + j], "rows accumulate");
    for (j = 0; j < 5; j++) CHECK(w.grad[3 * 5 + j] == 0.0f, "unused ids get no gradient");
    for (j = 0; j < 6; j++) CHECK(dx[j] == 0.0f, "ids have no gradient");
    moe_layer_destroy(l);
    return 0;
}

/* A backward large enough to run on several threads sums every row in token order. */
static int test_backward_threads(void) {
    int64_t T = 512, n = 8, De = 32, V = 40, i;
    float *x = (float *)malloc(sizeof(float) * (size_t)(T * n)), *y = (float *)malloc(sizeof(float) * (size_t)(T * n * De));
    float *dy = (float *)malloc(sizeof(float) * (size_t)(T * n * De)), *g1 = (float *)malloc(sizeof(float) * (size_t)(V * De));
    int threads;
    for (i = 0; i < T * n; i++) x[i] = (float)(moe_rng_u64(6, 1, (uint64_t)i) % (uint64_t)V);
    for (i = 0; i < T * n * De; i++) dy[i] = moe_rng_normal(6, 2, (uint64_t)i);
    for (threads = 1; threads <= 3; threads++) {
        moe_ctx c;
        moe_layer *l = NULL;
        int64_t np;
        float *g;
        moe_ctx_init(&c, &(moe_ctx_desc){.seed = 4, .n_threads = threads});
        CHECK_OK(moe_layer_create(&c, &(moe_layer_desc){.kind = MOE_LAYER_EMBEDDING, .d_in = n, .vocab_size = V, .d_embedding = De}, T, &l), &c);
        if (!l) break;
        g = moe_layer_grads(l, &np);
        CHECK_OK(moe_layer_forward(l, x, T, y, NULL), &c);
        CHECK_OK(moe_layer_backward(l, dy, NULL, 0), &c);
        if (threads == 1) memcpy(g1, g, sizeof(float) * (size_t)(V * De));
        else CHECK(memcmp(g1, g, sizeof(float) * (size_t)(V * De)) == 0, "%d threads: the same gradient bits", threads);
        moe_layer_destroy(l);
    }
    free(x); free(y); free(dy); free(g1);
    return 0;
}

static int test_bad_ids(void) {
    moe_model *m = NULL;
    float x[2 * N_CTX] = {1, 2, 3, 4, 5, 6, 7, 8}, y[2 * VOCAB];
    int32_t labels[2] = {0, 1};
    CHECK_OK(moe_model_create(&ctx, &model_desc, &m), &ctx);
    if (!m) return 0;
    CHECK_OK(moe_model_forward(m, x, 2, y, NULL), &ctx);
    x[5] = 2.5f;
    CHECK_RESULT(moe_model_forward(m, x, 2, y, NULL), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK(strstr(moe_ctx_error(&ctx), "x[1, 1] = 2.5") && strstr(moe_ctx_error(&ctx), "token id"), "message: %s", moe_ctx_error(&ctx));
    x[5] = (float)VOCAB;
    CHECK_RESULT(moe_model_forward(m, x, 2, y, NULL), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK(strstr(moe_ctx_error(&ctx), "0..10") != NULL, "message names the range: %s", moe_ctx_error(&ctx));
    x[5] = -1.0f;
    CHECK_RESULT(moe_model_train_step(m, x, &(moe_target){.labels = labels}, 2, NULL), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK(moe_model_steps(m) == 0, "a refused step takes no step");
    moe_model_destroy(m);
    return 0;
}

static int test_bad_descs(void) {
    moe_model *m = NULL;
    moe_layer *l = NULL;
    moe_layer_desc bad[2] = {{.kind = MOE_LAYER_DENSE, .d_out = 4}, {.kind = MOE_LAYER_EMBEDDING, .vocab_size = 5, .d_embedding = 2}};
    CHECK_RESULT(moe_model_create(&ctx, &(moe_model_desc){.d_in = 3, .n_layers = 2, .layers = bad}, &m), MOE_ERR_UNSUPPORTED, &ctx);
    CHECK(strstr(moe_ctx_error(&ctx), "first layer") != NULL, "message: %s", moe_ctx_error(&ctx));
    CHECK_RESULT(moe_layer_create(&ctx, &(moe_layer_desc){.kind = MOE_LAYER_EMBEDDING, .d_in = 3, .d_embedding = 2}, 8, &l), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK(strstr(moe_ctx_error(&ctx), "vocab_size") != NULL, "message: %s", moe_ctx_error(&ctx));
    CHECK_RESULT(moe_layer_create(&ctx, &(moe_layer_desc){.kind = MOE_LAYER_EMBEDDING, .d_in = 3, .vocab_size = (1 << 24) + 1, .d_embedding = 2}, 8, &l),
                 MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(moe_layer_create(&ctx, &(moe_layer_desc){.kind = MOE_LAYER_EMBEDDING, .d_in = 3, .vocab_size = 5}, 8, &l), MOE_ERR_SHAPE, &ctx);
    CHECK_RESULT(moe_layer_create(&ctx, &(moe_layer_desc){.kind = MOE_LAYER_EMBEDDING, .d_in = 3, .vocab_size = 5, .d_out = 7}, 8, &l), MOE_ERR_SHAPE, &ctx);
    CHECK_RESULT(moe_layer_create(&ctx, &(moe_layer_desc){.kind = MOE_LAYER_EMBEDDING, .d_in = 3, .vocab_size = 5, .d_embedding = 2, .d_out = 7}, 8, &l),
                 MOE_ERR_SHAPE, &ctx);
    CHECK_RESULT(moe_layer_create(&ctx, &(moe_layer_desc){.kind = MOE_LAYER_EMBEDDING, .d_in = 2, .vocab_size = 5, .d_embedding = 1, .residual = 1}, 8, &l),
                 MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK(l == NULL, "no layer");
    return 0;
}

/* Hash routing inside the model equals explicit token ids = each row's last id. */
static int test_hash_ids(void) {
    moe_model *m = NULL;
    float x[8 * N_CTX], y0[8 * VOCAB], y1[8 * VOCAB], y2[8 * VOCAB];
    int32_t labels[8], ids[8], other[8];
    int64_t t;
    moe_stats st;
    make_ids(x, labels, 8);
    for (t = 0; t < 8; t++) { ids[t] = (int32_t)x[t * N_CTX + N_CTX - 1]; other[t] = (ids[t] + 1) % VOCAB; }
    CHECK_OK(moe_model_create(&ctx, &model_desc, &m), &ctx);
    if (!m) return 0;
    CHECK_OK(moe_model_forward(m, x, 8, y0, NULL), &ctx);
    CHECK_OK(moe_model_forward(m, x, 8, y1, &(moe_forward_opts){.token_ids = ids}), &ctx);
    CHECK(memcmp(y0, y1, sizeof y0) == 0, "the model's ids are the last ids");
    CHECK_OK(moe_model_forward(m, x, 8, y2, &(moe_forward_opts){.token_ids = other}), &ctx);
    CHECK(memcmp(y0, y2, sizeof y0) != 0, "explicit token ids take precedence");
    CHECK_OK(moe_model_stats(m, 1, &st), &ctx);
    CHECK(st.n_tokens == 8, "hash layer stats");
    moe_model_destroy(m);
    return 0;
}

/* train_step with a hash router, on 1, 2 and 3 threads: the same bits; then save and load. */
static int test_train_determinism_io(void) {
    uint64_t digest[3] = {0, 0, 0};
    int n;
    float x[64 * N_CTX], y[64 * VOCAB], y2[64 * VOCAB], first = 0, last = 0;
    int32_t labels[64];
    char path[512];
    make_ids(x, labels, 64);
    snprintf(path, sizeof path, "%s/embedding.safetensors", TMP_DIR);
    for (n = 1; n <= 3; n++) {
        moe_ctx c;
        moe_model *m = NULL, *back = NULL;
        int s;
        int64_t np, i;
        const float *p;
        moe_ctx_init(&c, &(moe_ctx_desc){.seed = 9, .n_threads = n});
        CHECK_OK(moe_model_create(&c, &model_desc, &m), &c);
        if (!m) return 0;
        for (s = 0; s < 30; s++) {
            moe_step_info info;
            CHECK_OK(moe_model_train_step(m, x, &(moe_target){.labels = labels}, 64, &info), &c);
            if (s == 0) first = info.loss;
            last = info.loss;
        }
        p = moe_model_params(m, &np);
        digest[n - 1] = 1469598103934665603ull;
        for (i = 0; i < np; i++) {
            uint32_t u;
            memcpy(&u, &p[i], 4);
            digest[n - 1] = (digest[n - 1] ^ u) * 0x100000001B3ull;
        }
        if (n == 2) {
            const moe_model_desc *d;
            CHECK(last < 0.8f * first, "training lowers the loss (%g -> %g)", (double)first, (double)last);
            CHECK_OK(moe_model_forward(m, x, 64, y, NULL), &c);
            CHECK_OK(moe_model_save(m, path), &c);
            CHECK_OK(moe_model_load(&c, path, 0, &back), &c);
            if (back) {
                d = moe_model_get_desc(back);
                CHECK(d->layers[0].kind == MOE_LAYER_EMBEDDING && d->layers[0].vocab_size == VOCAB && d->layers[0].d_embedding == 6,
                      "the embedding configuration is read back");
                CHECK_OK(moe_model_forward(back, x, 64, y2, NULL), &c);
                CHECK(memcmp(y, y2, sizeof y) == 0, "the loaded model computes the same bits");
                moe_model_destroy(back);
            }
        }
        moe_model_destroy(m);
    }
    CHECK(digest[0] == digest[1] && digest[1] == digest[2], "1, 2, 3 threads: the same parameters");
    return 0;
}

int main(void) {
    printf("test_embedding\n");
    TEST_MKDIR(TMP_DIR);
    moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = 1, .n_threads = 2});
    RUN(test_forward_rows);
    RUN(test_backward_threads);
    RUN(test_bad_ids);
    RUN(test_bad_descs);
    RUN(test_hash_ids);
    RUN(test_train_determinism_io);
    TEST_END();
}
