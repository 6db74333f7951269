/* The fast expert kernels of a MoE layer against the plain reference path: the grouped GEMM with
   its fused epilogues (training forward + backward), the decode path (inference, T <= 8), and
   reduced-precision expert weights (bf16, int8 with one scale per 32 weights) — at awkward
   sizes (1, 7, 17, 255 rows; widths that are not multiples of 16; deep K; empty experts). */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "test.h"

#ifndef TMP_DIR
#define TMP_DIR "build/tests/tmp_kernels"
#endif

/* Documented error bounds of reduced-precision expert weights (README "Performance"): the
   largest |y - y_f32| over the largest |y_f32| of a forward, on these layers. */
#define BF16_BOUND 1e-2
#define INT8_BOUND 2e-2

static void fill(float *v, int64_t n, uint64_t stream, float scale) {
    int64_t i;
    for (i = 0; i < n; i++) v[i] = scale * moe_rng_normal(9, stream, (uint64_t)i);
}

typedef struct shape {
    const char *name;
    moe_layer_desc d;
    int random_router;         /* 0: zero router weights, so every token ties onto experts 0..k-1 */
} shape;

static const shape shapes[] = {
    {"swiglu 300->33, h 270, E 6", {.kind = MOE_LAYER_MOE, .d_in = 300, .d_out = 33, .n_experts = 6, .top_k = 2,
                                    .expert = MOE_EXPERT_SWIGLU, .d_hidden = 270, .n_shared_experts = 1, .d_shared_hidden = 17}, 1},
    {"mlp 45->45, 2 hidden gelu, bias, residual", {.kind = MOE_LAYER_MOE, .d_in = 45, .n_experts = 5, .top_k = 3, .d_hidden = 37,
                                    .n_hidden_layers = 2, .activation = MOE_ACT_GELU, .residual = 1}, 1},
    {"swiglu, empty experts (tied router)", {.kind = MOE_LAYER_MOE, .d_in = 20, .d_out = 17, .n_experts = 8, .top_k = 2,
                                    .expert = MOE_EXPERT_SWIGLU, .d_hidden = 40}, 0},
    {"geglu 70->19, h 45, E 5, bias", {.kind = MOE_LAYER_MOE, .d_in = 70, .d_out = 19, .n_experts = 5, .top_k = 2,
                                    .expert = MOE_EXPERT_GEGLU, .d_hidden = 45, .bias = MOE_FLAG_ON, .n_shared_experts = 1}, 1},
};

static moe_layer *make(moe_ctx *ctx, const shape *s, int64_t T) {
    moe_layer *l = NULL;
    int i;
    CHECK_OK(moe_layer_create(ctx, &s->d, T, &l), ctx);
    if (!l) return NULL;
    for (i = 0; i < moe_layer_tensor_count(l); i++) {
        moe_tensor t;
        moe_layer_tensor(l, i, &t);
        if (strncmp(t.name, "router.", 7) == 0) fill(t.data, t.size, 100 + (uint64_t)i, s->random_router ? 0.3f : 0.0f);
        else if (strstr(t.name, "bias")) fill(t.data, t.size, 100 + (uint64_t)i, 0.1f);
    }
    return l;
}

static double rel_err(const float *a, const float *b, int64_t n) {
    double worst = 0.0, scale = 1e-12;
    int64_t i;
    for (i = 0; i < n; i++) {
        double e = fabs((double)a[i] - b[i]);
        worst = e > worst ? e : worst;
        scale = fabs((double)b[i]) > scale ? fabs((double)b[i]) : scale;
    }
    return worst / scale;
}

/* The kernel family the checks below run: each one this CPU has, in turn (next_family). */
static moe_kernels family = MOE_KERNELS_DEFAULT;

/* Sets family to the f-th family this CPU runs (default, AVX2 where there, portable); 0 past them. */
static int next_family(int f) {
    moe_ctx probe;
    const moe_kernels all[] = {MOE_KERNELS_DEFAULT, MOE_KERNELS_AVX2, MOE_KERNELS_PORTABLE};
    int i, seen = 0;
    for (i = 0; i < 3; i++) {
        if (moe_ctx_init(&probe, &(moe_ctx_desc){.kernels = all[i]}) != MOE_OK) continue;
        if (seen++ == f) {
            family = all[i];
            printf("    kernels: %s\n", moe_ctx_kernels(&probe));
            return 1;
        }
    }
    family = MOE_KERNELS_DEFAULT;
    return 0;
}

/* Fast and reference paths: inference forward (decode path for T <= 8), training forward and
   backward (grouped GEMM), outputs, dx and every gradient. */
static void check_shape(const shape *s) {
    const int64_t counts[] = {1, 7, 17, 255};
    int c;
    for (c = 0; c < 4; c++) {
        int64_t T = counts[c], D = s->d.d_in, O = s->d.d_out ? s->d.d_out : D, n;
        moe_ctx fast, ref;
        moe_layer *a, *b;
        float *x = (float *)malloc(sizeof(float) * (size_t)(T * D)), *dy = (float *)malloc(sizeof(float) * (size_t)(T * O));
        float *ya = (float *)malloc(sizeof(float) * (size_t)(T * O)), *yb = (float *)malloc(sizeof(float) * (size_t)(T * O));
        float *dxa = (float *)malloc(sizeof(float) * (size_t)(T * D)), *dxb = (float *)malloc(sizeof(float) * (size_t)(T * D));
        moe_forward_opts train = {.training = 1};
        moe_ctx_init(&fast, &(moe_ctx_desc){.seed = 5, .n_threads = 2, .kernels = family});
        moe_ctx_init(&ref, &(moe_ctx_desc){.seed = 5, .kernels = MOE_KERNELS_REFERENCE});
        a = make(&fast, s, T);
        b = make(&ref, s, T);
        fill(x, T * D, 1, 1.0f);
        fill(dy, T * O, 2, 1.0f);
        if (a && b) {
            double w;
            long where;
            float *ga, *gb;
            CHECK_OK(moe_layer_forward(a, x, T, ya, NULL), &fast);
            CHECK_OK(moe_layer_forward(b, x, T, yb, NULL), &ref);
            w = test_worst(ya, yb, (long)(T * O), 1e-4, 1e-5, &where);
            CHECK(w <= 1.0, "%s T=%lld inference: y[%ld] %g vs reference %g", s->name, (long long)T, where, where >= 0 ? ya[where] : 0.0,
                  where >= 0 ? yb[where] : 0.0);
            CHECK_OK(moe_layer_forward(a, x, T, ya, &train), &fast);
            CHECK_OK(moe_layer_forward(b, x, T, yb, &train), &ref);
            CHECK(test_worst(ya, yb, (long)(T * O), 1e-4, 1e-5, NULL) <= 1.0, "%s T=%lld training forward differs", s->name, (long long)T);
            CHECK_OK(moe_layer_backward(a, dy, dxa, 0), &fast);
            CHECK_OK(moe_layer_backward(b, dy, dxb, 0), &ref);
            CHECK(test_worst(dxa, dxb, (long)(T * D), 1e-3, 1e-5, NULL) <= 1.0, "%s T=%lld: dx differs", s->name, (long long)T);
            ga = moe_layer_grads(a, &n);
            gb = moe_layer_grads(b, NULL);
            w = test_worst(ga, gb, (long)n, 1e-3, 1e-5, &where);
            CHECK(w <= 1.0, "%s T=%lld: gradient %ld is %g, reference %g", s->name, (long long)T, where, where >= 0 ? ga[where] : 0.0,
                  where >= 0 ? gb[where] : 0.0);
        }
        moe_layer_destroy(a);
        moe_layer_destroy(b);
        free(x); free(dy); free(ya); free(yb); free(dxa); free(dxb);
    }
}

static int test_fast_vs_reference(void) {
    int i, f;
    for (f = 0; next_family(f); f++)
        for (i = 0; i < (int)(sizeof shapes / sizeof shapes[0]); i++) check_shape(&shapes[i]);
    return 0;
}

/* Independent model of the documented quantization (README): bf16 rounds to nearest even; int8
   keeps, per 32 consecutive weights of a row, scale = max|w| / 127 and q = round(w / scale). */
static float bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&f, &u, sizeof f);
    return f;
}

static void dequantize_rows(float *w, int64_t rows, int64_t cols, moe_dtype dtype) {
    int64_t r, k, g;
    for (r = 0; r < rows; r++) {
        float *row = w + r * cols;
        if (dtype == MOE_DTYPE_BF16) {
            for (k = 0; k < cols; k++) row[k] = bf16_round(row[k]);
            continue;
        }
        for (g = 0; g < cols; g += 32) {
            int64_t end = g + 32 < cols ? g + 32 : cols;
            float amax = 0.0f, scale, inv;
            for (k = g; k < end; k++) amax = fabsf(row[k]) > amax ? fabsf(row[k]) : amax;
            scale = amax / 127.0f;
            /* 127 / amax rounded to float, as moe.h keeps it (x87 would keep the quotient in 80 bits
               and round a few weights near k + 0.5 the other way); w * inv is then exact in 80 bits,
               so roundf gets the float product under any FLT_EVAL_METHOD and the q are moe.h's */
            inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            for (k = g; k < end; k++) row[k] = amax > 0.0f ? roundf(row[k] * inv) * scale : 0.0f;
        }
    }
}

/* A quantized layer gives the outputs of an f32 layer whose expert weights were rounded the
   documented way (bitwise on the batched path; the decode path reads int8 weights with activations
   in int16, and bf16 weights with activations as two bf16 halves where the CPU has AVX512_BF16:
   within ROUNDED_ACT_BOUND, else bitwise), the same for 1 and 2 threads, stays within the
   documented bound of the unrounded layer, refuses training, and quantize(F32) restores it. */
#define ROUNDED_ACT_BOUND 1e-4
static void check_quantized(moe_dtype dtype, const shape *s) {
    const int64_t counts[] = {3, 255};
    double bound = dtype == MOE_DTYPE_BF16 ? BF16_BOUND : INT8_BOUND;
    int c;
    for (c = 0; c < 2; c++) {
        int64_t T = counts[c], D = s->d.d_in, O = s->d.d_out, n, i;
        moe_ctx two, one;
        moe_layer *q, *q1, *r, *f;
        float *x = (float *)malloc(sizeof(float) * (size_t)(T * D)), *y[4];
        moe_forward_opts train = {.training = 1};
        moe_ctx_init(&two, &(moe_ctx_desc){.seed = 5, .n_threads = 2, .kernels = family});
        moe_ctx_init(&one, &(moe_ctx_desc){.seed = 5, .n_threads = 1, .kernels = family});
        q = make(&two, s, T); q1 = make(&one, s, T); r = make(&two, s, T); f = make(&two, s, T);
        for (i = 0; i < 4; i++) y[i] = (float *)malloc(sizeof(float) * (size_t)(T * O));
        fill(x, T * D, 3, 1.0f);
        if (q && q1 && r && f) {
            double e;
            for (i = 0; i < moe_layer_tensor_count(r); i++) {
                moe_tensor t;
                moe_layer_tensor(r, i, &t);
                if (strncmp(t.name, "experts.", 8) == 0 || strncmp(t.name, "shared.", 7) == 0)
                    if (strstr(t.name, "weight")) dequantize_rows(t.data, t.size / t.shape[t.ndim - 1], t.shape[t.ndim - 1], dtype);
            }
            CHECK_OK(moe_layer_quantize(q, dtype), &two);
            CHECK_OK(moe_layer_quantize(q1, dtype), &one);
            CHECK_OK(moe_layer_forward(q, x, T, y[0], NULL), &two);
            CHECK_OK(moe_layer_forward(q1, x, T, y[1], NULL), &one);
            CHECK_OK(moe_layer_forward(r, x, T, y[2], NULL), &two);
            CHECK_OK(moe_layer_forward(f, x, T, y[3], NULL), &two);
            if (T <= MOE__DECODE_TOKENS && (dtype == MOE_DTYPE_I8 || moe__kernel_for(family).dot_bf16)) {
                e = rel_err(y[0], y[2], T * O);
                printf("    %s T=%lld (activations %s): max |y - y_rounded| / max |y_rounded| = %.2e (bound %.0e)\n", dtype == MOE_DTYPE_I8 ? "int8" : "bf16",
                       (long long)T, dtype == MOE_DTYPE_I8 ? "in int16" : "as two bf16 halves", e, ROUNDED_ACT_BOUND);
                CHECK(e <= ROUNDED_ACT_BOUND && e > 0.0, "dtype %d T=%lld: %g from f32 on rounded weights (bound %g)", (int)dtype, (long long)T, e,
                      ROUNDED_ACT_BOUND);
            } else {
                CHECK(memcmp(y[0], y[2], sizeof(float) * (size_t)(T * O)) == 0, "dtype %d T=%lld: differs from f32 on rounded weights", (int)dtype,
                      (long long)T);
            }
            CHECK(memcmp(y[0], y[1], sizeof(float) * (size_t)(T * O)) == 0, "dtype %d T=%lld: 1 and 2 threads differ", (int)dtype, (long long)T);
            e = rel_err(y[0], y[3], T * O);
            printf("    %s T=%lld: max |y - y_f32| / max |y_f32| = %.2e (bound %.0e)\n", dtype == MOE_DTYPE_BF16 ? "bf16" : "int8", (long long)T, e, bound);
            CHECK(e <= bound && e > 0.0, "dtype %d T=%lld: error %g against f32 (bound %g)", (int)dtype, (long long)T, e, bound);
            CHECK_RESULT(moe_layer_forward(q, x, T, y[0], &train), MOE_ERR_STATE, &two);
            CHECK_RESULT(moe_layer_backward(q, x, NULL, 0), MOE_ERR_STATE, &two);
            CHECK_OK(moe_layer_quantize(q, MOE_DTYPE_F32), &two);
            CHECK_OK(moe_layer_forward(q, x, T, y[0], NULL), &two);
            CHECK(memcmp(y[0], y[3], sizeof(float) * (size_t)(T * O)) == 0, "quantize(F32) did not restore the f32 weights");
            CHECK_RESULT(moe_layer_quantize(q, MOE_DTYPE_F16), MOE_ERR_INVALID_ARGUMENT, &two);
            (void)n;
        }
        moe_layer_destroy(q); moe_layer_destroy(q1); moe_layer_destroy(r); moe_layer_destroy(f);
        for (i = 0; i < 4; i++) free(y[i]);
        free(x);
    }
}

/* SwiGLU and GeGLU experts (shapes 0 and 3) */
static int test_bf16(void) {
    int f;
    for (f = 0; next_family(f); f++) { check_quantized(MOE_DTYPE_BF16, &shapes[0]); check_quantized(MOE_DTYPE_BF16, &shapes[3]); }
    return 0;
}
static int test_int8(void) {
    int f;
    for (f = 0; next_family(f); f++) { check_quantized(MOE_DTYPE_I8, &shapes[0]); check_quantized(MOE_DTYPE_I8, &shapes[3]); }
    return 0;
}

/* The decode path (inference, T <= 8) reads each weight once per token set; its outputs do not
   depend on the thread count. */
static int test_decode_threads(void) {
    const shape *s = &shapes[0];
    moe_ctx one, two;
    moe_layer *a, *b;
    int64_t T = 5, D = s->d.d_in, O = s->d.d_out;
    float x[5 * 300], ya[5 * 33], yb[5 * 33];
    moe_ctx_init(&one, &(moe_ctx_desc){.seed = 5, .n_threads = 1});
    moe_ctx_init(&two, &(moe_ctx_desc){.seed = 5, .n_threads = 2});
    a = make(&one, s, T);
    b = make(&two, s, T);
    fill(x, T * D, 4, 1.0f);
    if (a && b) {
        CHECK_OK(moe_layer_forward(a, x, T, ya, NULL), &one);
        CHECK_OK(moe_layer_forward(b, x, T, yb, NULL), &two);
        CHECK(memcmp(ya, yb, sizeof ya) == 0, "decode path: 1 and 2 threads differ");
    }
    moe_layer_destroy(a);
    moe_layer_destroy(b);
    (void)O;
    return 0;
}

/* Packed weights (moe_layer_pack): batched inference forwards give bitwise the outputs of the
   same layer without them, for 1 and 2 threads, at sizes with several depth, column and row
   blocks; a training forward and moe_layer_quantize drop the packed copy, so later changes to the
   weights are seen. */
static void check_packed(const shape *s, int64_t T, int threads) {
    int64_t D = s->d.d_in, O = s->d.d_out ? s->d.d_out : D;
    moe_ctx ctx;
    moe_layer *a, *b;
    float *x = (float *)malloc(sizeof(float) * (size_t)(T * D)), *ya = (float *)malloc(sizeof(float) * (size_t)(T * O));
    float *yb = (float *)malloc(sizeof(float) * (size_t)(T * O)), *dy = (float *)calloc((size_t)(T * O), sizeof(float));
    moe_forward_opts train = {.training = 1};
    moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = 5, .n_threads = threads});
    a = make(&ctx, s, T);
    b = make(&ctx, s, T);
    fill(x, T * D, 7, 1.0f);
    if (a && b) {
        moe_tensor t;
        int i;
        CHECK_OK(moe_layer_pack(a, 1), &ctx);
        CHECK_OK(moe_layer_forward(a, x, T, ya, NULL), &ctx);
        CHECK_OK(moe_layer_forward(b, x, T, yb, NULL), &ctx);
        CHECK(memcmp(ya, yb, sizeof(float) * (size_t)(T * O)) == 0, "%s T=%lld threads=%d: packed weights change the forward", s->name,
              (long long)T, threads);
        /* a training forward drops the copy: a weight changed afterwards is seen */
        CHECK_OK(moe_layer_forward(a, x, T, ya, &train), &ctx);
        for (i = 0; i < moe_layer_tensor_count(a); i++) {
            moe_layer_tensor(a, i, &t);
            if (strcmp(t.name, "experts.w1.weight") == 0 || strcmp(t.name, "experts.fc0.weight") == 0) {
                int64_t j;
                for (j = 0; j < t.size; j++) t.data[j] *= 0.5f;
                moe_layer_tensor(b, i, &t);
                for (j = 0; j < t.size; j++) t.data[j] *= 0.5f;
            }
        }
        CHECK_OK(moe_layer_forward(a, x, T, ya, NULL), &ctx);
        CHECK_OK(moe_layer_forward(b, x, T, yb, NULL), &ctx);
        CHECK(memcmp(ya, yb, sizeof(float) * (size_t)(T * O)) == 0, "%s T=%lld: packed weights outlived a training forward", s->name, (long long)T);
        /* packing again sees the changed weights; quantize drops the copy */
        CHECK_OK(moe_layer_pack(a, 1), &ctx);
        CHECK_OK(moe_layer_forward(a, x, T, ya, NULL), &ctx);
        CHECK(memcmp(ya, yb, sizeof(float) * (size_t)(T * O)) == 0, "%s T=%lld: repacked weights differ", s->name, (long long)T);
        CHECK_OK(moe_layer_quantize(a, MOE_DTYPE_F32), &ctx);
        moe_layer_tensor(a, 0, &t);
        CHECK_OK(moe_layer_pack(a, 1), &ctx);
        CHECK_OK(moe_layer_pack(a, 0), &ctx);
        CHECK_OK(moe_layer_forward(a, x, T, ya, NULL), &ctx);
        CHECK(memcmp(ya, yb, sizeof(float) * (size_t)(T * O)) == 0, "%s T=%lld: unpacked forward differs", s->name, (long long)T);
    }
    moe_layer_destroy(a);
    moe_layer_destroy(b);
    free(x); free(ya); free(yb); free(dy);
}

static int test_packed(void) {
    static const shape big = {"swiglu 600->530, h 700, E 3, bias", {.kind = MOE_LAYER_MOE, .d_in = 600, .d_out = 530, .n_experts = 3,
                              .top_k = 2, .expert = MOE_EXPERT_SWIGLU, .d_hidden = 700, .bias = MOE_FLAG_ON, .n_shared_experts = 1}, 1};
    int i;
    for (i = 0; i < (int)(sizeof shapes / sizeof shapes[0]); i++) {
        check_packed(&shapes[i], 9, 1);
        check_packed(&shapes[i], 255, 2);
    }
    check_packed(&big, 700, 1);
    check_packed(&big, 700, 2);
    return 0;
}

/* Quantized model files: a model with reduced-precision expert weights saves them as bf16, or as
   int8 plus "<name>_scale" [n, out, groups] F32; loading gives back the same reduced weights
   (the same outputs, bit for bit), a file saved again is byte-identical, training is refused, and
   an int8 weight without its scales is a format error. */
static unsigned char *slurp(const char *path, size_t *n) {
    FILE *fp = fopen(path, "rb");
    unsigned char *buf = NULL;
    long len;
    if (!fp) return NULL;
    if (fseek(fp, 0, SEEK_END) == 0 && (len = ftell(fp)) > 0 && fseek(fp, 0, SEEK_SET) == 0 &&
        (buf = (unsigned char *)malloc((size_t)len)) != NULL && fread(buf, 1, (size_t)len, fp) != (size_t)len) {
        free(buf);
        buf = NULL;
    }
    *n = buf ? (size_t)len : 0;
    fclose(fp);
    return buf;
}

static void check_quantized_file(moe_dtype dtype) {
    moe_layer_desc layers[2] = {shapes[0].d, {.kind = MOE_LAYER_DENSE, .d_out = 5}};
    moe_ctx ctx;
    moe_model *m = NULL, *back = NULL;
    float x[9 * 300], ya[9 * 5], yb[9 * 5];
    int32_t label[1] = {0};
    const char *p1 = TMP_DIR "/quantized_a.safetensors", *p2 = TMP_DIR "/quantized_b.safetensors";
    unsigned char *f1, *f2;
    size_t n1, n2;
    layers[0].d_in = 0;
    moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = 5});
    CHECK_OK(moe_model_create(&ctx, &(moe_model_desc){.d_in = 300, .n_layers = 2, .layers = layers, .max_tokens = 9}, &m), &ctx);
    if (!m) return;
    fill(x, 9 * 300, 6, 1.0f);
    CHECK_OK(moe_model_quantize(m, dtype), &ctx);
    CHECK_OK(moe_model_forward(m, x, 9, ya, NULL), &ctx);
    CHECK_RESULT(moe_model_save_checkpoint(m, p1), MOE_ERR_STATE, &ctx);
    CHECK_OK(moe_model_save(m, p1), &ctx);
    CHECK_OK(moe_model_load(&ctx, p1, 0, &back), &ctx);
    if (back) {
        CHECK_OK(moe_model_forward(back, x, 9, yb, NULL), &ctx);
        CHECK(memcmp(ya, yb, sizeof ya) == 0, "dtype %d: the loaded model computes other bits", (int)dtype);
        CHECK_RESULT(moe_model_train_step(back, x, &(moe_target){.labels = label}, 1, NULL), MOE_ERR_STATE, &ctx);
        CHECK_OK(moe_model_save(back, p2), &ctx);
        f1 = slurp(p1, &n1);
        f2 = slurp(p2, &n2);
        CHECK(f1 && f2 && n1 == n2 && memcmp(f1, f2, n1) == 0, "dtype %d: save(load(file)) differs (%zu vs %zu bytes)", (int)dtype, n1, n2);
        if (dtype == MOE_DTYPE_I8 && f1) {
            /* drop the scales' name: the int8 weight loses them */
            unsigned char *hit = NULL;
            size_t i;
            for (i = 0; i + 6 < n1 && !hit; i++)
                if (memcmp(f1 + i, "_scale", 6) == 0) hit = f1 + i;
            CHECK(hit != NULL, "the int8 file names its scales");
            if (hit) {
                moe_model *bad = NULL;
                memcpy(hit, "_scalX", 6);
                CHECK_RESULT(moe_model_load_memory(&ctx, f1, n1, 0, &bad), MOE_ERR_FORMAT, &ctx);
                CHECK(bad == NULL, "no model from a bad file");
            }
        }
        free(f1);
        free(f2);
        moe_model_destroy(back);
    }
    moe_model_destroy(m);
}

static int test_quantized_files(void) {
    test_make_dir(TMP_DIR);
    check_quantized_file(MOE_DTYPE_BF16);
    check_quantized_file(MOE_DTYPE_I8);
    return 0;
}

int main(void) {
    printf("test_kernels\n");
    RUN(test_fast_vs_reference);
    RUN(test_bf16);
    RUN(test_int8);
    RUN(test_decode_threads);
    RUN(test_quantized_files);
    RUN(test_packed);
    TEST_END();
}
