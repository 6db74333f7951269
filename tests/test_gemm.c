/* The GEMM entry point: packed kernels against the plain reference, for all three layouts, row
   gathers, accumulation, bias, SwiGLU pairs and every epilogue, at awkward sizes; and
   tiling/threads never change a bit. */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "test.h"

static float *random_matrix(int64_t n, uint64_t stream) {
    float *m = (float *)malloc(sizeof(float) * (size_t)(n ? n : 1));
    int64_t i;
    for (i = 0; i < n; i++) m[i] = moe_rng_normal(3, stream, (uint64_t)i);
    return m;
}

static moe__exec make_exec(moe_ctx *ctx, float **scratch) {
    moe__exec ex;
    *scratch = (float *)moe__malloc(ctx, sizeof(float) * (size_t)ctx->n_threads * moe__scratch_floats(MOE__MB_MAX));
    moe__exec_init(&ex, ctx, *scratch, MOE__MB_MAX);
    return ex;
}

/* The kernel under test (forced = 0: the one moe.h picks for this CPU). */
static int forced;
static moe__kernel forced_kernel;

/* One product in every way: fast vs reference (tolerance), and fast tiled 1 vs 2 threads (bitwise). */
static void check_product(moe__gemm_op op, int64_t M, int64_t N, int64_t K, int gather, int accumulate, int bias) {
    moe_ctx fast, ref, one;
    float *sf, *sr, *so;
    moe__exec exf, exr, exo;
    int64_t a_rows = op == MOE__TN ? K : M, a_cols = op == MOE__TN ? M : K;
    int64_t b_rows = op == MOE__NT ? N : K, b_cols = op == MOE__NT ? K : N;
    int64_t pool_a = a_rows + 5, pool_b = b_rows + 3, i;
    float *A = random_matrix(pool_a * (a_cols + 2), 1), *B = random_matrix(pool_b * (b_cols + 1), 2);
    float *bv = random_matrix(N, 3), *C0 = random_matrix(M * (N + 3), 4);
    float *Cf = (float *)malloc(sizeof(float) * (size_t)(M * (N + 3) + 1));
    float *Cr = (float *)malloc(sizeof(float) * (size_t)(M * (N + 3) + 1));
    float *Co = (float *)malloc(sizeof(float) * (size_t)(M * (N + 3) + 1));
    int32_t *ra = (int32_t *)malloc(sizeof(int32_t) * (size_t)(a_rows + 1)), *rb = (int32_t *)malloc(sizeof(int32_t) * (size_t)(b_rows + 1));
    moe__gemm g;
    double worst = 0;
    for (i = 0; i < a_rows; i++) ra[i] = (int32_t)((i * 7 + 3) % pool_a);
    for (i = 0; i < b_rows; i++) rb[i] = (int32_t)((i * 5 + 1) % pool_b);
    moe_ctx_init(&fast, &(moe_ctx_desc){.n_threads = 2});
    moe_ctx_init(&one, &(moe_ctx_desc){.n_threads = 1});
    moe_ctx_init(&ref, &(moe_ctx_desc){.n_threads = 2, .kernels = MOE_KERNELS_REFERENCE});
    exf = make_exec(&fast, &sf);
    exr = make_exec(&ref, &sr);
    exo = make_exec(&one, &so);
    if (forced) exf.kernel = exo.kernel = forced_kernel;
    memcpy(Cf, C0, sizeof(float) * (size_t)(M * (N + 3)));
    memcpy(Cr, C0, sizeof(float) * (size_t)(M * (N + 3)));
    memcpy(Co, C0, sizeof(float) * (size_t)(M * (N + 3)));
    g = moe__gemm_make(op, M, N, K, gather ? moe__mat_rows(A, a_cols + 2, ra) : moe__mat_of(A, a_cols + 2),
                       gather ? moe__mat_rows(B, b_cols + 1, rb) : moe__mat_of(B, b_cols + 1), Cf, N + 3, accumulate, bias ? bv : NULL);
    moe__gemm_run(&exf, &g);
    g.C = Cr;
    moe__gemm_run(&exr, &g);
    g.C = Co;
    moe__gemm_run(&exo, &g);
    for (i = 0; i < M * (N + 3); i++) {
        double e;
        if (i % (N + 3) >= N) {  /* the padding columns between rows are never touched */
            CHECK(Cf[i] == C0[i] && Cr[i] == C0[i], "op %d %lldx%lldx%lld: wrote outside C", (int)op, (long long)M, (long long)N, (long long)K);
            continue;
        }
        e = fabs((double)Cf[i] - Cr[i]) / (1e-5 * sqrt((double)K + 1.0) * (1.0 + fabs((double)Cr[i])));
        worst = e > worst ? e : worst;
    }
    CHECK(worst <= 1.0, "op %d M=%lld N=%lld K=%lld gather=%d acc=%d bias=%d: fast differs from reference (%.3g of tolerance)",
          (int)op, (long long)M, (long long)N, (long long)K, gather, accumulate, bias, worst);
    CHECK(memcmp(Cf, Co, sizeof(float) * (size_t)(M * (N + 3))) == 0, "op %d %lldx%lldx%lld: 1 and 2 threads differ", (int)op,
          (long long)M, (long long)N, (long long)K);
    /* any tile split gives the same bits */
    memcpy(Co, C0, sizeof(float) * (size_t)(M * (N + 3)));
    g.C = Co;
    moe__gemm_block(&exo, &g, 0, M / 3, 0, N);
    moe__gemm_block(&exo, &g, M / 3, M, 0, N / 2 + 1 > N ? N : N / 2 + 1);
    moe__gemm_block(&exo, &g, M / 3, M, N / 2 + 1 > N ? N : N / 2 + 1, N);
    CHECK(memcmp(Cf, Co, sizeof(float) * (size_t)(M * (N + 3))) == 0, "op %d %lldx%lldx%lld: tile split changes bits", (int)op,
          (long long)M, (long long)N, (long long)K);
    /* a packing scratch of two micro-panels of rows: one call packs A in several row blocks */
    {
        moe__exec exs = exo;
        exs.a_rows = 2 * exs.kernel.mr;
        memcpy(Co, C0, sizeof(float) * (size_t)(M * (N + 3)));
        g.C = Co;
        moe__gemm_block(&exs, &g, 0, M, 0, N);
        CHECK(memcmp(Cf, Co, sizeof(float) * (size_t)(M * (N + 3))) == 0, "op %d %lldx%lldx%lld: row blocks of %lld rows change bits",
              (int)op, (long long)M, (long long)N, (long long)K, (long long)exs.a_rows);
    }
    moe__free(&fast, sf);
    moe__free(&ref, sr);
    moe__free(&one, so);
    free(A); free(B); free(bv); free(C0); free(Cf); free(Cr); free(Co); free(ra); free(rb);
}

static int test_all_layouts_awkward_sizes(void) {
    const int64_t sizes[] = {1, 7, 17, 64, 255, 300};
    const int n = (int)(sizeof sizes / sizeof sizes[0]);
    int op, a, b, c;
    for (op = 0; op < 3; op++)
        for (a = 0; a < n; a++)
            for (b = 0; b < n; b++)
                for (c = 0; c < n; c++) {
                    int64_t M = sizes[a], N = sizes[b], K = sizes[c];
                    if (M * N * K > 300 * 300 * 64) continue;  /* keep the reference loops quick */
                    check_product((moe__gemm_op)op, M, N, K, (a + b + c) % 2, (a + c) % 2, op == MOE__NT && b % 2 == 0);
                }
    return 0;
}

static int test_zero_k_and_large_k(void) {
    check_product(MOE__NT, 5, 9, 0, 0, 0, 1);    /* C = bias */
    check_product(MOE__NN, 5, 9, 0, 0, 1, 0);    /* C unchanged */
    check_product(MOE__NT, 3, 20, 777, 1, 0, 1); /* several KC blocks */
    check_product(MOE__TN, 33, 18, 600, 1, 1, 0);
    return 0;
}

/* A SwiGLU / GeGLU pair with each epilogue: C = A B^T (+bias), C2 = A B2^T (+bias2), then the epilogue;
   every output buffer against the reference, and 1 vs 2 threads bitwise. */
static void check_epilogue(moe__epi epi, int64_t M, int64_t N, int64_t K) {
    moe_ctx fast, ref, one;
    float *s[3];
    moe__exec ex[3];
    moe_ctx *ctxs[3];
    int pair = epi == MOE__EPI_SWIGLU || epi == MOE__EPI_GEGLU, v, b;
    moe__gemm_op op = pair ? MOE__NT : MOE__NN;
    int64_t n = M * N, i;
    float *A = random_matrix(M * K, 11), *B = random_matrix(N * K, 12), *B2 = random_matrix(N * K, 13);
    float *bias = random_matrix(N, 14), *bias2 = random_matrix(N, 15), *in0 = random_matrix(n, 16), *in1 = random_matrix(n, 17);
    float *buf[3][4];  /* C, C2, out0, out1 per variant */
    int32_t *rows = (int32_t *)malloc(sizeof(int32_t) * (size_t)M);
    for (i = 0; i < M; i++) rows[i] = (int32_t)((i * 5 + 2) % M);
    moe_ctx_init(&fast, &(moe_ctx_desc){.n_threads = 2});
    moe_ctx_init(&one, &(moe_ctx_desc){.n_threads = 1});
    moe_ctx_init(&ref, &(moe_ctx_desc){.n_threads = 2, .kernels = MOE_KERNELS_REFERENCE});
    ctxs[0] = &fast; ctxs[1] = &ref; ctxs[2] = &one;
    for (v = 0; v < 3; v++) {
        moe__gemm g;
        ex[v] = make_exec(ctxs[v], &s[v]);
        if (forced && v != 1) ex[v].kernel = forced_kernel;
        for (b = 0; b < 4; b++) buf[v][b] = random_matrix(n, 20 + (uint64_t)b);
        g = moe__gemm_make(op, M, N, K, moe__mat_rows(A, K, rows), moe__mat_of(B, op == MOE__NT ? K : N), buf[v][0], N, 0,
                           pair ? bias : NULL);
        g.pair = pair;
        g.B2 = moe__mat_of(B2, K);
        g.C2 = buf[v][1];
        g.bias2 = bias2;
        g.epi = epi;
        g.act = MOE_ACT_GELU;
        g.out0 = buf[v][2]; g.out1 = buf[v][3];
        g.in0 = in0; g.in1 = in1;
        moe__gemm_run(&ex[v], &g);
    }
    for (b = 0; b < 4; b++) {
        double worst = 0.0;
        for (i = 0; i < n; i++) {
            double e = fabs((double)buf[0][b][i] - buf[1][b][i]) / (1e-5 * sqrt((double)K + 1.0) * (1.0 + fabs((double)buf[1][b][i])));
            worst = e > worst ? e : worst;
        }
        CHECK(worst <= 1.0, "epilogue %d %lldx%lldx%lld buffer %d: fast differs from reference (%.3g of tolerance)", (int)epi,
              (long long)M, (long long)N, (long long)K, b, worst);
        CHECK(memcmp(buf[0][b], buf[2][b], sizeof(float) * (size_t)n) == 0, "epilogue %d buffer %d: 1 and 2 threads differ", (int)epi, b);
    }
    for (v = 0; v < 3; v++) {
        moe__free(ctxs[v], s[v]);
        for (b = 0; b < 4; b++) free(buf[v][b]);
    }
    free(A); free(B); free(B2); free(bias); free(bias2); free(in0); free(in1); free(rows);
}

static int test_pairs_and_epilogues(void) {
    const int64_t sizes[][3] = {{1, 1, 1}, {7, 17, 5}, {17, 255, 33}, {255, 40, 300}, {100, 600, 20}};
    int e, i;
    for (e = MOE__EPI_NONE; e <= MOE__EPI_GEGLU_GRAD; e++)
        for (i = 0; i < 5; i++) check_epilogue((moe__epi)e, sizes[i][0], sizes[i][1], sizes[i][2]);
    return 0;
}

/* A kernel's packing copies against the plain ones, bit for bit, at every partial shape: rows
   short of the panel (zeros), depths and panel widths not multiples of 8 or 16, a wider stride. */
static void check_packing(moe__kernel k) {
    const int64_t ns[] = {1, 5, 7, 8, 9, 12, 15, 16, 17, 31, 32}, kcs[] = {1, 7, 8, 9, 16, 17, 255, 256};
    float *src = random_matrix(40 * 300, 9), *got = (float *)malloc(sizeof(float) * 40 * 300 * 2), *want = (float *)malloc(sizeof(float) * 40 * 300 * 2);
    const float *rows[300];
    size_t i, j, q, bad = 0, cases = 0;
    for (i = 0; i < sizeof ns / sizeof ns[0]; i++)
        for (j = 0; j < sizeof kcs / sizeof kcs[0]; j++)
            for (q = 0; q < 3; q++) {
                int64_t n = ns[i], kc = kcs[j], W = q == 0 ? n : (n + 7) / 8 * 8 + (q == 2 ? 4 : 0), ld = W + (q == 2 ? 3 : 0), r, wn;
                size_t size = sizeof(float) * (size_t)(kc * ld);
                if (W > 40) continue;
                for (r = 0; r < n; r++) rows[r] = src + r * 300 + r % 3;
                memset(got, 0x5a, size); memset(want, 0x5a, size);
                k.pack_t(rows, n, W, ld, kc, got);
                moe__pack_t(rows, n, W, ld, kc, want);
                bad += memcmp(got, want, size) != 0;
                wn = q == 0 ? 16 : q == 1 ? 32 : 8;  /* pack_n: one or several panels */
                size = sizeof(float) * (size_t)((n + wn - 1) / wn * wn * kc);
                for (r = 0; r < kc; r++) rows[r] = src + r * 40 + r % 5;
                memset(got, 0x5a, size); memset(want, 0x5a, size);
                k.pack_n(rows, (int64_t)q, n, wn, kc, got);
                moe__pack_n(rows, (int64_t)q, n, wn, kc, want);
                bad += memcmp(got, want, size) != 0;
                cases += 2;
            }
    CHECK(bad == 0, "kernel %s: %zu of %zu packing cases differ from the plain copies", k.name, bad, cases);
    free(src); free(got); free(want);
}

/* The combine's vector operations: axpy bit for bit as the plain loop (a multiply, then an add);
   the gate gradient's scaled copy bit for bit, its sum within rounding. */
static void check_vector_ops(moe__kernel k) {
    const int64_t ns[] = {1, 7, 15, 16, 17, 100, 1024};
    float *x = random_matrix(1024, 11), *y0 = random_matrix(1024, 12), *y1 = (float *)malloc(sizeof(float) * 1024), *y2 = (float *)malloc(sizeof(float) * 1024);
    float *d1 = (float *)malloc(sizeof(float) * 1024), *d2 = (float *)malloc(sizeof(float) * 1024);
    size_t i;
    for (i = 0; i < sizeof ns / sizeof ns[0]; i++) {
        int64_t n = ns[i], j;
        float s1, s2, mag = 0.0f;
        memcpy(y1, y0, sizeof(float) * 1024); memcpy(y2, y0, sizeof(float) * 1024);
        k.axpy(y1, 0.37f, x, n);
        moe__axpy(y2, 0.37f, x, n);
        CHECK(memcmp(y1, y2, sizeof(float) * 1024) == 0, "kernel %s: axpy over %lld differs from the plain loop", k.name, (long long)n);
        memset(d1, 0, sizeof(float) * 1024); memset(d2, 0, sizeof(float) * 1024);
        s1 = k.gate_grad(x, y0, -1.25f, d1, n);
        s2 = moe__gate_grad(x, y0, -1.25f, d2, n);
        for (j = 0; j < n; j++) mag += fabsf(x[j] * y0[j]);
        CHECK(memcmp(d1, d2, sizeof(float) * 1024) == 0, "kernel %s: gate gradient copy over %lld differs", k.name, (long long)n);
        CHECK(fabsf(s1 - s2) <= 4.0f * FLT_EPSILON * (float)n * mag, "kernel %s: gate gradient sum over %lld: %g vs %g", k.name, (long long)n, s1, s2);
    }
    free(x); free(y0); free(y1); free(y2); free(d1); free(d2);
}

/* The int8 decode dot products (int16 activations, one scale per 32 of each) against exact integer
   group sums in double, for 1..8 tokens, K around group and register widths, row 1 of two. */
static void check_dot_q8(moe__kernel k) {
    const int64_t Ks[] = {1, 7, 31, 32, 33, 63, 64, 65, 100, 1041};
    enum { KMAX = 1041, GMAX = (KMAX + 31) / 32 };
    static int8_t w[2 * KMAX];
    static int16_t xq[8][KMAX];
    float sw[2 * GMAX], xs[8][GMAX], x[KMAX], out[8];
    const int16_t *xp[8];
    const float *sp[8];
    size_t i;
    int r;
    for (i = 0; i < sizeof Ks / sizeof Ks[0]; i++) {
        int64_t K = Ks[i], G = (K + 31) / 32, g, q;
        moe__mat W;
        memset(&W, 0, sizeof W);
        W.q8 = w; W.scale = sw; W.ld = K; W.groups = G;
        for (q = 0; q < 2 * K; q++) w[q] = (int8_t)((int)(moe_rng_uniform(4, 50, (uint64_t)q) * 255.0f) - 127);
        for (g = 0; g < 2 * G; g++) sw[g] = 0.001f + moe_rng_uniform(4, 51, (uint64_t)g) * 0.01f;
        for (r = 0; r < 8; r++) {
            for (q = 0; q < K; q++) x[q] = moe_rng_normal(4, 52 + (uint64_t)r, (uint64_t)q) * (q % 32 == 5 ? 8.0f : 1.0f);
            moe__quant_row(x, K, xq[r], xs[r]);
            for (q = 0; q < K; q++)   /* rounded to nearest: half a step, and float rounding in x 32767 / max */
                CHECK(fabs((double)xq[r][q] * xs[r][q / 32] - x[q]) <= 0.51 * xs[r][q / 32], "K=%lld: x[%lld] %g quantized to %d * %g", (long long)K,
                      (long long)q, x[q], xq[r][q], xs[r][q / 32]);
            xp[r] = xq[r]; sp[r] = xs[r];
        }
        for (r = 1; r <= 8; r++) {
            int t;
            k.dot_q8(&W, 1, xp, sp, r, K, out);
            for (t = 0; t < r; t++) {
                double ref = 0.0, mag = 0.0;
                for (g = 0; g < G; g++) {
                    int64_t s = 0;
                    for (q = g * 32; q < K && q < g * 32 + 32; q++) s += (int64_t)w[K + q] * xq[t][q];
                    ref += (double)s * ((double)sw[G + g] * xs[t][g]);
                    mag += fabs((double)s * ((double)sw[G + g] * xs[t][g]));
                }
                CHECK(fabs(out[t] - ref) <= 1e-6 * mag + 1e-30, "kernel %s: int8 dot, K=%lld, %d tokens, token %d: %.9g vs %.9g", k.name, (long long)K, r, t,
                      out[t], ref);
            }
        }
    }
    {   /* a NaN activation quantizes to 0, an infinite one makes the group's scale infinite */
        float bad[3] = {1.0f, 0.0f, 2.0f};
        int16_t qb[3];
        float sb;
        bad[1] = NAN;
        sb = moe__quant_group(bad, 3, qb);
        CHECK(qb[1] == 0 && qb[2] == 32767 && sb == (float)(2.0f / 32767.0f), "NaN: q %d %d scale %g", qb[1], qb[2], sb);
        bad[1] = INFINITY;
        sb = moe__quant_group(bad, 3, qb);
        CHECK(isinf(sb) && qb[0] == 0 && qb[1] == 0, "infinity: scale %g, q %d %d", sb, qb[0], qb[1]);
    }
}

/* bf16 decode dot products (AVX512_BF16: activations as two bf16 halves) against the same sum in
   double; the halves within 2^-16 of each activation. */
static void check_dot_bf16(moe__kernel k) {
    const int64_t Ks[] = {1, 7, 31, 32, 33, 63, 64, 65, 100, 1041};
    enum { KMAX = 1041 };
    static uint16_t w[2 * KMAX], xh[8][KMAX], xl[8][KMAX];
    float x[KMAX], out[8];
    const uint16_t *hp[8], *lp[8];
    size_t i;
    int r;
    if (!k.dot_bf16) {
        printf("    kernel %s: bf16 weights take the f32 dot (AVX512_BF16 not in this CPU or compiler)\n", k.name);
        return;
    }
    for (i = 0; i < sizeof Ks / sizeof Ks[0]; i++) {
        int64_t K = Ks[i], q;
        moe__mat W;
        memset(&W, 0, sizeof W);
        W.bf16 = w; W.ld = K;
        for (q = 0; q < 2 * K; q++) w[q] = moe__float_to_bf16(moe_rng_normal(4, 60, (uint64_t)q));
        for (r = 0; r < 8; r++) {
            for (q = 0; q < K; q++) x[q] = moe_rng_normal(4, 61 + (uint64_t)r, (uint64_t)q) * (q % 32 == 5 ? 1e3f : 1.0f);
            moe__split_bf16(x, K, xh[r], xl[r]);
            for (q = 0; q < K; q++)
                CHECK(fabs((double)moe__bf16_to_float(xh[r][q]) + moe__bf16_to_float(xl[r][q]) - x[q]) <= ldexp(fabs(x[q]), -16),
                      "K=%lld: %.9g split into %.9g + %.9g", (long long)K, x[q], moe__bf16_to_float(xh[r][q]), moe__bf16_to_float(xl[r][q]));
            hp[r] = xh[r]; lp[r] = xl[r];
        }
        for (r = 1; r <= 8; r++) {
            int t;
            k.dot_bf16(&W, 1, hp, lp, r, K, out);
            for (t = 0; t < r; t++) {
                double ref = 0.0, mag = 0.0;
                for (q = 0; q < K; q++) {
                    double p = (double)moe__bf16_to_float(w[K + q]) * ((double)moe__bf16_to_float(xh[t][q]) + moe__bf16_to_float(xl[t][q]));
                    ref += p; mag += fabs(p);
                }
                CHECK(fabs(out[t] - ref) <= 1e-6 * mag + 1e-30, "kernel %s: bf16 dot, K=%lld, %d tokens, token %d: %.9g vs %.9g", k.name, (long long)K, r, t,
                      out[t], ref);
            }
        }
    }
}

static void check_kernel(moe__kernel k) {
    check_vector_ops(k);
    check_dot_q8(k);
    check_dot_bf16(k);
    check_packing(k);
    forced = 1;
    forced_kernel = k;
    check_product(MOE__NT, 37, 45, 300, 1, 0, 1);
    check_product(MOE__NN, 5, 70, 19, 0, 1, 0);
    check_product(MOE__TN, 17, 33, 129, 1, 1, 0);
    check_product(MOE__NT, 255, 1, 17, 1, 0, 0);
    check_epilogue(MOE__EPI_SWIGLU, 17, 40, 70);
    check_epilogue(MOE__EPI_SWIGLU_GRAD, 13, 33, 7);
    check_epilogue(MOE__EPI_GEGLU, 17, 40, 70);
    check_epilogue(MOE__EPI_GEGLU_GRAD, 13, 33, 7);
    forced = 0;
}

/* Every kernel this build has, whatever the CPU would pick, against the reference. */
static int test_each_kernel(void) {
    check_kernel(moe__kernel_generic());
#ifdef MOE__HAVE_X86_DISPATCH
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        check_kernel(moe__kernel_avx2());
    else
        printf("    this CPU has no AVX2+FMA: the AVX2 kernel is not exercised\n");
    if (__builtin_cpu_supports("avx512f"))
        check_kernel(moe__kernel_select());
    else
        printf("    this CPU has no AVX-512: the AVX-512 kernel is not exercised\n");
#endif
    return 0;
}

int main(void) {
    printf("test_gemm\n");
    RUN(test_all_layouts_awkward_sizes);
    RUN(test_zero_k_and_large_k);
    RUN(test_pairs_and_epilogues);
    RUN(test_each_kernel);
    TEST_END();
}
