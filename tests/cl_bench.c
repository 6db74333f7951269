/* cl_bench.c - time moe_cl.h on one MoE layer of SwiGLU experts (the README's OpenCL numbers).

   cc -O2 tests/cl_bench.c -o build/cl_bench -lm -ldl
   build/cl_bench T d h E k [reps]       e.g. 512 256 512 8 2 (edge), 2048 1024 2816 8 2 (mixtral-small)

   Prints the best wall time of a forward, of the grouped expert GEMMs alone (the forward's
   three expert products over the routing of the last forward) and of a training step, with
   GFLOP/s counted as T*k*6*d*h per forward and 3x that per step; "per cpu-second" divides by
   the process's CPU time instead, which says more on a machine that other jobs share (the
   OpenCL CPU driver's threads are this process's). MOE_CL_DEVICE and the other variables of
   moe_cl.h apply; CL_BENCH_NO_TRAIN=1 skips the training step; CL_BENCH_F16=1 times the
   forwards with fp16 expert weights (moe_cl_model_quantize; no training step then). */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#define MOE_CL_IMPLEMENTATION
#include "../moe_cl.h"
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>

static double wall(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static double cpu(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return (double)(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + 1e-6 * (double)(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

enum { FORWARD, EXPERTS, TRAIN };

/* One timed run of what; returns MOE_OK or the failure. */
static moe_result run(int what, moe_cl_ctx *cl, moe_cl_model *dm, const float *x, const moe_target *target, int64_t T) {
    moe_step_info info;
    moe_result r;
    if (what == FORWARD) r = moe_cl_model_forward(dm, x, T, NULL, NULL);
    else if (what == EXPERTS) r = moe__cl_bank_forward(dm, &dm->layers[0], 0, dm->x, T);
    else r = moe_cl_model_train_step(dm, x, target, T, &info);
    return r != MOE_OK ? r : moe_cl_finish(cl);
}

int main(int argc, char **argv) {
    static const char *const names[3] = { "forward", "grouped expert GEMMs", "train step" };
    moe_ctx ctx;
    moe_cl_ctx *cl = NULL;
    moe_cl_model *dm = NULL;
    moe_model *model = NULL;
    moe_layer_desc layer;
    moe_model_desc desc;
    moe_target target;
    int64_t T, d, h, i, n;
    int E, k, reps, what, rep;
    float *x, *values, *p;
    double flops;
    if (argc < 6) {
        fprintf(stderr, "usage: cl_bench T d h E k [reps]\n");
        return 2;
    }
    T = atol(argv[1]); d = atol(argv[2]); h = atol(argv[3]); E = atoi(argv[4]); k = atoi(argv[5]);
    reps = argc > 6 ? atoi(argv[6]) : 5;
    moe_ctx_init(&ctx, NULL);
    if (moe_cl_ctx_init(&ctx, NULL, &cl) != MOE_OK) {
        fprintf(stderr, "cl_bench: %s\n", moe_ctx_error(&ctx));
        return 1;
    }
    if (moe_cl_ctx_fallback(cl)) {
        fprintf(stderr, "cl_bench: no OpenCL device: %s\n", moe_cl_ctx_reason(cl));
        return 1;
    }
    memset(&layer, 0, sizeof layer);
    memset(&desc, 0, sizeof desc);
    layer.kind = MOE_LAYER_MOE; layer.n_experts = E; layer.top_k = k; layer.expert = MOE_EXPERT_SWIGLU; layer.d_hidden = h;
    desc.d_in = d; desc.n_layers = 1; desc.layers = &layer; desc.loss = MOE_LOSS_MSE; desc.max_tokens = T;
    if (moe_model_create(&ctx, &desc, &model) != MOE_OK) {
        fprintf(stderr, "cl_bench: %s\n", moe_ctx_error(&ctx));
        return 1;
    }
    p = moe_model_params(model, &n);
    for (i = 0; i < n; i++) p[i] += 0.1f * (moe_rng_uniform(1, 1, (uint64_t)i) - 0.5f);  /* a router that is not all ties */
    x = (float *)malloc(sizeof(float) * (size_t)(T * d));
    values = (float *)calloc((size_t)(T * d), sizeof(float));
    if (!x || !values) return 1;
    for (i = 0; i < T * d; i++) x[i] = moe_rng_uniform(2, 2, (uint64_t)i) - 0.5f;
    target.labels = NULL; target.values = values;
    if (moe_cl_model_upload(cl, model, &dm) != MOE_OK) {
        fprintf(stderr, "cl_bench: %s\n", moe_ctx_error(&ctx));
        return 1;
    }
    if (getenv("CL_BENCH_F16") && moe_cl_model_quantize(dm, MOE_DTYPE_F16) != MOE_OK) {
        fprintf(stderr, "cl_bench: %s\n", moe_ctx_error(&ctx));
        return 1;
    }
    printf("device: %s, tiles %s; T=%lld d=%lld h=%lld E=%d k=%d SwiGLU, %s expert weights\n", moe_cl_device_name(cl), moe_cl_tiles(cl),
           (long long)T, (long long)d, (long long)h, E, k, getenv("CL_BENCH_F16") ? "fp16" : "fp32");
    flops = (double)T * (double)k * 6.0 * (double)d * (double)h;
    for (what = FORWARD; what <= TRAIN; what++) {
        double best = 1e30, c0, f = what == TRAIN ? 3.0 * flops : flops;
        if (what == TRAIN && (getenv("CL_BENCH_NO_TRAIN") || getenv("CL_BENCH_F16"))) break;
        if (run(what, cl, dm, x, &target, T) != MOE_OK) {  /* warm-up */
            fprintf(stderr, "cl_bench: %s\n", moe_ctx_error(&ctx));
            return 1;
        }
        c0 = cpu();
        for (rep = 0; rep < reps; rep++) {
            double t0 = wall();
            run(what, cl, dm, x, &target, T);
            if (wall() - t0 < best) best = wall() - t0;
        }
        printf("%-21s %9.2f ms  %6.1f GFLOP/s   %6.1f GFLOP/s per cpu-second\n", names[what], best * 1e3, f / best * 1e-9,
               f / ((cpu() - c0) / reps) * 1e-9);
    }
    moe_cl_model_destroy(dm);
    moe_model_destroy(model);
    moe_cl_ctx_destroy(cl);
    free(x);
    free(values);
    return 0;
}
