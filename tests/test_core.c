/* Context, result codes, version, random numbers, allocators. */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "test.h"

static int test_results_and_version(void) {
    const moe_result all[] = {MOE_OK, MOE_ERR_INVALID_ARGUMENT, MOE_ERR_SHAPE, MOE_ERR_OUT_OF_MEMORY, MOE_ERR_IO,
                              MOE_ERR_FORMAT, MOE_ERR_UNSUPPORTED, MOE_ERR_NONFINITE, MOE_ERR_TOO_MANY_TOKENS, MOE_ERR_STATE};
    size_t i, j, n = sizeof all / sizeof all[0];
    char v[32];
    for (i = 0; i < n; i++) {
        const char *s = moe_result_string(all[i]);
        CHECK(s && s[0] && strcmp(s, "unknown result") != 0, "no text for %d", (int)all[i]);
        CHECK(i == 0 ? all[i] == 0 : all[i] < 0, "codes: OK is 0, errors negative (%d)", (int)all[i]);
        for (j = 0; j < i; j++) CHECK(strcmp(s, moe_result_string(all[j])) != 0, "duplicate text %s", s);
    }
    CHECK(strcmp(moe_result_string((moe_result)-1000), "unknown result") == 0, "unknown code text");
    snprintf(v, sizeof v, "%d.%d.%d", MOE_VERSION_MAJOR, MOE_VERSION_MINOR, MOE_VERSION_PATCH);
    CHECK(strcmp(moe_version(), v) == 0 && strcmp(MOE_VERSION_STRING, v) == 0, "version %s vs %s", moe_version(), v);
    CHECK(MOE_VERSION == MOE_VERSION_MAJOR * 10000 + MOE_VERSION_MINOR * 100 + MOE_VERSION_PATCH, "MOE_VERSION");
    return 0;
}

/* A run-time allocator that counts and can fail the N-th call. */
typedef struct counting { long calls, live, fail_at; size_t bytes; } counting;
static void *count_alloc(size_t size, void *user) {
    counting *c = (counting *)user;
    void *p;
    if (++c->calls == c->fail_at) return NULL;
    p = malloc(size);
    if (p) { c->live++; c->bytes += size; }
    return p;
}
static void count_free(void *ptr, void *user) {
    counting *c = (counting *)user;
    if (ptr) c->live--;
    free(ptr);
}

static int log_calls;
static void count_log(moe_log_level level, const char *msg, void *user) {
    (void)msg;
    if (level == MOE_LOG_ERROR) (*(int *)user)++;
    log_calls++;
}

static int test_ctx(void) {
    moe_ctx ctx;
    int errors = 0;
    moe_layer *l = NULL;
    CHECK_OK(moe_ctx_init(&ctx, NULL), &ctx);
    CHECK(ctx.n_threads >= 1, "default threads %d", ctx.n_threads);
    CHECK(moe_ctx_error(&ctx)[0] == 0, "fresh context has no error");
    CHECK(moe_ctx_init(NULL, NULL) == MOE_ERR_INVALID_ARGUMENT, "NULL ctx");
    CHECK_RESULT(moe_ctx_init(&ctx, &(moe_ctx_desc){.n_threads = -1}), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK(strstr(moe_ctx_error(&ctx), "n_threads") != NULL, "message names the field: %s", moe_ctx_error(&ctx));
    CHECK_RESULT(moe_ctx_init(&ctx, &(moe_ctx_desc){.allocator = {.alloc = NULL, .free = count_free}}), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(moe_ctx_init(&ctx, &(moe_ctx_desc){.kernels = MOE_KERNELS_COUNT}), MOE_ERR_INVALID_ARGUMENT, &ctx);
    /* the log callback hears every error, once */
    CHECK_OK(moe_ctx_init(&ctx, &(moe_ctx_desc){.log = count_log, .log_user = &errors}), &ctx);
    CHECK_RESULT(moe_layer_create(&ctx, &(moe_layer_desc){.kind = MOE_LAYER_MOE, .d_in = 4, .n_experts = 2, .top_k = 3}, 8, &l),
                 MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK(l == NULL, "no layer on failure");
    CHECK(errors == 1 && log_calls == 1, "log called %d times (%d errors)", log_calls, errors);
    CHECK(strstr(moe_ctx_error(&ctx), "top_k") != NULL, "message: %s", moe_ctx_error(&ctx));
    return 0;
}

static int test_rng(void) {
    double sum = 0, sq = 0, usum = 0;
    int i, n = 200000, bins[10] = {0};
    CHECK(moe_rng_u64(1, 2, 3) == moe_rng_u64(1, 2, 3), "pure function");
    CHECK(moe_rng_u64(1, 2, 3) != moe_rng_u64(1, 2, 4) && moe_rng_u64(1, 2, 3) != moe_rng_u64(1, 3, 3) &&
          moe_rng_u64(1, 2, 3) != moe_rng_u64(2, 2, 3), "seed, stream and counter all matter");
    for (i = 0; i < n; i++) {
        float z = moe_rng_normal(9, 1, (uint64_t)i), u = moe_rng_uniform(9, 2, (uint64_t)i);
        CHECK(u >= 0.0f && u < 1.0f, "uniform %g out of [0,1)", u);
        CHECK(z == z && fabsf(z) < 7.0f, "normal %g", z);
        sum += z;
        sq += (double)z * z;
        usum += u;
        bins[(int)(u * 10)]++;
    }
    CHECK(fabs(sum / n) < 0.01 && fabs(sq / n - 1.0) < 0.02, "normal mean %g var %g", sum / n, sq / n);
    CHECK(fabs(usum / n - 0.5) < 0.005, "uniform mean %g", usum / n);
    for (i = 0; i < 10; i++) CHECK(abs(bins[i] - n / 10) < n / 100, "uniform bin %d has %d", i, bins[i]);
    return 0;
}

static const moe_layer_desc alloc_layers[] = {
    {.kind = MOE_LAYER_MOE, .d_out = 6, .n_experts = 3, .top_k = 2, .expert = MOE_EXPERT_SWIGLU, .n_shared_experts = 1, .balance_loss = 0.1f},
    {.kind = MOE_LAYER_LAYERNORM},
    {.kind = MOE_LAYER_DENSE, .d_out = 3},
};

static int test_allocator_used_and_balanced(void) {
    counting c = {0, 0, 0, 0};
    moe_ctx ctx;
    moe_model *m = NULL;
    float x[8 * 5] = {0}, y[8 * 3];
    int32_t labels[8] = {0, 1, 2, 0, 1, 2, 0, 1};
    uintptr_t addr;
    moe_tensor t;
    int i;
    CHECK_OK(moe_ctx_init(&ctx, &(moe_ctx_desc){.allocator = {count_alloc, count_free, &c}}), &ctx);
    CHECK_OK(moe_model_create(&ctx, &(moe_model_desc){.d_in = 5, .n_layers = 3, .layers = alloc_layers, .max_tokens = 8}, &m), &ctx);
    CHECK(c.calls > 0 && c.live > 0, "the context's allocator is used (%ld calls)", c.calls);
    for (i = 0; i < moe_model_tensor_count(m); i++) {
        moe_model_tensor(m, i, &t);
        addr = (uintptr_t)t.data;
        CHECK(addr % 64 == 0, "tensor %s is not 64-byte aligned", t.name);
    }
    {
        long before = c.calls;
        for (i = 0; i < 40; i++) x[i] = (float)(i % 7) - 3.0f;
        for (i = 0; i < 20; i++) {
            CHECK_OK(moe_model_train_step(m, x, &(moe_target){.labels = labels}, 8, NULL), &ctx);
            CHECK_OK(moe_model_forward(m, x, 8, y, NULL), &ctx);
        }
        CHECK(c.calls == before, "forward/train_step allocated %ld times", c.calls - before);
    }
    moe_model_destroy(m);
    CHECK(c.live == 0, "%ld allocations not freed", c.live);
    return 0;
}

static int test_failing_allocator(void) {
    counting probe = {0, 0, 0, 0};
    moe_ctx ctx;
    moe_model *m = NULL;
    long n, total;
    CHECK_OK(moe_ctx_init(&ctx, &(moe_ctx_desc){.allocator = {count_alloc, count_free, &probe}}), &ctx);
    CHECK_OK(moe_model_create(&ctx, &(moe_model_desc){.d_in = 5, .n_layers = 3, .layers = alloc_layers, .max_tokens = 8}, &m), &ctx);
    moe_model_destroy(m);
    total = probe.calls;
    CHECK(total >= 4, "model creation allocates (%ld)", total);
    for (n = 1; n <= total; n++) {
        counting c = {0, 0, n, 0};
        moe_result r;
        moe_ctx_init(&ctx, &(moe_ctx_desc){.allocator = {count_alloc, count_free, &c}});
        m = (moe_model *)&c;  /* must be overwritten with NULL */
        r = moe_model_create(&ctx, &(moe_model_desc){.d_in = 5, .n_layers = 3, .layers = alloc_layers, .max_tokens = 8}, &m);
        CHECK(r == MOE_ERR_OUT_OF_MEMORY, "failing allocation %ld of %ld: %s", n, total, moe_result_string(r));
        CHECK(m == NULL, "failing allocation %ld: model pointer not cleared", n);
        CHECK(c.live == 0, "failing allocation %ld: %ld blocks leaked", n, c.live);
    }
    return 0;
}

int main(void) {
    printf("test_core\n");
    RUN(test_results_and_version);
    RUN(test_ctx);
    RUN(test_rng);
    RUN(test_allocator_used_and_balanced);
    RUN(test_failing_allocator);
    TEST_END();
}
