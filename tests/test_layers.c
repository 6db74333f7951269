/* Layers and routing semantics: the fast path against the plain kernels and the double reference
   at awkward sizes, ties, capacity and pass-through, empty experts, statistics, the layer-level
   API, noise, losses, optimizers and the learning-rate schedule. */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "test.h"
#include "ref_model.h"

static void fill(float *v, int64_t n, uint64_t stream, float scale) {
    int64_t i;
    for (i = 0; i < n; i++) v[i] = scale * moe_rng_normal(5, stream, (uint64_t)i);
}

static moe_model *make(moe_ctx *ctx, int64_t d_in, int n, const moe_layer_desc *layers, int64_t max_tokens, moe_loss loss) {
    moe_model *m = NULL;
    CHECK_OK(moe_model_create(ctx, &(moe_model_desc){.d_in = d_in, .n_layers = n, .layers = layers, .max_tokens = max_tokens, .loss = loss}, &m), ctx);
    return m;
}

static const moe_layer_desc mixed[] = {
    {.kind = MOE_LAYER_MOE, .d_out = 19, .n_experts = 5, .top_k = 2, .expert = MOE_EXPERT_SWIGLU, .d_hidden = 21,
     .n_shared_experts = 1, .d_shared_hidden = 9, .balance_loss = 0.1f, .z_loss = 0.01f},
    {.kind = MOE_LAYER_RMSNORM},
    {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_NOISY_TOPK, .n_experts = 6, .top_k = 3, .d_hidden = 17, .n_hidden_layers = 2,
     .activation = MOE_ACT_GELU, .importance_loss = 0.1f, .load_loss = 0.1f, .residual = 1},
    {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_SWITCH, .n_experts = 4, .capacity_factor = 1.0f, .residual = 1, .d_hidden = 11},
    {.kind = MOE_LAYER_LAYERNORM},
    {.kind = MOE_LAYER_DENSE, .d_out = 7, .activation = MOE_ACT_IDENTITY},
};

/* MOE_KERNELS_REFERENCE (plain loops) and a fast kernel family agree on outputs and all gradients
   (a training step on 37 tokens, an inference forward on 5, which takes the decode path); the
   family gives the same bits on 1 and 2 threads. */
static void kernels_parity(moe_kernels kernels, const char *name) {
    moe_ctx fast, ref, fast2;
    moe_model *a, *b, *c;
    int64_t T = 37, D = 13, C = 7, n, i;
    float x[37 * 13], dy[37 * 7], ya[37 * 7], yb[37 * 7], yc[37 * 7], dxa[37 * 13], dxb[37 * 13];
    moe_forward_opts opts = {.training = 1};
    moe_ctx_init(&fast, &(moe_ctx_desc){.seed = 3, .n_threads = 1, .kernels = kernels});
    moe_ctx_init(&fast2, &(moe_ctx_desc){.seed = 3, .n_threads = 2, .kernels = kernels});
    moe_ctx_init(&ref, &(moe_ctx_desc){.seed = 3, .kernels = MOE_KERNELS_REFERENCE});
    a = make(&fast, D, 6, mixed, 64, MOE_LOSS_MSE);
    b = make(&ref, D, 6, mixed, 64, MOE_LOSS_MSE);
    c = make(&fast2, D, 6, mixed, 64, MOE_LOSS_MSE);
    if (!a || !b || !c) return;
    fill(x, T * D, 1, 1.0f);
    fill(dy, T * C, 2, 1.0f);
    CHECK_OK(moe_model_forward(a, x, T, ya, &opts), &fast);
    CHECK_OK(moe_model_forward(b, x, T, yb, &opts), &ref);
    CHECK_OK(moe_model_forward(c, x, T, yc, &opts), &fast2);
    CHECK(test_worst(ya, yb, T * C, 1e-4, 1e-5, NULL) <= 1.0, "%s: outputs differ", name);
    CHECK(memcmp(ya, yc, sizeof ya) == 0, "%s: 1 and 2 threads give other outputs", name);
    CHECK_OK(moe_model_backward(a, dy, dxa, MOE_BACKWARD_AUX), &fast);
    CHECK_OK(moe_model_backward(b, dy, dxb, MOE_BACKWARD_AUX), &ref);
    CHECK(test_worst(dxa, dxb, T * D, 1e-3, 1e-5, NULL) <= 1.0, "%s: dx differs", name);
    {
        float *ga = moe_model_grads(a, &n), *gb = moe_model_grads(b, NULL);
        long where;
        double w = test_worst(ga, gb, n, 1e-3, 1e-5, &where);
        CHECK(w <= 1.0, "%s: gradient %ld differs: %g vs %g", name, where, where >= 0 ? ga[where] : 0.0, where >= 0 ? gb[where] : 0.0);
        for (i = 0; i < n; i++) if (ga[i] != 0.0f) break;
        CHECK(i < n, "%s: gradients are all zero", name);
    }
    CHECK_OK(moe_model_forward(a, x, 5, ya, NULL), &fast);
    CHECK_OK(moe_model_forward(b, x, 5, yb, NULL), &ref);
    CHECK_OK(moe_model_forward(c, x, 5, yc, NULL), &fast2);
    CHECK(test_worst(ya, yb, 5 * C, 1e-4, 1e-5, NULL) <= 1.0, "%s: decode outputs differ", name);
    CHECK(memcmp(ya, yc, sizeof(float) * 5 * 7) == 0, "%s: decode: 1 and 2 threads give other outputs", name);
    moe_model_destroy(a);
    moe_model_destroy(b);
    moe_model_destroy(c);
}

/* Every kernel family a context can ask for; MOE_KERNELS_AVX2 only where the CPU runs it (elsewhere
   moe_ctx_init refuses it with MOE_ERR_UNSUPPORTED). */
static int test_reference_kernels_parity(void) {
    moe_ctx ctx;
    moe_result r = moe_ctx_init(&ctx, &(moe_ctx_desc){.kernels = MOE_KERNELS_AVX2});
    int avx2 = 0;
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__)) && !defined(MOE_NO_VECTOR_EXTENSIONS)
    __builtin_cpu_init();
    avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    CHECK(r == (avx2 ? MOE_OK : MOE_ERR_UNSUPPORTED), "MOE_KERNELS_AVX2 where AVX2 is %s: %s", avx2 ? "there" : "not there", moe_result_string(r));
    if (avx2) CHECK(strcmp(moe_ctx_kernels(&ctx), "avx2") == 0, "MOE_KERNELS_AVX2 runs %s", moe_ctx_kernels(&ctx));
    moe_ctx_init(&ctx, &(moe_ctx_desc){.kernels = MOE_KERNELS_PORTABLE});
    CHECK(strcmp(moe_ctx_kernels(&ctx), "generic") == 0, "MOE_KERNELS_PORTABLE runs %s", moe_ctx_kernels(&ctx));
    moe_ctx_init(&ctx, &(moe_ctx_desc){.kernels = MOE_KERNELS_REFERENCE});
    CHECK(strcmp(moe_ctx_kernels(&ctx), "reference") == 0, "MOE_KERNELS_REFERENCE runs %s", moe_ctx_kernels(&ctx));
    kernels_parity(MOE_KERNELS_DEFAULT, "default");
    kernels_parity(MOE_KERNELS_PORTABLE, "portable");
    if (avx2) kernels_parity(MOE_KERNELS_AVX2, "avx2");
    return 0;
}

/* The fast path against the double-precision reference for 1, 7, 17 and 255 tokens. */
static int test_awkward_token_counts(void) {
    const int64_t counts[] = {1, 7, 17, 255};
    moe_ctx ctx;
    moe_model *m;
    int c;
    moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = 11});
    m = make(&ctx, 13, 6, mixed, 255, MOE_LOSS_MSE);
    if (!m) return 0;
    for (c = 0; c < 4; c++) {
        int64_t T = counts[c], C = moe_model_d_out(m), n_params, i;
        float *x = (float *)malloc(sizeof(float) * (size_t)(T * 13)), *y = (float *)malloc(sizeof(float) * (size_t)(T * C));
        double *yr = (double *)malloc(sizeof(double) * (size_t)(T * C)), *pd;
        float *pf = moe_model_params(m, &n_params);
        ref_run r;
        fill(x, T * 13, 10 + (uint64_t)c, 1.0f);
        CHECK_OK(moe_model_forward(m, x, T, y, NULL), &ctx);
        pd = (double *)malloc(sizeof(double) * (size_t)n_params);
        for (i = 0; i < n_params; i++) pd[i] = pf[i];
        memset(&r, 0, sizeof r);
        r.model = m;
        r.params = pd;
        ref_model_forward(&r, x, T, yr);
        for (i = 0; i < T * C; i++)
            if (!test_close(y[i], yr[i], 1e-4, 1e-4)) break;
        CHECK(i == T * C, "T=%lld: output %lld is %g, reference %g", (long long)T, (long long)i, i < T * C ? y[i] : 0.0, i < T * C ? yr[i] : 0.0);
        free(x); free(y); free(yr); free(pd);
    }
    moe_model_destroy(m);
    return 0;
}

/* Zero router weights: every logit ties, so top-k takes experts 0..k-1 with equal gates,
   the switch router sends everything to expert 0 and capacity drops the rest in token order. */
static int test_ties_capacity_passthrough(void) {
    moe_ctx ctx;
    moe_layer *l = NULL;
    moe_stats st;
    moe_tensor t;
    int64_t T = 10, D = 6, i, e;
    float x[60], y[60];
    moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = 4});
    CHECK_OK(moe_layer_create(&ctx, &(moe_layer_desc){.kind = MOE_LAYER_MOE, .d_in = D, .n_experts = 4, .top_k = 3}, 16, &l), &ctx);
    if (!l) return 0;
    moe_layer_tensor(l, 0, &t);
    CHECK(strcmp(t.name, "router.weight") == 0, "first tensor is %s", t.name);
    memset(t.data, 0, sizeof(float) * (size_t)t.size);
    fill(x, T * D, 3, 1.0f);
    CHECK_OK(moe_layer_forward(l, x, T, y, NULL), &ctx);
    CHECK_OK(moe_layer_stats(l, &st), &ctx);
    CHECK(st.tokens_per_expert[0] == T && st.tokens_per_expert[1] == T && st.tokens_per_expert[2] == T && st.tokens_per_expert[3] == 0,
          "ties go to the lower index: %lld %lld %lld %lld", (long long)st.tokens_per_expert[0], (long long)st.tokens_per_expert[1],
          (long long)st.tokens_per_expert[2], (long long)st.tokens_per_expert[3]);
    CHECK(fabsf(st.router_entropy - logf(4.0f)) < 1e-5f, "uniform router entropy %g", st.router_entropy);
    CHECK(fabsf(l->gate[0] - 1.0f / 3.0f) < 1e-6f && fabsf(l->gate[2] - 1.0f / 3.0f) < 1e-6f, "renormalised gates %g", l->gate[0]);
    moe_layer_destroy(l);

    /* switch, capacity ceil(0.5 * 10 * 1 / 4) = 2: tokens 0 and 1 go to expert 0, the rest pass through */
    CHECK_OK(moe_layer_create(&ctx, &(moe_layer_desc){.kind = MOE_LAYER_MOE, .d_in = D, .router = MOE_ROUTER_SWITCH, .n_experts = 4,
                                                      .capacity_factor = 0.5f}, 16, &l), &ctx);
    if (!l) return 0;
    moe_layer_tensor(l, 0, &t);
    memset(t.data, 0, sizeof(float) * (size_t)t.size);
    CHECK_OK(moe_layer_forward(l, x, T, y, NULL), &ctx);
    CHECK_OK(moe_layer_stats(l, &st), &ctx);
    CHECK(st.tokens_per_expert[0] == 2 && st.dropped_tokens == T - 2 && st.dropped_assignments == T - 2,
          "capacity 2: kept %lld, dropped %lld", (long long)st.tokens_per_expert[0], (long long)st.dropped_tokens);
    CHECK(fabsf(st.load_cv - sqrtf(3.0f)) < 1e-5f, "load cv of (2,0,0,0) is sqrt(3), got %g", st.load_cv);
    CHECK(memcmp(y + 2 * D, x + 2 * D, sizeof(float) * (size_t)((T - 2) * D)) == 0, "dropped tokens pass through unchanged");
    CHECK(memcmp(y, x, sizeof(float) * (size_t)(2 * D)) != 0, "routed tokens are transformed");
    for (e = 1; e < 4; e++) CHECK(st.tokens_per_expert[e] == 0, "expert %lld is empty", (long long)e);
    /* gradients: the pass-through carries dy; empty experts get exactly zero */
    {
        float dy[60], dx[60];
        int k;
        fill(dy, T * D, 4, 1.0f);
        CHECK_OK(moe_layer_backward(l, dy, dx, 0), &ctx);
        for (i = 2 * D; i < T * D; i++) if (dx[i] != dy[i]) break;
        CHECK(i == T * D, "dropped token %lld: dx %g, dy %g", (long long)(i / D), i < T * D ? dx[i] : 0.0, i < T * D ? dy[i] : 0.0);
        for (k = 0; k < moe_layer_tensor_count(l); k++) {
            moe_tensor w;
            moe_layer_tensor(l, k, &w);
            if (strncmp(w.name, "experts.", 8) != 0) continue;
            for (i = w.size / 4; i < w.size; i++) if (w.grad[i] != 0.0f) break;  /* experts 1..3 */
            CHECK(i == w.size, "%s: an empty expert has gradient %g", w.name, w.grad[i]);
        }
    }
    moe_layer_destroy(l);
    return 0;
}

/* k = E: renormalised or not, the gates are the full softmax (the dense soft mixture). */
static int test_soft_mixture(void) {
    moe_ctx ctx;
    moe_model *a, *b;
    moe_layer_desc la = {.kind = MOE_LAYER_MOE, .n_experts = 4, .top_k = 4, .d_hidden = 8};
    moe_layer_desc lb = la;
    float x[9 * 5], ya[9 * 5], yb[9 * 5];
    moe_stats st;
    lb.renormalize = MOE_FLAG_OFF;
    moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = 8});
    a = make(&ctx, 5, 1, &la, 9, MOE_LOSS_MSE);
    b = make(&ctx, 5, 1, &lb, 9, MOE_LOSS_MSE);
    if (!a || !b) return 0;
    fill(x, 45, 6, 1.0f);
    moe_model_forward(a, x, 9, ya, NULL);
    moe_model_forward(b, x, 9, yb, NULL);
    CHECK(test_worst(ya, yb, 45, 1e-6, 1e-7, NULL) <= 1.0, "k = E: renormalisation changes nothing");
    moe_model_stats(a, 0, &st);
    CHECK(st.tokens_per_expert[0] == 9 && st.tokens_per_expert[3] == 9 && st.load_cv == 0.0f, "every token uses every expert");
    moe_model_destroy(a);
    moe_model_destroy(b);
    return 0;
}

/* Capacity: no expert ever holds more than ceil(cf*T*k/E); kept + dropped = T*k. */
static int test_capacity_bounds(void) {
    moe_ctx ctx;
    moe_model *m;
    const float factors[] = {0.3f, 0.8f, 1.0f, 1.25f, 2.0f};
    int f;
    moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = 21});
    for (f = 0; f < 5; f++) {
        moe_layer_desc d = {.kind = MOE_LAYER_MOE, .n_experts = 6, .top_k = 2, .capacity_factor = factors[f], .d_hidden = 4};
        float x[50 * 8];
        moe_stats st;
        int64_t cap = (int64_t)ceil((double)factors[f] * 50 * 2 / 6), kept = 0;
        int e;
        m = make(&ctx, 8, 1, &d, 50, MOE_LOSS_MSE);
        if (!m) return 0;
        fill(x, 400, 30 + (uint64_t)f, 2.0f);
        moe_model_forward(m, x, 50, NULL, NULL);
        moe_model_stats(m, 0, &st);
        for (e = 0; e < 6; e++) {
            CHECK(st.tokens_per_expert[e] <= cap, "cf %g: expert %d holds %lld > %lld", factors[f], e, (long long)st.tokens_per_expert[e], (long long)cap);
            kept += st.tokens_per_expert[e];
        }
        CHECK(kept + st.dropped_assignments == 100, "cf %g: %lld kept + %lld dropped", factors[f], (long long)kept, (long long)st.dropped_assignments);
        moe_model_destroy(m);
    }
    return 0;
}

/* The layer-level API and a one-layer model are the same computation (same seed, same bits). */
static int test_layer_api_matches_model(void) {
    moe_ctx ctx;
    moe_layer *l = NULL;
    moe_model *m;
    moe_layer_desc d = mixed[0];
    float x[12 * 13], dy[12 * 19], ya[12 * 19], yb[12 * 19], dxa[12 * 13], dxb[12 * 13];
    int64_t na, nb;
    d.d_in = 13;
    moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = 5});
    CHECK_OK(moe_layer_create(&ctx, &d, 12, &l), &ctx);
    m = make(&ctx, 13, 1, &d, 12, MOE_LOSS_MSE);
    if (!l || !m) return 0;
    moe_layer_params(l, &na);
    moe_model_params(m, &nb);
    {   /* router 5x13; experts w1, w3 5x21x13 and w2 5x19x21; shared w1, w3 9x13 and w2 19x9 */
        CHECK(moe_model_parameter_count(m) == 5 * 13 + 2 * 5 * 21 * 13 + 5 * 19 * 21 + 2 * 9 * 13 + 19 * 9, "parameter count %lld",
              (long long)moe_model_parameter_count(m));
        CHECK(nb >= moe_model_parameter_count(m), "the blob holds every parameter");
    }
    CHECK(na == nb && memcmp(moe_layer_params(l, NULL), moe_model_params(m, NULL), sizeof(float) * (size_t)nb) == 0, "same initial parameters");
    fill(x, 12 * 13, 7, 1.0f);
    fill(dy, 12 * 19, 8, 1.0f);
    CHECK_OK(moe_layer_forward(l, x, 12, ya, NULL), &ctx);
    CHECK_OK(moe_model_forward(m, x, 12, yb, NULL), &ctx);
    CHECK(memcmp(ya, yb, sizeof ya) == 0, "same outputs");
    CHECK_OK(moe_layer_backward(l, dy, dxa, MOE_BACKWARD_AUX), &ctx);
    CHECK_OK(moe_model_backward(m, dy, dxb, MOE_BACKWARD_AUX), &ctx);
    CHECK(memcmp(dxa, dxb, sizeof dxa) == 0, "same dx");
    CHECK(memcmp(moe_layer_grads(l, NULL), moe_model_grads(m, NULL), sizeof(float) * (size_t)nb) == 0, "same gradients");
    /* gradients accumulate */
    CHECK_OK(moe_layer_backward(l, dy, NULL, MOE_BACKWARD_AUX), &ctx);
    {
        float *g1 = moe_model_grads(m, NULL), *g2 = moe_layer_grads(l, NULL);
        int64_t i;
        for (i = 0; i < nb; i++) if (g2[i] != 2.0f * g1[i] && fabsf(g2[i] - 2.0f * g1[i]) > 1e-6f * fabsf(g1[i])) break;
        CHECK(i == nb, "a second backward doubles the gradients (entry %lld)", (long long)i);
    }
    moe_layer_destroy(l);
    moe_model_destroy(m);
    return 0;
}

/* Router noise: a pure function of seed, layer and step; off at inference. */
static int test_noise(void) {
    moe_layer_desc d = {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_NOISY_TOPK, .n_experts = 5, .top_k = 2, .d_hidden = 4};
    moe_forward_opts train = {.training = 1};
    float x[20 * 6], y1[20 * 6], y2[20 * 6], y3[20 * 6], y4[20 * 6];
    moe_ctx c1, c2;
    moe_model *a, *b;
    moe_tensor nw;
    moe_ctx_init(&c1, &(moe_ctx_desc){.seed = 1});
    moe_ctx_init(&c2, &(moe_ctx_desc){.seed = 2});
    a = make(&c1, 6, 1, &d, 20, MOE_LOSS_MSE);
    b = make(&c1, 6, 1, &d, 20, MOE_LOSS_MSE);
    if (!a || !b) return 0;
    fill(x, 120, 9, 1.0f);
    moe_model_find_tensor(a, "layers.0.router.noise_weight", &nw);
    CHECK(nw.size == 30 && nw.data[0] == 0.0f, "noise weights start at zero");
    moe_model_forward(a, x, 20, y1, &train);
    moe_model_forward(b, x, 20, y2, &train);
    CHECK(memcmp(y1, y2, sizeof y1) == 0, "same seed, same noise");
    moe_model_forward(a, x, 20, y3, &train);
    CHECK(memcmp(y1, y3, sizeof y1) != 0, "the next step draws new noise");
    moe_model_forward(a, x, 20, y3, NULL);
    moe_model_forward(b, x, 20, y4, NULL);
    CHECK(memcmp(y3, y4, sizeof y3) == 0, "no noise at inference");
    moe_model_destroy(b);
    b = make(&c2, 6, 1, &d, 20, MOE_LOSS_MSE);
    if (!b) return 0;
    {
        int64_t n;
        float *pa = moe_model_params(a, &n);
        memcpy(moe_model_params(b, NULL), pa, sizeof(float) * (size_t)n);
    }
    moe_model_forward(b, x, 20, y4, &train);
    CHECK(memcmp(y1, y4, sizeof y1) != 0, "another seed draws other noise");
    moe_model_destroy(a);
    moe_model_destroy(b);
    return 0;
}

static int test_losses_and_predict(void) {
    moe_ctx ctx;
    moe_model *m;
    moe_layer_desc d = {.kind = MOE_LAYER_DENSE, .d_out = 3};
    float x[2 * 2] = {1, 0, 0, 1}, y[6], loss, dy[6];
    int32_t labels[2] = {2, 0}, pred[2];
    moe_tensor w, b;
    int i;
    moe_ctx_init(&ctx, NULL);
    m = make(&ctx, 2, 1, &d, 4, MOE_LOSS_CROSS_ENTROPY);
    if (!m) return 0;
    moe_model_find_tensor(m, "layers.0.weight", &w);
    moe_model_find_tensor(m, "layers.0.bias", &b);
    /* y row 0 = (1, 2, 3), row 1 = (0.5, 0, -0.5) */
    w.data[0] = 1; w.data[1] = 0.5f; w.data[2] = 2; w.data[3] = 0; w.data[4] = 3; w.data[5] = -0.5f;
    b.data[0] = b.data[1] = b.data[2] = 0;
    CHECK_OK(moe_model_forward(m, x, 2, y, NULL), &ctx);
    CHECK_OK(moe_model_loss(m, &(moe_target){.labels = labels}, &loss, dy), &ctx);
    {
        double l0 = log(exp(1) + exp(2) + exp(3)) - 3, l1 = log(exp(0.5) + 1 + exp(-0.5)) - 0.5;
        CHECK(test_close(loss, (l0 + l1) / 2, 1e-6, 1e-7), "cross-entropy %g vs %g", loss, (l0 + l1) / 2);
        CHECK(test_close(dy[2], (exp(3) / (exp(1) + exp(2) + exp(3)) - 1) / 2, 1e-5, 1e-7), "dL/dy %g", dy[2]);
    }
    CHECK_OK(moe_model_predict(m, x, 2, pred), &ctx);
    CHECK(pred[0] == 2 && pred[1] == 0, "predict %d %d", pred[0], pred[1]);
    labels[0] = 3;
    CHECK_RESULT(moe_model_loss(m, &(moe_target){.labels = labels}, &loss, dy), MOE_ERR_INVALID_ARGUMENT, &ctx);
    moe_model_destroy(m);
    {
        float t[6] = {0, 1, 0.5f, 1, 0, 0.25f};
        double mse = 0, bce = 0;
        float yy[6];
        m = make(&ctx, 2, 1, &d, 4, MOE_LOSS_MSE);
        moe_model_find_tensor(m, "layers.0.weight", &w);
        for (i = 0; i < 6; i++) w.data[i] = (float)i * 0.25f - 0.5f;
        moe_model_forward(m, x, 2, yy, NULL);
        CHECK_OK(moe_model_loss(m, &(moe_target){.values = t}, &loss, NULL), &ctx);
        for (i = 0; i < 6; i++) mse += (yy[i] - t[i]) * (yy[i] - t[i]);
        CHECK(test_close(loss, mse / 6, 1e-6, 1e-8), "mse %g vs %g", loss, mse / 6);
        CHECK_RESULT(moe_model_loss(m, &(moe_target){.labels = labels}, &loss, NULL), MOE_ERR_INVALID_ARGUMENT, &ctx);
        moe_model_destroy(m);
        m = make(&ctx, 2, 1, &d, 4, MOE_LOSS_BCE);
        moe_model_find_tensor(m, "layers.0.weight", &w);
        for (i = 0; i < 6; i++) w.data[i] = (float)i * 0.25f - 0.5f;
        moe_model_forward(m, x, 2, yy, NULL);
        CHECK_OK(moe_model_loss(m, &(moe_target){.values = t}, &loss, NULL), &ctx);
        for (i = 0; i < 6; i++) bce += -(t[i] * log(1 / (1 + exp(-yy[i]))) + (1 - t[i]) * log(1 - 1 / (1 + exp(-yy[i]))));
        CHECK(test_close(loss, bce / 6, 1e-5, 1e-7), "bce %g vs %g", loss, bce / 6);
        moe_model_destroy(m);
    }
    return 0;
}

/* Optimizers on a two-parameter blob against hand-computed PyTorch-style updates. */
static int test_optimizers(void) {
    moe_ctx ctx;
    moe_optimizer *o = NULL;
    float p[2], g[2];
    moe_step_info info;
    double m0 = 0, v0 = 0, pp = 1.0;
    int s;
    moe_ctx_init(&ctx, NULL);
    /* AdamW, 3 steps */
    CHECK_OK(moe_optimizer_create(&ctx, &(moe_optimizer_desc){.kind = MOE_OPTIMIZER_ADAMW, .lr = 0.1f, .weight_decay = 0.5f}, 2, &o), &ctx);
    p[0] = 1.0f; p[1] = -2.0f;
    for (s = 1; s <= 3; s++) {
        double gg = 0.3 * s;
        g[0] = (float)gg; g[1] = 0.0f;
        CHECK_OK(moe_optimizer_step(o, p, g, &info), &ctx);
        pp *= 1 - 0.1 * 0.5;
        m0 = 0.9 * m0 + 0.1 * gg;
        v0 = 0.999 * v0 + 0.001 * gg * gg;
        pp -= (0.1 / (1 - pow(0.9, s))) * m0 / (sqrt(v0) / sqrt(1 - pow(0.999, s)) + 1e-8);
    }
    CHECK(test_close(p[0], pp, 1e-5, 1e-7), "adamw %g vs %g", p[0], pp);
    CHECK(test_close(p[1], -2.0 * pow(0.95, 3), 1e-6, 1e-7), "decoupled decay alone %g", p[1]);
    CHECK(info.step == 3 && moe_optimizer_steps(o) == 3, "step counter");
    moe_optimizer_destroy(o);
    /* SGD with momentum and clipping */
    CHECK_OK(moe_optimizer_create(&ctx, &(moe_optimizer_desc){.kind = MOE_OPTIMIZER_SGD, .lr = 0.5f, .momentum = 0.9f, .clip_norm = 1.0f}, 2, &o), &ctx);
    p[0] = 0; p[1] = 0;
    g[0] = 3; g[1] = 4;   /* norm 5 -> scaled by 1/(5+1e-6) */
    CHECK_OK(moe_optimizer_step(o, p, g, &info), &ctx);
    CHECK(test_close(info.grad_norm, 5.0, 1e-6, 0) && test_close(p[0], -0.5 * 3 / (5 + 1e-6), 1e-5, 0), "clip: %g", p[0]);
    g[0] = 0.3f; g[1] = 0.4f;  /* norm 0.5: not clipped; buf = 0.9 * 0.6 + 0.3 */
    CHECK_OK(moe_optimizer_step(o, p, g, &info), &ctx);
    CHECK(test_close(p[0], -0.5 * 0.6 - 0.5 * (0.9 * 0.6 + 0.3), 1e-5, 1e-7), "momentum %g", p[0]);
    g[0] = NAN;
    p[1] = 7.0f;
    CHECK_RESULT(moe_optimizer_step(o, p, g, &info), MOE_ERR_NONFINITE, &ctx);
    CHECK(p[1] == 7.0f, "a non-finite gradient leaves the parameters alone");
    moe_optimizer_destroy(o);
    /* Adam with L2 weight decay added to the gradient */
    CHECK_OK(moe_optimizer_create(&ctx, &(moe_optimizer_desc){.kind = MOE_OPTIMIZER_ADAM, .lr = 0.01f, .weight_decay = 0.1f}, 1, &o), &ctx);
    p[0] = 2.0f; g[0] = 0.0f;  /* g = 0.2 after decay: first Adam step moves by lr */
    moe_optimizer_step(o, p, g, NULL);
    CHECK(test_close(p[0], 2.0 - 0.01 * 0.2 / (0.2 + 1e-8), 1e-6, 0), "adam %g", p[0]);
    moe_optimizer_destroy(o);
    return 0;
}

static int test_schedule(void) {
    moe_ctx ctx;
    moe_optimizer *o = NULL;
    moe_ctx_init(&ctx, NULL);
    CHECK_OK(moe_optimizer_create(&ctx, &(moe_optimizer_desc){.lr = 1.0f, .warmup_steps = 4, .total_steps = 14, .min_lr = 0.1f}, 1, &o), &ctx);
    CHECK(test_close(moe_optimizer_lr(o, 0), 0.25, 1e-6, 0) && test_close(moe_optimizer_lr(o, 3), 1.0, 1e-6, 0), "warm-up");
    CHECK(test_close(moe_optimizer_lr(o, 4), 1.0, 1e-6, 0), "cosine starts at lr");
    CHECK(test_close(moe_optimizer_lr(o, 9), 0.55, 1e-5, 0), "cosine midpoint %g", moe_optimizer_lr(o, 9));
    CHECK(test_close(moe_optimizer_lr(o, 14), 0.1, 1e-6, 0) && test_close(moe_optimizer_lr(o, 100), 0.1, 1e-6, 0), "floor");
    moe_optimizer_destroy(o);
    return 0;
}

int main(void) {
    printf("test_layers\n");
    RUN(test_reference_kernels_parity);
    RUN(test_awkward_token_counts);
    RUN(test_ties_capacity_passthrough);
    RUN(test_soft_mixture);
    RUN(test_capacity_bounds);
    RUN(test_layer_api_matches_model);
    RUN(test_noise);
    RUN(test_losses_and_predict);
    RUN(test_optimizers);
    RUN(test_schedule);
    TEST_END();
}
