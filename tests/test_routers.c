/* Routers beyond softmax top-k, checked by their visible behaviour: the sigmoid router's
   aux-loss-free selection bias (it balances a skewed load, and nothing else moves it), expert
   choice (C tokens per expert, ties to the lower token, pass-through), per-call top_k and top_p
   (exactly the documented experts, gates renormalised over them), the hash router (the documented
   hash, identical on any thread count), error codes, and files and configurations that round-trip.
   Many cases read the routing off the output: linear experts with zero weights and a one-hot bias
   make y[t, e] the gate of expert e for token t. */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "test.h"

#ifndef TMP_DIR
#define TMP_DIR "build/tmp_routers"
#endif

static moe_ctx ctx;

static void fill(float *v, int64_t n, uint64_t stream, float scale) {
    int64_t i;
    for (i = 0; i < n; i++) v[i] = scale * moe_rng_normal(9, stream, (uint64_t)i);
}

static moe_model *make(moe_ctx *c, int64_t d_in, int n, const moe_layer_desc *layers, int64_t max_tokens, const moe_optimizer_desc *opt) {
    moe_model *m = NULL;
    moe_model_desc d;
    memset(&d, 0, sizeof d);
    d.d_in = d_in; d.n_layers = n; d.layers = layers; d.max_tokens = max_tokens; d.loss = MOE_LOSS_MSE;
    if (opt) d.optimizer = *opt;
    CHECK_OK(moe_model_create(c, &d, &m), c);
    return m;
}

static float *tensor(moe_model *m, const char *name, int64_t *size) {
    moe_tensor t;
    if (moe_model_find_tensor(m, name, &t) != MOE_OK) { CHECK(0, "no tensor %s", name); return NULL; }
    if (size) *size = t.size;
    return t.data;
}

/* Layer 0's linear experts output one-hot rows: expert e adds gate * unit vector e. */
static void one_hot_experts(moe_model *m, int64_t E) {
    int64_t n, i;
    float *w = tensor(m, "layers.0.experts.fc0.weight", &n), *b = tensor(m, "layers.0.experts.fc0.bias", NULL);
    if (!w || !b) return;
    memset(w, 0, sizeof(float) * (size_t)n);
    for (i = 0; i < E * E; i++) b[i] = i % (E + 1) == 0 ? 1.0f : 0.0f;
}

/* Load coefficient of variation of the last forward of layer 0. */
static float load_cv(moe_model *m) {
    moe_stats st;
    CHECK_OK(moe_model_stats(m, 0, &st), &ctx);
    return st.load_cv;
}

/* A skewed task: every token has a large feature 0 that the router maps onto experts 0 and 1. Trained
   with a learning rate too small to rebalance the router, only the selection bias can spread the load. */
static float skewed_run(float rate, float *cv_start, moe_model **keep) {
    moe_layer_desc layers[] = {
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_SIGMOID, .n_experts = 8, .top_k = 2, .d_hidden = 8, .d_out = 4,
         .bias_update_rate = rate},
    };
    moe_optimizer_desc opt = {.kind = MOE_OPTIMIZER_ADAMW, .lr = 1e-6f, .weight_decay = 0.1f};
    int64_t T = 128, D = 6, i, e;
    float x[128 * 6], target[128 * 4], cv = 0.0f, *wr;
    moe_model *m = make(&ctx, D, 1, layers, T, &opt);
    int step;
    if (!m) return 0.0f;
    fill(x, T * D, 1, 1.0f);
    fill(target, T * 4, 2, 1.0f);
    for (i = 0; i < T; i++) x[i * D] = 3.0f;
    wr = tensor(m, "layers.0.router.weight", NULL);
    for (e = 0; e < 8; e++)
        for (i = 0; i < D; i++) wr[e * D + i] = i == 0 ? (e < 2 ? 1.0f : -0.3f) : 0.3f * moe_rng_normal(9, 3, (uint64_t)(e * D + i));
    for (step = 0; step < 60; step++) {
        CHECK_OK(moe_model_train_step(m, x, &(moe_target){.values = target}, T, NULL), &ctx);
        cv = load_cv(m);
        if (step == 0 && cv_start) *cv_start = cv;
    }
    CHECK_OK(moe_model_forward(m, x, T, NULL, NULL), &ctx);
    cv = load_cv(m);
    if (keep) *keep = m;
    else moe_model_destroy(m);
    return cv;
}

static int test_selection_bias_balances(void) {
    float start_on = 0, start_off = 0;
    moe_model *m = NULL;
    float on = skewed_run(0.01f, &start_on, &m), off = skewed_run(0.0f, &start_off, NULL);
    float *b = m ? tensor(m, "layers.0.router.selection_bias", NULL) : NULL;
    printf("    load CV after 60 steps: %.3f with the bias update (start %.3f), %.3f without (start %.3f)\n", on, start_on, off, start_off);
    CHECK(start_on > 1.0f && start_off > 1.0f, "the task is not skewed (CV %g, %g)", start_on, start_off);
    CHECK(on < 0.35f, "the bias update did not balance the load (CV %g)", on);
    CHECK(off > 1.0f, "without the update the load balanced anyway (CV %g): the test proves nothing", off);
    if (b) CHECK(b[0] < 0.0f && b[7] > 0.0f, "bias of the crowded expert %g, of an idle one %g", b[0], b[7]);
    /* a saved model routes the same: the bias is in the file */
    if (m) {
        moe_model *r = NULL;
        moe_stats s1, s2;
        float x[16 * 6], y1[16 * 4], y2[16 * 4];
        int64_t e;
        fill(x, 16 * 6, 4, 1.0f);
        CHECK_OK(moe_model_save(m, TMP_DIR "/sigmoid.safetensors"), &ctx);
        CHECK_OK(moe_model_load(&ctx, TMP_DIR "/sigmoid.safetensors", 0, &r), &ctx);
        if (r) {
            CHECK_OK(moe_model_forward(m, x, 16, y1, NULL), &ctx);
            CHECK_OK(moe_model_forward(r, x, 16, y2, NULL), &ctx);
            CHECK(memcmp(y1, y2, sizeof y1) == 0, "the loaded model computes something else");
            moe_model_stats(m, 0, &s1);
            moe_model_stats(r, 0, &s2);
            for (e = 0; e < 8; e++) CHECK(s1.tokens_per_expert[e] == s2.tokens_per_expert[e], "expert %lld routes differently after loading", (long long)e);
            moe_model_destroy(r);
        }
        moe_model_destroy(m);
    }
    return 0;
}

/* The optimizer leaves the selection bias alone (no weight decay, no momentum); its gradient is 0. */
static int test_selection_bias_is_state(void) {
    moe_layer_desc layers[] = {{.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_SIGMOID, .n_experts = 4, .top_k = 2, .d_hidden = 4}};
    moe_optimizer_desc opt = {.kind = MOE_OPTIMIZER_SGD, .lr = 0.5f, .weight_decay = 0.5f, .momentum = 0.9f};
    moe_model *m = make(&ctx, 5, 1, layers, 8, &opt);
    float x[8 * 5], target[8 * 5], *b, *g;
    int step, e;
    moe_tensor t;
    if (!m) return 0;
    fill(x, 40, 5, 1.0f);
    fill(target, 40, 6, 1.0f);
    b = tensor(m, "layers.0.router.selection_bias", NULL);
    for (e = 0; e < 4; e++) b[e] = 0.25f * (float)e;
    for (step = 0; step < 3; step++) CHECK_OK(moe_model_train_step(m, x, &(moe_target){.values = target}, 8, NULL), &ctx);
    for (e = 0; e < 4; e++) CHECK(b[e] == 0.25f * (float)e, "the optimizer moved selection_bias[%d] to %g", e, b[e]);
    CHECK_OK(moe_model_find_tensor(m, "layers.0.router.selection_bias", &t), &ctx);
    g = t.grad;
    for (e = 0; e < 4; e++) CHECK(g[e] == 0.0f, "selection_bias has a gradient %g", g[e]);
    moe_model_destroy(m);
    return 0;
}

/* moe_layer_update_bias on a standalone layer: b_e += rate * sign(mean load - load_e). */
static int test_layer_update_bias(void) {
    moe_layer *l = NULL;
    float x[20 * 3], y[20 * 3], *b = NULL;
    int64_t E = 4, e;
    int i;
    moe_stats st;
    CHECK_RESULT(moe_layer_create(&ctx, &(moe_layer_desc){.kind = MOE_LAYER_MOE, .d_in = 3, .router = MOE_ROUTER_SIGMOID,
                                                           .n_experts = 4, .top_k = 1, .bias_update_rate = 0.125f}, 20, &l), MOE_OK, &ctx);
    if (!l) return 0;
    CHECK_RESULT(moe_layer_update_bias(l), MOE_ERR_STATE, &ctx);
    for (i = 0; i < moe_layer_tensor_count(l); i++) {
        moe_tensor t;
        moe_layer_tensor(l, i, &t);
        if (strcmp(t.name, "router.selection_bias") == 0) b = t.data;
        if (strcmp(t.name, "router.weight") == 0) fill(t.data, t.size, 7, 1.0f);
    }
    CHECK(b != NULL, "no router.selection_bias");
    if (!b) { moe_layer_destroy(l); return 0; }
    fill(x, 60, 8, 1.0f);
    CHECK_OK(moe_layer_forward(l, x, 20, y, NULL), &ctx);
    CHECK_OK(moe_layer_stats(l, &st), &ctx);
    CHECK_OK(moe_layer_update_bias(l), &ctx);
    for (e = 0; e < E; e++) {
        int64_t n = st.tokens_per_expert[e];
        float want = n < 5 ? 0.125f : n > 5 ? -0.125f : 0.0f;  /* mean load 20 * 1 / 4 = 5 */
        CHECK(b[e] == want, "expert %lld with %lld tokens: bias %g, expected %g", (long long)e, (long long)n, b[e], want);
    }
    moe_layer_destroy(l);
    return 0;
}

/* Expert choice with all scores equal: each expert takes tokens 0..C-1 (ties to the lower token),
   the rest have no expert and pass through. */
static int test_expert_choice_ties(void) {
    int64_t T = 10, E = 4, C = 3, t, e;  /* C = ceil(0.5 * 10 * 2 / 4) = 3 */
    moe_layer_desc layers[] = {{.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_EXPERT_CHOICE, .n_experts = 4, .top_k = 2,
                                .capacity_factor = 0.5f, .expert = MOE_EXPERT_LINEAR, .d_out = 4}};
    moe_model *m = make(&ctx, E, 1, layers, T, NULL);
    float x[10 * 4], y[10 * 4];
    moe_stats st;
    if (!m) return 0;
    one_hot_experts(m, E);
    for (t = 0; t < T * E; t++) x[t] = 0.5f + (float)(t / E);
    memset(tensor(m, "layers.0.router.weight", NULL), 0, sizeof(float) * (size_t)(E * E));  /* every score is 1/E */
    CHECK_OK(moe_model_forward(m, x, T, y, NULL), &ctx);
    for (t = 0; t < T; t++)
        for (e = 0; e < E; e++) {
            float want = t < C ? 0.25f : x[t * E + e];
            CHECK(y[t * E + e] == want, "token %lld expert %lld: %g, expected %g", (long long)t, (long long)e, y[t * E + e], want);
        }
    CHECK_OK(moe_model_stats(m, 0, &st), &ctx);
    CHECK(st.dropped_tokens == T - C, "dropped tokens %lld, expected %lld", (long long)st.dropped_tokens, (long long)(T - C));
    for (e = 0; e < E; e++) CHECK(st.tokens_per_expert[e] == C, "expert %lld took %lld tokens", (long long)e, (long long)st.tokens_per_expert[e]);
    moe_model_destroy(m);
    return 0;
}

/* Expert choice with distinct scores: expert e takes the C tokens of largest softmax score, gate = score;
   a token may get 0..E experts. Tokens 0 and 1 score 1/4 everywhere; tokens 2..7 all prefer expert 0
   (and score little elsewhere), so experts 1..3 take tokens 0 and 1 and tokens 4..7 get no expert. */
static int test_expert_choice_selection(void) {
    int64_t T = 8, E = 4, D = 4, C = 2, t, e, q;  /* C = ceil(0.5 * 8 * 2 / 4) */
    moe_layer_desc layers[] = {{.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_EXPERT_CHOICE, .n_experts = 4, .top_k = 2,
                                .capacity_factor = 0.5f, .expert = MOE_EXPERT_LINEAR, .d_out = 4}};
    moe_model *m = make(&ctx, D, 1, layers, T, NULL);
    float x[8 * 4] = {0}, y[8 * 4], *wr;
    double p[8 * 4];
    int count[9] = {0};
    moe_stats st;
    if (!m) return 0;
    one_hot_experts(m, E);
    wr = tensor(m, "layers.0.router.weight", NULL);
    for (e = 0; e < E * D; e++) wr[e] = e % (D + 1) == 0 ? 2.0f : 0.0f;  /* logits = 2 x */
    for (t = 2; t < T; t++) { x[t * D] = 2.0f - 0.1f * (float)t; x[t * D + 1 + t % 3] = -0.2f * (float)t; }
    for (t = 0; t < T; t++) {
        double z = 0;
        for (e = 0; e < E; e++) z += exp(2.0 * x[t * D + e]);
        for (e = 0; e < E; e++) p[t * E + e] = exp(2.0 * x[t * D + e]) / z;
    }
    CHECK_OK(moe_model_forward(m, x, T, y, NULL), &ctx);
    for (t = 0; t < T; t++) {
        int n = 0, taken[4];
        for (e = 0; e < E; e++) {
            int rank = 0;
            for (q = 0; q < T; q++) rank += p[q * E + e] > p[t * E + e] || (p[q * E + e] == p[t * E + e] && q < t);
            taken[e] = rank < C;
            n += taken[e];
        }
        for (e = 0; e < E; e++) {  /* a token with no expert passes through: y = x */
            double want = n == 0 ? (double)x[t * D + e] : taken[e] ? p[t * E + e] : 0.0;
            CHECK(fabs(y[t * E + e] - want) < 1e-6, "token %lld expert %lld: %g, expected %g", (long long)t, (long long)e, y[t * E + e], want);
        }
        count[n]++;
    }
    CHECK(count[3] == 2 && count[0] == 4, "tokens with 3 experts: %d (expected 2), with none: %d (expected 4)", count[3], count[0]);
    CHECK_OK(moe_model_stats(m, 0, &st), &ctx);
    CHECK(st.dropped_tokens == 4, "dropped tokens %lld, expected 4", (long long)st.dropped_tokens);
    moe_model_destroy(m);
    return 0;
}

/* Per-call top_k and top_p on a softmax top-k router: exactly the documented experts, gates
   renormalised over them. */
static int test_top_k_top_p(void) {
    int64_t T = 40, E = 6, D = 6, t, e, s;
    moe_layer_desc layers[] = {{.kind = MOE_LAYER_MOE, .n_experts = 6, .top_k = 2, .max_top_k = 4, .expert = MOE_EXPERT_LINEAR, .d_out = 6}};
    moe_model *m = make(&ctx, D, 1, layers, T, NULL);
    float x[40 * 6], y[40 * 6], *wr;
    const float ps[] = {0.3f, 0.6f, 0.9f, 1.0f};
    const int ks[] = {1, 2, 3, 4};
    int checked = 0, sizes[5] = {0}, ip, ik;
    if (!m) return 0;
    one_hot_experts(m, E);
    wr = tensor(m, "layers.0.router.weight", NULL);
    for (e = 0; e < E * D; e++) wr[e] = e % (D + 1) == 0 ? 1.5f : 0.0f;
    fill(x, T * D, 11, 1.0f);
    for (ik = 0; ik < 4; ik++)
        for (ip = -1; ip < 4; ip++) {
            moe_forward_opts o = {.top_k = ks[ik], .top_p = ip < 0 ? 0.0f : ps[ip]};
            CHECK_OK(moe_model_forward(m, x, T, y, &o), &ctx);
            for (t = 0; t < T; t++) {
                double p[6], z = 0, cum = 0, kept = 0;
                int order[6], n;
                for (e = 0; e < E; e++) z += exp(1.5 * x[t * D + e]);
                for (e = 0; e < E; e++) { p[e] = exp(1.5 * x[t * D + e]) / z; order[e] = (int)e; }
                for (e = 1; e < E; e++)
                    for (s = e; s > 0 && p[order[s]] > p[order[s - 1]]; s--) { int tmp = order[s]; order[s] = order[s - 1]; order[s - 1] = tmp; }
                for (n = 0; n < ks[ik] && (ip < 0 || cum < ps[ip]); n++) cum += p[order[n]];
                if (ip >= 0 && fabs(cum - ps[ip]) < 1e-5) continue;  /* too close to call in float */
                for (s = 0; s < n; s++) kept += p[order[s]];
                for (s = 0; s < E; s++) {
                    double want = s < n ? p[order[s]] / kept : 0.0;
                    CHECK(fabs(y[t * E + order[s]] - want) < 1e-5, "top_k %d top_p %g token %lld: expert %d gate %g, expected %g",
                          ks[ik], ip < 0 ? 0.0 : ps[ip], (long long)t, order[s], y[t * E + order[s]], want);
                }
                sizes[n]++;
                checked++;
            }
        }
    CHECK(checked > 700, "only %d tokens checked", checked);
    CHECK(sizes[1] && sizes[2] && sizes[3] && sizes[4], "top_p should give every set size 1..4 (%d %d %d %d)", sizes[1], sizes[2], sizes[3], sizes[4]);
    {
        moe_forward_opts big = {.top_k = 5}, bad_p = {.top_p = 1.5f};
        CHECK_RESULT(moe_model_forward(m, x, T, y, &big), MOE_ERR_INVALID_ARGUMENT, &ctx);
        CHECK_RESULT(moe_model_forward(m, x, T, y, &bad_p), MOE_ERR_INVALID_ARGUMENT, &ctx);
    }
    moe_model_destroy(m);
    return 0;
}

/* The hash router: k distinct experts e = moe_rng_u64(hash_seed, layer, id << 32 | c) % E, c = 0, 1, ...
   skipping repeats; gates 1/k; no parameters; the same bits on 1, 2 and 3 threads. */
static int test_hash_router(void) {
    int64_t T = 50, E = 7, K = 3, t, e;
    moe_layer_desc layers[] = {
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_HASH, .n_experts = 7, .top_k = 3, .hash_seed = 77, .expert = MOE_EXPERT_LINEAR, .d_out = 7},
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_HASH, .n_experts = 5, .top_k = 2, .d_hidden = 64, .residual = 1},
    };
    float x[50 * 7], y[3][50 * 7];
    int32_t ids[50];
    int nt, i;
    for (t = 0; t < T; t++) ids[t] = (int32_t)(t * 7919 % 1000) - (t == 3 ? 2000 : 0);
    fill(x, T * E, 12, 1.0f);
    for (nt = 1; nt <= 3; nt++) {
        moe_ctx c;
        moe_model *m;
        moe_forward_opts o = {.token_ids = ids};
        moe_ctx_init(&c, &(moe_ctx_desc){.seed = 5, .n_threads = nt});
        m = make(&c, E, 2, layers, T, NULL);
        if (!m) return 0;
        for (i = 0; i < moe_model_tensor_count(m); i++) {
            moe_tensor tt;
            moe_model_tensor(m, i, &tt);
            CHECK(strstr(tt.name, "router") == NULL, "hash layer has a router tensor %s", tt.name);
        }
        CHECK_RESULT(moe_model_forward(m, x, T, y[nt - 1], NULL), MOE_ERR_INVALID_ARGUMENT, &c);
        CHECK_OK(moe_model_forward(m, x, T, y[nt - 1], &o), &c);
        moe_model_destroy(m);
    }
    CHECK(memcmp(y[0], y[1], sizeof y[0]) == 0 && memcmp(y[0], y[2], sizeof y[0]) == 0, "hash routing differs between thread counts");
    {   /* train_step takes no token ids: a hash model is trained with forward, loss, backward, step */
        moe_model *m = make(&ctx, E, 2, layers, T, NULL);
        float target[50 * 7];
        moe_forward_opts o = {.training = 1, .token_ids = ids};
        if (!m) return 0;
        fill(target, T * E, 13, 1.0f);
        CHECK_RESULT(moe_model_train_step(m, x, &(moe_target){.values = target}, T, NULL), MOE_ERR_INVALID_ARGUMENT, &ctx);
        CHECK_OK(moe_model_forward(m, x, T, NULL, &o), &ctx);
        CHECK_OK(moe_model_loss(m, &(moe_target){.values = target}, NULL, y[1]), &ctx);
        CHECK_OK(moe_model_backward(m, y[1], NULL, MOE_BACKWARD_AUX), &ctx);
        CHECK_OK(moe_model_optimizer_step(m, NULL), &ctx);
        moe_model_destroy(m);
    }
    {
        moe_model *m = make(&ctx, E, 1, layers, T, NULL);
        moe_forward_opts o = {.token_ids = ids};
        if (!m) return 0;
        one_hot_experts(m, E);
        CHECK_OK(moe_model_forward(m, x, T, y[0], &o), &ctx);
        for (t = 0; t < T; t++) {
            float want[7] = {0};
            int32_t sel[3];
            int n = 0, s, seen;
            uint64_t c;
            for (c = 0; n < K; c++) {
                int32_t v = (int32_t)(moe_rng_u64(77, 0, ((uint64_t)(uint32_t)ids[t] << 32) | c) % (uint64_t)E);
                for (seen = 0, s = 0; s < n; s++) seen |= sel[s] == v;
                if (!seen) sel[n++] = v;
            }
            for (s = 0; s < K; s++) want[sel[s]] = 1.0f / 3.0f;
            for (e = 0; e < E; e++) CHECK(y[0][t * E + e] == want[e], "token %lld (id %d) expert %lld: %g, expected %g", (long long)t, ids[t], (long long)e, y[0][t * E + e], want[e]);
        }
        moe_model_destroy(m);
    }
    return 0;
}

/* Configuration errors of the new routers name the field. */
static int test_router_errors(void) {
    moe_layer *l = NULL;
    const moe_layer_desc bad[] = {
        {.kind = MOE_LAYER_MOE, .d_in = 4, .router = MOE_ROUTER_SIGMOID, .n_experts = 6, .n_groups = 4},        /* 4 does not divide 6 */
        {.kind = MOE_LAYER_MOE, .d_in = 4, .router = MOE_ROUTER_SIGMOID, .n_experts = 8, .top_k = 3, .n_groups = 4, .top_k_groups = 1},
        {.kind = MOE_LAYER_MOE, .d_in = 4, .router = MOE_ROUTER_SIGMOID, .balance_loss = 0.1f},
        {.kind = MOE_LAYER_MOE, .d_in = 4, .router = MOE_ROUTER_TOPK, .bias_update_rate = 0.1f},
        {.kind = MOE_LAYER_MOE, .d_in = 4, .router = MOE_ROUTER_EXPERT_CHOICE, .balance_loss = 0.1f},
        {.kind = MOE_LAYER_MOE, .d_in = 4, .router = MOE_ROUTER_HASH, .router_bias = MOE_FLAG_ON},
        {.kind = MOE_LAYER_MOE, .d_in = 4, .top_k = 2, .max_top_k = 1},
        {.kind = MOE_LAYER_MOE, .d_in = 4, .n_experts = 4, .max_top_k = 5},
    };
    size_t i;
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_RESULT(moe_layer_create(&ctx, &bad[i], 8, &l), MOE_ERR_INVALID_ARGUMENT, &ctx);
        CHECK(l == NULL, "case %zu: a layer was returned", i);
    }
    CHECK_OK(moe_layer_create(&ctx, &(moe_layer_desc){.kind = MOE_LAYER_MOE, .d_in = 4, .router = MOE_ROUTER_SIGMOID}, 8, &l), &ctx);
    if (l) {
        float x[8 * 4] = {0}, y[8 * 4];
        moe_forward_opts o = {.top_p = 0.5f};
        CHECK_RESULT(moe_layer_forward(l, x, 8, y, &o), MOE_ERR_UNSUPPORTED, &ctx);
        CHECK(moe_layer_get_desc(l)->routed_scaling_factor == 1.0f && moe_layer_get_desc(l)->n_groups == 1 &&
              moe_layer_get_desc(l)->top_k_groups == 1 && moe_layer_get_desc(l)->renormalize == MOE_FLAG_ON, "sigmoid defaults");
        moe_layer_destroy(l);
    }
    return 0;
}

/* Every new router and field survives config JSON and a model file: same text, same outputs. */
static int test_round_trip(void) {
    moe_layer_desc layers[] = {
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_SIGMOID, .n_experts = 8, .top_k = 2, .max_top_k = 3, .n_groups = 4,
         .top_k_groups = 2, .routed_scaling_factor = 2.5f, .bias_update_rate = 0.001f, .d_hidden = 6, .renormalize = MOE_FLAG_OFF},
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_EXPERT_CHOICE, .n_experts = 4, .top_k = 2, .capacity_factor = 1.5f,
         .d_hidden = 5, .z_loss = 0.01f},
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_HASH, .n_experts = 3, .top_k = 2, .hash_seed = 4000000000u, .d_hidden = 5},
        {.kind = MOE_LAYER_DENSE, .d_out = 3},
    };
    moe_model *a = make(&ctx, 6, 4, layers, 16, NULL), *b = NULL, *c = NULL;
    char ja[4096], jb[4096], jc[4096];
    float x[16 * 6], ya[16 * 3], yb[16 * 3];
    int32_t ids[16];
    int i;
    moe_forward_opts o = {.token_ids = ids};
    if (!a) return 0;
    for (i = 0; i < 16; i++) ids[i] = i * 31;
    fill(x, 96, 13, 1.0f);
    {
        float *sb = tensor(a, "layers.0.router.selection_bias", NULL);
        if (sb) for (i = 0; i < 8; i++) sb[i] = 0.01f * (float)i;
    }
    moe_model_config_json(a, ja, sizeof ja);
    CHECK(strstr(ja, "\"router\":\"sigmoid\"") && strstr(ja, "\"groups\":4") && strstr(ja, "\"top_k_groups\":2") &&
          strstr(ja, "\"routed_scaling_factor\":2.5") && strstr(ja, "\"bias_update_rate\":0.001") && strstr(ja, "\"max_top_k\":3") &&
          strstr(ja, "\"router\":\"expert_choice\"") && strstr(ja, "\"router\":\"hash\"") && strstr(ja, "\"hash_seed\":4000000000"),
          "config text misses a field: %s", ja);
    CHECK_OK(moe_model_from_config(&ctx, ja, 0, &b), &ctx);
    if (b) { moe_model_config_json(b, jb, sizeof jb); CHECK(strcmp(ja, jb) == 0, "config changed:\n%s\n%s", ja, jb); moe_model_destroy(b); }
    CHECK_OK(moe_model_save(a, TMP_DIR "/routers.safetensors"), &ctx);
    CHECK_OK(moe_model_load(&ctx, TMP_DIR "/routers.safetensors", 0, &c), &ctx);
    if (c) {
        moe_model_config_json(c, jc, sizeof jc);
        CHECK(strcmp(ja, jc) == 0, "config changed through the file:\n%s\n%s", ja, jc);
        CHECK_OK(moe_model_forward(a, x, 16, ya, &o), &ctx);
        CHECK_OK(moe_model_forward(c, x, 16, yb, &o), &ctx);
        CHECK(memcmp(ya, yb, sizeof ya) == 0, "the loaded model computes something else");
        moe_model_destroy(c);
    }
    moe_model_destroy(a);
    return 0;
}

/* Soft MoE: every expert processes soft_group_tokens-sized groups' slots (stats), tokens only
   interact within their group, and what the router refuses. */
static int test_soft_router(void) {
    moe_layer_desc layers[] = {
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_SOFT, .n_experts = 3, .slots_per_expert = 2, .soft_group_tokens = 4, .d_hidden = 8},
    };
    moe_model *m = make(&ctx, 5, 1, layers, 12, NULL);
    float x[12 * 5], y[12 * 5], y2[12 * 5];
    moe_stats st;
    int i;
    if (!m) return 0;
    fill(x, 60, 21, 1.0f);
    CHECK_OK(moe_model_forward(m, x, 12, y, NULL), &ctx);
    CHECK_OK(moe_model_stats(m, 0, &st), &ctx);
    for (i = 0; i < 3; i++) CHECK(st.tokens_per_expert[i] == 3 * 2, "expert %d processed %lld slot rows, not groups * S = 6", i, (long long)st.tokens_per_expert[i]);
    CHECK(st.load_cv == 0.0f && st.dropped_tokens == 0 && st.top_k == 3, "soft stats: cv %g, dropped %lld, top_k %d", st.load_cv, (long long)st.dropped_tokens, st.top_k);
    CHECK(st.router_entropy > 0.0f && st.router_entropy <= logf(6.0f) + 1e-5f, "combine entropy %g out of (0, log 6]", st.router_entropy);
    x[0] += 1.0f;  /* token 0 is in group 0: groups 1 and 2 must not change, group 0 must */
    CHECK_OK(moe_model_forward(m, x, 12, y2, NULL), &ctx);
    CHECK(memcmp(y + 20, y2 + 20, sizeof(float) * 40) == 0, "a token changed the outputs of another group");
    CHECK(memcmp(y + 5, y2 + 5, sizeof(float) * 15) != 0, "a token did not change its own group");
    CHECK_OK(moe_model_quantize(m, MOE_DTYPE_BF16), &ctx);  /* slot rows go through the reduced weights too */
    CHECK_OK(moe_model_forward(m, x, 12, y, NULL), &ctx);
    for (i = 0; i < 60; i++) CHECK(fabsf(y[i] - y2[i]) < 0.02f, "bf16 soft forward: y[%d] %g vs %g", i, y[i], y2[i]);
    CHECK_OK(moe_model_quantize(m, MOE_DTYPE_F32), &ctx);
    CHECK_RESULT(moe_model_forward(m, x, 10, y, NULL), MOE_ERR_SHAPE, &ctx);
    CHECK_RESULT(moe_model_forward(m, x, 8, y, &(moe_forward_opts){.top_k = 2}), MOE_ERR_UNSUPPORTED, &ctx);
    CHECK_RESULT(moe_model_forward(m, x, 8, y, &(moe_forward_opts){.top_p = 0.5f}), MOE_ERR_UNSUPPORTED, &ctx);
    moe_model_destroy(m);
    return 0;
}

/* Hierarchical: each token's gates (read off one-hot linear experts) cover exactly top_k experts in
   each of top_k_groups distinct groups and sum to 1 (renormalised at both levels). */
static int test_hierarchical_router(void) {
    moe_layer_desc layers[] = {
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_HIERARCHICAL, .n_experts = 8, .n_groups = 4, .top_k_groups = 2, .top_k = 1,
         .expert = MOE_EXPERT_LINEAR, .d_out = 8},
    };
    moe_model *m = make(&ctx, 8, 1, layers, 16, NULL);
    float x[16 * 8], y[16 * 8];
    moe_stats st;
    int t, e;
    if (!m) return 0;
    one_hot_experts(m, 8);
    fill(tensor(m, "layers.0.router.weight", NULL), 64, 22, 1.0f);
    fill(tensor(m, "layers.0.router.group.weight", NULL), 32, 23, 1.0f);
    fill(x, 128, 24, 1.0f);
    CHECK_OK(moe_model_forward(m, x, 16, y, NULL), &ctx);
    for (t = 0; t < 16; t++) {
        int used = 0, groups[4] = {0, 0, 0, 0};
        float sum = 0.0f;
        for (e = 0; e < 8; e++)
            if (y[t * 8 + e] != 0.0f) { used++; groups[e / 2]++; sum += y[t * 8 + e]; }
        CHECK(used == 2 && groups[0] <= 1 && groups[1] <= 1 && groups[2] <= 1 && groups[3] <= 1 && fabsf(sum - 1.0f) < 1e-5f,
              "token %d: %d experts, gates sum %g", t, used, sum);
    }
    CHECK_OK(moe_model_stats(m, 0, &st), &ctx);
    {
        int64_t total = 0;
        for (e = 0; e < 8; e++) total += st.tokens_per_expert[e];
        CHECK(total == 32, "%lld assignments, expected 16 tokens * 2 groups * 1", (long long)total);
    }
    moe_model_destroy(m);
    return 0;
}

/* Configuration errors of the soft and hierarchical routers. */
static int test_soft_hierarchical_errors(void) {
    moe_layer *l = NULL;
    const struct { moe_layer_desc d; moe_result r; } bad[] = {
        {{.kind = MOE_LAYER_MOE, .d_in = 4, .router = MOE_ROUTER_SOFT, .top_k = 2}, MOE_ERR_INVALID_ARGUMENT},
        {{.kind = MOE_LAYER_MOE, .d_in = 4, .router = MOE_ROUTER_SOFT, .balance_loss = 0.1f}, MOE_ERR_INVALID_ARGUMENT},
        {{.kind = MOE_LAYER_MOE, .d_in = 4, .router = MOE_ROUTER_SOFT, .slots_per_expert = -1}, MOE_ERR_INVALID_ARGUMENT},
        {{.kind = MOE_LAYER_MOE, .d_in = 4, .router = MOE_ROUTER_SOFT, .n_shared_experts = 1}, MOE_ERR_UNSUPPORTED},
        {{.kind = MOE_LAYER_MOE, .d_in = 4, .router = MOE_ROUTER_SOFT, .n_groups = 2}, MOE_ERR_INVALID_ARGUMENT},
        {{.kind = MOE_LAYER_MOE, .d_in = 4, .router = MOE_ROUTER_TOPK, .slots_per_expert = 2}, MOE_ERR_INVALID_ARGUMENT},
        {{.kind = MOE_LAYER_MOE, .d_in = 4, .router = MOE_ROUTER_TOPK, .group_router = MOE_ROUTER_TOPK}, MOE_ERR_INVALID_ARGUMENT},
        {{.kind = MOE_LAYER_MOE, .d_in = 4, .router = MOE_ROUTER_HIERARCHICAL, .n_experts = 8, .n_groups = 3}, MOE_ERR_INVALID_ARGUMENT},
        {{.kind = MOE_LAYER_MOE, .d_in = 4, .router = MOE_ROUTER_HIERARCHICAL, .n_experts = 8, .n_groups = 4, .top_k = 3}, MOE_ERR_INVALID_ARGUMENT},
        {{.kind = MOE_LAYER_MOE, .d_in = 4, .router = MOE_ROUTER_HIERARCHICAL, .n_experts = 8, .top_k_groups = 3}, MOE_ERR_INVALID_ARGUMENT},
        {{.kind = MOE_LAYER_MOE, .d_in = 4, .router = MOE_ROUTER_HIERARCHICAL, .group_router = MOE_ROUTER_SWITCH}, MOE_ERR_UNSUPPORTED},
        {{.kind = MOE_LAYER_MOE, .d_in = 4, .router = MOE_ROUTER_HIERARCHICAL, .expert_router = MOE_ROUTER_HIERARCHICAL}, MOE_ERR_UNSUPPORTED},
        {{.kind = MOE_LAYER_MOE, .d_in = 4, .router = MOE_ROUTER_HIERARCHICAL, .z_loss = 0.1f}, MOE_ERR_UNSUPPORTED},
        {{.kind = MOE_LAYER_MOE, .d_in = 4, .router = MOE_ROUTER_HIERARCHICAL, .load_loss = 0.1f}, MOE_ERR_UNSUPPORTED},
    };
    size_t i;
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_RESULT(moe_layer_create(&ctx, &bad[i].d, 8, &l), bad[i].r, &ctx);
        CHECK(l == NULL, "case %zu: a layer was returned", i);
    }
    CHECK_OK(moe_layer_create(&ctx, &(moe_layer_desc){.kind = MOE_LAYER_MOE, .d_in = 4, .router = MOE_ROUTER_HIERARCHICAL}, 8, &l), &ctx);
    if (l) {
        const moe_layer_desc *d = moe_layer_get_desc(l);
        CHECK(d->n_experts == 4 && d->n_groups == 2 && d->top_k_groups == 1 && d->top_k == 2 && d->group_router == MOE_ROUTER_TOPK &&
              d->expert_router == MOE_ROUTER_TOPK && d->renormalize == MOE_FLAG_ON, "hierarchical defaults");
        moe_layer_destroy(l);
    }
    CHECK_OK(moe_layer_create(&ctx, &(moe_layer_desc){.kind = MOE_LAYER_MOE, .d_in = 4, .router = MOE_ROUTER_SOFT}, 8, &l), &ctx);
    if (l) {
        const moe_layer_desc *d = moe_layer_get_desc(l);
        CHECK(d->slots_per_expert == 1 && d->soft_group_tokens == 0 && d->top_k == d->n_experts, "soft defaults");
        moe_layer_destroy(l);
    }
    return 0;
}

/* Both routers: config text, file round trip, and the same bits on 1, 2 and 3 threads after training. */
static uint64_t soft_hierarchical_train(int n_threads, const char *path) {
    moe_layer_desc layers[] = {
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_SOFT, .n_experts = 8, .slots_per_expert = 4, .soft_group_tokens = 50, .d_hidden = 48},
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_HIERARCHICAL, .n_experts = 8, .n_groups = 4, .top_k_groups = 2, .top_k = 2,
         .group_router = MOE_ROUTER_NOISY_TOPK, .expert_router = MOE_ROUTER_NOISY_TOPK, .router_bias = MOE_FLAG_ON, .jitter = 0.05f,
         .balance_loss = 0.01f, .importance_loss = 0.01f, .d_hidden = 40, .residual = 1, .n_shared_experts = 1},
        {.kind = MOE_LAYER_DENSE, .d_out = 6},
    };
    moe_ctx c;
    moe_model *m;
    float x[200 * 32], v[200 * 6];
    int64_t n;
    uint64_t h = 1469598103934665603ull;
    size_t i;
    int s;
    moe_ctx_init(&c, &(moe_ctx_desc){.seed = 5, .n_threads = n_threads});
    m = make(&c, 32, 3, layers, 200, NULL);
    if (!m) return 0;
    fill(x, 200 * 32, 25, 1.0f);
    fill(v, 200 * 6, 26, 1.0f);
    for (s = 0; s < 4; s++) CHECK_OK(moe_model_train_step(m, x, &(moe_target){.values = v}, 200, NULL), &c);
    if (path) CHECK_OK(moe_model_save(m, path), &c);
    {
        const unsigned char *b = (const unsigned char *)moe_model_params(m, &n);
        for (i = 0; i < (size_t)n * sizeof(float); i++) h = (h ^ b[i]) * 0x100000001B3ull;
    }
    moe_model_destroy(m);
    return h;
}

static int test_soft_hierarchical_round_trip(void) {
    uint64_t h1 = soft_hierarchical_train(1, TMP_DIR "/soft_hier.safetensors"), h2 = soft_hierarchical_train(2, NULL), h3 = soft_hierarchical_train(3, NULL);
    moe_model *a = NULL, *b = NULL;
    char ja[4096], jb[4096];
    float x[200 * 32], ya[200 * 6], yb[200 * 6];
    CHECK(h1 == h2 && h1 == h3, "soft/hierarchical training differs between 1, 2 and 3 threads");
    CHECK_OK(moe_model_load(&ctx, TMP_DIR "/soft_hier.safetensors", 0, &a), &ctx);
    if (!a) return 0;
    moe_model_config_json(a, ja, sizeof ja);
    CHECK(strstr(ja, "\"router\":\"soft\"") && strstr(ja, "\"slots_per_expert\":4") && strstr(ja, "\"soft_group_tokens\":50") &&
          strstr(ja, "\"router\":\"hierarchical\"") && strstr(ja, "\"group_router\":\"noisy_topk\"") &&
          strstr(ja, "\"expert_router\":\"noisy_topk\"") && strstr(ja, "\"groups\":4") && strstr(ja, "\"top_k_groups\":2"),
          "config text misses a field: %s", ja);
    CHECK_OK(moe_model_from_config(&ctx, ja, 0, &b), &ctx);
    if (b) { moe_model_config_json(b, jb, sizeof jb); CHECK(strcmp(ja, jb) == 0, "config changed:\n%s\n%s", ja, jb); moe_model_destroy(b); }
    fill(x, 200 * 32, 25, 1.0f);
    CHECK_OK(moe_model_forward(a, x, 200, ya, NULL), &ctx);
    CHECK(moe_model_forward(a, x, 200, yb, NULL) == MOE_OK && memcmp(ya, yb, sizeof ya) == 0, "forward is not repeatable");
    moe_model_destroy(a);
    return 0;
}

/* A hierarchical layer with noise at both levels resumes from a checkpoint bit for bit. */
static int test_hierarchical_checkpoint(void) {
    moe_layer_desc layers[] = {
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_HIERARCHICAL, .n_experts = 6, .n_groups = 3, .top_k_groups = 2, .top_k = 1,
         .group_router = MOE_ROUTER_NOISY_TOPK, .expert_router = MOE_ROUTER_NOISY_TOPK, .d_hidden = 8, .balance_loss = 0.01f},
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_SOFT, .n_experts = 3, .slots_per_expert = 2, .soft_group_tokens = 8, .residual = 1},
        {.kind = MOE_LAYER_DENSE, .d_out = 3},
    };
    moe_model *a = make(&ctx, 6, 3, layers, 16, NULL), *b = NULL;
    float x[16 * 6], v[16 * 3];
    int64_t n;
    int s;
    if (!a) return 0;
    fill(x, 96, 27, 1.0f);
    fill(v, 48, 28, 1.0f);
    for (s = 0; s < 2; s++) CHECK_OK(moe_model_train_step(a, x, &(moe_target){.values = v}, 16, NULL), &ctx);
    CHECK_OK(moe_model_save_checkpoint(a, TMP_DIR "/hier.ckpt"), &ctx);
    CHECK_OK(moe_model_load_checkpoint(&ctx, TMP_DIR "/hier.ckpt", 0, &b), &ctx);
    for (s = 0; s < 3; s++) {
        CHECK_OK(moe_model_train_step(a, x, &(moe_target){.values = v}, 16, NULL), &ctx);
        if (b) CHECK_OK(moe_model_train_step(b, x, &(moe_target){.values = v}, 16, NULL), &ctx);
    }
    if (b) {
        float *pa = moe_model_params(a, &n);
        CHECK(memcmp(pa, moe_model_params(b, NULL), sizeof(float) * (size_t)n) == 0, "the resumed model trains differently");
        moe_model_destroy(b);
    }
    moe_model_destroy(a);
    return 0;
}

/* The top-n selection every router uses, against a selection sort by its documented order
   (larger first, NaN as the lowest, ties to the lower index; -1 past E), on values full of ties. */
static int test_top_n_order(void) {
    float h[70];
    int32_t got[80], want[80];
    int E, n, trial, s, bad = 0, cases = 0;
    for (trial = 0; trial < 200; trial++) {
        E = 1 + trial % 70;
        for (s = 0; s < E; s++) {
            uint64_t r = moe_rng_u64(7, (uint64_t)trial, (uint64_t)s) % 11;
            h[s] = r == 10 ? NAN : r == 9 ? -FLT_MAX : (float)(r % 5) - 2.0f;  /* 5 values, many ties */
        }
        for (n = 0; n <= E + 2 && n < 80; n += 1 + n / 3) {
            int taken[70] = {0}, q, e;
            for (q = 0; q < n; q++) {
                int best = -1;
                for (e = 0; e < E; e++) {
                    float he = h[e] == h[e] ? h[e] : -FLT_MAX, hb = best < 0 ? 0.0f : h[best] == h[best] ? h[best] : -FLT_MAX;
                    if (!taken[e] && (best < 0 || he > hb)) best = e;
                }
                want[q] = best;
                if (best >= 0) taken[best] = 1;
            }
            moe__top_n(h, E, n, got);
            bad += memcmp(got, want, sizeof(int32_t) * (size_t)n) != 0;
            cases++;
        }
    }
    CHECK(bad == 0, "%d of %d top-n selections differ from the selection sort", bad, cases);
    return 0;
}

int main(void) {
    printf("test_routers\n");
    if (test_make_dir(TMP_DIR) != 0) return 1;
    moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = 11});
    RUN(test_top_n_order);
    RUN(test_selection_bias_balances);
    RUN(test_selection_bias_is_state);
    RUN(test_layer_update_bias);
    RUN(test_expert_choice_ties);
    RUN(test_expert_choice_selection);
    RUN(test_top_k_top_p);
    RUN(test_hash_router);
    RUN(test_router_errors);
    RUN(test_round_trip);
    RUN(test_soft_router);
    RUN(test_hierarchical_router);
    RUN(test_soft_hierarchical_errors);
    RUN(test_soft_hierarchical_round_trip);
    RUN(test_hierarchical_checkpoint);
    TEST_END();
}
