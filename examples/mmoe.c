/* mmoe.c - multi-task learning on the synthetic data of the MMoE paper (Ma et al., KDD 2018,
   section 4.1): two regression tasks whose label functions are correlated by the cosine between
   two unit vectors, learnt by a shared-bottom model, MMoE and PLE (Tang et al., RecSys 2020).

     make mmoe           (or: build/mmoe [--corr 0.5,0.9] [--epochs N] [--train N] [--seed S] [--threads N])

   The data, for input width d = 100 and m = 10 sinusoids:
     u1, u2         orthogonal unit vectors (Gram-Schmidt of two Gaussian vectors)
     w1 = c u1,  w2 = c (p u1 + sqrt(1 - p^2) u2)      c = 1, p = the correlation (cosine of w1, w2)
     x ~ N(0, I_d)
     y_i = w_i^T x + sum_{j=1..m} sin(alpha_j w_i^T x + beta_j) + eps_i,   eps_i ~ N(0, 0.01)
   alpha_j, beta_j ~ N(0, 1) are drawn once and shared by both tasks. For each correlation, every
   model trains on the same rows (Adam, batch 64) and prints one line per model:
     corr=0.50 model=mmoe task0_mse=0.0xxx task1_mse=0.0xxx params=NNNN seconds=N.N
   with the test-set MSE of each task (the noise alone gives 0.01). */
#define _POSIX_C_SOURCE 199309L   /* clock_gettime */
#define MOE_IMPLEMENTATION
#include "../moe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define D_IN 100
#define N_SINES 10
#define N_TEST 2000
#define BATCH 64

typedef struct run_options {
    double corr[8];
    int n_corr, epochs, n_train, n_threads;
    uint64_t seed;
} run_options;

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* Rows x [n, D_IN] and labels y0, y1 [n] for correlation p; stream keeps train and test apart. */
static void make_rows(uint64_t seed, double p, uint64_t stream, int n, float *x, float *y0, float *y1) {
    double u1[D_IN], u2[D_IN], w1[D_IN], w2[D_IN], alpha[N_SINES], beta[N_SINES], dot = 0, n1 = 0, n2 = 0;
    int i, j;
    /* u1, u2: the same for every stream (they define the tasks) */
    for (i = 0; i < D_IN; i++) { u1[i] = moe_rng_normal(seed, 1, (uint64_t)i); u2[i] = moe_rng_normal(seed, 2, (uint64_t)i); }
    for (i = 0; i < D_IN; i++) n1 += u1[i] * u1[i];
    for (i = 0; i < D_IN; i++) u1[i] /= sqrt(n1);
    for (i = 0; i < D_IN; i++) dot += u1[i] * u2[i];
    for (i = 0; i < D_IN; i++) u2[i] -= dot * u1[i];
    for (i = 0; i < D_IN; i++) n2 += u2[i] * u2[i];
    for (i = 0; i < D_IN; i++) u2[i] /= sqrt(n2);
    for (i = 0; i < D_IN; i++) { w1[i] = u1[i]; w2[i] = p * u1[i] + sqrt(1.0 - p * p) * u2[i]; }
    for (j = 0; j < N_SINES; j++) { alpha[j] = moe_rng_normal(seed, 3, (uint64_t)j); beta[j] = moe_rng_normal(seed, 4, (uint64_t)j); }
    for (i = 0; i < n; i++) {
        double a = 0, b = 0, s0, s1;
        for (j = 0; j < D_IN; j++) {
            float v = moe_rng_normal(seed, stream, (uint64_t)i * D_IN + (uint64_t)j);
            x[i * D_IN + j] = v;
            a += w1[j] * v;
            b += w2[j] * v;
        }
        s0 = a; s1 = b;
        for (j = 0; j < N_SINES; j++) { s0 += sin(alpha[j] * a + beta[j]); s1 += sin(alpha[j] * b + beta[j]); }
        y0[i] = (float)(s0 + 0.1 * moe_rng_normal(seed, stream + 1, (uint64_t)i));
        y1[i] = (float)(s1 + 0.1 * moe_rng_normal(seed, stream + 2, (uint64_t)i));
    }
}

/* The three models; each ends in [T, 2]: task 0's prediction, then task 1's. */
static int model_layers(const char *name, moe_layer_desc *l) {
    memset(l, 0, sizeof(moe_layer_desc) * 4);
    if (strcmp(name, "shared_bottom") == 0) {
        /* a shared bottom as deep as an expert (100 -> 128 relu -> 32), then a tower per task on it */
        l[0] = (moe_layer_desc){.kind = MOE_LAYER_DENSE, .d_out = 128, .activation = MOE_ACT_RELU};
        l[1] = (moe_layer_desc){.kind = MOE_LAYER_DENSE, .d_out = 32};
        l[2] = (moe_layer_desc){.kind = MOE_LAYER_TASK_TOWERS, .n_tasks = 2, .task_input = MOE_TASK_INPUT_SINGLE, .d_hidden = 8, .d_out = 2};
        return 3;
    }
    if (strcmp(name, "mmoe") == 0) {
        /* 8 shared experts (100 -> 16 relu -> 16), a softmax gate per task, towers on the task slices */
        l[0] = (moe_layer_desc){.kind = MOE_LAYER_MULTIGATE, .n_tasks = 2, .n_experts = 8, .d_hidden = 16, .d_out = 2 * 16};
        l[1] = (moe_layer_desc){.kind = MOE_LAYER_TASK_TOWERS, .n_tasks = 2, .d_hidden = 8, .d_out = 2};
        return 2;
    }
    /* PLE: two levels of 2 experts per task + 4 shared; the first level's shared gate feeds the second */
    l[0] = (moe_layer_desc){.kind = MOE_LAYER_MULTIGATE, .n_tasks = 2, .n_experts = 4, .n_task_experts = 2, .shared_output = 1,
                            .d_hidden = 16, .d_out = 3 * 16};
    l[1] = (moe_layer_desc){.kind = MOE_LAYER_MULTIGATE, .n_tasks = 2, .n_experts = 4, .n_task_experts = 2,
                            .task_input = MOE_TASK_INPUT_TASKS_SHARED, .d_hidden = 16, .d_out = 2 * 16};
    l[2] = (moe_layer_desc){.kind = MOE_LAYER_TASK_TOWERS, .n_tasks = 2, .d_hidden = 8, .d_out = 2};
    return 3;
}

static int train_and_test(moe_ctx *ctx, const char *name, const run_options *o, double corr, const float *x, const float *y0,
                          const float *y1, const float *tx, const float *ty0, const float *ty1) {
    moe_layer_desc layers[4];
    moe_model_desc desc;
    moe_model *m = NULL;
    int n_batches = o->n_train / BATCH, epoch, b, i;
    float *yb = (float *)malloc(sizeof(float) * BATCH * 2), *out = (float *)malloc(sizeof(float) * N_TEST * 2);
    double t0 = now_s(), mse[2] = {0, 0};
    memset(&desc, 0, sizeof desc);
    desc.d_in = D_IN;
    desc.n_layers = model_layers(name, layers);
    desc.layers = layers;
    desc.max_tokens = N_TEST;
    desc.loss = MOE_LOSS_MSE;
    desc.n_tasks = 2;       /* two 1-wide slices, each its own MSE, weights 1 */
    desc.optimizer = (moe_optimizer_desc){.kind = MOE_OPTIMIZER_ADAM, .lr = 2e-3f, .total_steps = (int64_t)o->epochs * n_batches,
                                          .min_lr = 2e-4f};
    if (!yb || !out || moe_model_create(ctx, &desc, &m) != MOE_OK) {
        fprintf(stderr, "%s: %s\n", name, moe_ctx_error(ctx));
        free(yb); free(out);
        return 1;
    }
    for (epoch = 0; epoch < o->epochs; epoch++) {
        for (b = 0; b < n_batches; b++) {
            moe_target tasks[2], target;
            memset(tasks, 0, sizeof tasks);
            memset(&target, 0, sizeof target);
            tasks[0].values = y0 + (int64_t)b * BATCH;
            tasks[1].values = y1 + (int64_t)b * BATCH;
            target.tasks = tasks;
            if (moe_model_train_step(m, x + (int64_t)b * BATCH * D_IN, &target, BATCH, NULL) != MOE_OK) {
                fprintf(stderr, "%s: %s\n", name, moe_ctx_error(ctx));
                moe_model_destroy(m);
                free(yb); free(out);
                return 1;
            }
        }
    }
    if (moe_model_forward(m, tx, N_TEST, out, NULL) != MOE_OK) {
        fprintf(stderr, "%s: %s\n", name, moe_ctx_error(ctx));
        moe_model_destroy(m);
        free(yb); free(out);
        return 1;
    }
    for (i = 0; i < N_TEST; i++) {
        mse[0] += ((double)out[2 * i] - ty0[i]) * ((double)out[2 * i] - ty0[i]);
        mse[1] += ((double)out[2 * i + 1] - ty1[i]) * ((double)out[2 * i + 1] - ty1[i]);
    }
    printf("corr=%.2f model=%s task0_mse=%.4f task1_mse=%.4f params=%lld seconds=%.1f\n", corr, name, mse[0] / N_TEST, mse[1] / N_TEST,
           (long long)moe_model_parameter_count(m), now_s() - t0);
    fflush(stdout);
    moe_model_destroy(m);
    free(yb);
    free(out);
    return 0;
}

static int parse(int argc, char **argv, run_options *o) {
    int i;
    o->corr[0] = 0.5; o->corr[1] = 0.9; o->n_corr = 2;
    o->epochs = 12; o->n_train = 8192; o->n_threads = 1; o->seed = 1;
    for (i = 1; i < argc; i += 2) {      /* every option takes a value */
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) return 0;
        if (strcmp(argv[i], "--corr") == 0) {
            char *end = NULL;
            const char *s = v;
            o->n_corr = 0;
            while (*s && o->n_corr < 8) {
                double c = strtod(s, &end);
                if (end == s || !(c >= 0.0 && c <= 1.0)) return 0;
                o->corr[o->n_corr++] = c;
                s = *end == ',' ? end + 1 : end;
                if (*end && *end != ',') return 0;
            }
        } else if (strcmp(argv[i], "--epochs") == 0) {
            o->epochs = atoi(v);
        } else if (strcmp(argv[i], "--train") == 0) {
            o->n_train = atoi(v);
        } else if (strcmp(argv[i], "--threads") == 0) {
            o->n_threads = atoi(v);
        } else if (strcmp(argv[i], "--seed") == 0) {
            o->seed = (uint64_t)strtoull(v, NULL, 10);
        } else {
            return 0;
        }
    }
    return o->n_corr > 0 && o->epochs > 0 && o->n_train >= BATCH && o->n_train <= 1000000 && o->n_threads >= 0;
}

int main(int argc, char **argv) {
    static const char *const models[] = {"shared_bottom", "mmoe", "ple"};
    run_options o;
    moe_ctx ctx;
    float *x, *y0, *y1, *tx, *ty0, *ty1;
    int c, k, rc = 0;
    if (!parse(argc, argv, &o)) {
        fprintf(stderr, "usage: mmoe [--corr 0.5,0.9] [--epochs N] [--train N] [--seed S] [--threads N]\n");
        return 2;
    }
    x = (float *)malloc(sizeof(float) * (size_t)o.n_train * D_IN);
    y0 = (float *)malloc(sizeof(float) * (size_t)o.n_train);
    y1 = (float *)malloc(sizeof(float) * (size_t)o.n_train);
    tx = (float *)malloc(sizeof(float) * N_TEST * D_IN);
    ty0 = (float *)malloc(sizeof(float) * N_TEST);
    ty1 = (float *)malloc(sizeof(float) * N_TEST);
    if (!x || !y0 || !y1 || !tx || !ty0 || !ty1) { fprintf(stderr, "out of memory\n"); return 1; }
    printf("MMoE synthetic data (Ma et al. 2018): d=%d, m=%d sinusoids, %d train / %d test rows, %d epochs, batch %d\n", D_IN, N_SINES,
           o.n_train, N_TEST, o.epochs, BATCH);
    for (c = 0; c < o.n_corr && rc == 0; c++) {
        double corr = o.corr[c], m0 = 0, m1 = 0, s00 = 0, s11 = 0, s01 = 0;
        int i;
        make_rows(o.seed, corr, 10, o.n_train, x, y0, y1);
        make_rows(o.seed, corr, 20, N_TEST, tx, ty0, ty1);
        for (i = 0; i < o.n_train; i++) { m0 += y0[i]; m1 += y1[i]; }
        m0 /= o.n_train; m1 /= o.n_train;
        for (i = 0; i < o.n_train; i++) {
            s00 += (y0[i] - m0) * (y0[i] - m0); s11 += (y1[i] - m1) * (y1[i] - m1); s01 += (y0[i] - m0) * (y1[i] - m1);
        }
        printf("corr=%.2f label_pearson=%.3f label_var=%.3f,%.3f\n", corr, s01 / sqrt(s00 * s11), s00 / o.n_train, s11 / o.n_train);
        for (k = 0; k < 3 && rc == 0; k++) {
            /* the same initialisation seed per model at every correlation */
            moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = o.seed, .n_threads = o.n_threads});
            rc = train_and_test(&ctx, models[k], &o, corr, x, y0, y1, tx, ty0, ty1);
        }
    }
    free(x); free(y0); free(y1); free(tx); free(ty0); free(ty1);
    return rc;
}
