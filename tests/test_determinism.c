/* Same seed, same bits: training with every router (drawn noise, jitter, capacity, selection-bias
   updates, expert choice; hash routing and per-call top_k in a model trained step by step, since
   train_step takes no token ids) on 1, 2 and 3 threads gives identical outputs, parameters and
   model files. With a file argument the program also writes a digest of them, which
   tests/run_tests.sh compares between the OpenMP build and the build without OpenMP. */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "test.h"

#ifndef TMP_DIR
#define TMP_DIR "build/tmp_determinism"
#endif

static const moe_layer_desc layers[] = {
    {.kind = MOE_LAYER_MOE, .d_out = 24, .n_experts = 6, .top_k = 2, .expert = MOE_EXPERT_SWIGLU, .d_hidden = 40,
     .n_shared_experts = 1, .balance_loss = 0.01f, .z_loss = 0.001f, .jitter = 0.05f},
    {.kind = MOE_LAYER_RMSNORM},
    {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_NOISY_TOPK, .n_experts = 8, .top_k = 3, .d_hidden = 33, .activation = MOE_ACT_GELU,
     .importance_loss = 0.05f, .load_loss = 0.05f, .residual = 1},
    {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_SWITCH, .n_experts = 4, .d_hidden = 48, .residual = 1, .capacity_factor = 1.1f},
    {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_SIGMOID, .n_experts = 8, .top_k = 3, .n_groups = 4, .top_k_groups = 2,
     .bias_update_rate = 0.01f, .routed_scaling_factor = 1.5f, .d_hidden = 20, .residual = 1, .jitter = 0.05f},
    {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_EXPERT_CHOICE, .n_experts = 5, .top_k = 2, .expert = MOE_EXPERT_SWIGLU,
     .d_hidden = 30, .residual = 1, .z_loss = 0.001f, .n_shared_experts = 1, .shared_gate = MOE_FLAG_ON},
    {.kind = MOE_LAYER_LAYERNORM},
    {.kind = MOE_LAYER_DENSE, .d_out = 10},
};

typedef struct run_result {
    uint64_t params, output, file, hash;
    float loss;
} run_result;

static uint64_t fnv(const void *p, size_t n, uint64_t h) {
    const unsigned char *b = (const unsigned char *)p;
    size_t i;
    for (i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001B3ull;
    return h;
}

static run_result train(int n_threads, const char *file) {
    moe_ctx ctx;
    moe_model *m = NULL;
    run_result res = {0, 0, 0, 0, 0};
    int64_t T = 200, D = 20, n, i;
    float *x = (float *)malloc(sizeof(float) * (size_t)(T * D)), *y = (float *)malloc(sizeof(float) * (size_t)(T * 10));
    int32_t *labels = (int32_t *)malloc(sizeof(int32_t) * (size_t)T);
    int s;
    moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = 2024, .n_threads = n_threads});
    CHECK_OK(moe_model_create(&ctx, &(moe_model_desc){.d_in = D, .n_layers = (int)(sizeof layers / sizeof layers[0]), .layers = layers, .max_tokens = T,
                                                      .optimizer = {.kind = MOE_OPTIMIZER_ADAMW, .lr = 3e-3f, .weight_decay = 0.01f,
                                                                    .clip_norm = 1.0f, .warmup_steps = 3, .total_steps = 12}}, &m), &ctx);
    if (!m) return res;
    for (i = 0; i < T * D; i++) x[i] = moe_rng_normal(1, 1, (uint64_t)i);
    for (i = 0; i < T; i++) labels[i] = (int32_t)(moe_rng_u64(1, 2, (uint64_t)i) % 10);
    for (s = 0; s < 12; s++) {
        moe_step_info info;
        CHECK_OK(moe_model_train_step(m, x, &(moe_target){.labels = labels}, T, &info), &ctx);
        res.loss = info.loss;
    }
    CHECK_OK(moe_model_forward(m, x, T, y, NULL), &ctx);
    res.output = fnv(y, sizeof(float) * (size_t)(T * 10), 1469598103934665603ull);
    res.params = fnv(moe_model_params(m, &n), 0, 1469598103934665603ull);
    res.params = fnv(moe_model_params(m, NULL), sizeof(float) * (size_t)n, res.params);
    CHECK_OK(moe_model_save(m, file), &ctx);
    {
        FILE *f = fopen(file, "rb");
        unsigned char buf[4096];
        size_t k;
        res.file = 1469598103934665603ull;
        while (f && (k = fread(buf, 1, sizeof buf, f)) > 0) res.file = fnv(buf, k, res.file);
        if (f) fclose(f);
    }
    moe_model_destroy(m);
    free(x); free(y); free(labels);
    return res;
}

/* The hash router needs token ids, so this model trains with forward, loss, backward and step;
   every forward also asks for 3 experts per token (per-call top_k). Returns the parameters' digest. */
static uint64_t train_hash(int n_threads) {
    static const moe_layer_desc hash_layers[] = {
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_HASH, .n_experts = 6, .top_k = 2, .max_top_k = 3, .d_hidden = 40, .hash_seed = 3},
        {.kind = MOE_LAYER_MOE, .n_experts = 5, .top_k = 2, .max_top_k = 3, .expert = MOE_EXPERT_SWIGLU, .d_hidden = 40, .residual = 1,
         .capacity_factor = 1.0f, .balance_loss = 0.01f},
        {.kind = MOE_LAYER_DENSE, .d_out = 10},
    };
    moe_ctx ctx;
    moe_model *m = NULL;
    int64_t T = 200, D = 20, n, i;
    float *x = (float *)malloc(sizeof(float) * (size_t)(T * D)), *dy = (float *)malloc(sizeof(float) * (size_t)(T * 10));
    int32_t *labels = (int32_t *)malloc(sizeof(int32_t) * (size_t)T), *ids = (int32_t *)malloc(sizeof(int32_t) * (size_t)T);
    moe_forward_opts opts = {.training = 1, .top_k = 3};
    uint64_t h = 1469598103934665603ull;
    int s;
    moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = 2024, .n_threads = n_threads});
    CHECK_OK(moe_model_create(&ctx, &(moe_model_desc){.d_in = D, .n_layers = 3, .layers = hash_layers, .max_tokens = T}, &m), &ctx);
    if (!m) return 0;
    for (i = 0; i < T * D; i++) x[i] = moe_rng_normal(1, 1, (uint64_t)i);
    for (i = 0; i < T; i++) { labels[i] = (int32_t)(moe_rng_u64(1, 2, (uint64_t)i) % 10); ids[i] = (int32_t)(moe_rng_u64(1, 3, (uint64_t)i) % 500); }
    opts.token_ids = ids;
    for (s = 0; s < 8; s++) {
        CHECK_OK(moe_model_forward(m, x, T, NULL, &opts), &ctx);
        CHECK_OK(moe_model_loss(m, &(moe_target){.labels = labels}, NULL, dy), &ctx);
        moe_model_zero_grad(m);
        CHECK_OK(moe_model_backward(m, dy, NULL, MOE_BACKWARD_AUX), &ctx);
        CHECK_OK(moe_model_optimizer_step(m, NULL), &ctx);
    }
    moe_model_params(m, &n);
    h = fnv(moe_model_params(m, NULL), sizeof(float) * (size_t)n, h);
    moe_model_destroy(m);
    free(x); free(dy); free(labels); free(ids);
    return h;
}

static const char *digest_path;

static int test_thread_counts(void) {
    run_result r1 = train(1, TMP_DIR "/t1.safetensors");
    run_result r2 = train(2, TMP_DIR "/t2.safetensors");
    run_result r3 = train(3, TMP_DIR "/t3.safetensors");
    printf("    loss after 12 steps %.6f; digest %016llx\n", r1.loss, (unsigned long long)r1.params);
    CHECK(r1.params == r2.params && r1.params == r3.params, "parameters differ between 1, 2 and 3 threads");
    CHECK(r1.output == r2.output && r1.output == r3.output, "outputs differ between 1, 2 and 3 threads");
    CHECK(r1.file == r2.file && r1.file == r3.file, "model files differ between 1, 2 and 3 threads");
    CHECK(r1.loss < 2.5f && r1.loss == r1.loss, "training moved (loss %g)", r1.loss);
    r1.hash = train_hash(1);
    r2.hash = train_hash(2);
    r3.hash = train_hash(3);
    CHECK(r1.hash == r2.hash && r1.hash == r3.hash, "the hash-router model trains differently on 1, 2 and 3 threads");
    if (digest_path) {
        FILE *f = fopen(digest_path, "w");
        CHECK(f != NULL, "cannot write %s", digest_path);
        if (f) {
            fprintf(f, "%016llx %016llx %016llx %016llx\n", (unsigned long long)r1.params, (unsigned long long)r1.output,
                    (unsigned long long)r1.file, (unsigned long long)r1.hash);
            fclose(f);
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    printf("test_determinism\n");
    digest_path = argc > 1 ? argv[1] : NULL;
    if (test_make_dir(TMP_DIR) != 0) return 1;
    RUN(test_thread_counts);
    TEST_END();
}
