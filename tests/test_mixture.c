/* Mixture density (Gaussian experts, the mixture NLL): the packed output's layout and clamp, the
   inference helpers (mixture mean, top mean, sampling: deterministic and with the right
   statistics), sparse mixtures (top_k < E: log pi = -inf), the loss against a direct formula,
   determinism over thread counts, save/load, and the error codes of bad configurations.
   Gradients are checked in test_grad.c, PyTorch agreement in test_fixtures.c. */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "test.h"

#include <math.h>

#ifndef TMP_DIR
#define TMP_DIR "build/tmp_mixture"
#endif

static moe_ctx ctx;

/* A hand-made mixture of 2 tokens, 3 components, 2 dimensions. */
#define E3 3
#define O2 2
#define W3 (E3 * (1 + 2 * O2))
static const float hand[2 * W3] = {
    /* token 0: pi = (0.2, 0.5, 0.3) */
    -1.6094379f, -0.6931472f, -1.2039728f,
    1.0f, 2.0f, -1.0f, 0.0f, 3.0f, 3.0f,        /* means [3][2] */
    0.0f, 0.0f, -1.0f, -1.0f, 0.5f, 0.5f,       /* log-stds [3][2] */
    /* token 1: component 1 left out (top_k 2 of 3): pi = (0.25, 0, 0.75) */
    -1.3862944f, -INFINITY, -0.2876821f,
    -2.0f, 0.0f, 0.0f, 0.0f, 4.0f, 1.0f,
    -0.5f, -0.5f, 0.0f, 0.0f, -2.0f, -2.0f,
};

static int test_helpers(void) {
    float mean[2 * O2], top[2 * O2];
    CHECK_OK(moe_mixture_mean(&ctx, hand, 2, E3, O2, mean), &ctx);
    CHECK_OK(moe_mixture_top_mean(&ctx, hand, 2, E3, O2, top), &ctx);
    CHECK(test_close(mean[0], 0.2 * 1 + 0.5 * -1 + 0.3 * 3, 1e-5, 1e-6) && test_close(mean[1], 0.2 * 2 + 0.3 * 3, 1e-5, 1e-6),
          "mixture mean of token 0: %g %g", mean[0], mean[1]);
    CHECK(test_close(mean[2], 0.25 * -2 + 0.75 * 4, 1e-5, 1e-6) && test_close(mean[3], 0.75 * 1, 1e-5, 1e-6),
          "mixture mean of token 1 (a component left out): %g %g", mean[2], mean[3]);
    CHECK(top[0] == -1.0f && top[1] == 0.0f && top[2] == 4.0f && top[3] == 1.0f, "top means %g %g %g %g", top[0], top[1], top[2], top[3]);
    return 0;
}

/* The component token i's draw `draw` picks, from the streams README 3.6 documents. */
static int documented_pick(uint64_t seed, uint64_t draw, int i, const float *lp) {
    uint64_t stream = ((uint64_t)12 << 56) ^ draw;
    double u = moe_rng_uniform(seed, stream, (uint64_t)i * (O2 + 1)), cum = 0, lse = 0;
    int e, last = -1;
    for (e = 0; e < E3; e++) lse += exp((double)lp[e]);
    for (e = 0; e < E3; e++) {
        if (lp[e] == -INFINITY) continue;
        last = e;
        cum += exp((double)lp[e]) / lse;
        if (u < cum) break;
    }
    return last;
}

/* Many draws of one mixture: each is the documented draw; component frequencies and moments match. */
static int sample_many(const float *mix, uint64_t draw, const double *want_pi) {
    enum { N = 4000 };
    static float many[N * W3], a[N * O2];
    double count[E3] = {0}, sum[E3] = {0}, sq[E3] = {0};
    int i, e, j;
    for (i = 0; i < N; i++) memcpy(many + i * W3, mix, sizeof(float) * W3);
    CHECK_OK(moe_mixture_sample(&ctx, many, N, E3, O2, draw, a), &ctx);
    for (i = 0; i < N && !test_case_failed; i++) {
        uint64_t stream = ((uint64_t)12 << 56) ^ draw;
        e = documented_pick(ctx.seed, draw, i, mix);
        for (j = 0; j < O2; j++) {
            float z = moe_rng_normal(ctx.seed, stream, (uint64_t)i * (O2 + 1) + 1 + (uint64_t)j);
            CHECK(test_close(a[i * O2 + j], mix[E3 + e * O2 + j] + expf(mix[E3 + E3 * O2 + e * O2 + j]) * z, 1e-5, 1e-5),
                  "sample %d is not the documented draw", i);
        }
        count[e] += 1;
        sum[e] += a[i * O2];
        sq[e] += (double)a[i * O2] * a[i * O2];
    }
    for (e = 0; e < E3; e++) {
        double p = count[e] / N, m, sd, mu = mix[E3 + e * O2], sigma = exp(mix[E3 + E3 * O2 + e * O2]);
        CHECK(fabs(p - want_pi[e]) < 0.03, "component %d drawn %.3f of the time, pi %.3f", e, p, want_pi[e]);
        if (count[e] < 100) continue;
        m = sum[e] / count[e];
        sd = sqrt(sq[e] / count[e] - m * m);
        CHECK(fabs(m - mu) < 5 * sigma / sqrt(count[e]) && fabs(sd - sigma) < 0.1 * sigma, "component %d: mean %.3f sd %.3f, want %.3f %.3f", e, m, sd, mu, sigma);
    }
    return 0;
}

static int test_sampling(void) {
    static const double pi0[E3] = {0.2, 0.5, 0.3}, pi1[E3] = {0.25, 0.0, 0.75};
    float a[2 * O2], b[2 * O2], c[2 * O2];
    moe_ctx other;
    CHECK_OK(moe_mixture_sample(&ctx, hand, 2, E3, O2, 7, a), &ctx);
    CHECK_OK(moe_mixture_sample(&ctx, hand, 2, E3, O2, 7, b), &ctx);
    CHECK(memcmp(a, b, sizeof a) == 0, "the same draw gave other samples");
    CHECK_OK(moe_mixture_sample(&ctx, hand, 2, E3, O2, 8, c), &ctx);
    CHECK(memcmp(a, c, sizeof a) != 0, "another draw gave the same samples");
    CHECK_OK(moe_ctx_init(&other, &(moe_ctx_desc){.seed = 99, .n_threads = 1}), &other);
    CHECK_OK(moe_mixture_sample(&other, hand, 2, E3, O2, 7, c), &other);
    CHECK(memcmp(a, c, sizeof a) != 0, "another context seed gave the same samples");
    sample_many(hand, 7, pi0);
    sample_many(hand + W3, 3, pi1);   /* the left-out component is never drawn */
    return 0;
}

static const moe_layer_desc mixture_layers[] = {
    {.kind = MOE_LAYER_DENSE, .d_out = 12, .activation = MOE_ACT_TANH},
    {.kind = MOE_LAYER_MOE, .expert = MOE_EXPERT_GAUSSIAN, .n_experts = 4, .d_out = 2, .d_hidden = 10, .n_hidden_layers = 2,
     .activation = MOE_ACT_GELU, .balance_loss = 0.01f, .z_loss = 0.001f, .max_top_k = 4},
};

static moe_model *make_model(moe_ctx *c) {
    moe_model *m = NULL;
    CHECK_OK(moe_model_create(c, &(moe_model_desc){.d_in = 3, .n_layers = 2, .layers = mixture_layers, .max_tokens = 64,
                                                   .optimizer = {.kind = MOE_OPTIMIZER_ADAM, .lr = 0.01f}}, &m), c);
    return m;
}

static void make_batch(float *x, float *y, int n) {
    int i;
    for (i = 0; i < n * 3; i++) x[i] = moe_rng_normal(3, 1, (uint64_t)i);
    for (i = 0; i < n * 2; i++) y[i] = (moe_rng_uniform(3, 2, (uint64_t)i) < 0.5f ? -1.0f : 1.0f) * fabsf(x[(i / 2) * 3]) + 0.1f * moe_rng_normal(3, 3, (uint64_t)i);
}

/* Defaults, the packed layout against the loss formula computed here, sparse calls. */
static int test_model_output(void) {
    float x[64 * 3], y[64 * 2], out[64 * 36], loss;
    const moe_layer_desc *d;
    moe_model *m = make_model(&ctx);
    int t, e, j;
    double want = 0;
    if (!m) return 0;
    d = &moe_model_get_desc(m)->layers[1];
    CHECK(moe_model_get_desc(m)->loss == MOE_LOSS_MIXTURE_NLL, "the loss does not default to the mixture NLL");
    CHECK(d->top_k == 4 && d->renormalize == MOE_FLAG_ON, "Gaussian experts: top_k %d (want E = 4), renormalize %d", d->top_k, (int)d->renormalize);
    CHECK(moe_model_d_out(m) == 4 * (1 + 2 * 2), "model width %lld, want 20", (long long)moe_model_d_out(m));
    make_batch(x, y, 64);
    CHECK_OK(moe_model_forward(m, x, 64, out, NULL), &ctx);
    CHECK_OK(moe_model_loss(m, &(moe_target){.values = y}, &loss, NULL), &ctx);
    for (t = 0; t < 64; t++) {
        const float *o = out + t * 20;
        double lse = -INFINITY, s = 0, l[4], pis = 0;
        for (e = 0; e < 4; e++) {
            pis += exp(o[e]);
            l[e] = o[e];
            for (j = 0; j < 2; j++) {
                double mu = o[4 + e * 2 + j], ls = o[12 + e * 2 + j], z = (y[t * 2 + j] - mu) / exp(ls);
                CHECK(ls >= -10 && ls <= 10, "log-std %g outside the clamp", ls);
                l[e] += -0.5 * z * z - ls - 0.5 * log(2 * 3.14159265358979);
            }
            lse = l[e] > lse ? l[e] : lse;
        }
        CHECK(fabs(pis - 1) < 1e-5, "token %d: mixing weights sum to %.7f", t, pis);
        for (e = 0; e < 4; e++) s += exp(l[e] - lse);
        want += -(lse + log(s)) / 64;
    }
    CHECK(test_close(loss, want, 1e-5, 1e-6), "mixture NLL %.7g, direct formula %.7g", loss, want);
    {   /* two tokens take the decode path (and bf16 weights): the same mixture, to rounding */
        float few[2 * 20];
        CHECK_OK(moe_model_forward(m, x, 2, few, NULL), &ctx);
        CHECK(test_worst(few, out, 2 * 20, 1e-4, 1e-5, NULL) <= 1.0, "the decode path gives another mixture");
        CHECK_OK(moe_model_quantize(m, MOE_DTYPE_BF16), &ctx);
        CHECK_OK(moe_model_forward(m, x, 2, few, NULL), &ctx);
        CHECK(test_worst(few, out, 2 * 20, 2e-2, 2e-2, NULL) <= 1.0, "bf16 expert weights give a far other mixture");
        CHECK_OK(moe_model_quantize(m, MOE_DTYPE_F32), &ctx);
    }
    /* per-call top_k 2: two components per token, the others -inf with zero mean and log-std */
    CHECK_OK(moe_model_forward(m, x, 64, out, &(moe_forward_opts){.top_k = 2}), &ctx);
    for (t = 0; t < 64; t++) {
        int n = 0;
        double pis = 0;
        for (e = 0; e < 4; e++) {
            if (out[t * 20 + e] == -INFINITY) {
                CHECK(out[t * 20 + 4 + e * 2] == 0 && out[t * 20 + 12 + e * 2 + 1] == 0, "a left-out component has parameters");
                continue;
            }
            n++;
            pis += exp(out[t * 20 + e]);
        }
        CHECK(n == 2 && fabs(pis - 1) < 1e-5, "token %d: %d components, weights sum %.7f", t, n, pis);
    }
    CHECK_OK(moe_model_loss(m, &(moe_target){.values = y}, &loss, NULL), &ctx);
    CHECK(moe__finite(loss), "the sparse mixture's loss is %g", loss);
    moe_model_destroy(m);
    return 0;
}

/* Training is bitwise the same on 1 and 2 threads; save and load keep the mixture. */
static int test_train_threads_save(void) {
    float x[64 * 3], y[64 * 2], out1[64 * 20], out2[64 * 20], out3[64 * 20];
    moe_ctx c1, c2;
    moe_model *m1, *m2, *back = NULL;
    moe_step_info i1, i2;
    float first = 0;
    int s;
    CHECK_OK(moe_ctx_init(&c1, &(moe_ctx_desc){.seed = 5, .n_threads = 1}), &c1);
    CHECK_OK(moe_ctx_init(&c2, &(moe_ctx_desc){.seed = 5, .n_threads = 2}), &c2);
    m1 = make_model(&c1);
    m2 = make_model(&c2);
    if (!m1 || !m2) { moe_model_destroy(m1); moe_model_destroy(m2); return 0; }
    make_batch(x, y, 64);
    for (s = 0; s < 60; s++) {
        CHECK_OK(moe_model_train_step(m1, x, &(moe_target){.values = y}, 64, &i1), &c1);
        CHECK_OK(moe_model_train_step(m2, x, &(moe_target){.values = y}, 64, &i2), &c2);
        if (s == 0) first = i1.loss;
        CHECK(memcmp(&i1.loss, &i2.loss, sizeof(float)) == 0, "step %d: loss %.9g on 1 thread, %.9g on 2", s, i1.loss, i2.loss);
        if (test_case_failed) break;
    }
    CHECK(i1.loss < first - 0.3f, "training did not lower the NLL: %g -> %g", first, i1.loss);
    CHECK(memcmp(moe_model_params(m1, NULL), moe_model_params(m2, NULL), sizeof(float) * (size_t)moe_model_parameter_count(m1)) == 0,
          "parameters differ between 1 and 2 threads");
    CHECK_OK(moe_model_forward(m1, x, 64, out1, NULL), &c1);
    CHECK_OK(moe_model_forward(m2, x, 64, out2, NULL), &c2);
    CHECK(memcmp(out1, out2, sizeof out1) == 0, "outputs differ between 1 and 2 threads");
    test_make_dir(TMP_DIR);
    CHECK_OK(moe_model_save(m1, TMP_DIR "/mixture.safetensors"), &c1);
    CHECK_OK(moe_model_load(&c1, TMP_DIR "/mixture.safetensors", 0, &back), &c1);
    if (back) {
        const moe_layer_desc *d = &moe_model_get_desc(back)->layers[1];
        CHECK(d->expert == MOE_EXPERT_GAUSSIAN && moe_model_get_desc(back)->loss == MOE_LOSS_MIXTURE_NLL && d->max_top_k == 4,
              "the loaded model lost its Gaussian experts or loss");
        CHECK_OK(moe_model_forward(back, x, 64, out3, NULL), &c1);
        CHECK(memcmp(out1, out3, sizeof out1) == 0, "the loaded model computes another mixture");
    }
    moe_model_destroy(back);
    moe_model_destroy(m1);
    moe_model_destroy(m2);
    return 0;
}

static int test_errors(void) {
    moe_layer_desc l[2];
    moe_model *m = (moe_model *)&ctx;
    moe_layer *layer = NULL;
    float out[4];
    moe_model_desc md;
    memset(l, 0, sizeof l);
    l[0].kind = MOE_LAYER_MOE; l[0].expert = MOE_EXPERT_GAUSSIAN; l[0].d_out = 1;
    memset(&md, 0, sizeof md);
    md.d_in = 4; md.n_layers = 1; md.layers = l;
    l[0].router = MOE_ROUTER_SWITCH;
    CHECK_RESULT(moe_model_create(&ctx, &md, &m), MOE_ERR_UNSUPPORTED, &ctx);
    CHECK(m == NULL && strstr(moe_ctx_error(&ctx), "Gaussian"), "message: %s", moe_ctx_error(&ctx));
    l[0].router = MOE_ROUTER_NOISY_TOPK;
    l[0].d_in = 4;
    CHECK_RESULT(moe_layer_create(&ctx, &l[0], 8, &layer), MOE_ERR_UNSUPPORTED, &ctx);
    l[0].d_in = 0;
    l[0].router = MOE_ROUTER_TOPK;
    l[0].n_shared_experts = 1;
    CHECK_RESULT(moe_model_create(&ctx, &md, &m), MOE_ERR_INVALID_ARGUMENT, &ctx);
    l[0].n_shared_experts = 0;
    l[0].renormalize = MOE_FLAG_OFF;
    CHECK_RESULT(moe_model_create(&ctx, &md, &m), MOE_ERR_INVALID_ARGUMENT, &ctx);
    l[0].renormalize = MOE_FLAG_DEFAULT;
    l[0].capacity_factor = 1.5f;
    CHECK_RESULT(moe_model_create(&ctx, &md, &m), MOE_ERR_INVALID_ARGUMENT, &ctx);
    l[0].capacity_factor = 0;
    l[0].d_out = 4; l[0].residual = 1;
    CHECK_RESULT(moe_model_create(&ctx, &md, &m), MOE_ERR_INVALID_ARGUMENT, &ctx);
    l[0].residual = 0; l[0].d_out = 1;
    md.loss = MOE_LOSS_MSE;     /* a Gaussian last layer takes the mixture NLL only */
    CHECK_RESULT(moe_model_create(&ctx, &md, &m), MOE_ERR_INVALID_ARGUMENT, &ctx);
    md.loss = MOE_LOSS_MIXTURE_NLL;
    l[0].expert = MOE_EXPERT_MLP;   /* and the mixture NLL needs one */
    CHECK_RESULT(moe_model_create(&ctx, &md, &m), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK(strstr(moe_ctx_error(&ctx), "mixture_nll") != NULL, "message: %s", moe_ctx_error(&ctx));
    l[0].expert = MOE_EXPERT_GAUSSIAN;
    CHECK_OK(moe_model_create(&ctx, &md, &m), &ctx);
    if (m) {
        float x[4] = {0.1f, 0.2f, 0.3f, 0.4f}, loss;
        CHECK_OK(moe_model_forward(m, x, 1, NULL, NULL), &ctx);
        CHECK_RESULT(moe_model_loss(m, &(moe_target){.labels = NULL}, &loss, NULL), MOE_ERR_INVALID_ARGUMENT, &ctx);
        moe_model_destroy(m);
    }
    CHECK_RESULT(moe_mixture_mean(&ctx, NULL, 1, 3, 2, out), MOE_ERR_INVALID_ARGUMENT, &ctx);
    CHECK_RESULT(moe_mixture_top_mean(&ctx, hand, 0, 3, 2, out), MOE_ERR_SHAPE, &ctx);
    CHECK_RESULT(moe_mixture_sample(&ctx, hand, 1, 0, 2, 0, out), MOE_ERR_SHAPE, &ctx);
    CHECK_RESULT(moe_mixture_sample(&ctx, hand, 1, 3, 0, 0, out), MOE_ERR_SHAPE, &ctx);
    CHECK_RESULT(moe_mixture_sample(NULL, hand, 1, 3, 2, 0, out), MOE_ERR_INVALID_ARGUMENT, &ctx);
    {   /* a token without any component */
        float none[W3];
        memcpy(none, hand, sizeof none);
        none[0] = none[1] = none[2] = -INFINITY;
        CHECK_RESULT(moe_mixture_sample(&ctx, none, 1, E3, O2, 0, out), MOE_ERR_INVALID_ARGUMENT, &ctx);
        CHECK_RESULT(moe_mixture_mean(&ctx, none, 1, E3, O2, out), MOE_ERR_INVALID_ARGUMENT, &ctx);
    }
    return 0;
}

int main(void) {
    printf("test_mixture\n");
    if (moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = 11, .n_threads = 2}) != MOE_OK) return 1;
    RUN(test_helpers);
    RUN(test_sampling);
    RUN(test_model_output);
    RUN(test_train_threads_save);
    RUN(test_errors);
    TEST_END();
}
