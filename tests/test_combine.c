/* The combines beyond the weighted sum (README "Combine"): voting on a hand-computed case and on
   the bundled digits (sane accuracy, close to the gated sum it trains), backward refused after a
   vote; stacking saved and loaded with its tensor names; bad combine settings refused; and both
   bitwise identical for 1 and 2 threads. Gradients: tests/test_grad.c; PyTorch: tests/test_fixtures.c. */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "test.h"

#ifndef TMP_DIR
#define TMP_DIR "build/tests/tmp_combine"
#endif

static moe_ctx ctx;

static void set_tensor(moe_layer *l, const char *name, const float *v) {
    int i;
    for (i = 0; i < moe_layer_tensor_count(l); i++) {
        moe_tensor t;
        moe_layer_tensor(l, i, &t);
        if (strcmp(t.name, name) == 0) { memcpy(t.data, v, sizeof(float) * (size_t)t.size); return; }
    }
    CHECK(0, "no tensor %s", name);
}

/* Three linear experts whose outputs are their biases: expert 0 votes class 2, experts 1 and 2
   class 0. Router bias [1, 0.5, 0] with zero weights: every token takes experts 0 and 1 with
   gates g0 = 1 / (1 + e^-0.5) > g1 = 1 - g0. */
static int test_vote_by_hand(void) {
    const float zeros[3 * 3 * 2] = {0}, rb[3] = {1.0f, 0.5f, 0.0f};
    const float eb[3 * 3] = {0.1f, 0.2f, 0.9f, /* */ 0.7f, 0.3f, -1.0f, /* */ 2.0f, 0.0f, 0.0f};
    const moe_combine kinds[2] = {MOE_COMBINE_VOTE, MOE_COMBINE_VOTE_MAJORITY};
    float x[4 * 2] = {1, 2, -3, 0.5f, 0, 0, 7, -7}, y[4 * 3], dy[4 * 3] = {0};
    double g0 = 1.0 / (1.0 + exp(-0.5)), g1 = 1.0 - g0;
    int k, t;
    for (k = 0; k < 2; k++) {
        moe_layer *l = NULL;
        moe_layer_desc d = {.kind = MOE_LAYER_MOE, .d_in = 2, .d_out = 3, .n_experts = 3, .top_k = 2, .expert = MOE_EXPERT_LINEAR,
                            .router_bias = MOE_FLAG_ON, .combine = kinds[k]};
        CHECK_OK(moe_layer_create(&ctx, &d, 4, &l), &ctx);
        if (!l) return 0;
        set_tensor(l, "router.weight", zeros);
        set_tensor(l, "router.bias", rb);
        set_tensor(l, "experts.fc0.weight", zeros);
        set_tensor(l, "experts.fc0.bias", eb);
        CHECK_OK(moe_layer_forward(l, x, 4, y, NULL), &ctx);
        for (t = 0; t < 4; t++) {
            const float *yt = y + t * 3;
            if (k == 0) {   /* class 0 gets g1, class 2 gets g0 */
                CHECK(fabs(yt[0] - g1) < 1e-6 && yt[1] == 0.0f && fabs(yt[2] - g0) < 1e-6, "weighted vote %g %g %g", yt[0], yt[1], yt[2]);
            } else {        /* one vote each: the tie goes to the larger gate sum */
                CHECK(fabs(yt[0] - (1.0 + 0.5 * g1)) < 1e-6 && yt[1] == 0.0f && fabs(yt[2] - (1.0 + 0.5 * g0)) < 1e-6,
                      "majority vote %g %g %g", yt[0], yt[1], yt[2]);
            }
        }
        /* a vote has no gradient */
        CHECK_RESULT(moe_layer_backward(l, dy, NULL, 0), MOE_ERR_STATE, &ctx);
        CHECK(strstr(moe_ctx_error(&ctx), "training forward") != NULL, "message: %s", moe_ctx_error(&ctx));
        /* the training forward is the weighted sum of the experts' logits, and has one */
        CHECK_OK(moe_layer_forward(l, x, 4, y, &(moe_forward_opts){.training = 1}), &ctx);
        for (t = 0; t < 3; t++) CHECK(fabs(y[t] - (g0 * eb[t] + g1 * eb[3 + t])) < 1e-6, "training output %d: %g", t, y[t]);
        CHECK_OK(moe_layer_backward(l, dy, NULL, 0), &ctx);
        moe_layer_destroy(l);
    }
    return 0;
}

/* ---- digits ------------------------------------------------------------------------------ */
#include "digits.h"

static double accuracy(const int32_t *pred, const int32_t *want, int64_t n) {
    int64_t i, c = 0;
    for (i = 0; i < n; i++) c += pred[i] == want[i];
    return (double)c / (double)n;
}

/* One MoE layer whose experts output the 10 class logits: trained on the gated sum, evaluated by
   the weighted vote, the majority vote (same parameters) and the gated sum itself. */
static int test_vote_digits(void) {
    moe_layer_desc layer = {.kind = MOE_LAYER_MOE, .d_out = 10, .n_experts = 4, .top_k = 2, .d_hidden = 32, .balance_loss = 0.01f,
                            .combine = MOE_COMBINE_VOTE};
    moe_model_desc md = {.d_in = 64, .n_layers = 1, .layers = &layer, .max_tokens = 512, .optimizer = {.lr = 1e-2f}};
    moe_model *m = NULL, *maj = NULL;
    int64_t n_train = 0, n_test = 0, i, b, seen[10] = {0}, n_params = 0, n_maj = 0;
    float *xtr, *xte, *y;
    int32_t *ytr, *yte, *pred;
    double acc_vote, acc_major, acc_sum;
    int e;
    if (!load_digits()) { CHECK(0, "cannot read the digits from %s", DATA_DIR); return 0; }
    xtr = (float *)malloc(sizeof(float) * (size_t)(n_samples * 64));
    xte = (float *)malloc(sizeof(float) * (size_t)(n_samples * 64));
    y = (float *)malloc(sizeof(float) * (size_t)(n_samples * 10));
    ytr = (int32_t *)malloc(sizeof(int32_t) * (size_t)n_samples);
    yte = (int32_t *)malloc(sizeof(int32_t) * (size_t)n_samples);
    pred = (int32_t *)malloc(sizeof(int32_t) * (size_t)n_samples);
    for (i = 0; i < n_samples; i++) {  /* the demo's split: every fifth sample of each digit is a test sample */
        if (seen[labels[i]]++ % 5 == 4) { memcpy(xte + n_test * 64, images + i * 64, 256); yte[n_test++] = labels[i]; }
        else { memcpy(xtr + n_train * 64, images + i * 64, 256); ytr[n_train++] = labels[i]; }
    }
    CHECK_OK(moe_model_create(&ctx, &md, &m), &ctx);
    layer.combine = MOE_COMBINE_VOTE_MAJORITY;
    CHECK_OK(moe_model_create(&ctx, &md, &maj), &ctx);
    if (m && maj) {
        for (e = 0; e < 10; e++)
            for (b = 0; b + 32 <= n_train; b += 32)
                CHECK_OK(moe_model_train_step(m, xtr + b * 64, &(moe_target){.labels = ytr + b}, 32, NULL), &ctx);
        CHECK_OK(moe_model_predict(m, xte, n_test, pred), &ctx);
        acc_vote = accuracy(pred, yte, n_test);
        float *src = moe_model_params(m, &n_params), *dst = moe_model_params(maj, &n_maj);
        memcpy(dst, src, sizeof(float) * (size_t)n_params);
        CHECK(n_maj == n_params, "the voting kinds differ in parameters");
        CHECK_OK(moe_model_predict(maj, xte, n_test, pred), &ctx);
        acc_major = accuracy(pred, yte, n_test);
        CHECK_OK(moe_model_forward(m, xte, n_test, y, &(moe_forward_opts){.training = 1}), &ctx);
        for (i = 0; i < n_test; i++) {
            int64_t c, best = 0;
            for (c = 1; c < 10; c++)
                if (y[i * 10 + c] > y[i * 10 + best]) best = c;
            pred[i] = (int32_t)best;
        }
        acc_sum = accuracy(pred, yte, n_test);
        printf("    digits test accuracy: weighted vote %.4f, majority vote %.4f, gated sum %.4f\n", acc_vote, acc_major, acc_sum);
        CHECK(acc_vote >= 0.90 && acc_major >= 0.90, "voting accuracy too low: %.4f / %.4f", acc_vote, acc_major);
        CHECK(acc_vote >= acc_sum - 0.05 && acc_major >= acc_sum - 0.05, "voting loses more than 5 points to the gated sum %.4f", acc_sum);
    }
    moe_model_destroy(m);
    moe_model_destroy(maj);
    free(xtr); free(xte); free(y); free(ytr); free(yte); free(pred);
    return 0;
}

/* ---- stacking ---------------------------------------------------------------------------- */
static const moe_layer_desc stack_layers[] = {
    {.kind = MOE_LAYER_MOE, .d_out = 9, .n_experts = 5, .top_k = 2, .d_hidden = 12, .combine = MOE_COMBINE_STACK, .d_expert_out = 4,
     .expert = MOE_EXPERT_GEGLU},
    {.kind = MOE_LAYER_MOE, .n_experts = 3, .top_k = 1, .d_hidden = 7, .combine = MOE_COMBINE_VOTE_MAJORITY, .d_out = 4},
};

static int test_stack_files(void) {
    moe_model *a = NULL, *b = NULL, *c = NULL;
    moe_model_desc md = {.d_in = 6, .n_layers = 2, .layers = stack_layers, .max_tokens = 64};
    moe_tensor t;
    char json[4096], path[512];
    float x[20 * 6], ya[20 * 4], yb[20 * 4];
    int i;
    for (i = 0; i < 20 * 6; i++) x[i] = moe_rng_normal(3, 1, (uint64_t)i);
    snprintf(path, sizeof path, "%s/stack.safetensors", TMP_DIR);
    CHECK_OK(moe_model_create(&ctx, &md, &a), &ctx);
    if (!a) return 0;
    CHECK_OK(moe_model_find_tensor(a, "layers.0.combine.weight", &t), &ctx);
    CHECK(t.ndim == 2 && t.shape[0] == 9 && t.shape[1] == 5 * 4, "combine.weight shape [%lld, %lld]", (long long)t.shape[0], (long long)t.shape[1]);
    CHECK_OK(moe_model_find_tensor(a, "layers.0.combine.bias", &t), &ctx);
    CHECK(t.ndim == 1 && t.shape[0] == 9, "combine.bias shape");
    CHECK_OK(moe_model_find_tensor(a, "layers.0.experts.w2.weight", &t), &ctx);
    CHECK(t.shape[0] == 5 && t.shape[1] == 4 && t.shape[2] == 12, "experts.w2.weight is [E, d_expert_out, h]");
    CHECK_RESULT(moe_model_find_tensor(a, "layers.1.combine.weight", &t), MOE_ERR_INVALID_ARGUMENT, &ctx);
    moe_model_config_json(a, json, sizeof json);
    CHECK(strstr(json, "\"combine\":\"stack\",\"d_expert_out\":4") && strstr(json, "\"combine\":\"vote_majority\"") &&
          strstr(json, "\"expert\":\"geglu\""), "config: %s", json);
    CHECK_OK(moe_model_forward(a, x, 20, ya, NULL), &ctx);
    CHECK_OK(moe_model_save(a, path), &ctx);
    CHECK_OK(moe_model_load(&ctx, path, 0, &b), &ctx);
    if (b) {
        CHECK(moe_model_get_desc(b)->layers[0].combine == MOE_COMBINE_STACK && moe_model_get_desc(b)->layers[0].d_expert_out == 4 &&
              moe_model_get_desc(b)->layers[1].combine == MOE_COMBINE_VOTE_MAJORITY, "combine settings lost");
        CHECK_OK(moe_model_forward(b, x, 20, yb, NULL), &ctx);
        CHECK(memcmp(ya, yb, sizeof ya) == 0, "the loaded model computes something else");
    }
    CHECK_OK(moe_model_from_config(&ctx, json, 0, &c), &ctx);
    CHECK(c && moe_model_parameter_count(c) == moe_model_parameter_count(a), "from_config");
    moe_model_destroy(b); moe_model_destroy(c);
    /* reduced-precision expert weights (GeGLU experts; combine.weight stays f32): saved as used */
    b = NULL;
    CHECK_OK(moe_model_quantize(a, MOE_DTYPE_I8), &ctx);
    CHECK_OK(moe_model_forward(a, x, 20, ya, NULL), &ctx);
    CHECK_OK(moe_model_save(a, path), &ctx);
    CHECK_OK(moe_model_load(&ctx, path, 0, &b), &ctx);
    if (b) {
        CHECK_OK(moe_model_forward(b, x, 20, yb, NULL), &ctx);
        CHECK(memcmp(ya, yb, sizeof ya) == 0, "the loaded int8 model computes something else");
    }
    moe_model_destroy(a); moe_model_destroy(b);
    return 0;
}

static int test_bad_settings(void) {
    moe_layer *l = NULL;
    moe_layer_desc d = {.kind = MOE_LAYER_MOE, .d_in = 4, .d_out = 5, .d_expert_out = 3};
    CHECK_RESULT(moe_layer_create(&ctx, &d, 8, &l), MOE_ERR_SHAPE, &ctx);           /* d_expert_out needs stack */
    CHECK(strstr(moe_ctx_error(&ctx), "d_expert_out") != NULL, "message: %s", moe_ctx_error(&ctx));
    d.d_expert_out = 0;
    d.combine = MOE_COMBINE_COUNT;
    CHECK_RESULT(moe_layer_create(&ctx, &d, 8, &l), MOE_ERR_INVALID_ARGUMENT, &ctx);
    d.combine = MOE_COMBINE_STACK;
    d.n_shared_experts = 1;
    CHECK_RESULT(moe_layer_create(&ctx, &d, 8, &l), MOE_ERR_UNSUPPORTED, &ctx);
    d.n_shared_experts = 0;
    d.d_expert_out = -2;
    CHECK_RESULT(moe_layer_create(&ctx, &d, 8, &l), MOE_ERR_SHAPE, &ctx);
    d.d_expert_out = 0;
    d.combine = MOE_COMBINE_VOTE;
    d.d_out = 4;
    d.residual = 1;
    CHECK_RESULT(moe_layer_create(&ctx, &d, 8, &l), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK(l == NULL, "a refused layer was returned");
    /* an unknown combine name in a file */
    CHECK_RESULT(moe_model_from_config(&ctx, "{\"format\":\"moe.h\",\"version\":1,\"d_in\":3,\"layers\":[{\"kind\":\"moe\",\"combine\":\"median\"}]}", 0,
                                       &(moe_model *){NULL}), MOE_ERR_FORMAT, &ctx);
    return 0;
}

/* Stacking (training forward + backward) and voting (inference): 1 and 2 threads, bitwise. */
static int test_threads(void) {
    moe_model_desc md = {.d_in = 6, .n_layers = 2, .layers = stack_layers, .max_tokens = 300, .loss = MOE_LOSS_CROSS_ENTROPY};
    moe_ctx c1, c2;
    moe_model *m1 = NULL, *m2 = NULL;
    float *x = (float *)malloc(sizeof(float) * 300 * 6), y1[300 * 4], y2[300 * 4];
    int32_t lab[300];
    int i;
    for (i = 0; i < 300 * 6; i++) x[i] = moe_rng_normal(4, 1, (uint64_t)i);
    for (i = 0; i < 300; i++) lab[i] = (int32_t)(moe_rng_u64(4, 2, (uint64_t)i) % 4);
    moe_ctx_init(&c1, &(moe_ctx_desc){.seed = 3, .n_threads = 1});
    moe_ctx_init(&c2, &(moe_ctx_desc){.seed = 3, .n_threads = 2});
    CHECK_OK(moe_model_create(&c1, &md, &m1), &c1);
    CHECK_OK(moe_model_create(&c2, &md, &m2), &c2);
    if (m1 && m2) {
        int64_t n = 0;
        const float *p1, *p2;
        for (i = 0; i < 3; i++) {
            CHECK_OK(moe_model_train_step(m1, x, &(moe_target){.labels = lab}, 300, NULL), &c1);
            CHECK_OK(moe_model_train_step(m2, x, &(moe_target){.labels = lab}, 300, NULL), &c2);
        }
        p1 = moe_model_params(m1, &n);
        p2 = moe_model_params(m2, NULL);
        CHECK(memcmp(p1, p2, sizeof(float) * (size_t)n) == 0, "training differs by threads");
        CHECK_OK(moe_model_forward(m1, x, 300, y1, NULL), &c1);
        CHECK_OK(moe_model_forward(m2, x, 300, y2, NULL), &c2);
        CHECK(memcmp(y1, y2, sizeof y1) == 0, "votes differ by threads");
    }
    moe_model_destroy(m1);
    moe_model_destroy(m2);
    free(x);
    return 0;
}

int main(void) {
    printf("test_combine\n");
    test_make_dir(TMP_DIR);
    moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = 11});
    RUN(test_vote_by_hand);
    RUN(test_vote_digits);
    RUN(test_stack_files);
    RUN(test_bad_settings);
    RUN(test_threads);
    free(images);
    free(labels);
    TEST_END();
}
