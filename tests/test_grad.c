/* Finite-difference gradient checks: every layer kind, activation, router, expert kind, loss and
   auxiliary loss. The analytic gradients of moe.h (float) are compared with central differences
   of the double-precision reference (tests/ref_model.h). A point where a discrete decision (top-k
   order, capacity, relu sign, load threshold) flips within the step is skipped, never tolerated. */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "test.h"
#include "ref_model.h"

#define FD_STEP 1e-5
/* Float backward vs. double finite differences. The float path rounds at ~1e-7 relative to the
   terms it sums, so a gradient is compared against both its own size and its tensor's scale. */
#define GRAD_RTOL 2e-3
#define GRAD_ATOL_SCALE 2e-4   /* times the largest |gradient| in the same tensor */

typedef struct grad_case {
    const char *name;
    int64_t d_in, T;
    int n_layers;
    moe_layer_desc layers[6];
    moe_loss loss;
    int training;               /* noise and jitter on */
    int top_k;                  /* moe_forward_opts.top_k (0: the layers' own) */
    float top_p;                /* moe_forward_opts.top_p */
} grad_case;

/* A multi-task model's losses, weights and slice widths (moe_model_desc). */
typedef struct grad_tasks {
    int n_tasks;
    moe_loss loss[3];
    float weight[3];
    int64_t d_out[3];
} grad_tasks;

static uint64_t fd_seed = 42;

/* Objective at the reference: mode 0 = task + aux loss (training), mode 1 = sum(y * dy) (inference). */
static double objective(ref_run *r, const float *x, int64_t T, int mode, const int32_t *labels, const float *values,
                        const float *dy, moe_loss loss) {
    const moe_model_desc *md = moe_model_get_desc(r->model);
    int64_t C = moe_model_d_out(r->model), i;
    double *y = (double *)malloc(sizeof(double) * (size_t)(T * C)), v;
    double aux = ref_model_forward(r, x, T, y);
    if (mode == 0 && loss == MOE_LOSS_MIXTURE_NLL) {
        const moe_layer_desc *last = &md->layers[md->n_layers - 1];
        v = ref_mixture_nll(y, T, last->n_experts, last->d_out, values) + aux;
    } else if (mode == 0) {
        v = (md->n_tasks > 0 ? ref_multi_task_loss(md, y, T, C, labels, values) : ref_task_loss(loss, y, T, C, labels, values)) + aux;
    } else {
        v = 0;
        for (i = 0; i < T * C; i++)
            if (y[i] != -INFINITY) v += y[i] * dy[i];  /* log pi of a component the router left out */
    }
    free(y);
    return v;
}

static int run_case_tasks(const grad_case *gc, const grad_tasks *tk) {
    moe_ctx ctx;
    moe_model *m = NULL;
    moe_model_desc desc;
    int64_t T = gc->T, D = gc->d_in, C, n_params, i;
    int64_t vocab = gc->layers[0].kind == MOE_LAYER_EMBEDDING ? gc->layers[0].vocab_size : 0;
    float *x, *dy, *values, *dx, *gfloat, *yf, *dl;
    int32_t *labels, *ids;
    float *noise[6] = {0};
    const float *noise_c[6];
    double *params;
    ref_run r;
    int mode, t, l;
    int checked = 0, skipped = 0, votes;
    memset(&desc, 0, sizeof desc);
    desc.d_in = D;
    desc.n_layers = gc->n_layers;
    desc.layers = gc->layers;
    desc.loss = gc->loss;
    desc.max_tokens = T;
    if (tk) {
        desc.n_tasks = tk->n_tasks;
        for (i = 0; i < 3; i++) { desc.task_loss[i] = tk->loss[i]; desc.task_weight[i] = tk->weight[i]; desc.task_d_out[i] = tk->d_out[i]; }
    }
    CHECK_OK(moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = fd_seed, .n_threads = 2}), &ctx);
    CHECK_OK(moe_model_create(&ctx, &desc, &m), &ctx);
    if (!m) return 0;
    C = moe_model_d_out(m);
    x = (float *)malloc(sizeof(float) * (size_t)(T * D));
    dx = (float *)malloc(sizeof(float) * (size_t)(T * D));
    dy = (float *)malloc(sizeof(float) * (size_t)(T * C));
    yf = (float *)malloc(sizeof(float) * (size_t)(T * C));
    dl = (float *)malloc(sizeof(float) * (size_t)(T * C));
    values = (float *)malloc(sizeof(float) * (size_t)(T * C));
    labels = (int32_t *)malloc(sizeof(int32_t) * (size_t)(T * MOE_MAX_TASKS));
    ids = (int32_t *)malloc(sizeof(int32_t) * (size_t)T);
    for (i = 0; i < T; i++) ids[i] = (int32_t)(moe_rng_u64(7, 14, (uint64_t)i) % 1000);
    for (i = 0; i < T * D; i++) x[i] = moe_rng_normal(7, 1, (uint64_t)i);
    /* an embedding first layer: x holds token ids, hash routers take the model's own ids (each
       row's last id), and dx must be 0 */
    if (vocab > 0) {
        for (i = 0; i < T * D; i++) x[i] = (float)(moe_rng_u64(7, 15, (uint64_t)i) % (uint64_t)vocab);
        for (i = 0; i < T; i++) ids[i] = (int32_t)x[i * D + D - 1];
    }
    for (i = 0; i < T * C; i++) { dy[i] = moe_rng_normal(7, 2, (uint64_t)i); values[i] = moe_rng_uniform(7, 3, (uint64_t)i); }
    if (gc->loss == MOE_LOSS_MSE) for (i = 0; i < T * C; i++) values[i] = 2.0f * values[i] - 1.0f;
    for (i = 0; i < T; i++) labels[i] = (int32_t)(moe_rng_u64(7, 4, (uint64_t)i) % (uint64_t)C);
    for (t = 0; t < moe_model_get_desc(m)->n_tasks; t++)   /* task t's labels [T] at labels + t*T */
        for (i = 0; i < T; i++) labels[t * T + i] = (int32_t)(moe_rng_u64(7, 15, (uint64_t)(t * T + i)) % (uint64_t)moe_model_get_desc(m)->task_d_out[t]);
    /* make routers decisive enough to be interesting: scale router weights up */
    {
        float *p = moe_model_params(m, &n_params);
        for (t = 0; t < moe_model_tensor_count(m); t++) {
            moe_tensor tt;
            moe_model_tensor(m, t, &tt);
            for (i = 0; i < tt.size; i++) {
                if (strstr(tt.name, "router.weight")) tt.data[i] *= 3.0f;
                if (strstr(tt.name, "noise_weight")) tt.data[i] = 0.3f * moe_rng_normal(7, 5, (uint64_t)i);
                if (strstr(tt.name, "router.bias")) tt.data[i] = 0.2f * moe_rng_normal(7, 6, (uint64_t)i);
                if (strstr(tt.name, "selection_bias")) tt.data[i] = 0.1f * moe_rng_normal(7, 13, (uint64_t)i);
                if (strstr(tt.name, ".bias") && !strstr(tt.name, "router")) tt.data[i] += 0.05f * moe_rng_normal(7, 8, (uint64_t)i);
                if (strstr(tt.name, "norm") == NULL && tt.ndim == 1 && strstr(tt.name, "weight")) tt.data[i] = 1.0f + 0.2f * moe_rng_normal(7, 9, (uint64_t)i);
            }
        }
        (void)p;
    }
    for (l = 0; l < gc->n_layers; l++) {
        const moe_layer_desc *d = &moe_model_get_desc(m)->layers[l];
        if (d->kind == MOE_LAYER_MOE && (d->router == MOE_ROUTER_NOISY_TOPK || d->router == MOE_ROUTER_HIERARCHICAL)) {
            int64_t n = T * (d->n_experts + (d->router == MOE_ROUTER_HIERARCHICAL ? d->n_groups : 0));  /* hierarchical: then group noise */
            noise[l] = (float *)malloc(sizeof(float) * (size_t)n);
            for (i = 0; i < n; i++) noise[l][i] = moe_rng_normal(7, 10 + (uint64_t)l, (uint64_t)i);
        }
        noise_c[l] = noise[l];
    }
    float *pf = moe_model_params(m, &n_params);
    params = (double *)malloc(sizeof(double) * (size_t)n_params);
    gfloat = (float *)malloc(sizeof(float) * (size_t)n_params);
    for (l = 0, votes = 0; l < gc->n_layers; l++)
        votes |= gc->layers[l].combine == MOE_COMBINE_VOTE || gc->layers[l].combine == MOE_COMBINE_VOTE_MAJORITY;
    /* a voting layer's inference output has no gradient (tests/test_combine.c): training only */
    for (mode = 0; mode < (votes ? 1 : 2); mode++) {
        moe_forward_opts opts;
        int training = mode == 0 && gc->training;
        double worst_fwd = 0;
        memset(&opts, 0, sizeof opts);
        opts.training = training;
        opts.router_noise = noise_c;
        opts.top_k = gc->top_k;
        opts.top_p = gc->top_p;
        opts.token_ids = vocab > 0 ? NULL : ids;
        /* a fresh model state per mode: the training forward is the model's first (jitter step 0) */
        moe_model_zero_grad(m);
        CHECK_OK(moe_model_forward(m, x, T, yf, &opts), &ctx);
        if (mode == 0) {
            float loss;
            moe_target tg, tasks[MOE_MAX_TASKS];
            int64_t off = 0;
            memset(&tg, 0, sizeof tg);
            memset(tasks, 0, sizeof tasks);
            tg.labels = labels;
            tg.values = values;
            for (t = 0; t < moe_model_get_desc(m)->n_tasks; t++) {
                tasks[t].labels = labels + t * T;
                tasks[t].values = values + off * T;
                off += moe_model_get_desc(m)->task_d_out[t];
            }
            if (moe_model_get_desc(m)->n_tasks > 0) tg.tasks = tasks;
            CHECK_OK(moe_model_loss(m, &tg, &loss, dl), &ctx);
            CHECK_OK(moe_model_backward(m, dl, dx, MOE_BACKWARD_AUX), &ctx);
        } else {
            CHECK_OK(moe_model_backward(m, dy, dx, 0), &ctx);
        }
        memcpy(gfloat, moe_model_grads(m, NULL), sizeof(float) * (size_t)n_params);
        for (i = 0; i < n_params; i++) params[i] = pf[i];
        memset(&r, 0, sizeof r);
        r.model = m;
        r.params = params;
        r.training = training;
        r.noise = noise_c;
        r.seed = fd_seed;
        r.step = 0;
        r.top_k = gc->top_k;
        r.top_p = gc->top_p;
        r.token_ids = ids;
        /* forward agreement with the reference */
        {
            double *yr = (double *)malloc(sizeof(double) * (size_t)(T * C));
            ref_model_forward(&r, x, T, yr);
            for (i = 0; i < T * C; i++) {
                double e = fabs(yf[i] - yr[i]) / (1e-5 + 1e-4 * fabs(yr[i]));
                if (e > worst_fwd) worst_fwd = e;
            }
            CHECK(worst_fwd <= 1.0, "%s mode %d: forward differs from the reference (worst %.3g of tolerance)", gc->name, mode, worst_fwd);
            free(yr);
        }
        /* parameters: every tensor, a deterministic sample of entries */
        for (t = 0; t < moe_model_tensor_count(m); t++) {
            moe_tensor tt;
            double scale = 0;
            int64_t n_check, q;
            moe_model_tensor(m, t, &tt);
            for (i = 0; i < tt.size; i++) scale = fabs(gfloat[tt.offset + i]) > scale ? fabs(gfloat[tt.offset + i]) : scale;
            n_check = tt.size < 40 ? tt.size : 40;
            for (q = 0; q < n_check; q++) {
                int64_t idx = tt.offset + (tt.size <= 40 ? q : (int64_t)(moe_rng_u64(11, (uint64_t)t, (uint64_t)q) % (uint64_t)tt.size));
                double keep = params[idx], fp, fm, fd;
                uint64_t s0, s1, s2;
                objective(&r, x, T, mode, labels, values, dy, gc->loss);
                s0 = r.sig;
                params[idx] = keep + FD_STEP;
                fp = objective(&r, x, T, mode, labels, values, dy, gc->loss);
                s1 = r.sig;
                params[idx] = keep - FD_STEP;
                fm = objective(&r, x, T, mode, labels, values, dy, gc->loss);
                s2 = r.sig;
                params[idx] = keep;
                if (s0 != s1 || s0 != s2) { skipped++; continue; }
                fd = (fp - fm) / (2 * FD_STEP);
                checked++;
                CHECK(test_close(gfloat[idx], fd, GRAD_RTOL, GRAD_ATOL_SCALE * scale + 1e-7),
                      "%s mode %d: d/d %s[%lld]: moe.h %.8g, finite differences %.8g", gc->name, mode, tt.name,
                      (long long)(idx - tt.offset), (double)gfloat[idx], fd);
            }
        }
        /* inputs: token ids have no gradient */
        if (vocab > 0) {
            for (i = 0; i < T * D; i++) CHECK(dx[i] == 0.0f, "%s: dx[%lld] = %g for a token id", gc->name, (long long)i, (double)dx[i]);
        } else {
            double scale = 0;
            int64_t q;
            float *xp = (float *)malloc(sizeof(float) * (size_t)(T * D));
            for (i = 0; i < T * D; i++) scale = fabs(dx[i]) > scale ? fabs(dx[i]) : scale;
            for (q = 0; q < 48 && q < T * D; q++) {
                int64_t idx = (int64_t)(moe_rng_u64(12, 0, (uint64_t)q) % (uint64_t)(T * D));
                double fp, fm, fd;
                uint64_t s0, s1, s2;
                /* the reference takes float inputs: perturb through a double-exact float step */
                float hstep = 1.0f / 65536.0f;
                memcpy(xp, x, sizeof(float) * (size_t)(T * D));
                objective(&r, xp, T, mode, labels, values, dy, gc->loss);
                s0 = r.sig;
                xp[idx] = x[idx] + hstep;
                fp = objective(&r, xp, T, mode, labels, values, dy, gc->loss);
                s1 = r.sig;
                xp[idx] = x[idx] - hstep;
                fm = objective(&r, xp, T, mode, labels, values, dy, gc->loss);
                s2 = r.sig;
                if (s0 != s1 || s0 != s2) { skipped++; continue; }
                fd = (fp - fm) / ((double)(x[idx] + hstep) - (double)(x[idx] - hstep));
                checked++;
                CHECK(test_close(dx[idx], fd, 1e-2, GRAD_ATOL_SCALE * scale + 1e-6),
                      "%s mode %d: d/dx[%lld]: moe.h %.8g, finite differences %.8g", gc->name, mode, (long long)idx, (double)dx[idx], fd);
            }
            free(xp);
        }
    }
    printf("    %-28s %4d gradients checked, %3d skipped at decision boundaries\n", gc->name, checked, skipped);
    CHECK(checked > 0 && skipped * 4 < checked, "%s: too few points checked (%d checked, %d skipped)", gc->name, checked, skipped);
    for (l = 0; l < 6; l++) free(noise[l]);
    free(params); free(gfloat); free(x); free(dx); free(dy); free(yf); free(dl); free(values); free(labels); free(ids);
    moe_model_destroy(m);
    return 0;
}

static int run_case(const grad_case *gc) { return run_case_tasks(gc, NULL); }

static int test_dense_activations(void) {
    grad_case gc = {"dense+activations", 7, 9, 6, {
        {.kind = MOE_LAYER_DENSE, .d_out = 8, .activation = MOE_ACT_GELU},
        {.kind = MOE_LAYER_DENSE, .activation = MOE_ACT_SILU, .residual = 1},
        {.kind = MOE_LAYER_DENSE, .d_out = 6, .activation = MOE_ACT_TANH},
        {.kind = MOE_LAYER_DENSE, .activation = MOE_ACT_SIGMOID, .bias = MOE_FLAG_OFF},
        {.kind = MOE_LAYER_DENSE, .activation = MOE_ACT_RELU, .residual = 1},
        {.kind = MOE_LAYER_DENSE, .d_out = 5}}, MOE_LOSS_CROSS_ENTROPY, 1, 0, 0.0f};
    return run_case(&gc);
}

static int test_norms_mse(void) {
    grad_case gc = {"norms+mse", 6, 8, 5, {
        {.kind = MOE_LAYER_DENSE, .d_out = 10, .activation = MOE_ACT_TANH},
        {.kind = MOE_LAYER_LAYERNORM},
        {.kind = MOE_LAYER_RMSNORM, .residual = 1},
        {.kind = MOE_LAYER_LAYERNORM, .residual = 1, .eps = 1e-3f},
        {.kind = MOE_LAYER_DENSE, .d_out = 3}}, MOE_LOSS_MSE, 1, 0, 0.0f};
    return run_case(&gc);
}

static int test_topk_swiglu_shared(void) {
    grad_case gc = {"topk2 swiglu shared", 8, 12, 2, {
        {.kind = MOE_LAYER_MOE, .n_experts = 4, .top_k = 2, .expert = MOE_EXPERT_SWIGLU, .d_hidden = 6, .d_out = 7,
         .n_shared_experts = 2, .d_shared_hidden = 5, .balance_loss = 0.3f, .z_loss = 0.05f},
        {.kind = MOE_LAYER_DENSE, .d_out = 4}}, MOE_LOSS_CROSS_ENTROPY, 1, 0, 0.0f};
    return run_case(&gc);
}

static int test_topk_geglu(void) {
    grad_case gc = {"topk2 geglu bias + shared", 7, 12, 2, {
        {.kind = MOE_LAYER_MOE, .n_experts = 4, .top_k = 2, .expert = MOE_EXPERT_GEGLU, .d_hidden = 6, .d_out = 5,
         .bias = MOE_FLAG_ON, .n_shared_experts = 1, .d_shared_hidden = 3, .balance_loss = 0.2f},
        {.kind = MOE_LAYER_DENSE, .d_out = 3}}, MOE_LOSS_CROSS_ENTROPY, 1, 0, 0.0f};
    return run_case(&gc);
}

static int test_stack_combine(void) {
    grad_case gc = {"stacking combine, d_e 3", 6, 14, 3, {
        {.kind = MOE_LAYER_MOE, .n_experts = 4, .top_k = 2, .d_hidden = 5, .d_out = 6, .combine = MOE_COMBINE_STACK, .d_expert_out = 3,
         .activation = MOE_ACT_TANH, .residual = 1, .balance_loss = 0.1f},
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_SWITCH, .n_experts = 3, .capacity_factor = 0.5f, .expert = MOE_EXPERT_GEGLU,
         .d_hidden = 4, .combine = MOE_COMBINE_STACK},
        {.kind = MOE_LAYER_DENSE, .d_out = 3}}, MOE_LOSS_CROSS_ENTROPY, 1, 0, 0.0f};
    return run_case(&gc);
}

static int test_vote_training(void) {
    grad_case gc = {"voting combine (training forward)", 6, 12, 2, {
        {.kind = MOE_LAYER_MOE, .n_experts = 4, .top_k = 2, .d_hidden = 5, .activation = MOE_ACT_GELU, .d_out = 6},
        {.kind = MOE_LAYER_MOE, .n_experts = 3, .top_k = 2, .d_hidden = 4, .d_out = 4, .combine = MOE_COMBINE_VOTE_MAJORITY,
         .z_loss = 0.05f}}, MOE_LOSS_CROSS_ENTROPY, 1, 0, 0.0f};
    return run_case(&gc);
}

static int test_soft_mixture(void) {
    grad_case gc = {"soft mixture k=E mlp2", 5, 10, 1, {
        {.kind = MOE_LAYER_MOE, .n_experts = 4, .top_k = 4, .expert = MOE_EXPERT_MLP, .n_hidden_layers = 2, .d_hidden = 6,
         .d_out = 3, .activation = MOE_ACT_GELU, .balance_loss = 0.2f, .z_loss = 0.01f}}, MOE_LOSS_MSE, 1, 0, 0.0f};
    return run_case(&gc);
}

static int test_topk_norenorm_bce(void) {
    grad_case gc = {"topk3/5 no-renorm linear bce", 6, 12, 2, {
        {.kind = MOE_LAYER_MOE, .n_experts = 5, .top_k = 3, .renormalize = MOE_FLAG_OFF, .expert = MOE_EXPERT_LINEAR,
         .router_bias = MOE_FLAG_ON, .balance_loss = 0.5f, .z_loss = 0.1f, .importance_loss = 0.3f, .residual = 1},
        {.kind = MOE_LAYER_DENSE, .d_out = 3}}, MOE_LOSS_BCE, 1, 0, 0.0f};
    return run_case(&gc);
}

static int test_switch_capacity(void) {
    grad_case gc = {"switch capacity + passthrough", 6, 16, 3, {
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_SWITCH, .n_experts = 4, .capacity_factor = 0.75f, .residual = 1,
         .d_hidden = 5, .balance_loss = 0.2f, .activation = MOE_ACT_SILU},
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_SWITCH, .n_experts = 3, .capacity_factor = 0.5f, .d_hidden = 4,
         .expert = MOE_EXPERT_SWIGLU, .z_loss = 0.02f},
        {.kind = MOE_LAYER_DENSE, .d_out = 4}}, MOE_LOSS_CROSS_ENTROPY, 1, 0, 0.0f};
    return run_case(&gc);
}

static int test_noisy_topk(void) {
    grad_case gc = {"noisy top-k + importance/load", 6, 16, 2, {
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_NOISY_TOPK, .n_experts = 6, .top_k = 2, .d_hidden = 5,
         .activation = MOE_ACT_TANH, .importance_loss = 0.5f, .load_loss = 0.5f, .balance_loss = 0.1f, .z_loss = 0.05f,
         .router_bias = MOE_FLAG_ON},
        {.kind = MOE_LAYER_DENSE, .d_out = 3}}, MOE_LOSS_CROSS_ENTROPY, 1, 0, 0.0f};
    return run_case(&gc);
}

static int test_jitter_deep_mlp(void) {
    grad_case gc = {"jitter + 3-layer mlp experts", 5, 10, 2, {
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_TOPK, .n_experts = 3, .top_k = 2, .d_hidden = 4, .n_hidden_layers = 3,
         .activation = MOE_ACT_SIGMOID, .jitter = 0.2f, .n_shared_experts = 1, .z_loss = 0.1f},
        {.kind = MOE_LAYER_DENSE, .d_out = 2, .activation = MOE_ACT_SILU}}, MOE_LOSS_MSE, 1, 0, 0.0f};
    return run_case(&gc);
}

static int test_relu_experts(void) {
    grad_case gc = {"relu mlp experts k=1", 6, 12, 2, {
        {.kind = MOE_LAYER_MOE, .n_experts = 3, .top_k = 1, .d_hidden = 7, .activation = MOE_ACT_RELU, .balance_loss = 0.1f},
        {.kind = MOE_LAYER_DENSE, .d_out = 3}}, MOE_LOSS_CROSS_ENTROPY, 1, 0, 0.0f};
    return run_case(&gc);
}

static int test_sigmoid_groups(void) {
    grad_case gc = {"sigmoid + bias, groups", 6, 16, 3, {
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_SIGMOID, .n_experts = 8, .top_k = 2, .n_groups = 4, .top_k_groups = 2,
         .routed_scaling_factor = 2.5f, .expert = MOE_EXPERT_SWIGLU, .d_hidden = 5, .d_out = 7, .n_shared_experts = 1,
         .router_bias = MOE_FLAG_ON},
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_SIGMOID, .n_experts = 5, .top_k = 3, .renormalize = MOE_FLAG_OFF,
         .d_hidden = 4, .activation = MOE_ACT_TANH, .capacity_factor = 1.0f, .residual = 1},
        {.kind = MOE_LAYER_DENSE, .d_out = 4}}, MOE_LOSS_CROSS_ENTROPY, 1, 0, 0.0f};
    return run_case(&gc);
}

static int test_shared_gate(void) {
    grad_case gc = {"gated shared experts (Qwen2-MoE)", 6, 12, 2, {
        {.kind = MOE_LAYER_MOE, .n_experts = 4, .top_k = 2, .renormalize = MOE_FLAG_OFF, .expert = MOE_EXPERT_SWIGLU,
         .d_hidden = 5, .n_shared_experts = 2, .d_shared_hidden = 3, .shared_gate = MOE_FLAG_ON, .jitter = 0.1f},
        {.kind = MOE_LAYER_DENSE, .d_out = 3}}, MOE_LOSS_MSE, 1, 0, 0.0f};
    return run_case(&gc);
}

static int test_expert_choice(void) {
    grad_case gc = {"expert choice + pass-through", 6, 16, 3, {
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_EXPERT_CHOICE, .n_experts = 4, .top_k = 2, .d_hidden = 5,
         .activation = MOE_ACT_SILU, .z_loss = 0.05f, .d_out = 6},
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_EXPERT_CHOICE, .n_experts = 3, .top_k = 1, .capacity_factor = 0.5f,
         .expert = MOE_EXPERT_SWIGLU, .d_hidden = 4, .jitter = 0.1f, .n_shared_experts = 1},
        {.kind = MOE_LAYER_DENSE, .d_out = 3}}, MOE_LOSS_MSE, 1, 0, 0.0f};
    return run_case(&gc);
}

static int test_call_top_k(void) {
    grad_case gc = {"per-call top_k 3 of max 4", 5, 12, 2, {
        {.kind = MOE_LAYER_MOE, .n_experts = 5, .top_k = 2, .max_top_k = 4, .d_hidden = 4, .activation = MOE_ACT_GELU,
         .balance_loss = 0.2f, .importance_loss = 0.2f},
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_NOISY_TOPK, .n_experts = 4, .top_k = 1, .max_top_k = 3, .d_hidden = 3,
         .renormalize = MOE_FLAG_OFF, .load_loss = 0.3f, .d_out = 3}}, MOE_LOSS_CROSS_ENTROPY, 1, 3, 0.0f};
    return run_case(&gc);
}

static int test_call_top_p(void) {
    grad_case gc = {"per-call top_p 0.6", 5, 16, 3, {
        {.kind = MOE_LAYER_MOE, .n_experts = 5, .top_k = 3, .d_hidden = 4, .activation = MOE_ACT_TANH, .z_loss = 0.05f,
         .importance_loss = 0.2f},
        {.kind = MOE_LAYER_MOE, .n_experts = 4, .top_k = 3, .renormalize = MOE_FLAG_OFF, .d_hidden = 3, .balance_loss = 0.2f,
         .residual = 1},
        {.kind = MOE_LAYER_DENSE, .d_out = 3}}, MOE_LOSS_CROSS_ENTROPY, 1, 0, 0.6f};
    return run_case(&gc);
}

static int test_embedding_hash(void) {
    grad_case gc = {"embedding + hash on last id", 3, 14, 3, {
        {.kind = MOE_LAYER_EMBEDDING, .vocab_size = 7, .d_embedding = 4},
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_HASH, .n_experts = 4, .top_k = 2, .d_hidden = 5, .activation = MOE_ACT_TANH},
        {.kind = MOE_LAYER_MOE, .n_experts = 3, .top_k = 2, .d_hidden = 4, .balance_loss = 0.1f, .d_out = 7}},
        MOE_LOSS_CROSS_ENTROPY, 1, 0, 0.0f};
    return run_case(&gc);
}

static int test_hash(void) {
    grad_case gc = {"hash router + top-k", 6, 12, 3, {
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_HASH, .n_experts = 5, .top_k = 2, .d_hidden = 4, .hash_seed = 9,
         .activation = MOE_ACT_GELU, .n_shared_experts = 1},
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_HASH, .n_experts = 3, .top_k = 1, .expert = MOE_EXPERT_LINEAR,
         .capacity_factor = 0.5f, .residual = 1},
        {.kind = MOE_LAYER_DENSE, .d_out = 3}}, MOE_LOSS_CROSS_ENTROPY, 1, 0, 0.0f};
    return run_case(&gc);
}

static int test_gaussian_dense(void) {
    grad_case gc = {"gaussian mixture k=E nll", 5, 12, 2, {
        {.kind = MOE_LAYER_DENSE, .d_out = 6, .activation = MOE_ACT_TANH},
        {.kind = MOE_LAYER_MOE, .expert = MOE_EXPERT_GAUSSIAN, .n_experts = 3, .d_out = 2, .d_hidden = 5,
         .activation = MOE_ACT_TANH, .balance_loss = 0.1f, .z_loss = 0.05f, .importance_loss = 0.2f, .jitter = 0.1f}},
        MOE_LOSS_MIXTURE_NLL, 1, 0, 0.0f};
    return run_case(&gc);
}

static int test_gaussian_sparse(void) {
    grad_case gc = {"gaussian top-2 of 4, mlp2", 5, 12, 1, {
        {.kind = MOE_LAYER_MOE, .expert = MOE_EXPERT_GAUSSIAN, .n_experts = 4, .top_k = 2, .d_out = 3, .d_hidden = 4,
         .n_hidden_layers = 2, .activation = MOE_ACT_GELU, .router_bias = MOE_FLAG_ON, .z_loss = 0.05f}},
        MOE_LOSS_MIXTURE_NLL, 1, 0, 0.0f};
    return run_case(&gc);
}

static int test_soft(void) {
    grad_case gc = {"soft moe S=2 groups of 4", 5, 8, 2, {
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_SOFT, .n_experts = 3, .slots_per_expert = 2, .soft_group_tokens = 4,
         .d_hidden = 6, .d_out = 4, .activation = MOE_ACT_GELU},
        {.kind = MOE_LAYER_DENSE, .d_out = 3}}, MOE_LOSS_CROSS_ENTROPY, 1, 0, 0.0f};
    grad_case gc2 = {"soft moe swiglu residual", 6, 7, 1, {
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_SOFT, .n_experts = 2, .expert = MOE_EXPERT_SWIGLU, .d_hidden = 5,
         .residual = 1}}, MOE_LOSS_MSE, 1, 0, 0.0f};
    return run_case(&gc) || run_case(&gc2);
}

static int test_hierarchical(void) {
    grad_case gc = {"hierarchical noisy/noisy", 6, 12, 2, {
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_HIERARCHICAL, .n_experts = 8, .n_groups = 4, .top_k_groups = 2, .top_k = 1,
         .group_router = MOE_ROUTER_NOISY_TOPK, .expert_router = MOE_ROUTER_NOISY_TOPK, .router_bias = MOE_FLAG_ON, .d_hidden = 5,
         .activation = MOE_ACT_TANH, .balance_loss = 0.3f, .importance_loss = 0.4f},
        {.kind = MOE_LAYER_DENSE, .d_out = 3}}, MOE_LOSS_CROSS_ENTROPY, 1, 0, 0.0f};
    grad_case gc2 = {"hierarchical dense no-renorm", 5, 10, 2, {
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_HIERARCHICAL, .n_experts = 6, .n_groups = 2, .top_k_groups = 2, .top_k = 3,
         .renormalize = MOE_FLAG_OFF, .expert_router = MOE_ROUTER_NOISY_TOPK, .d_hidden = 4, .n_shared_experts = 1,
         .balance_loss = 0.2f, .residual = 1},
        {.kind = MOE_LAYER_DENSE, .d_out = 2}}, MOE_LOSS_MSE, 1, 0, 0.0f};
    grad_case gc3 = {"hierarchical top-1 of 3 groups, capacity", 6, 12, 2, {
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_HIERARCHICAL, .n_experts = 6, .n_groups = 3, .top_k = 2, .group_router = MOE_ROUTER_NOISY_TOPK,
         .capacity_factor = 0.8f, .expert = MOE_EXPERT_LINEAR, .jitter = 0.1f, .importance_loss = 0.2f},
        {.kind = MOE_LAYER_DENSE, .d_out = 3}}, MOE_LOSS_CROSS_ENTROPY, 1, 0, 0.0f};
    grad_case gc4 = {"hierarchical per-call k=2 of max 2", 6, 10, 2, {
        {.kind = MOE_LAYER_MOE, .router = MOE_ROUTER_HIERARCHICAL, .n_experts = 9, .n_groups = 3, .top_k_groups = 2, .top_k = 1,
         .max_top_k = 2, .d_hidden = 4, .balance_loss = 0.1f},
        {.kind = MOE_LAYER_DENSE, .d_out = 3}}, MOE_LOSS_CROSS_ENTROPY, 1, 2, 0.0f};
    return run_case(&gc) || run_case(&gc2) || run_case(&gc3) || run_case(&gc4);
}

static int test_mmoe(void) {
    /* MMoE: 3 shared MLP experts, one gate per task, towers on the task slices; CE + MSE tasks, weighted */
    grad_case gc = {"mmoe + towers, 2 tasks", 6, 12, 2, {
        {.kind = MOE_LAYER_MULTIGATE, .n_tasks = 2, .n_experts = 3, .d_hidden = 5, .d_out = 2 * 4, .activation = MOE_ACT_TANH},
        {.kind = MOE_LAYER_TASK_TOWERS, .n_tasks = 2, .d_hidden = 3, .d_out = 2 * 3, .activation = MOE_ACT_GELU}},
        MOE_LOSS_MSE, 1, 0, 0.0f};
    grad_tasks tk = {2, {MOE_LOSS_CROSS_ENTROPY, MOE_LOSS_MSE, MOE_LOSS_DEFAULT}, {1.0f, 0.5f, 0.0f}, {0, 0, 0}};
    return run_case_tasks(&gc, &tk);
}

static int test_ple(void) {
    /* PLE: two levels (the first with the shared gate and output), swiglu experts, then linear
       towers on the task slices; three tasks of different widths and losses */
    grad_case gc = {"ple 2 levels, 3 tasks", 5, 10, 4, {
        {.kind = MOE_LAYER_MULTIGATE, .n_tasks = 3, .n_experts = 2, .n_task_experts = 2, .shared_output = 1, .d_out = 4 * 4,
         .expert = MOE_EXPERT_SWIGLU, .d_hidden = 4},
        {.kind = MOE_LAYER_MULTIGATE, .n_tasks = 3, .n_experts = 1, .n_task_experts = 1, .task_input = MOE_TASK_INPUT_TASKS_SHARED,
         .d_hidden = 3, .activation = MOE_ACT_SILU, .n_hidden_layers = 2},
        {.kind = MOE_LAYER_TASK_TOWERS, .n_tasks = 3, .expert = MOE_EXPERT_LINEAR, .d_out = 3 * 2},
        {.kind = MOE_LAYER_DENSE, .d_out = 5}},
        MOE_LOSS_MSE, 1, 0, 0.0f};
    grad_tasks tk = {3, {MOE_LOSS_BCE, MOE_LOSS_CROSS_ENTROPY, MOE_LOSS_MSE}, {0.7f, 1.0f, 2.0f}, {1, 3, 1}};
    return run_case_tasks(&gc, &tk);
}

static int test_mmoe_top_k(void) {
    /* MMoE with top-2 of 5 gates (renormalised over the two), PLE-style task experts, towers */
    grad_case gc = {"mmoe top-2 gates", 6, 12, 2, {
        {.kind = MOE_LAYER_MULTIGATE, .n_tasks = 2, .n_experts = 3, .n_task_experts = 2, .top_k = 2, .d_hidden = 4, .d_out = 2 * 4,
         .activation = MOE_ACT_SILU},
        {.kind = MOE_LAYER_TASK_TOWERS, .n_tasks = 2, .expert = MOE_EXPERT_LINEAR, .d_out = 2 * 2}},
        MOE_LOSS_MSE, 1, 0, 0.0f};
    grad_tasks tk = {2, {MOE_LOSS_MSE, MOE_LOSS_BCE, MOE_LOSS_DEFAULT}, {1.0f, 1.0f, 0.0f}, {0, 0, 0}};
    return run_case_tasks(&gc, &tk);
}

static int test_shared_bottom_towers(void) {
    /* shared bottom (dense) -> towers reading the one representation (task_input single), relu */
    grad_case gc = {"shared bottom + towers", 5, 12, 2, {
        {.kind = MOE_LAYER_DENSE, .d_out = 6, .activation = MOE_ACT_TANH},
        {.kind = MOE_LAYER_TASK_TOWERS, .n_tasks = 2, .task_input = MOE_TASK_INPUT_SINGLE, .d_hidden = 4, .d_out = 2,
         .activation = MOE_ACT_RELU}},
        MOE_LOSS_MSE, 1, 0, 0.0f};
    grad_tasks tk = {2, {MOE_LOSS_DEFAULT, MOE_LOSS_DEFAULT, MOE_LOSS_DEFAULT}, {0.0f, 3.0f, 0.0f}, {0, 0, 0}};
    return run_case_tasks(&gc, &tk);
}

int main(void) {
    printf("test_grad\n");
    RUN(test_dense_activations);
    RUN(test_norms_mse);
    RUN(test_topk_swiglu_shared);
    RUN(test_topk_geglu);
    RUN(test_stack_combine);
    RUN(test_vote_training);
    RUN(test_soft_mixture);
    RUN(test_topk_norenorm_bce);
    RUN(test_switch_capacity);
    RUN(test_noisy_topk);
    RUN(test_jitter_deep_mlp);
    RUN(test_relu_experts);
    RUN(test_sigmoid_groups);
    RUN(test_shared_gate);
    RUN(test_expert_choice);
    RUN(test_call_top_k);
    RUN(test_call_top_p);
    RUN(test_hash);
    RUN(test_gaussian_dense);
    RUN(test_gaussian_sparse);
    RUN(test_soft);
    RUN(test_hierarchical);
    RUN(test_mmoe);
    RUN(test_ple);
    RUN(test_mmoe_top_k);
    RUN(test_shared_bottom_towers);
    RUN(test_embedding_hash);
    TEST_END();
}
