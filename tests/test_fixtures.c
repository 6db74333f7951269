/* PyTorch fixtures (tests/ref/gen_fixtures.py, written from README.md (Model reference) alone): forward, losses,
   auxiliary losses, routing statistics, every gradient (training with aux losses, and inference
   without), and five AdamW steps. Tolerances (float32 here against float64 there):
     outputs, losses, gradients:  |a - b| <= 1e-4 |b| + 2e-5 max|b over the tensor|
     parameters after 5 steps:     |a - b| <= 1e-4 |b| + 1e-5 max|b over the tensor|
     gradients also + 4 FLT_EPSILON max|b over every parameter gradient of the same backward|:
       a gradient that is 0 in exact arithmetic (a whole tensor can be) comes out of float sums
       whose terms are the size of the other gradients, as a few ulps of them (x87's wider
       intermediates leave 9e-8 where SSE leaves 0, beside gradients up to 5.6);
     kept tokens per expert, dropped tokens: exact.
   A model with a voting layer (combine vote / vote_majority) has no inference backward: its fixture
   has no eval.dx / eval.grad.*, and the backward after its inference forward must be refused. */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "test.h"
#include <float.h>

#ifndef FIXTURE_DIR
#define FIXTURE_DIR "tests/ref"
#endif

static const char *const fixtures[] = {
    "dense_mlp", "dense_mse", "dense_bce", "topk2_swiglu_shared", "soft_mixture_mlp", "switch_capacity",
    "noisy_topk", "topk_norenorm_aux", "noisy_capacity_passthrough", "topk1_mlp3_residual",
    "sigmoid_groups_bias", "expert_choice", "call_top_k_top_p", "hash_tokens", "gaussian_mixture",
    "topk2_geglu_bias", "stack_combine", "soft_slots_groups", "hierarchical_noisy", "mmoe_ple_tasks",
    "embedding_hash", "vote_combine",
};

static moe_ctx ctx;
static double worst_seen;

static double max_abs(const float *v, int64_t n) {
    double m = 0;
    int64_t i;
    for (i = 0; i < n; i++) m = fabs(v[i]) > m ? fabs(v[i]) : m;
    return m;
}

/* Largest |value| over the fixture tensors whose names start with prefix. */
static double prefix_maxabs(const moe_tensor_file *f, const char *prefix) {
    double maxabs = 0;
    int t;
    for (t = 0; t < moe_tensor_file_count(f); t++) {
        const moe_file_tensor *ft = moe_tensor_file_get(f, t);
        int64_t n = 1;
        int d;
        float *v;
        if (strncmp(ft->name, prefix, strlen(prefix)) != 0) continue;
        for (d = 0; d < ft->ndim; d++) n *= ft->shape[d];
        v = (float *)malloc(sizeof(float) * (size_t)(n ? n : 1));
        CHECK_OK(moe_file_tensor_to_f32(&ctx, ft, v, n), &ctx);
        if (max_abs(v, n) > maxabs) maxabs = max_abs(v, n);
        free(v);
    }
    return maxabs;
}

/* Compare n floats with the fixture tensor `name`: |a - b| <= rtol |b| + atol_scale max|b| +
   4 FLT_EPSILON scale, scale the size of related quantities (0: none; an all-zero tensor must then
   be exact). */
static void compare(const moe_tensor_file *f, const char *fixture, const char *name, const float *got, int64_t n, double rtol, double atol_scale,
                    double scale) {
    const moe_file_tensor *t = moe_tensor_file_find(f, name);
    float *want;
    double maxabs, worst, atol;
    long where;
    CHECK(t != NULL, "%s: fixture has no tensor %s", fixture, name);
    if (!t) return;
    want = (float *)malloc(sizeof(float) * (size_t)(n ? n : 1));
    CHECK_OK(moe_file_tensor_to_f32(&ctx, t, want, n), &ctx);
    maxabs = max_abs(want, n);
    atol = atol_scale * maxabs + 4.0 * FLT_EPSILON * scale;
    worst = test_worst(got, want, (long)n, rtol, atol > 0 ? atol : DBL_MIN, &where);
    if (worst > worst_seen) worst_seen = worst;
    CHECK(worst <= 1.0, "%s: %s[%ld] = %.8g, PyTorch %.8g (%.3g of the tolerance)", fixture, name, where,
          where >= 0 ? (double)got[where] : 0.0, where >= 0 ? (double)want[where] : 0.0, worst);
    free(want);
}

static float scalar(const moe_tensor_file *f, const char *name) {
    const moe_file_tensor *t = moe_tensor_file_find(f, name);
    float v = NAN;
    if (t) moe_file_tensor_to_f32(&ctx, t, &v, 1);
    return v;
}

static void compare_grads(moe_model *m, const moe_tensor_file *f, const char *fixture, const char *prefix) {
    int i;
    char name[200];
    double scale = prefix_maxabs(f, prefix);
    for (i = 0; i < moe_model_tensor_count(m); i++) {
        moe_tensor t;
        moe_model_tensor(m, i, &t);
        snprintf(name, sizeof name, "%s%s", prefix, t.name);
        compare(f, fixture, name, t.grad, t.size, 1e-4, 2e-5, scale);
    }
}

static void run_fixture(const char *fixture) {
    char path[256], name[200];
    moe_tensor_file *f = NULL;
    moe_model *m = NULL;
    const moe_model_desc *md;
    const moe_file_tensor *tx, *tl, *tt;
    float *x = NULL, *values = NULL, *dy = NULL, *dx = NULL, *grad_loss = NULL, *noise[8] = {0};
    const float *noise_c[8] = {0};
    int32_t *labels = NULL, *ids = NULL;
    int64_t T, D, C, i;
    int l, k, votes = 0;
    moe_forward_opts train_opts, eval_opts;
    moe_target target, tasks[MOE_MAX_TASKS];
    float *task_values[MOE_MAX_TASKS] = {0};
    int32_t *task_labels[MOE_MAX_TASKS] = {0};
    float loss, aux;
    snprintf(path, sizeof path, "%s/%s.safetensors", FIXTURE_DIR, fixture);
    CHECK_OK(moe_tensor_file_read(&ctx, path, &f), &ctx);
    if (!f) return;
    tx = moe_tensor_file_find(f, "x");
    CHECK(tx && tx->ndim == 2, "%s: x missing", fixture);
    if (!tx) goto done;
    T = tx->shape[0];
    D = tx->shape[1];
    CHECK_OK(moe_model_load(&ctx, path, T, &m), &ctx);
    if (!m) goto done;
    md = moe_model_get_desc(m);
    C = moe_model_d_out(m);
    for (l = 0; l < md->n_layers; l++)
        if (md->layers[l].kind == MOE_LAYER_MOE && (md->layers[l].combine == MOE_COMBINE_VOTE || md->layers[l].combine == MOE_COMBINE_VOTE_MAJORITY)) votes = 1;
    x = (float *)malloc(sizeof(float) * (size_t)(T * D));
    dx = (float *)malloc(sizeof(float) * (size_t)(T * D));
    dy = (float *)malloc(sizeof(float) * (size_t)(T * C));
    grad_loss = (float *)malloc(sizeof(float) * (size_t)(T * C));
    CHECK_OK(moe_file_tensor_to_f32(&ctx, tx, x, T * D), &ctx);
    CHECK_OK(moe_file_tensor_to_f32(&ctx, moe_tensor_file_find(f, "dy"), dy, T * C), &ctx);
    memset(&target, 0, sizeof target);
    if ((tl = moe_tensor_file_find(f, "labels")) != NULL) {
        labels = (int32_t *)malloc(sizeof(int32_t) * (size_t)T);
        CHECK_OK(moe_file_tensor_to_i32(&ctx, tl, labels, T), &ctx);
        target.labels = labels;
    }
    if ((tt = moe_tensor_file_find(f, "target")) != NULL) {
        /* the mixture NLL's target has the Gaussian layer's d_out, not the packed width */
        int64_t TC = T * (md->loss == MOE_LOSS_MIXTURE_NLL ? md->layers[md->n_layers - 1].d_out : C);
        values = (float *)malloc(sizeof(float) * (size_t)TC);
        CHECK_OK(moe_file_tensor_to_f32(&ctx, tt, values, TC), &ctx);
        target.values = values;
    }
    /* multi-task models: task i's labels [T] or values [T, task_d_out[i]] (README section 4) */
    memset(tasks, 0, sizeof tasks);
    for (k = 0; k < md->n_tasks; k++) {
        int64_t w = md->task_d_out[k];
        snprintf(name, sizeof name, "task.%d.labels", k);
        if ((tl = moe_tensor_file_find(f, name)) != NULL) {
            task_labels[k] = (int32_t *)malloc(sizeof(int32_t) * (size_t)T);
            CHECK_OK(moe_file_tensor_to_i32(&ctx, tl, task_labels[k], T), &ctx);
            tasks[k].labels = task_labels[k];
        }
        snprintf(name, sizeof name, "task.%d.target", k);
        if ((tt = moe_tensor_file_find(f, name)) != NULL) {
            task_values[k] = (float *)malloc(sizeof(float) * (size_t)(T * w));
            CHECK_OK(moe_file_tensor_to_f32(&ctx, tt, task_values[k], T * w), &ctx);
            tasks[k].values = task_values[k];
        }
        target.tasks = tasks;
    }
    for (l = 0; l < md->n_layers && l < 8; l++) {
        const moe_file_tensor *tn;
        snprintf(name, sizeof name, "noise.%d", l);
        if ((tn = moe_tensor_file_find(f, name)) != NULL) {
            int64_t n = T * (md->layers[l].n_experts + (md->layers[l].router == MOE_ROUTER_HIERARCHICAL ? md->layers[l].n_groups : 0));
            noise[l] = (float *)malloc(sizeof(float) * (size_t)n);
            CHECK_OK(moe_file_tensor_to_f32(&ctx, tn, noise[l], n), &ctx);
        }
        noise_c[l] = noise[l];
    }
    /* per-call routing options and token ids (README 3.5), for every forward */
    memset(&eval_opts, 0, sizeof eval_opts);
    if ((tl = moe_tensor_file_find(f, "token_ids")) != NULL) {
        ids = (int32_t *)malloc(sizeof(int32_t) * (size_t)T);
        CHECK_OK(moe_file_tensor_to_i32(&ctx, tl, ids, T), &ctx);
        eval_opts.token_ids = ids;
    }
    if (moe_tensor_file_find(f, "call.top_k")) eval_opts.top_k = (int)scalar(f, "call.top_k");
    if (moe_tensor_file_find(f, "call.top_p")) eval_opts.top_p = scalar(f, "call.top_p");
    train_opts = eval_opts;
    train_opts.training = 1;
    train_opts.router_noise = noise_c;

    /* training forward, losses, statistics */
    CHECK_OK(moe_model_forward(m, x, T, NULL, &train_opts), &ctx);
    compare(f, fixture, "y", moe_model_output(m), T * C, 1e-4, 2e-5, 0);
    CHECK_OK(moe_model_loss(m, &target, &loss, grad_loss), &ctx);
    CHECK(test_close(loss, scalar(f, "loss"), 1e-5, 1e-6), "%s: loss %.8g, PyTorch %.8g", fixture, loss, scalar(f, "loss"));
    aux = 0;
    for (l = 0; l < md->n_layers; l++) {
        moe_stats st;
        float got[4];
        const moe_file_tensor *ts;
        if (md->layers[l].kind != MOE_LAYER_MOE) continue;
        CHECK_OK(moe_model_stats(m, l, &st), &ctx);
        got[0] = st.balance_loss; got[1] = st.z_loss; got[2] = st.importance_loss; got[3] = st.load_loss;
        aux += st.aux_loss;
        snprintf(name, sizeof name, "aux.%d", l);
        compare(f, fixture, name, got, 4, 1e-4, 1e-6, 0);
        snprintf(name, sizeof name, "stats.%d.tokens_per_expert", l);
        if ((ts = moe_tensor_file_find(f, name)) != NULL) {
            float want[256];
            int e;
            CHECK_OK(moe_file_tensor_to_f32(&ctx, ts, want, st.n_experts), &ctx);
            for (e = 0; e < st.n_experts && e < 256; e++)
                CHECK((float)st.tokens_per_expert[e] == want[e], "%s layer %d: expert %d kept %lld tokens, PyTorch %g", fixture, l, e,
                      (long long)st.tokens_per_expert[e], want[e]);
        }
        snprintf(name, sizeof name, "stats.%d.dropped_tokens", l);
        CHECK((float)st.dropped_tokens == scalar(f, name), "%s layer %d: %lld dropped tokens, PyTorch %g", fixture, l,
              (long long)st.dropped_tokens, scalar(f, name));
    }
    CHECK(test_close(aux, scalar(f, "aux_loss"), 1e-4, 1e-7), "%s: aux loss %.8g, PyTorch %.8g", fixture, aux, scalar(f, "aux_loss"));

    /* gradients of task + aux loss */
    moe_model_zero_grad(m);
    CHECK_OK(moe_model_backward(m, grad_loss, dx, MOE_BACKWARD_AUX), &ctx);
    compare(f, fixture, "dx", dx, T * D, 1e-4, 2e-5, 0);
    compare_grads(m, f, fixture, "grad.");

    /* inference: outputs and gradients of sum(y * dy), no aux */
    CHECK_OK(moe_model_forward(m, x, T, NULL, &eval_opts), &ctx);
    compare(f, fixture, "eval.y", moe_model_output(m), T * C, 1e-4, 2e-5, 0);
    moe_model_zero_grad(m);
    if (votes) {  /* a vote has no gradient (README 3.4 step 6) */
        CHECK(moe_model_backward(m, dy, dx, 0) == MOE_ERR_STATE, "%s: backward after a vote not refused with MOE_ERR_STATE", fixture);
        CHECK(moe_tensor_file_find(f, "eval.dx") == NULL, "%s: a voting model's fixture has eval.dx", fixture);
    } else {
        CHECK_OK(moe_model_backward(m, dy, dx, 0), &ctx);
        compare(f, fixture, "eval.dx", dx, T * D, 1e-4, 2e-5, 0);
        compare_grads(m, f, fixture, "eval.grad.");
    }

    /* five optimizer steps on the same batch and noise */
    for (k = 1; k <= 5; k++) {
        moe_step_info info;
        float step_loss, step_aux = 0;
        CHECK_OK(moe_model_forward(m, x, T, NULL, &train_opts), &ctx);
        CHECK_OK(moe_model_loss(m, &target, &step_loss, grad_loss), &ctx);
        for (l = 0; l < md->n_layers; l++) {
            moe_stats st;
            if (moe_model_stats(m, l, &st) == MOE_OK) step_aux += st.aux_loss;
        }
        snprintf(name, sizeof name, "step%d.loss", k);
        CHECK(test_close(step_loss, scalar(f, name), 1e-4, 1e-6), "%s: %s %.8g, PyTorch %.8g", fixture, name, step_loss, scalar(f, name));
        snprintf(name, sizeof name, "step%d.aux_loss", k);
        CHECK(test_close(step_aux, scalar(f, name), 1e-3, 1e-7), "%s: %s %.8g, PyTorch %.8g", fixture, name, step_aux, scalar(f, name));
        moe_model_zero_grad(m);
        CHECK_OK(moe_model_backward(m, grad_loss, NULL, MOE_BACKWARD_AUX), &ctx);
        CHECK_OK(moe_model_optimizer_step(m, &info), &ctx);
        for (i = 0; i < moe_model_tensor_count(m); i++) {
            moe_tensor t;
            char pname[220];
            moe_model_tensor(m, (int)i, &t);
            snprintf(pname, sizeof pname, "step%d.%s", k, t.name);
            compare(f, fixture, pname, t.data, t.size, 1e-4, 1e-5, 0);
        }
    }
done:
    for (l = 0; l < 8; l++) free(noise[l]);
    for (k = 0; k < MOE_MAX_TASKS; k++) { free(task_labels[k]); free(task_values[k]); }
    free(x); free(dx); free(dy); free(grad_loss); free(labels); free(values); free(ids);
    moe_model_destroy(m);
    moe_tensor_file_close(f);
}

static void fixture_case(const char *fixture) {
    worst_seen = 0;
    run_fixture(fixture);
    printf("    %-28s worst error %.2f of the tolerance\n", fixture, worst_seen);
}

int main(void) {
    size_t i;
    printf("test_fixtures\n");
    moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = 1});
    for (i = 0; i < sizeof fixtures / sizeof fixtures[0]; i++) RUN_NAMED(fixtures[i], fixture_case, fixtures[i]);
    TEST_END();
}
