/* moe_cl.h: the OpenCL device against the CPU model (on PoCL in CI), the fallback paths and
   the error paths. Cases that need an OpenCL device report "skip" where there is none.
   Tolerances (relative, with a small absolute term for values near 0): forward outputs 1e-4,
   gradients 2e-3, parameters after a few optimizer steps 1e-3. The device sums in another
   order than the CPU (tiles, fused multiply-add); a router tie could pick another expert,
   which the random inputs here do not produce. */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#define MOE_CL_IMPLEMENTATION
#include "../moe_cl.h"
#include "test.h"

#ifndef TMP_DIR
#define TMP_DIR "build"
#endif

static moe_ctx ctx;
static moe_cl_ctx *device;      /* NULL when this machine has no OpenCL device */
static moe_cl_ctx *variant;     /* the context the parity cases run on: device or one with other tiles */
static char no_device_reason[256];

static void fill(float *v, int64_t n, uint64_t stream, float scale) {
    int64_t i;
    for (i = 0; i < n; i++) v[i] = (2.0f * moe_rng_uniform(7, stream, (uint64_t)i) - 1.0f) * scale;
}

/* Random parameters (the router's default is all zeros, which makes every logit a tie). */
static void randomize(moe_model *m) {
    int64_t n, i;
    float *p = moe_model_params(m, &n);
    for (i = 0; i < n; i++) p[i] += (2.0f * moe_rng_uniform(11, 5, (uint64_t)i) - 1.0f) * 0.3f;
}

static double worst_of(const float *a, const float *b, int64_t n, double rtol, double atol, const char *what) {
    long where;
    double w = test_worst(a, b, (long)n, rtol, atol, &where);
    CHECK(w <= 1.0, "%s: worst error %.3g x tolerance at %ld (device %.9g, cpu %.9g)", what, w, where,
          where >= 0 ? (double)a[where] : 0.0, where >= 0 ? (double)b[where] : 0.0);
    return w;
}

/* ---------------------------------------------------------------- fallback */
static moe_model *small_model(void) {
    moe_layer_desc layers[2];
    moe_model_desc d;
    moe_model *m = NULL;
    memset(layers, 0, sizeof layers);
    memset(&d, 0, sizeof d);
    layers[0].kind = MOE_LAYER_MOE; layers[0].d_out = 12; layers[0].n_experts = 4; layers[0].top_k = 2;
    layers[1].kind = MOE_LAYER_DENSE; layers[1].d_out = 5;
    d.d_in = 10; d.n_layers = 2; d.layers = layers; d.max_tokens = 16;
    CHECK_OK(moe_model_create(&ctx, &d, &m), &ctx);
    if (m) randomize(m);
    return m;
}

static int test_fallback_without_library(void) {
    moe_cl_desc desc;
    moe_cl_ctx *cl = NULL;
    moe_cl_model *dm = NULL;
    moe_model *m = small_model();
    float x[3 * 10], y_cl[3 * 5], y_cpu[3 * 5];
    int32_t labels[3] = { 1, 2, 3 };
    moe_target target;
    moe_step_info info;
#ifdef MOE_CL_LINKED
    moe_model_destroy(m);
    return TEST_SKIP;  /* linked to the library: there is none to miss */
#endif
    memset(&desc, 0, sizeof desc);
    desc.library = "/nonexistent/libOpenCL-bogus.so";
    CHECK_OK(moe_cl_ctx_init(&ctx, &desc, &cl), &ctx);
    if (!cl || !m) { moe_model_destroy(m); return 0; }
    CHECK(moe_cl_ctx_fallback(cl), "a missing library must mean the CPU");
    CHECK(strstr(moe_cl_ctx_reason(cl), "libOpenCL-bogus") != NULL, "reason: %s", moe_cl_ctx_reason(cl));
    fill(x, 30, 1, 1.0f);
    CHECK_OK(moe_cl_model_upload(cl, m, &dm), &ctx);
    CHECK_OK(moe_cl_model_forward(dm, x, 3, y_cl, NULL), &ctx);
    CHECK_OK(moe_model_forward(m, x, 3, y_cpu, NULL), &ctx);
    CHECK(memcmp(y_cl, y_cpu, sizeof y_cl) == 0, "the fallback runs the CPU model itself");
    target.labels = labels; target.values = NULL;
    CHECK_OK(moe_cl_model_train_step(dm, x, &target, 3, &info), &ctx);
    CHECK(info.step == 1 && moe_optimizer_steps(m->opt) == 1, "the step ran on the CPU model (step %lld)", (long long)info.step);
    CHECK_OK(moe_cl_model_download(dm), &ctx);
    moe_cl_model_destroy(dm);
    moe_cl_ctx_destroy(cl);
    /* required device: an error with the reason, nothing allocated */
    desc.require_device = 1;
    cl = (moe_cl_ctx *)&desc;
    CHECK_RESULT(moe_cl_ctx_init(&ctx, &desc, &cl), MOE_ERR_UNSUPPORTED, &ctx);
    CHECK(cl == NULL, "out-pointer is NULL on failure");
    CHECK(strstr(moe_ctx_error(&ctx), "no OpenCL library") != NULL, "message: %s", moe_ctx_error(&ctx));
    CHECK(moe_cl_list_devices(desc.library, NULL, 0) == 0, "no devices without a library");
#if defined(__linux__) && defined(__GLIBC__)
    /* a library that is there but is no OpenCL loader */
    desc.library = "libm.so.6";
    desc.require_device = 0;
    CHECK_OK(moe_cl_ctx_init(&ctx, &desc, &cl), &ctx);
    CHECK(cl && moe_cl_ctx_fallback(cl) && strstr(moe_cl_ctx_reason(cl), "lacks clGetPlatformIDs") != NULL, "reason: %s",
          cl ? moe_cl_ctx_reason(cl) : "");
    moe_cl_ctx_destroy(cl);
#endif
    moe_model_destroy(m);
    return 0;
}

static int test_fallback_by_name(void) {
    moe_cl_desc desc;
    moe_cl_ctx *cl = NULL;
    memset(&desc, 0, sizeof desc);
    desc.device = "none";
    CHECK_OK(moe_cl_ctx_init(&ctx, &desc, &cl), &ctx);
    CHECK(cl && moe_cl_ctx_fallback(cl), "device \"none\" is the CPU");
    CHECK(cl && strcmp(moe_cl_device_name(cl), "cpu (fallback)") == 0, "name %s", cl ? moe_cl_device_name(cl) : "");
    moe_cl_ctx_destroy(cl);
    if (!device) return TEST_SKIP;  /* the rest needs a platform to search */
    desc.device = "no-such-device-anywhere";
    desc.require_device = 1;
    CHECK_RESULT(moe_cl_ctx_init(&ctx, &desc, &cl), MOE_ERR_UNSUPPORTED, &ctx);
    CHECK(strstr(moe_ctx_error(&ctx), "no-such-device-anywhere") != NULL, "message: %s", moe_ctx_error(&ctx));
    desc.device = "99";
    CHECK_RESULT(moe_cl_ctx_init(&ctx, &desc, &cl), MOE_ERR_UNSUPPORTED, &ctx);
    return 0;
}

/* ---------------------------------------------------------------- errors on a device */
static int test_build_failure(void) {
    moe_cl_desc desc;
    moe_cl_ctx *cl = NULL;
    if (!device) return TEST_SKIP;
    memset(&desc, 0, sizeof desc);
    desc.no_tuning = 1;
    desc.require_device = 1;
    desc.build_options = "-DRN=bogus_tile";
    CHECK_RESULT(moe_cl_ctx_init(&ctx, &desc, &cl), MOE_ERR_DEVICE, &ctx);
    CHECK(cl == NULL, "no context after a failed build");
    CHECK(strstr(moe_ctx_error(&ctx), "kernel build failed") != NULL, "message: %s", moe_ctx_error(&ctx));
    CHECK(strstr(moe_ctx_error(&ctx), "bogus_tile") != NULL, "the message shows the options and the log: %s", moe_ctx_error(&ctx));
    return 0;
}

static int test_upload_errors(void) {
    moe_layer_desc layers[1];
    moe_model_desc d;
    moe_model *m = NULL;
    moe_cl_model *dm = NULL;
    if (!device) return TEST_SKIP;
    memset(layers, 0, sizeof layers);
    memset(&d, 0, sizeof d);
    layers[0].kind = MOE_LAYER_MOE; layers[0].n_experts = 4;
    d.d_in = 8; d.n_layers = 1; d.layers = layers; d.loss = MOE_LOSS_MSE;
    /* reduced-precision weights stay on the CPU */
    CHECK_OK(moe_model_create(&ctx, &d, &m), &ctx);
    dm = (moe_cl_model *)m;
    CHECK_OK(moe_model_quantize(m, MOE_DTYPE_I8), &ctx);
    CHECK_RESULT(moe_cl_model_upload(device, m, &dm), MOE_ERR_UNSUPPORTED, &ctx);
    CHECK(dm == NULL && strstr(moe_ctx_error(&ctx), "int8") != NULL, "message: %s", moe_ctx_error(&ctx));
    moe_model_destroy(m);
    /* layers the device does not run stay on the CPU, refused by name */
    layers[0].router = MOE_ROUTER_SOFT;
    CHECK_OK(moe_model_create(&ctx, &d, &m), &ctx);
    CHECK_RESULT(moe_cl_model_upload(device, m, &dm), MOE_ERR_UNSUPPORTED, &ctx);
    CHECK(dm == NULL && strstr(moe_ctx_error(&ctx), "router") != NULL, "message: %s", moe_ctx_error(&ctx));
    moe_model_destroy(m);
    layers[0].router = MOE_ROUTER_HIERARCHICAL;
    CHECK_OK(moe_model_create(&ctx, &d, &m), &ctx);
    CHECK_RESULT(moe_cl_model_upload(device, m, &dm), MOE_ERR_UNSUPPORTED, &ctx);
    CHECK(dm == NULL && strstr(moe_ctx_error(&ctx), "router") != NULL, "message: %s", moe_ctx_error(&ctx));
    moe_model_destroy(m);
    layers[0].router = MOE_ROUTER_TOPK;
    layers[0].expert = MOE_EXPERT_GAUSSIAN;  /* mixture density: CPU only */
    d.loss = MOE_LOSS_MIXTURE_NLL;
    CHECK_OK(moe_model_create(&ctx, &d, &m), &ctx);
    CHECK_RESULT(moe_cl_model_upload(device, m, &dm), MOE_ERR_UNSUPPORTED, &ctx);
    CHECK(dm == NULL && strstr(moe_ctx_error(&ctx), "Gaussian") != NULL, "message: %s", moe_ctx_error(&ctx));
    moe_model_destroy(m);
    layers[0].expert = MOE_EXPERT_DEFAULT;
    d.loss = MOE_LOSS_MSE;
    layers[0].n_shared_experts = 1;  /* Qwen2-MoE's sigmoid-gated shared expert */
    layers[0].shared_gate = MOE_FLAG_ON;
    CHECK_OK(moe_model_create(&ctx, &d, &m), &ctx);
    CHECK_RESULT(moe_cl_model_upload(device, m, &dm), MOE_ERR_UNSUPPORTED, &ctx);
    CHECK(dm == NULL && strstr(moe_ctx_error(&ctx), "shared_gate") != NULL, "message: %s", moe_ctx_error(&ctx));
    moe_model_destroy(m);
    layers[0].n_shared_experts = 0;
    layers[0].shared_gate = MOE_FLAG_DEFAULT;
    /* GeGLU experts and the stacking and voting combines stay on the CPU */
    {
        const char *const what[] = {"GeGLU", "stacking", "voting", "voting"};
        int q;
        for (q = 0; q < 4; q++) {
            layers[0].expert = q == 0 ? MOE_EXPERT_GEGLU : MOE_EXPERT_MLP;
            layers[0].combine = q == 0 ? MOE_COMBINE_DEFAULT : q == 1 ? MOE_COMBINE_STACK : q == 2 ? MOE_COMBINE_VOTE : MOE_COMBINE_VOTE_MAJORITY;
            CHECK_OK(moe_model_create(&ctx, &d, &m), &ctx);
            CHECK_RESULT(moe_cl_model_upload(device, m, &dm), MOE_ERR_UNSUPPORTED, &ctx);
            CHECK(dm == NULL && strstr(moe_ctx_error(&ctx), what[q]) != NULL, "message: %s", moe_ctx_error(&ctx));
            moe_model_destroy(m);
        }
        layers[0].expert = MOE_EXPERT_DEFAULT;
        layers[0].combine = MOE_COMBINE_DEFAULT;
    }
    /* multi-task layers and multi-task losses stay on the CPU */
    memset(layers, 0, sizeof layers);
    layers[0].kind = MOE_LAYER_MULTIGATE; layers[0].n_tasks = 2; layers[0].n_experts = 3;
    CHECK_OK(moe_model_create(&ctx, &d, &m), &ctx);
    CHECK_RESULT(moe_cl_model_upload(device, m, &dm), MOE_ERR_UNSUPPORTED, &ctx);
    CHECK(dm == NULL && strstr(moe_ctx_error(&ctx), "multi-task") != NULL, "message: %s", moe_ctx_error(&ctx));
    moe_model_destroy(m);
    layers[0].kind = MOE_LAYER_DENSE; layers[0].n_tasks = 0; layers[0].n_experts = 0;
    d.n_tasks = 2;
    CHECK_OK(moe_model_create(&ctx, &d, &m), &ctx);
    CHECK_RESULT(moe_cl_model_upload(device, m, &dm), MOE_ERR_UNSUPPORTED, &ctx);
    CHECK(dm == NULL && strstr(moe_ctx_error(&ctx), "multi-task") != NULL, "message: %s", moe_ctx_error(&ctx));
    moe_model_destroy(m);
    d.n_tasks = 0;
    memset(layers, 0, sizeof layers);  /* token embeddings stay on the CPU */
    layers[0].kind = MOE_LAYER_EMBEDDING; layers[0].vocab_size = 5; layers[0].d_embedding = 2;
    d.loss = MOE_LOSS_CROSS_ENTROPY;
    CHECK_OK(moe_model_create(&ctx, &d, &m), &ctx);
    CHECK_RESULT(moe_cl_model_upload(device, m, &dm), MOE_ERR_UNSUPPORTED, &ctx);
    CHECK(dm == NULL && strstr(moe_ctx_error(&ctx), "embedding") != NULL, "message: %s", moe_ctx_error(&ctx));
    moe_model_destroy(m);
    return 0;
}

/* The upload runs only what it lists: kinds added to moe.h later (simulated here by values past
   the end of each enum, and by a tensor of a name it does not know) are refused, naming the
   layer and the field. */
static int test_upload_whitelist(void) {
    static const char *const wants[5] = { "field kind", "field router", "field expert", "field activation", "tensor \"experts.combine.weight\"" };
    moe_layer_desc layers[2];
    moe_model_desc d;
    int what;
    if (!device) return TEST_SKIP;
    memset(layers, 0, sizeof layers);
    memset(&d, 0, sizeof d);
    layers[0].kind = MOE_LAYER_DENSE; layers[0].d_out = 6;
    layers[1].kind = MOE_LAYER_MOE; layers[1].n_experts = 4;
    d.d_in = 8; d.n_layers = 2; d.layers = layers; d.loss = MOE_LOSS_MSE;
    for (what = 0; what < 5; what++) {
        moe_model *m = NULL;
        moe_cl_model *dm = NULL;
        moe_layer *l;
        CHECK_OK(moe_model_create(&ctx, &d, &m), &ctx);
        if (!m) return 0;
        l = &m->layers[1];
        CHECK_OK(moe_cl_model_upload(device, m, &dm), &ctx);  /* as created it runs */
        moe_cl_model_destroy(dm);
        dm = NULL;
        if (what == 0) l->d.kind = MOE_LAYER_COUNT;
        if (what == 1) l->d.router = MOE_ROUTER_COUNT;
        if (what == 2) l->d.expert = MOE_EXPERT_COUNT;
        if (what == 3) l->d.activation = MOE_ACT_COUNT;
        if (what == 4) snprintf(l->tensors[l->n_tensors - 1].name, sizeof l->tensors[0].name, "experts.combine.weight");
        CHECK_RESULT(moe_cl_model_upload(device, m, &dm), MOE_ERR_UNSUPPORTED, &ctx);
        CHECK(dm == NULL && strstr(moe_ctx_error(&ctx), "layer 1") && strstr(moe_ctx_error(&ctx), wants[what]), "case %d: %s", what, moe_ctx_error(&ctx));
        moe_model_destroy(m);
    }
    return 0;
}

static int test_upload_memory_limit(void) {
    moe_model *m;
    moe_cl_model *dm = NULL;
    moe_cl_ctx *cl = NULL;
    moe_cl_desc desc;
    if (!device) return TEST_SKIP;
    m = small_model();
    memset(&desc, 0, sizeof desc);
    desc.no_tuning = 1;
    desc.max_device_bytes = 4096;
    CHECK_OK(moe_cl_ctx_init(&ctx, &desc, &cl), &ctx);
    CHECK_RESULT(moe_cl_model_upload(cl, m, &dm), MOE_ERR_OUT_OF_MEMORY, &ctx);
    CHECK(dm == NULL && strstr(moe_ctx_error(&ctx), "device memory") != NULL, "message: %s", moe_ctx_error(&ctx));
    moe_cl_ctx_destroy(cl);
    moe_model_destroy(m);
    return 0;
}

/* ---------------------------------------------------------------- parity */
typedef struct parity_case {
    const char *name;
    moe_layer_desc layers[4];
    int n_layers;
    int64_t d_in, tokens;
    moe_loss loss;
    moe_optimizer_desc opt;
    moe_forward_opts fwd;       /* the forward of check_forward_backward (training: noise and jitter on) */
    int forward_only;           /* no training steps (hash routers need token ids, which train_step has not) */
    int twin_rows;              /* rows of x come in identical pairs (router ties) */
} parity_case;

static int32_t token_ids[64];
static float noise0[40 * 6], noise1[40 * 4];  /* the caller's router noise of the noisy case */
static const float *const given_noise[2] = { noise0, noise1 };

static moe_model *make(const parity_case *pc) {
    moe_model_desc d;
    moe_model *m = NULL;
    memset(&d, 0, sizeof d);
    d.d_in = pc->d_in; d.n_layers = pc->n_layers; d.layers = pc->layers; d.loss = pc->loss;
    d.max_tokens = pc->tokens + 3; d.optimizer = pc->opt;
    CHECK_OK(moe_model_create(&ctx, &d, &m), &ctx);
    if (m) randomize(m);
    return m;
}

/* Forward, stats, backward (with aux), dx and every gradient against the CPU. */
static void check_forward_backward(const parity_case *pc) {
    moe_model *m = make(pc);
    moe_cl_model *dm = NULL;
    int64_t T = pc->tokens, O, n, i;
    float *x, *y_cpu, *y_cl, *dy, *dx_cpu, *dx_cl, *g_cpu;
    int l;
    if (!m) return;
    O = moe_model_d_out(m);
    x = (float *)malloc(sizeof(float) * (size_t)(T * pc->d_in));
    dx_cpu = (float *)malloc(sizeof(float) * (size_t)(T * pc->d_in));
    dx_cl = (float *)malloc(sizeof(float) * (size_t)(T * pc->d_in));
    y_cpu = (float *)malloc(sizeof(float) * (size_t)(T * O));
    y_cl = (float *)malloc(sizeof(float) * (size_t)(T * O));
    dy = (float *)malloc(sizeof(float) * (size_t)(T * O));
    moe_model_grads(m, &n);
    g_cpu = (float *)malloc(sizeof(float) * (size_t)n);
    fill(x, T * pc->d_in, 2, 1.0f);
    fill(dy, T * O, 3, 1.0f);
    if (pc->twin_rows)
        for (i = 1; i < T; i += 2) memcpy(x + i * pc->d_in, x + (i - 1) * pc->d_in, sizeof(float) * (size_t)pc->d_in);
    CHECK_OK(moe_cl_model_upload(variant, m, &dm), &ctx);
    if (!dm) goto done;
    CHECK_OK(moe_model_forward(m, x, T, y_cpu, &pc->fwd), &ctx);
    CHECK_OK(moe_cl_model_forward(dm, x, T, y_cl, &pc->fwd), &ctx);
    worst_of(y_cl, y_cpu, T * O, 1e-4, 1e-5, "forward y");
    for (l = 0; l < pc->n_layers; l++) {
        moe_stats a, b;
        int e;
        if (pc->layers[l].kind != MOE_LAYER_MOE) continue;
        CHECK_OK(moe_model_stats(m, l, &a), &ctx);
        CHECK_OK(moe_cl_model_stats(dm, l, &b), &ctx);
        for (e = 0; e < a.n_experts; e++)
            CHECK(a.tokens_per_expert[e] == b.tokens_per_expert[e], "layer %d expert %d: %lld tokens, cpu %lld", l, e,
                  (long long)b.tokens_per_expert[e], (long long)a.tokens_per_expert[e]);
        CHECK(a.dropped_assignments == b.dropped_assignments && a.dropped_tokens == b.dropped_tokens, "dropped %lld/%lld vs %lld/%lld",
              (long long)b.dropped_assignments, (long long)b.dropped_tokens, (long long)a.dropped_assignments, (long long)a.dropped_tokens);
        CHECK(test_close(b.aux_loss, a.aux_loss, 1e-4, 1e-7) && test_close(b.router_entropy, a.router_entropy, 1e-4, 1e-7),
              "aux %.9g vs %.9g, entropy %.9g vs %.9g", (double)b.aux_loss, (double)a.aux_loss, (double)b.router_entropy, (double)a.router_entropy);
    }
    moe_model_zero_grad(m);
    CHECK_OK(moe_model_backward(m, dy, dx_cpu, MOE_BACKWARD_AUX), &ctx);
    memcpy(g_cpu, moe_model_grads(m, NULL), sizeof(float) * (size_t)n);
    moe_cl_model_zero_grad(dm);
    CHECK_OK(moe_cl_model_backward(dm, dy, dx_cl, MOE_BACKWARD_AUX), &ctx);
    worst_of(dx_cl, dx_cpu, T * pc->d_in, 2e-3, 1e-5, "dx");
    CHECK_OK(moe_cl_model_download(dm), &ctx);  /* device gradients into the model */
    for (i = 0; i < moe_model_tensor_count(m); i++) {
        moe_tensor t;
        double scale = 0.0;
        int64_t k;
        moe_model_tensor(m, (int)i, &t);
        for (k = 0; k < t.size; k++) scale = fmax(scale, fabs((double)g_cpu[t.offset + k]));
        worst_of(t.grad, g_cpu + t.offset, t.size, 2e-3, 1e-4 * scale + 1e-7, t.name);
    }
done:
    moe_cl_model_destroy(dm);
    moe_model_destroy(m);
    free(x); free(dx_cpu); free(dx_cl); free(y_cpu); free(y_cl); free(dy); free(g_cpu);
}

/* Three training steps on both; then parameters, losses and the optimizer state agree, and a
   second device run gives the same bits. */
static void check_training(const parity_case *pc) {
    moe_model *m_cpu = make(pc), *m_dev = make(pc);
    moe_cl_model *dm = NULL;
    int64_t T = pc->tokens, O, n, s;
    float *x = NULL, *values = NULL, *p_first = NULL;
    int32_t *labels = NULL;
    moe_target target;
    int run;
    if (!m_cpu || !m_dev) goto done;
    O = moe_model_d_out(m_cpu);
    moe_model_params(m_cpu, &n);
    x = (float *)malloc(sizeof(float) * (size_t)(T * pc->d_in));
    values = (float *)malloc(sizeof(float) * (size_t)(T * O));
    labels = (int32_t *)malloc(sizeof(int32_t) * (size_t)T);
    p_first = (float *)malloc(sizeof(float) * (size_t)n);
    fill(values, T * O, 4, 1.0f);
    for (s = 0; s < T; s++) labels[s] = (int32_t)(moe_rng_u64(3, 3, (uint64_t)s) % (uint64_t)O);
    target.labels = labels; target.values = values;
    for (run = 0; run < 2; run++) {
        if (run == 1) {  /* the same steps again from the same start */
            moe_cl_model_destroy(dm);
            dm = NULL;
            moe_model_destroy(m_dev);
            m_dev = make(pc);
            if (!m_dev) goto done;
        }
        CHECK_OK(moe_cl_model_upload(variant, m_dev, &dm), &ctx);
        if (!dm) goto done;
        for (s = 0; s < 3; s++) {
            moe_step_info a, b;
            fill(x, T * pc->d_in, 10 + (uint64_t)s, 1.0f);
            if (run == 0) CHECK_OK(moe_model_train_step(m_cpu, x, &target, T, &a), &ctx);
            CHECK_OK(moe_cl_model_train_step(dm, x, &target, T, &b), &ctx);
            if (run == 0)
                CHECK(test_close(b.loss, a.loss, 1e-4, 1e-6) && test_close(b.aux_loss, a.aux_loss, 1e-3, 1e-6) &&
                      test_close(b.grad_norm, a.grad_norm, 1e-3, 1e-6) && b.lr == a.lr && b.step == a.step,
                      "step %lld: loss %.9g/%.9g aux %.9g/%.9g norm %.9g/%.9g lr %g/%g", (long long)s, (double)b.loss, (double)a.loss,
                      (double)b.aux_loss, (double)a.aux_loss, (double)b.grad_norm, (double)a.grad_norm, (double)b.lr, (double)a.lr);
        }
        CHECK_OK(moe_cl_model_download(dm), &ctx);
        if (run == 0) {
            worst_of(moe_model_params(m_dev, NULL), moe_model_params(m_cpu, NULL), n, 1e-3, 1e-5, "parameters after 3 steps");
            CHECK(moe_optimizer_steps(m_dev->opt) == 3, "step count %lld", (long long)moe_optimizer_steps(m_dev->opt));
            memcpy(p_first, moe_model_params(m_dev, NULL), sizeof(float) * (size_t)n);
        } else {
            CHECK(memcmp(p_first, moe_model_params(m_dev, NULL), sizeof(float) * (size_t)n) == 0, "two device runs differ");
        }
    }
done:
    moe_cl_model_destroy(dm);
    moe_model_destroy(m_cpu);
    moe_model_destroy(m_dev);
    free(x); free(values); free(labels); free(p_first);
}

static parity_case cases[20];
static int n_cases;

static void add_cases(void) {
    parity_case *c;
    memset(cases, 0, sizeof cases);
    /* top-k, MLP relu experts with biases, renormalised gates, balance, z and importance losses,
       residual; dense head */
    c = &cases[n_cases++];
    c->name = "topk_mlp_residual"; c->d_in = 37; c->tokens = 45; c->n_layers = 2; c->loss = MOE_LOSS_CROSS_ENTROPY;
    c->layers[0].kind = MOE_LAYER_MOE; c->layers[0].n_experts = 5; c->layers[0].top_k = 2; c->layers[0].d_hidden = 45;
    c->layers[0].residual = 1; c->layers[0].balance_loss = 0.01f; c->layers[0].z_loss = 0.001f; c->layers[0].router_bias = MOE_FLAG_ON;
    c->layers[0].importance_loss = 0.05f;
    c->layers[1].kind = MOE_LAYER_DENSE; c->layers[1].d_out = 7;
    c->opt.kind = MOE_OPTIMIZER_ADAMW; c->opt.weight_decay = 0.01f; c->opt.clip_norm = 0.5f;
    /* switch router with a tight capacity (drops, pass-through), linear experts, MSE */
    c = &cases[n_cases++];
    c->name = "switch_capacity_linear"; c->d_in = 16; c->tokens = 40; c->n_layers = 1; c->loss = MOE_LOSS_MSE;
    c->layers[0].kind = MOE_LAYER_MOE; c->layers[0].router = MOE_ROUTER_SWITCH; c->layers[0].n_experts = 4;
    c->layers[0].expert = MOE_EXPERT_LINEAR; c->layers[0].capacity_factor = 0.6f; c->layers[0].balance_loss = 0.02f;
    c->opt.kind = MOE_OPTIMIZER_SGD; c->opt.momentum = 0.9f; c->opt.lr = 0.05f;
    /* shared experts (two MLP, one SwiGLU layer further on) beside the routed ones; jitter */
    c = &cases[n_cases++];
    c->name = "shared_experts"; c->d_in = 18; c->tokens = 29; c->n_layers = 2; c->loss = MOE_LOSS_MSE;
    c->layers[0].kind = MOE_LAYER_MOE; c->layers[0].n_experts = 4; c->layers[0].top_k = 1; c->layers[0].n_shared_experts = 2;
    c->layers[0].d_shared_hidden = 11; c->layers[0].balance_loss = 0.01f;
    c->layers[1].kind = MOE_LAYER_MOE; c->layers[1].n_experts = 3; c->layers[1].top_k = 2; c->layers[1].expert = MOE_EXPERT_SWIGLU;
    c->layers[1].n_shared_experts = 1; c->layers[1].d_out = 5; c->layers[1].capacity_factor = 0.7f; c->layers[1].jitter = 0.2f;
    c->opt.kind = MOE_OPTIMIZER_ADAMW;
    /* SwiGLU experts without renormalisation, top-3 of 8, layer norm in front, BCE */
    c = &cases[n_cases++];
    c->name = "swiglu_layernorm"; c->d_in = 24; c->tokens = 33; c->n_layers = 3; c->loss = MOE_LOSS_BCE;
    c->layers[0].kind = MOE_LAYER_LAYERNORM;
    c->layers[1].kind = MOE_LAYER_MOE; c->layers[1].n_experts = 8; c->layers[1].top_k = 3; c->layers[1].expert = MOE_EXPERT_SWIGLU;
    c->layers[1].d_hidden = 40; c->layers[1].d_out = 20; c->layers[1].renormalize = MOE_FLAG_OFF; c->layers[1].z_loss = 0.01f;
    c->layers[2].kind = MOE_LAYER_DENSE; c->layers[2].d_out = 3; c->layers[2].activation = MOE_ACT_TANH;
    c->opt.kind = MOE_OPTIMIZER_ADAM; c->opt.weight_decay = 0.001f; c->opt.warmup_steps = 2;
    /* two hidden gelu layers per expert, RMSNorm with residual, dense relu with residual */
    c = &cases[n_cases++];
    c->name = "mlp2_gelu_rmsnorm"; c->d_in = 20; c->tokens = 70; c->n_layers = 4; c->loss = MOE_LOSS_CROSS_ENTROPY;
    c->layers[0].kind = MOE_LAYER_DENSE; c->layers[0].activation = MOE_ACT_RELU; c->layers[0].residual = 1;
    c->layers[1].kind = MOE_LAYER_RMSNORM; c->layers[1].residual = 1;
    c->layers[2].kind = MOE_LAYER_MOE; c->layers[2].n_experts = 3; c->layers[2].top_k = 3; c->layers[2].n_hidden_layers = 2;
    c->layers[2].activation = MOE_ACT_GELU; c->layers[2].d_hidden = 33; c->layers[2].d_out = 9;
    c->layers[3].kind = MOE_LAYER_DENSE; c->layers[3].d_out = 6; c->layers[3].activation = MOE_ACT_SIGMOID;
    c->opt.kind = MOE_OPTIMIZER_ADAMW; c->opt.total_steps = 5;
    /* noisy top-k (Shazeer 2017) in training mode: the CPU's noise, softplus scale, importance and
       load losses through the noisy gate; jitter on the router input too */
    c = &cases[n_cases++];
    c->name = "noisy_topk_training"; c->d_in = 21; c->tokens = 38; c->n_layers = 2; c->loss = MOE_LOSS_CROSS_ENTROPY;
    c->layers[0].kind = MOE_LAYER_MOE; c->layers[0].router = MOE_ROUTER_NOISY_TOPK; c->layers[0].n_experts = 6; c->layers[0].top_k = 2;
    c->layers[0].importance_loss = 0.1f; c->layers[0].load_loss = 0.1f; c->layers[0].balance_loss = 0.01f; c->layers[0].router_bias = MOE_FLAG_ON;
    c->layers[1].kind = MOE_LAYER_MOE; c->layers[1].router = MOE_ROUTER_NOISY_TOPK; c->layers[1].n_experts = 4; c->layers[1].top_k = 3;
    c->layers[1].expert = MOE_EXPERT_SWIGLU; c->layers[1].d_out = 5; c->layers[1].load_loss = 0.2f; c->layers[1].jitter = 0.1f;
    c->layers[1].renormalize = MOE_FLAG_OFF; c->layers[1].z_loss = 0.01f;
    c->opt.kind = MOE_OPTIMIZER_ADAM;
    c->fwd.training = 1;
    /* the same router at inference (no noise; the load loss still counts) */
    cases[n_cases] = *c;
    c = &cases[n_cases++];
    c->name = "noisy_topk_inference";
    c->fwd.training = 0;
    /* ... and with the caller's noise (moe_forward_opts.router_noise) */
    cases[n_cases] = cases[n_cases - 2];
    c = &cases[n_cases++];
    c->name = "noisy_topk_given_noise";
    c->fwd.router_noise = given_noise;
    c->forward_only = 1;
    /* per-call k and top-p: a layer sized for k up to 4 runs k = 3 with top_p 0.6 (slots left
       empty) and its balance loss at that k */
    c = &cases[n_cases++];
    c->name = "per_call_topk_topp"; c->d_in = 19; c->tokens = 41; c->n_layers = 1; c->loss = MOE_LOSS_MSE;
    c->layers[0].kind = MOE_LAYER_MOE; c->layers[0].n_experts = 6; c->layers[0].top_k = 2; c->layers[0].max_top_k = 4;
    c->layers[0].balance_loss = 0.02f; c->layers[0].importance_loss = 0.05f; c->layers[0].d_out = 8;
    c->fwd.top_k = 3; c->fwd.top_p = 0.6f;
    /* sigmoid + selection bias (DeepSeek-V3): group-limited top-k, routed scaling, the bias held
       out of AdamW's weight decay and moved after each step; then one without groups or
       renormalisation, with a capacity */
    c = &cases[n_cases++];
    c->name = "sigmoid_bias_groups"; c->d_in = 22; c->tokens = 43; c->n_layers = 2; c->loss = MOE_LOSS_CROSS_ENTROPY;
    c->layers[0].kind = MOE_LAYER_MOE; c->layers[0].router = MOE_ROUTER_SIGMOID; c->layers[0].n_experts = 8; c->layers[0].top_k = 3;
    c->layers[0].n_groups = 4; c->layers[0].top_k_groups = 2; c->layers[0].routed_scaling_factor = 2.5f; c->layers[0].bias_update_rate = 0.01f;
    c->layers[0].expert = MOE_EXPERT_SWIGLU; c->layers[0].n_shared_experts = 1; c->layers[0].router_bias = MOE_FLAG_ON;
    c->layers[1].kind = MOE_LAYER_MOE; c->layers[1].router = MOE_ROUTER_SIGMOID; c->layers[1].n_experts = 5; c->layers[1].top_k = 2;
    c->layers[1].renormalize = MOE_FLAG_OFF; c->layers[1].bias_update_rate = 0.02f; c->layers[1].capacity_factor = 0.8f; c->layers[1].d_out = 6;
    c->opt.kind = MOE_OPTIMIZER_ADAMW; c->opt.weight_decay = 0.1f;
    /* expert choice: each expert takes its top-C tokens (C = 1.0 * T * 2 / E), z loss; a second
       layer with a small capacity leaves tokens to pass through */
    c = &cases[n_cases++];
    c->name = "expert_choice"; c->d_in = 17; c->tokens = 37; c->n_layers = 2; c->loss = MOE_LOSS_MSE;
    c->layers[0].kind = MOE_LAYER_MOE; c->layers[0].router = MOE_ROUTER_EXPERT_CHOICE; c->layers[0].n_experts = 4; c->layers[0].top_k = 2;
    c->layers[0].z_loss = 0.01f; c->layers[0].d_hidden = 23;
    c->layers[1].kind = MOE_LAYER_MOE; c->layers[1].router = MOE_ROUTER_EXPERT_CHOICE; c->layers[1].n_experts = 6; c->layers[1].top_k = 1;
    c->layers[1].capacity_factor = 0.5f; c->layers[1].expert = MOE_EXPERT_LINEAR; c->layers[1].router_bias = MOE_FLAG_ON;
    c->opt.kind = MOE_OPTIMIZER_SGD; c->opt.lr = 0.05f;
    /* hash routing by token id (forward and backward: no router parameters) */
    c = &cases[n_cases++];
    c->name = "hash"; c->d_in = 14; c->tokens = 40; c->n_layers = 2; c->loss = MOE_LOSS_MSE;
    c->layers[0].kind = MOE_LAYER_MOE; c->layers[0].router = MOE_ROUTER_HASH; c->layers[0].n_experts = 7; c->layers[0].top_k = 2;
    c->layers[0].hash_seed = 99; c->layers[0].n_shared_experts = 1;
    c->layers[1].kind = MOE_LAYER_MOE; c->layers[1].router = MOE_ROUTER_HASH; c->layers[1].n_experts = 3; c->layers[1].top_k = 1;
    c->layers[1].capacity_factor = 0.5f; c->layers[1].d_out = 14;
    c->fwd.token_ids = token_ids;
    c->forward_only = 1;
    /* expert choice on tokens that come in identical pairs: every score ties with its twin, and
       the device must take the lower token first, as the CPU */
    c = &cases[n_cases++];
    c->name = "expert_choice_ties"; c->d_in = 9; c->tokens = 30; c->n_layers = 1; c->loss = MOE_LOSS_MSE;
    c->layers[0].kind = MOE_LAYER_MOE; c->layers[0].router = MOE_ROUTER_EXPERT_CHOICE; c->layers[0].n_experts = 5; c->layers[0].top_k = 1;
    c->layers[0].capacity_factor = 0.75f; c->layers[0].expert = MOE_EXPERT_LINEAR;  /* C = 5: a tied pair straddles the cut */
    c->twin_rows = 1;
    c->forward_only = 1;
}

static void run_forward_backward(const void *arg) { check_forward_backward((const parity_case *)arg); }
static void run_training(const void *arg) { check_training((const parity_case *)arg); }

/* A layer uploaded alone (what a benchmark times): forward, dx and gradients against the CPU
   layer; no training step; and the same calls on the CPU fallback. */
static int test_layer_upload(void) {
    moe_layer_desc d;
    moe_layer *l = NULL;
    moe_cl_model *dm = NULL;
    moe_cl_ctx *cpu_ctx = NULL;
    moe_cl_desc desc;
    float x[20 * 24], y_cpu[20 * 16], y_cl[20 * 16], dy[20 * 16], dx_cpu[20 * 24], dx_cl[20 * 24], *g_cpu, *p;
    int64_t n, i;
    memset(&d, 0, sizeof d);
    d.kind = MOE_LAYER_MOE; d.d_in = 24; d.d_out = 16; d.n_experts = 4; d.top_k = 2; d.expert = MOE_EXPERT_SWIGLU; d.d_hidden = 40;
    CHECK_OK(moe_layer_create(&ctx, &d, 20, &l), &ctx);
    if (!l) return 0;
    p = moe_layer_params(l, &n);
    for (i = 0; i < n; i++) p[i] += (2.0f * moe_rng_uniform(11, 6, (uint64_t)i) - 1.0f) * 0.3f;
    g_cpu = (float *)malloc(sizeof(float) * (size_t)n);
    fill(x, 20 * 24, 21, 1.0f);
    fill(dy, 20 * 16, 22, 1.0f);
    memset(moe_layer_grads(l, NULL), 0, sizeof(float) * (size_t)n);
    CHECK_OK(moe_layer_forward(l, x, 20, y_cpu, NULL), &ctx);
    CHECK_OK(moe_layer_backward(l, dy, dx_cpu, 0), &ctx);
    memcpy(g_cpu, moe_layer_grads(l, NULL), sizeof(float) * (size_t)n);
    if (device) {
        CHECK_OK(moe_cl_layer_upload(device, l, &dm), &ctx);
        if (dm) {
            moe_step_info info;
            moe_target target;
            target.labels = NULL; target.values = y_cpu;
            moe_cl_model_zero_grad(dm);
            CHECK_OK(moe_cl_model_forward(dm, x, 20, y_cl, NULL), &ctx);
            CHECK_OK(moe_cl_model_backward(dm, dy, dx_cl, 0), &ctx);
            CHECK_OK(moe_cl_model_download(dm), &ctx);
            worst_of(y_cl, y_cpu, 20 * 16, 1e-4, 1e-5, "layer y");
            worst_of(dx_cl, dx_cpu, 20 * 24, 2e-3, 1e-5, "layer dx");
            worst_of(moe_layer_grads(l, NULL), g_cpu, n, 2e-3, 1e-5, "layer gradients");
            CHECK_RESULT(moe_cl_model_train_step(dm, x, &target, 20, &info), MOE_ERR_STATE, &ctx);
            moe_cl_model_destroy(dm);
            dm = NULL;
        }
    }
    memset(&desc, 0, sizeof desc);
    desc.device = "none";
    CHECK_OK(moe_cl_ctx_init(&ctx, &desc, &cpu_ctx), &ctx);
    CHECK_OK(moe_cl_layer_upload(cpu_ctx, l, &dm), &ctx);
    if (dm) {
        moe_cl_model_zero_grad(dm);
        CHECK_OK(moe_cl_model_forward(dm, x, 20, NULL, NULL), &ctx);
        CHECK_OK(moe_cl_model_backward(dm, dy, dx_cl, 0), &ctx);
        CHECK(memcmp(dx_cl, dx_cpu, sizeof dx_cl) == 0, "the fallback is the CPU layer");
        CHECK(memcmp(moe_layer_grads(l, NULL), g_cpu, sizeof(float) * (size_t)n) == 0, "the fallback accumulates into the layer");
    }
    moe_cl_model_destroy(dm);
    moe_cl_ctx_destroy(cpu_ctx);
    moe_layer_destroy(l);
    free(g_cpu);
    return 0;
}

/* A refused training step (non-finite loss) leaves the noise counters where they were, so the
   next step draws the noise the CPU model draws. */
static int test_refused_step_noise(void) {
    parity_case pc;
    moe_model *m_cpu, *m_dev;
    moe_cl_model *dm = NULL;
    float x[20 * 12], good[20 * 3], bad[20 * 3];
    moe_target target;
    moe_step_info a, b;
    int k;
    if (!device) return TEST_SKIP;
    memset(&pc, 0, sizeof pc);
    pc.d_in = 12; pc.tokens = 20; pc.n_layers = 1; pc.loss = MOE_LOSS_MSE;
    pc.layers[0].kind = MOE_LAYER_MOE; pc.layers[0].router = MOE_ROUTER_NOISY_TOPK; pc.layers[0].n_experts = 5; pc.layers[0].top_k = 2;
    pc.layers[0].d_out = 3; pc.layers[0].load_loss = 0.1f; pc.layers[0].jitter = 0.1f;
    m_cpu = make(&pc);
    m_dev = make(&pc);
    if (m_cpu && m_dev) CHECK_OK(moe_cl_model_upload(device, m_dev, &dm), &ctx);
    if (dm) {
        fill(x, 20 * 12, 51, 1.0f);
        fill(good, 20 * 3, 52, 1.0f);
        for (k = 0; k < 20 * 3; k++) bad[k] = 3e38f;
        target.labels = NULL;
        target.values = bad;
        CHECK_RESULT(moe_model_train_step(m_cpu, x, &target, 20, &a), MOE_ERR_NONFINITE, &ctx);
        CHECK_RESULT(moe_cl_model_train_step(dm, x, &target, 20, &b), MOE_ERR_NONFINITE, &ctx);
        target.values = good;
        for (k = 0; k < 2; k++) {
            CHECK_OK(moe_model_train_step(m_cpu, x, &target, 20, &a), &ctx);
            CHECK_OK(moe_cl_model_train_step(dm, x, &target, 20, &b), &ctx);
            CHECK(test_close(b.loss, a.loss, 1e-4, 1e-6) && test_close(b.aux_loss, a.aux_loss, 1e-3, 1e-6), "step %d: loss %.9g/%.9g aux %.9g/%.9g",
                  k, (double)b.loss, (double)a.loss, (double)b.aux_loss, (double)a.aux_loss);
        }
    }
    moe_cl_model_destroy(dm);
    moe_model_destroy(m_cpu);
    moe_model_destroy(m_dev);
    return 0;
}

/* ---------------------------------------------------------------- fp16 weights */
/* x rounded to the nearest half value (ties to even), for the normal and subnormal half range */
static float half_round(float x) {
    int e;
    double m = frexp((double)x, &e);  /* x = m 2^e, 0.5 <= |m| < 1: 11 significant bits */
    if (x == 0.0f || !isfinite(x)) return x;
    if (e - 1 < -14) return (float)(nearbyint((double)x * 16777216.0) / 16777216.0);  /* subnormal: steps of 2^-24 */
    return (float)ldexp(nearbyint(ldexp(m, 11)), e - 11);
}

/* moe_cl_model_quantize(F16): expert weights as half on the device. Against a CPU model whose
   expert weights are rounded to half the same way it must agree as fp32 does (1e-4); against the
   fp32 CPU model the documented bound is 1e-2 relative plus 1e-3 of the largest output. */
static void check_fp16_weights(moe_cl_ctx *cl) {
    parity_case pc;
    moe_model *m, *m_half;
    moe_cl_model *dm = NULL;
    int64_t T = 31, O, i, k;
    float x[31 * 26], y_cpu[31 * 6], y_half[31 * 6], y_dev[31 * 6], y_f32[31 * 6], dy[31 * 6];
    double ymax = 0.0;
    moe_target target;
    moe_step_info info;
    memset(&pc, 0, sizeof pc);
    pc.d_in = 26; pc.tokens = T; pc.n_layers = 2; pc.loss = MOE_LOSS_MSE;
    pc.layers[0].kind = MOE_LAYER_MOE; pc.layers[0].n_experts = 6; pc.layers[0].top_k = 2; pc.layers[0].expert = MOE_EXPERT_SWIGLU;
    pc.layers[0].d_hidden = 37; pc.layers[0].n_shared_experts = 1; pc.layers[0].residual = 1;
    pc.layers[1].kind = MOE_LAYER_MOE; pc.layers[1].router = MOE_ROUTER_SIGMOID; pc.layers[1].n_experts = 4; pc.layers[1].top_k = 2;
    pc.layers[1].d_out = 6; pc.layers[1].d_hidden = 19;
    m = make(&pc);
    m_half = make(&pc);
    if (!m || !m_half) { moe_model_destroy(m); moe_model_destroy(m_half); return; }
    O = moe_model_d_out(m);
    for (i = 0; i < moe_model_tensor_count(m_half); i++) {
        moe_tensor t;
        moe_model_tensor(m_half, (int)i, &t);
        if ((strstr(t.name, ".experts.") || strstr(t.name, ".shared.")) && strstr(t.name, ".weight"))
            for (k = 0; k < t.size; k++) t.data[k] = half_round(t.data[k]);
    }
    fill(x, T * pc.d_in, 31, 1.0f);
    fill(dy, T * O, 32, 1.0f);
    CHECK_OK(moe_model_forward(m, x, T, y_cpu, NULL), &ctx);
    CHECK_OK(moe_model_forward(m_half, x, T, y_half, NULL), &ctx);
    CHECK_OK(moe_cl_model_upload(cl, m, &dm), &ctx);
    if (dm) {
        CHECK_OK(moe_cl_model_forward(dm, x, T, y_f32, NULL), &ctx);
        CHECK_RESULT(moe_cl_model_quantize(dm, MOE_DTYPE_I8), MOE_ERR_UNSUPPORTED, &ctx);
        CHECK_OK(moe_cl_model_quantize(dm, MOE_DTYPE_F16), &ctx);
        CHECK_OK(moe_cl_model_forward(dm, x, T, y_dev, NULL), &ctx);
        worst_of(y_dev, y_half, T * O, 1e-4, 1e-5, "fp16 device vs CPU with half-rounded weights");
        for (i = 0; i < T * O; i++) ymax = fmax(ymax, fabs((double)y_cpu[i]));
        worst_of(y_dev, y_cpu, T * O, 1e-2, 1e-3 * ymax, "fp16 device vs fp32 CPU");
        CHECK(memcmp(y_dev, y_f32, sizeof y_dev) != 0, "the fp16 forward reads other weights");
        CHECK_RESULT(moe_cl_model_backward(dm, dy, NULL, 0), MOE_ERR_STATE, &ctx);
        target.labels = NULL; target.values = dy;
        CHECK_RESULT(moe_cl_model_train_step(dm, x, &target, T, &info), MOE_ERR_STATE, &ctx);
        CHECK_OK(moe_cl_model_quantize(dm, MOE_DTYPE_F32), &ctx);
        CHECK_OK(moe_cl_model_forward(dm, x, T, y_dev, NULL), &ctx);
        CHECK(memcmp(y_dev, y_f32, sizeof y_dev) == 0, "F32 restores the fp32 forward bit for bit");
        CHECK_OK(moe_cl_model_train_step(dm, x, &target, T, &info), &ctx);
        moe_cl_model_destroy(dm);
        dm = NULL;
    }
    /* bf16: the CPU's own bf16 path (moe_model_quantize) is the reference, to fp32 parity; a model
       quantized on the host uploads as bf16, and moe_cl_model_quantize(BF16) gives the same */
    moe_model_destroy(m_half);  /* its expert weights were rounded to half above */
    m_half = make(&pc);
    if (m_half) {
        moe_model *m2 = make(&pc);
        CHECK_OK(moe_model_quantize(m_half, MOE_DTYPE_BF16), &ctx);
        CHECK_OK(moe_model_forward(m_half, x, T, y_half, NULL), &ctx);
        CHECK_OK(moe_cl_model_upload(cl, m_half, &dm), &ctx);
        if (dm) {
            CHECK_OK(moe_cl_model_forward(dm, x, T, y_dev, NULL), &ctx);
            worst_of(y_dev, y_half, T * O, 1e-4, 1e-5, "bf16 model uploaded vs CPU bf16");
            CHECK_RESULT(moe_cl_model_backward(dm, dy, NULL, 0), MOE_ERR_STATE, &ctx);
            moe_cl_model_destroy(dm);
            dm = NULL;
        }
        if (m2) CHECK_OK(moe_cl_model_upload(cl, m2, &dm), &ctx);
        if (dm) {
            CHECK_OK(moe_cl_model_quantize(dm, MOE_DTYPE_BF16), &ctx);
            CHECK_OK(moe_cl_model_forward(dm, x, T, y_f32, NULL), &ctx);
            CHECK(memcmp(y_dev, y_f32, sizeof y_dev) == 0, "moe_cl_model_quantize(BF16) is the host's bf16 snapshot");
            moe_cl_model_destroy(dm);
            dm = NULL;
        }
        moe_model_destroy(m2);
    }
    moe_cl_model_destroy(dm);
    moe_model_destroy(m);
    moe_model_destroy(m_half);
}

/* on the default tiles (direct GEMM on CPU devices) and on the local-memory GEMM */
static int test_fp16_weights(void) {
    moe_cl_desc desc;
    moe_cl_ctx *tiled = NULL;
    if (!device) return TEST_SKIP;
    check_fp16_weights(device);
    memset(&desc, 0, sizeof desc);
    desc.require_device = 1;
    desc.tiles = "32 32 8 4 4 0";
    CHECK_OK(moe_cl_ctx_init(&ctx, &desc, &tiled), &ctx);
    if (tiled) check_fp16_weights(tiled);
    moe_cl_ctx_destroy(tiled);
    return 0;
}

/* ---------------------------------------------------------------- tuning */
static int test_tuning_cache(void) {
    moe_cl_desc desc;
    moe_cl_ctx *a = NULL, *b = NULL;
    char path[512], line[600];
    FILE *f;
    int lines = 0;
    if (!device) return TEST_SKIP;
    /* moe_cl.h writes into cache_dir but does not create it (make test makes TMP_DIR, make cross does not) */
    CHECK(test_make_dir(TMP_DIR) == 0, "the cache folder %s exists", TMP_DIR);
    snprintf(path, sizeof path, "%s/moe_cl_tuning.txt", TMP_DIR);
    remove(path);
    memset(&desc, 0, sizeof desc);
    desc.require_device = 1;
    desc.cache_dir = TMP_DIR;
    CHECK_OK(moe_cl_ctx_init(&ctx, &desc, &a), &ctx);
    f = fopen(path, "r");
    CHECK(f != NULL, "the tuning step writes %s", path);
    if (f) {
        while (fgets(line, sizeof line, f)) lines++;
        fclose(f);
    }
    CHECK(lines == 1, "one line per device, got %d", lines);
    CHECK_OK(moe_cl_ctx_init(&ctx, &desc, &b), &ctx);  /* reads the file: no new line */
    if (a && b) CHECK(strcmp(moe_cl_tiles(a), moe_cl_tiles(b)) == 0, "tiles %s vs %s", moe_cl_tiles(a), moe_cl_tiles(b));
    f = fopen(path, "r");
    lines = 0;
    if (f) {
        while (fgets(line, sizeof line, f)) lines++;
        fclose(f);
    }
    CHECK(lines == 1, "the second context used the cache, the file has %d lines", lines);
    moe_cl_ctx_destroy(a);
    moe_cl_ctx_destroy(b);
    return 0;
}

int main(void) {
    moe_cl_desc desc;
    moe_result r;
    int i, v;
    char name[96];
    moe_ctx_init(&ctx, NULL);
    memset(&desc, 0, sizeof desc);
    desc.no_tuning = 1;
    r = moe_cl_ctx_init(&ctx, &desc, &device);
    if (r != MOE_OK) {  /* a device that is there but fails (e.g. the kernels do not build) fails the test */
        printf("FAIL: the OpenCL device does not work: %s\n", moe_ctx_error(&ctx));
        test_failed++;
        device = NULL;
    } else if (moe_cl_ctx_fallback(device)) {
        snprintf(no_device_reason, sizeof no_device_reason, "%s", moe_cl_ctx_reason(device));
        printf("no OpenCL device, device cases skip: %s\n", no_device_reason);
        moe_cl_ctx_destroy(device);
        device = NULL;
    } else {
        printf("device: %s (%s)\n", moe_cl_device_name(device), moe_cl_tiles(device));
    }
    RUN(test_fallback_without_library);
    RUN(test_fallback_by_name);
    RUN(test_build_failure);
    RUN(test_upload_errors);
    RUN(test_upload_whitelist);
    RUN(test_upload_memory_limit);
    fill(noise0, 40 * 6, 41, 2.0f);
    fill(noise1, 40 * 4, 42, 2.0f);
    for (i = 0; i < 64; i++) token_ids[i] = (int32_t)(moe_rng_u64(5, 5, (uint64_t)i) % 1000u) - 20;  /* a few negative ids too */
    add_cases();
    /* every case on the default tiles (the direct GEMM on CPU devices); forward and backward
       again on the local-memory GEMM and on small odd tiles, so both kernels and their edges
       are checked on any device */
    for (v = 0; v < 3; v++) {
        static const char *const tiles[3] = { NULL, "32 32 8 4 4 0", "8 16 4 2 8 1" };
        variant = device;
        if (device && tiles[v]) {
            memset(&desc, 0, sizeof desc);
            desc.require_device = 1;
            desc.tiles = tiles[v];
            variant = NULL;
            CHECK_OK(moe_cl_ctx_init(&ctx, &desc, &variant), &ctx);
            if (!variant) { test_failed++; continue; }
        }
        for (i = 0; i < n_cases; i++) {
            snprintf(name, sizeof name, "forward_backward_%s [%s]", cases[i].name, tiles[v] ? tiles[v] : "default tiles");
            if (!device) { test_skipped++; printf("  skip %s\n", name); continue; }
            RUN_NAMED(name, run_forward_backward, &cases[i]);
            if (v > 0 || cases[i].forward_only) continue;
            snprintf(name, sizeof name, "training_%s", cases[i].name);
            RUN_NAMED(name, run_training, &cases[i]);
        }
        if (variant != device) moe_cl_ctx_destroy(variant);
    }
    RUN(test_layer_upload);
    RUN(test_refused_step_noise);
    RUN(test_fp16_weights);
    RUN(test_tuning_cache);
    moe_cl_ctx_destroy(device);
    TEST_END();
}
