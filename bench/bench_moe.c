/* bench_moe - speed of one MoE layer (SwiGLU experts) of moe.h on the standard shapes.

     build/bench_moe [--shape NAME|all] [--mode fwd|train|all] [--threads N] [--backend cpu|cl]
                     [--dtype f32|bf16|q8|f32p|all] [--runs N] [--check]

   Prints one line of space-separated key=value pairs per measurement, after three lines that
   describe the machine (model, measured fp32 FMA peak, measured memory read bandwidth).
   bench/README.md explains every key and how peak and bandwidth are measured.
   Exit status: 0 ok, 1 a library error or a failed --check, 2 a malformed command line.

   Build: make build/bench_moe   (cc -std=c99 -O2 -fopenmp bench/bench_moe.c -o build/bench_moe -lm)
   No -march flags: moe.h and the peak loop below choose their instructions at run time. */
#define _POSIX_C_SOURCE 200809L   /* clock_gettime, sysconf */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#ifdef MOE_BENCH_CL
#define MOE_CL_IMPLEMENTATION
#include "../moe_cl.h"
#endif

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define BENCH_X86 1
#endif

#define EXIT_USAGE 2
#define SEED 20240601u
#define CHECK_TOKENS 64           /* --check compares the first min(T, 64) tokens */
#define FEW_TOKENS 8              /* at most this many tokens: moe.h's decode path, weights read from memory */

/* ---- shapes ---------------------------------------------------------------------------------- */
typedef struct bench_shape {
    const char *name;
    int64_t tokens, d, hidden;    /* T, d, h */
    int experts, top_k;           /* E, k */
} bench_shape;

static const bench_shape SHAPES[] = {
    { "edge",          512,  256,  512,  8, 2 },
    { "mixtral-small", 2048, 1024, 2816, 8, 2 },
    { "fine",          2048, 512,  256,  64, 8 },
    { "decode",        1,    1024, 2816, 8, 2 },
};
#define N_SHAPES ((int)(sizeof SHAPES / sizeof SHAPES[0]))

/* Weight types of the expert matrices: bytes per weight (q8: int8 plus one f32 scale per 32). */
typedef struct bench_dtype {
    const char *name;
    moe_dtype dtype;
    double bytes;
    double tolerance;             /* --check: max |a - b| / (max |b| + 1e-6) against the f32 reference */
    int packed;                   /* f32p: f32 weights packed once for inference (moe_layer_pack) */
} bench_dtype;

static const bench_dtype DTYPES[] = {
    { "f32",  MOE_DTYPE_F32,  4.0,   1e-4, 0 },
    { "bf16", MOE_DTYPE_BF16, 2.0,   2e-2, 0 },
    { "q8",   MOE_DTYPE_I8,   1.125, 5e-2, 0 },
    { "f32p", MOE_DTYPE_F32,  4.0,   1e-4, 1 },
};
#define N_DTYPES ((int)(sizeof DTYPES / sizeof DTYPES[0]))

static double flops_of(const bench_shape *s, int train) {
    return (double)s->tokens * s->top_k * 6.0 * (double)s->d * (double)s->hidden * (train ? 3.0 : 1.0);
}

/* Bytes a decode step must read: the router and the three matrices of each expert it uses. */
static double decode_bytes(const bench_shape *s, const bench_dtype *t, int experts_used) {
    return (double)s->experts * s->d * 4.0 + (double)experts_used * 3.0 * s->d * s->hidden * t->bytes;
}

/* ---- time ------------------------------------------------------------------------------------ */
static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, compare_doubles);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* ---- machine: model, ISA, fp32 FMA peak, memory read bandwidth ------------------------------- */
/* The FMA loops keep every accumulator in a register: acc = acc * m + c with m just below 1,
   so values settle without overflow or denormals. The accumulators are independent, enough of
   them to cover FMA latency x issue width on current cores (4-5 cycles x 2 pipes). */
#define REP12(X, P) X(0, P) X(1, P) X(2, P) X(3, P) X(4, P) X(5, P) X(6, P) X(7, P) X(8, P) X(9, P) X(10, P) X(11, P)
#define REP16(X, P) REP12(X, P) X(12, P) X(13, P) X(14, P) X(15, P)
#define ACC_DECLARE(j, P) acc##j,
#define ACC_INIT(j, P) acc##j = P##_set1_ps(1.0f + 0.01f * (float)(j));
#define ACC_STEP(j, P) acc##j = P##_fmadd_ps(acc##j, m, c);
#define ACC_SUM(j, P) sum = P##_add_ps(sum, acc##j);
/* volatile: the compiler must not fold the loop (1.0 * m + c rounds to 1.0, a fixed point) */
static volatile float g_fma_m = 0.9999999f, g_fma_c = 1e-7f;
/* The body of each loop, with the operations of prefix P (_mm512, _mm256, plain). */
#define FMA_LOOP(V, P, REP)                                               \
    const V m = P##_set1_ps(g_fma_m), c = P##_set1_ps(g_fma_c);           \
    V REP(ACC_DECLARE, P) sum = P##_set1_ps(0.0f);                        \
    int64_t i;                                                            \
    REP(ACC_INIT, P)                                                      \
    for (i = 0; i < iters; i++) { REP(ACC_STEP, P) }                      \
    REP(ACC_SUM, P)

/* Streaming read: four independent sums of 64-bit integers in registers of W bits;
   n (in uint64) a multiple of 4 * LANES. */
#define READ_LOOP(V, P, W, LANES)                                                       \
    V s0 = P##_setzero_si##W(), s1 = s0, s2 = s0, s3 = s0;                              \
    size_t i;                                                                           \
    for (i = 0; i + 4 * (LANES) <= n; i += 4 * (LANES)) {                               \
        s0 = P##_add_epi64(s0, P##_loadu_si##W((const void *)(p + i)));                 \
        s1 = P##_add_epi64(s1, P##_loadu_si##W((const void *)(p + i + (LANES))));       \
        s2 = P##_add_epi64(s2, P##_loadu_si##W((const void *)(p + i + 2 * (LANES))));   \
        s3 = P##_add_epi64(s3, P##_loadu_si##W((const void *)(p + i + 3 * (LANES))));   \
    }                                                                                   \
    s0 = P##_add_epi64(P##_add_epi64(s0, s1), P##_add_epi64(s2, s3));

typedef float (*fma_loop_fn)(int64_t iters);
typedef uint64_t (*read_loop_fn)(const uint64_t *p, size_t n);

#ifdef BENCH_X86
__attribute__((target("avx512f")))
static float fma_loop_avx512(int64_t iters) {
    FMA_LOOP(__m512, _mm512, REP16)
    return _mm512_reduce_add_ps(sum);
}

__attribute__((target("avx512f")))
static uint64_t read_loop_avx512(const uint64_t *p, size_t n) {
    READ_LOOP(__m512i, _mm512, 512, 8)
    return (uint64_t)_mm512_reduce_add_epi64(s0);
}

__attribute__((target("avx2,fma")))
static float fma_loop_avx2(int64_t iters) {
    float out[8];
    FMA_LOOP(__m256, _mm256, REP12)
    _mm256_storeu_ps(out, sum);
    return out[0] + out[7];
}

__attribute__((target("avx2")))
static uint64_t read_loop_avx2(const uint64_t *p, size_t n) {
    READ_LOOP(__m256i, _mm256, 256, 4)
    return (uint64_t)_mm256_extract_epi64(s0, 0) + (uint64_t)_mm256_extract_epi64(s0, 3);
}
#endif

/* Plain C: what a CPU without the vector paths (or another compiler) reaches. */
#define plain_set1_ps(v) (v)
#define plain_fmadd_ps(a, b, c) ((a) * (b) + (c))
#define plain_add_ps(a, b) ((a) + (b))
#define plain_setzero_si64() 0
#define plain_add_epi64(a, b) ((a) + (b))
#define plain_loadu_si64(q) (*(const uint64_t *)(q))
static float fma_loop_generic(int64_t iters) {
    FMA_LOOP(float, plain, REP16)
    return sum;
}

static uint64_t read_loop_generic(const uint64_t *p, size_t n) {
    READ_LOOP(uint64_t, plain, 64, 1)
    return s0;
}

typedef struct isa_info {
    const char *name;             /* printed as isa= */
    fma_loop_fn loop;
    double flops_per_iter;        /* accumulators x lanes x 2 */
    read_loop_fn read;
    read_loop_fn read2;           /* a second read loop (AVX2 on an AVX-512 CPU) or NULL */
} isa_info;

static isa_info detect_isa(void) {
    isa_info isa = { "generic", fma_loop_generic, 16 * 2.0, read_loop_generic, NULL };
#ifdef BENCH_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        isa.name = "avx512f"; isa.loop = fma_loop_avx512; isa.flops_per_iter = 16 * 16 * 2.0;
        isa.read = read_loop_avx512; isa.read2 = read_loop_avx2;
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        isa.name = "avx2+fma"; isa.loop = fma_loop_avx2; isa.flops_per_iter = 12 * 8 * 2.0;
        isa.read = read_loop_avx2;
    }
#endif
    return isa;
}

static volatile float g_sink;     /* keeps the measured loops from being optimised away */

/* Runs the loop on n_threads threads at once; returns the wall time in ms. */
static double fma_run_ms(const isa_info *isa, int64_t iters, int n_threads) {
    double t0 = now_ms();
#ifdef _OPENMP
#pragma omp parallel num_threads(n_threads)
    { float r = isa->loop(iters); if (r == 12345.0f) g_sink = r; }
#else
    (void)n_threads;
    g_sink = isa->loop(iters);
#endif
    return now_ms() - t0;
}

/* GFLOP/s of n_threads threads running the FMA loop: median of 7 runs of ~30 ms each. */
static double measure_peak(const isa_info *isa, int n_threads) {
    double t[7];
    int64_t iters = 1 << 16;
    int r;
    while (fma_run_ms(isa, iters, n_threads) < 3.0 && iters < ((int64_t)1 << 40)) iters *= 2;
    iters *= 10;                  /* ~30 ms; also the warm-up that wakes the cores to full clock */
    fma_run_ms(isa, iters, n_threads);
    for (r = 0; r < 7; r++) t[r] = fma_run_ms(isa, iters, n_threads);
    return (double)n_threads * (double)iters * isa->flops_per_iter / (median(t, 7) * 1e6);
}

/* GB/s of n_threads threads each reading its part of a 512 MiB buffer: best of 10 passes (with
   two read loops, 10 passes of each taken in turn: whichever streams faster on this CPU). */
static double measure_memory_read(const isa_info *isa, int n_threads) {
    const size_t bytes = (size_t)512 << 20, n = bytes / sizeof(uint64_t);
    uint64_t *buf = (uint64_t *)malloc(bytes);
    double best = 0.0;
    int pass, loops = isa->read2 ? 2 : 1;
    if (!buf) return 0.0;
    memset(buf, 1, bytes);        /* fault every page in before timing */
    for (pass = 0; pass < 11 * loops; pass++) {
        read_loop_fn reader = pass % 2 ? isa->read2 : isa->read;
        uint64_t total = 0;
        double t0 = now_ms(), ms;
#ifdef _OPENMP
        int part;
#pragma omp parallel for num_threads(n_threads) reduction(+ : total) schedule(static)
        for (part = 0; part < n_threads; part++) {
            size_t lo = n / (size_t)n_threads * (size_t)part;
            size_t hi = part == n_threads - 1 ? n : lo + n / (size_t)n_threads;
            total += reader(buf + lo, hi - lo);
        }
#else
        (void)n_threads;
        total = reader(buf, n);
#endif
        ms = now_ms() - t0;
        if (total == 12345u) g_sink = (float)total;
        if (pass >= loops && (double)bytes / (ms * 1e6) > best) best = (double)bytes / (ms * 1e6);
    }
    free(buf);
    return best;
}

/* "AMD EPYC 9R14" -> "AMD_EPYC_9R14", so every value is one word */
static void cpu_model(char *out, size_t cap) {
    char line[256];
    FILE *f = fopen("/proc/cpuinfo", "r");
    snprintf(out, cap, "unknown");
    if (!f) return;
    while (fgets(line, sizeof line, f)) {
        char *v = strchr(line, ':'), *p;
        if (strncmp(line, "model name", 10) != 0 || !v) continue;
        for (v++; *v == ' ' || *v == '\t'; v++) {}
        v[strcspn(v, "\n")] = 0;
        for (p = v; *p; p++) if (*p == ' ' || *p == '\t' || *p == '=') *p = '_';
        if (*v) snprintf(out, cap, "%s", v);
        break;
    }
    fclose(f);
}

/* ---- command line ---------------------------------------------------------------------------- */
typedef struct options {
    int shape;                    /* index into SHAPES, -1: all */
    int fwd, train;               /* modes to run */
    int mode_all;                 /* --mode all (default): decode runs fwd only */
    int n_threads;
    int backend;                  /* index into BACKENDS */
    int dtype;                    /* index into DTYPES; -1: default set; -2: all */
    int runs;
    int check;
    moe_kernels kernels;          /* --kernels */
    int tokens;                   /* --tokens: T of every shape run; 0: the shape's own */
} options;

static void usage(FILE *f) {
    fprintf(f,
        "usage: bench_moe [--shape edge|mixtral-small|fine|decode|all] [--mode fwd|train|all]\n"
        "                 [--threads N] [--backend cpu|cl] [--dtype f32|bf16|q8|f32p|all] [--runs N] [--check]\n"
        "                 [--kernels default|avx2|portable] [--tokens N]\n"
        "  --shape    default all\n"
        "  --mode     default all: fwd and train (decode: fwd only)\n"
        "  --threads  default: OpenMP's maximum (1 without OpenMP)\n"
        "  --dtype    expert weight type; default f32, plus bf16 and q8 for decode fwd and f32p (f32 packed\n"
        "             once, moe_layer_pack) for batched fwd; all: every one\n"
        "  --runs     timed runs after one warm-up, median reported (default 5)\n"
        "  --check    compare with the reference kernels on the first min(T, 64) tokens\n"
        "  --kernels  the CPU kernels: default (the fastest this CPU runs), avx2 (AVX2+FMA even where\n"
        "             AVX-512 is there) or portable (plain C); the machine line's kernels= names them\n"
        "  --tokens   run the shapes with N tokens instead of their own T (lines gain tokens=N); at most\n"
        "             8 tokens is a decode step (weights read from memory, gbps from the experts used)\n");
}

/* ---- backends -------------------------------------------------------------------------------- */
/* One measurement's state. The CPU layer always exists: it owns the weights (and is what an
   accelerator backend would upload); x, y, dy, dx are host buffers [T, d]. */
typedef struct bench_run {
    const bench_shape *shape;
    moe_ctx ctx;
    moe_layer *layer;
    float *x, *y, *dy, *dx;
    void *backend_state;
} bench_run;

/* A backend runs forward and training steps on the first n tokens of x; y, dx and the layer's
   gradients hold the results afterwards (copied back to the host by non-CPU backends). */
typedef struct bench_backend {
    const char *name;
    const char *missing;          /* non-NULL: not built in, and why */
    moe_result (*prepare)(bench_run *run, const bench_dtype *t);   /* after the weights are set */
    moe_result (*forward)(bench_run *run, int64_t n);
    moe_result (*train)(bench_run *run, int64_t n);
    void (*release)(bench_run *run);
} bench_backend;

static moe_result cpu_prepare(bench_run *run, const bench_dtype *t) {
    moe_result r = moe_layer_quantize(run->layer, t->dtype);
    return r == MOE_OK && t->packed ? moe_layer_pack(run->layer, 1) : r;
}

static moe_result cpu_forward(bench_run *run, int64_t n) {
    return moe_layer_forward(run->layer, run->x, n, run->y, NULL);
}

static moe_result cpu_train(bench_run *run, int64_t n) {
    moe_forward_opts opts;
    memset(&opts, 0, sizeof opts);
    opts.training = 1;
    moe_result r = moe_layer_forward(run->layer, run->x, n, run->y, &opts);
    return r != MOE_OK ? r : moe_layer_backward(run->layer, run->dy, run->dx, 0);
}

static void cpu_release(bench_run *run) { (void)moe_layer_quantize(run->layer, MOE_DTYPE_F32); }

#ifdef MOE_BENCH_CL
/* The layer uploaded to the OpenCL device moe_cl.h picks (MOE_CL_DEVICE chooses another);
   every step ends with moe_cl_finish so the time covers the device's work. */
typedef struct cl_state {
    moe_cl_ctx *cl;
    moe_cl_model *dm;
} cl_state;

static moe_result cl_prepare(bench_run *run, const bench_dtype *t) {
    cl_state *st = (cl_state *)calloc(1, sizeof *st);
    moe_result r;
    if (!st) return moe__fail(&run->ctx, MOE_ERR_OUT_OF_MEMORY, "cl state");
    run->backend_state = st;
    if (t->dtype != MOE_DTYPE_F32 || t->packed) return moe__fail(&run->ctx, MOE_ERR_UNSUPPORTED, "the OpenCL backend keeps plain f32 weights");
    if ((r = moe_cl_ctx_init(&run->ctx, NULL, &st->cl)) != MOE_OK) return r;
    if (moe_cl_ctx_fallback(st->cl)) return moe__fail(&run->ctx, MOE_ERR_UNSUPPORTED, "no OpenCL device: %s", moe_cl_ctx_reason(st->cl));
    return moe_cl_layer_upload(st->cl, run->layer, &st->dm);
}

static moe_result cl_forward(bench_run *run, int64_t n) {
    cl_state *st = (cl_state *)run->backend_state;
    moe_result r = moe_cl_model_forward(st->dm, run->x, n, run->y, NULL);
    return r != MOE_OK ? r : moe_cl_finish(st->cl);
}

static moe_result cl_train(bench_run *run, int64_t n) {
    cl_state *st = (cl_state *)run->backend_state;
    moe_forward_opts opts;
    moe_result r;
    memset(&opts, 0, sizeof opts);
    opts.training = 1;
    r = moe_cl_model_forward(st->dm, run->x, n, run->y, &opts);
    if (r == MOE_OK) r = moe_cl_model_backward(st->dm, run->dy, run->dx, 0);
    return r != MOE_OK ? r : moe_cl_finish(st->cl);
}

static void cl_release(bench_run *run) {
    cl_state *st = (cl_state *)run->backend_state;
    if (!st) return;
    moe_cl_model_destroy(st->dm);
    moe_cl_ctx_destroy(st->cl);
    free(st);
    run->backend_state = NULL;
}
#endif

static const bench_backend BACKENDS[] = {
    { "cpu", NULL, cpu_prepare, cpu_forward, cpu_train, cpu_release },
#ifdef MOE_BENCH_CL
    /* moe_cl.h: cl_prepare uploads the layer's weights, cl_forward / cl_train run there and
       read y, dx and the gradients back. */
    { "cl", NULL, cl_prepare, cl_forward, cl_train, cl_release },
#else
    { "cl", "moe_cl.h not built in", NULL, NULL, NULL, NULL },
#endif
};
#define N_BACKENDS ((int)(sizeof BACKENDS / sizeof BACKENDS[0]))

/* ---- layer setup ----------------------------------------------------------------------------- */
static int fail(const moe_ctx *ctx, const char *what) {
    fprintf(stderr, "bench_moe: %s: %s\n", what, moe_ctx_error(ctx));
    return 1;
}

static void fill_uniform(float *v, int64_t n, uint64_t stream, float bound) {
    int64_t i;
    for (i = 0; i < n; i++) v[i] = bound * (2.0f * moe_rng_uniform(SEED, stream, (uint64_t)i) - 1.0f);
}

static moe_tensor find_tensor(moe_layer *layer, const char *name) {
    moe_tensor t;
    int i;
    memset(&t, 0, sizeof t);
    for (i = 0; i < moe_layer_tensor_count(layer); i++)
        if (moe_layer_tensor(layer, i, &t) == MOE_OK && strcmp(t.name, name) == 0) return t;
    memset(&t, 0, sizeof t);
    return t;
}

static moe_result create_layer(moe_ctx *ctx, const bench_shape *s, int64_t max_tokens, moe_layer **out) {
    moe_layer_desc desc;
    memset(&desc, 0, sizeof desc);
    desc.kind = MOE_LAYER_MOE;
    desc.d_in = s->d;
    desc.d_out = s->d;
    desc.n_experts = s->experts;
    desc.top_k = s->top_k;
    desc.expert = MOE_EXPERT_SWIGLU;
    desc.d_hidden = s->hidden;
    return moe_layer_create(ctx, &desc, max_tokens, out);
}

static moe_result context(moe_ctx *ctx, int n_threads, moe_kernels kernels) {
    moe_ctx_desc desc;
    memset(&desc, 0, sizeof desc);
    desc.n_threads = n_threads;
    desc.seed = SEED;
    desc.kernels = kernels;
    return moe_ctx_init(ctx, &desc);
}

/* The layer of a shape with its weights (router U(-0.1, 0.1): the library starts it at zero,
   which would send every token to the same experts) and its inputs. */
static int run_create(bench_run *run, const bench_shape *s, int n_threads, moe_kernels kernels) {
    size_t bytes = (size_t)s->tokens * (size_t)s->d * sizeof(float);
    moe_tensor router;
    memset(run, 0, sizeof *run);
    run->shape = s;
    if (context(&run->ctx, n_threads, kernels) != MOE_OK) return fail(&run->ctx, "context");
    if (create_layer(&run->ctx, s, s->tokens, &run->layer) != MOE_OK) return fail(&run->ctx, s->name);
    router = find_tensor(run->layer, "router.weight");
    if (!router.data) { fprintf(stderr, "bench_moe: layer has no router.weight\n"); return 1; }
    fill_uniform(router.data, router.size, 3, 0.1f);
    run->x = (float *)malloc(bytes);
    run->y = (float *)malloc(bytes);
    run->dy = (float *)malloc(bytes);
    run->dx = (float *)malloc(bytes);
    if (!run->x || !run->y || !run->dy || !run->dx) { fprintf(stderr, "bench_moe: out of memory\n"); return 1; }
    fill_uniform(run->x, s->tokens * s->d, 1, 1.0f);
    fill_uniform(run->dy, s->tokens * s->d, 2, 1.0f);
    return 0;
}

static void run_destroy(bench_run *run) {
    moe_layer_destroy(run->layer);
    free(run->x); free(run->y); free(run->dy); free(run->dx);
    memset(run, 0, sizeof *run);
}

/* ---- --check --------------------------------------------------------------------------------- */
/* max |a - b| / (max |b| + 1e-6) over n values */
static double max_relative(const float *a, const float *b, int64_t n) {
    double diff = 0.0, scale = 0.0;
    int64_t i;
    for (i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= diff)) diff = d;           /* NaN in a propagates */
        if (fabs((double)b[i]) > scale) scale = fabs((double)b[i]);
    }
    return diff / (scale + 1e-6);
}

typedef struct check_result {
    double max_rel;
    char worst[80];               /* what max_rel was found in: "y", "dx", a gradient's name */
} check_result;

static void check_note(check_result *c, const char *what, double rel) {
    if (!(rel <= c->max_rel)) { c->max_rel = rel; snprintf(c->worst, sizeof c->worst, "%s", what); }
}

/* Runs the measured backend and the reference kernels (same weights, f32) on the first
   min(T, 64) tokens and compares y, and for training dx and every gradient. */
static int check_against_reference(bench_run *run, const bench_backend *b, int train, check_result *c) {
    const bench_shape *s = run->shape;
    int64_t n = s->tokens < CHECK_TOKENS ? s->tokens : CHECK_TOKENS, n_params, n_ref;
    size_t bytes = (size_t)n * (size_t)s->d * sizeof(float);
    moe_ctx ctx;
    moe_layer *ref = NULL;
    float *y = (float *)malloc(bytes), *dx = (float *)malloc(bytes);
    float *params = moe_layer_params(run->layer, &n_params), *grads = moe_layer_grads(run->layer, NULL);
    moe_forward_opts opts;
    memset(&opts, 0, sizeof opts);
    opts.training = 1;
    int status = 1, i;
    c->max_rel = 0.0;
    snprintf(c->worst, sizeof c->worst, "y");
    if (!y || !dx) { fprintf(stderr, "bench_moe: out of memory\n"); goto done; }
    if (context(&ctx, run->ctx.n_threads, MOE_KERNELS_REFERENCE) != MOE_OK) { fail(&ctx, "context"); goto done; }
    if (create_layer(&ctx, s, n, &ref) != MOE_OK) { fail(&ctx, "reference layer"); goto done; }
    if (!moe_layer_params(ref, &n_ref) || n_ref != n_params) { fprintf(stderr, "bench_moe: layouts differ\n"); goto done; }
    memcpy(moe_layer_params(ref, NULL), params, (size_t)n_params * sizeof(float));
    memset(grads, 0, (size_t)n_params * sizeof(float));      /* the timed steps accumulated */
    if ((train ? b->train(run, n) : b->forward(run, n)) != MOE_OK) { fail(&run->ctx, "checked step"); goto done; }
    if (moe_layer_forward(ref, run->x, n, y, train ? &opts : NULL) != MOE_OK) { fail(&ctx, "reference forward"); goto done; }
    check_note(c, "y", max_relative(run->y, y, n * s->d));
    if (train) {
        if (moe_layer_backward(ref, run->dy, dx, 0) != MOE_OK) { fail(&ctx, "reference backward"); goto done; }
        check_note(c, "dx", max_relative(run->dx, dx, n * s->d));
        /* the gradients stay on an accelerator: y and dx are compared there */
        for (i = 0; strcmp(b->name, "cpu") == 0 && i < moe_layer_tensor_count(ref); i++) {
            moe_tensor t, r;
            if (moe_layer_tensor(run->layer, i, &t) != MOE_OK || moe_layer_tensor(ref, i, &r) != MOE_OK) { fail(&ctx, "tensor"); goto done; }
            check_note(c, t.name, max_relative(t.grad, r.grad, t.size));
        }
    }
    status = 0;
done:
    moe_layer_destroy(ref);
    free(y); free(dx);
    return status;
}

/* ---- one measurement ------------------------------------------------------------------------- */
typedef struct machine {
    int n_threads;
    double peak_gflops;           /* at n_threads */
    double mem_gbps;              /* at n_threads */
    read_loop_fn read;
    uint64_t *evict;              /* EVICT_BYTES read before every decode step, or NULL */
} machine;

/* A decode step reads 10-70 MB of expert weights, which a large last-level cache may keep from one
   step to the next (two experts' int8 weights are 19.5 MB): that would time the cache, not memory.
   Before every decode step, each thread reads its part of a buffer far larger than any such cache,
   so every step reads its weights from memory, as when a model's layers take turns. */
#define EVICT_BYTES ((size_t)256 << 20)

static void evict_caches(const machine *m) {
    size_t n = EVICT_BYTES / sizeof(uint64_t);
    uint64_t total = 0;
#ifdef _OPENMP
    int part;
#pragma omp parallel for num_threads(m->n_threads) reduction(+ : total) schedule(static)
    for (part = 0; part < m->n_threads; part++) {
        size_t lo = n / (size_t)m->n_threads * (size_t)part;
        size_t hi = part == m->n_threads - 1 ? n : lo + n / (size_t)m->n_threads;
        total += m->read(m->evict + lo, hi - lo);
    }
#else
    total = m->read(m->evict, n);
#endif
    if (total == 12345u) g_sink = (float)total;
}

/* Prints the measurement's line. Returns 0, 1 on a library error, 3 on a failed check. */
/* Experts the last forward used: k for one token; for more, the CPU layer's routing statistics
   (0 where another backend routed them). */
static int experts_used(bench_run *run, const bench_backend *b) {
    moe_stats st;
    int e, n = 0;
    if (run->shape->tokens == 1) return run->shape->top_k;
    if (strcmp(b->name, "cpu") != 0 || moe_layer_stats(run->layer, &st) != MOE_OK) return 0;
    for (e = 0; e < st.n_experts; e++) n += st.tokens_per_expert[e] > 0;
    return n;
}

static int measure(bench_run *run, const bench_backend *b, int train, const bench_dtype *t,
                   const options *o, const machine *m) {
    const bench_shape *s = run->shape;
    double *times = (double *)malloc((size_t)o->runs * sizeof(double)), ms, gflops;
    moe_result r;
    int i, status = 0;
    char head[160];
    snprintf(head, sizeof head, "shape=%s mode=%s backend=%s dtype=%s threads=%d%s%.0d",
             s->name, train ? "train" : "fwd", b->name, t->name, o->n_threads, o->tokens ? " tokens=" : "", o->tokens);
    if (!times) { fprintf(stderr, "bench_moe: out of memory\n"); return 1; }
    if (b->missing) { printf("%s skipped=%s\n", head, b->missing); goto done; }
    if (train && (t->dtype != MOE_DTYPE_F32 || t->packed)) {
        printf("%s skipped=%s\n", head, t->packed ? "packed weights are for inference only" : "reduced-precision weights are for inference only");
        goto done;
    }
    r = b->prepare(run, t);
    if (r == MOE_ERR_UNSUPPORTED) { printf("%s skipped=%s\n", head, moe_ctx_error(&run->ctx)); goto done; }
    if (r != MOE_OK) { status = fail(&run->ctx, "prepare"); goto done; }
    for (i = -1; i < o->runs; i++) {          /* run -1 is the warm-up */
        double t0;
        if (s->tokens <= FEW_TOKENS && m->evict) evict_caches(m);
        t0 = now_ms();
        r = train ? b->train(run, s->tokens) : b->forward(run, s->tokens);
        if (r != MOE_OK) { status = fail(&run->ctx, train ? "training step" : "forward"); goto done; }
        if (i >= 0) times[i] = now_ms() - t0;
    }
    ms = median(times, o->runs);
    gflops = flops_of(s, train) / (ms * 1e6);
    printf("%s ms=%.3f gflops=%.2f peak_pct=%.2f", head, ms, gflops, 100.0 * gflops / m->peak_gflops);
    if (s->tokens <= FEW_TOKENS && !train && experts_used(run, b) > 0) {
        double gbps = decode_bytes(s, t, experts_used(run, b)) / (ms * 1e6);
        printf(" gbps=%.2f bw_pct=%.2f", gbps, m->mem_gbps > 0 ? 100.0 * gbps / m->mem_gbps : 0.0);
    }
    if (o->check) {
        check_result c;
        fflush(stdout);
        if (check_against_reference(run, b, train, &c) != 0) { printf("\n"); status = 1; goto done; }
        if (c.max_rel <= t->tolerance) {
            printf(" check=ok max_rel=%.3g", c.max_rel);
        } else {
            printf(" check=FAIL max_rel=%.3g worst=%s tolerance=%g", c.max_rel, c.worst, t->tolerance);
            status = 3;
        }
    }
    printf("\n");
done:
    fflush(stdout);
    if (b->release) b->release(run);
    free(times);
    return status;
}

/* ---- main ------------------------------------------------------------------------------------ */
static int parse_int(const char *s, int lo, int *out) {
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == 0 || *end != 0 || v < lo || v > 1 << 20) return 0;
    *out = (int)v;
    return 1;
}

static int parse_options(int argc, char **argv, options *o) {
    int i, j;
    memset(o, 0, sizeof *o);
    o->shape = -1;
    o->fwd = o->train = o->mode_all = 1;
    o->dtype = -1;
    o->runs = 5;
#ifdef _OPENMP
    o->n_threads = omp_get_max_threads();
#else
    o->n_threads = 1;
#endif
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--check") == 0) { o->check = 1; continue; }
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) { usage(stdout); exit(0); }
        if (!v) { fprintf(stderr, "bench_moe: unknown option or missing value: %s\n", a); return 0; }
        i++;
        if (strcmp(a, "--shape") == 0) {
            o->shape = -2;
            if (strcmp(v, "all") == 0) o->shape = -1;
            for (j = 0; j < N_SHAPES; j++) if (strcmp(v, SHAPES[j].name) == 0) o->shape = j;
            if (o->shape == -2) { fprintf(stderr, "bench_moe: unknown shape %s\n", v); return 0; }
        } else if (strcmp(a, "--mode") == 0) {
            o->mode_all = strcmp(v, "all") == 0;
            o->fwd = o->mode_all || strcmp(v, "fwd") == 0;
            o->train = o->mode_all || strcmp(v, "train") == 0;
            if (!o->fwd && !o->train) { fprintf(stderr, "bench_moe: unknown mode %s\n", v); return 0; }
        } else if (strcmp(a, "--threads") == 0) {
            if (!parse_int(v, 1, &o->n_threads)) { fprintf(stderr, "bench_moe: bad thread count %s\n", v); return 0; }
        } else if (strcmp(a, "--runs") == 0) {
            if (!parse_int(v, 1, &o->runs)) { fprintf(stderr, "bench_moe: bad run count %s\n", v); return 0; }
        } else if (strcmp(a, "--backend") == 0) {
            o->backend = -1;
            for (j = 0; j < N_BACKENDS; j++) if (strcmp(v, BACKENDS[j].name) == 0) o->backend = j;
            if (o->backend < 0) { fprintf(stderr, "bench_moe: unknown backend %s\n", v); return 0; }
        } else if (strcmp(a, "--kernels") == 0) {
            static const char *const names[] = {"default", "avx2", "portable"};
            static const moe_kernels values[] = {MOE_KERNELS_DEFAULT, MOE_KERNELS_AVX2, MOE_KERNELS_PORTABLE};
            o->kernels = MOE_KERNELS_COUNT;
            for (j = 0; j < 3; j++) if (strcmp(v, names[j]) == 0) o->kernels = values[j];
            if (o->kernels == MOE_KERNELS_COUNT) { fprintf(stderr, "bench_moe: unknown kernels %s\n", v); return 0; }
        } else if (strcmp(a, "--tokens") == 0) {
            if (!parse_int(v, 1, &o->tokens) || o->tokens > 65536) { fprintf(stderr, "bench_moe: bad token count %s\n", v); return 0; }
        } else if (strcmp(a, "--dtype") == 0) {
            o->dtype = strcmp(v, "all") == 0 ? -2 : -3;
            for (j = 0; j < N_DTYPES; j++) if (strcmp(v, DTYPES[j].name) == 0) o->dtype = j;
            if (o->dtype == -3) { fprintf(stderr, "bench_moe: unknown dtype %s\n", v); return 0; }
        } else {
            fprintf(stderr, "bench_moe: unknown option %s\n", a);
            return 0;
        }
    }
    return 1;
}

/* Whether a (shape, mode, dtype) is part of this run. */
static int selected(const options *o, const bench_shape *s, int train, int dtype) {
    if (train ? !o->train : !o->fwd) return 0;
    if (train && o->mode_all && s->tokens <= FEW_TOKENS) return 0;   /* decode is an inference shape */
    if (o->dtype >= 0) return dtype == o->dtype;
    if (o->dtype == -2) return !train || dtype == 0;
    if (dtype == 0) return 1;                   /* default: f32; decode also bf16, q8; CPU batches f32p */
    if (train) return 0;
    return s->tokens <= FEW_TOKENS ? !DTYPES[dtype].packed : DTYPES[dtype].packed && strcmp(BACKENDS[o->backend].name, "cpu") == 0;
}

int main(int argc, char **argv) {
    options o;
    machine m;
    isa_info isa;
    char model[128];
    int si, train, di, failed = 0;
    moe_ctx probe;
    if (!parse_options(argc, argv, &o)) { usage(stderr); return EXIT_USAGE; }
    if (context(&probe, 1, o.kernels) != MOE_OK) { fprintf(stderr, "bench_moe: %s\n", moe_ctx_error(&probe)); return 1; }

    isa = detect_isa();
    cpu_model(model, sizeof model);
    printf("machine=%s cores=%ld isa=%s openmp=%d moe=%s kernels=%s\n", model, sysconf(_SC_NPROCESSORS_ONLN), isa.name,
#ifdef _OPENMP
           1,
#else
           0,
#endif
           moe_version(), moe_ctx_kernels(&probe));
    fflush(stdout);
    m.n_threads = o.n_threads;
    printf("peak_gflops_1t=%.1f", measure_peak(&isa, 1));
    fflush(stdout);
    m.peak_gflops = measure_peak(&isa, o.n_threads);
    printf(" peak_gflops=%.1f threads=%d\n", m.peak_gflops, o.n_threads);
    fflush(stdout);
    m.mem_gbps = measure_memory_read(&isa, o.n_threads);
    printf("mem_read_gbps=%.2f threads=%d\n", m.mem_gbps, o.n_threads);
    fflush(stdout);
    m.read = isa.read;
    m.evict = NULL;
    if ((o.shape < 0 || SHAPES[o.shape].tokens <= FEW_TOKENS || (o.tokens && o.tokens <= FEW_TOKENS)) &&
        (m.evict = (uint64_t *)malloc(EVICT_BYTES)) != NULL)
        memset(m.evict, 1, EVICT_BYTES);

    for (si = 0; si < N_SHAPES; si++) {
        bench_shape shape = SHAPES[si];
        const bench_shape *s = &shape;
        const bench_backend *b = &BACKENDS[o.backend];
        bench_run run;
        int any = 0;
        if (o.shape >= 0 && o.shape != si) continue;
        if (o.tokens) shape.tokens = o.tokens;
        for (train = 0; train < 2; train++)
            for (di = 0; di < N_DTYPES; di++) any |= selected(&o, s, train, di);
        if (!any) continue;
        if (run_create(&run, s, o.n_threads, o.kernels) != 0) { run_destroy(&run); return 1; }
        for (train = 0; train < 2; train++)
            for (di = 0; di < N_DTYPES; di++) {
                int st;
                if (!selected(&o, s, train, di)) continue;
                st = measure(&run, b, train, &DTYPES[di], &o, &m);
                if (st == 1) { run_destroy(&run); free(m.evict); return 1; }
                if (st == 3) failed = 1;
            }
        run_destroy(&run);
    }
    free(m.evict);
    return failed ? 1 : 0;
}
