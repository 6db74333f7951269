/* Double-precision reference of README.md (Model reference): naive loops, written from the document, sharing no
   code with moe.h's implementation. It reads a model's configuration and tensor offsets through
   the public API and its parameters from a double array in the model's blob layout.
   ref_model_eval also hashes every discrete decision (top-k order, capacity drops, relu signs,
   load-loss thresholds) so finite differences can skip points where a decision flips. */
#ifndef MOE_REF_MODEL_H
#define MOE_REF_MODEL_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct ref_run {
    moe_model *model;
    const double *params;       /* n_params, the model's layout */
    int training;
    const float *const *noise;  /* [layer][T*E] for noisy routers while training (NULL: none) */
    int64_t step;               /* the training step whose jitter is applied */
    uint64_t seed;
    uint64_t sig;               /* hash of discrete decisions */
    double aux[64][4];          /* per layer: balance, z, importance, load (coefficients applied) */
    double kept[64][64];        /* per layer, per expert: kept assignments */
    double dropped[64];         /* per layer: dropped tokens */
    int top_k;                  /* per-call k (0: each layer's top_k) */
    float top_p;                /* per-call top-p (0: off) */
    const int32_t *token_ids;   /* [T] for hash routers */
} ref_run;

static void ref_decide(ref_run *r, uint64_t v) { r->sig = (r->sig ^ v) * 0x100000001B3ull + 0x9E37u; }

static const double *ref_tensor(ref_run *r, int layer, const char *rel) {
    char name[160];
    moe_tensor t;
    snprintf(name, sizeof name, "layers.%d.%s", layer, rel);
    if (moe_model_find_tensor(r->model, name, &t) != MOE_OK) return NULL;
    return r->params + t.offset;
}

static double ref_act(ref_run *r, moe_activation a, double z) {
    switch (a) {
    case MOE_ACT_RELU: ref_decide(r, z > 0); return z > 0 ? z : 0;
    case MOE_ACT_GELU: return 0.5 * z * (1.0 + erf(z / sqrt(2.0)));
    case MOE_ACT_SILU: return z / (1.0 + exp(-z));
    case MOE_ACT_TANH: return tanh(z);
    case MOE_ACT_SIGMOID: return 1.0 / (1.0 + exp(-z));
    default: return z;
    }
}

static double ref_softplus(double z) { return z > 30 ? z : log1p(exp(z)); }

/* y[out] = W[out, in] x + b */
static void ref_linear(const double *W, const double *b, const double *x, int64_t in, int64_t out, double *y) {
    int64_t o, i;
    for (o = 0; o < out; o++) {
        double s = b ? b[o] : 0.0;
        for (i = 0; i < in; i++) s += W[o * in + i] * x[i];
        y[o] = s;
    }
}

/* One expert of bank `prefix` ("experts" or "shared"), expert index e, on one input row. */
static void ref_expert(ref_run *r, int layer, const moe_layer_desc *d, const char *prefix, int e, int64_t H, const double *x, double *y) {
    char name[96];
    int64_t D = d->d_in, i;  /* README: d_expert_out; Gaussian: mean | log-std */
    int64_t O = (strcmp(prefix, "experts") == 0 && d->d_expert_out > 0 ? d->d_expert_out : d->d_out) * (d->expert == MOE_EXPERT_GAUSSIAN ? 2 : 1);
    int bias = d->bias == MOE_FLAG_ON;
    if (d->expert == MOE_EXPERT_SWIGLU || d->expert == MOE_EXPERT_GEGLU) {
        double *a = (double *)malloc(sizeof(double) * (size_t)H), *g = (double *)malloc(sizeof(double) * (size_t)H);
        const double *W1, *W2, *W3, *b1 = NULL, *b2 = NULL, *b3 = NULL;
        snprintf(name, sizeof name, "%s.w1.weight", prefix); W1 = ref_tensor(r, layer, name);
        snprintf(name, sizeof name, "%s.w2.weight", prefix); W2 = ref_tensor(r, layer, name);
        snprintf(name, sizeof name, "%s.w3.weight", prefix); W3 = ref_tensor(r, layer, name);
        if (bias) {
            snprintf(name, sizeof name, "%s.w1.bias", prefix); b1 = ref_tensor(r, layer, name) + e * H;
            snprintf(name, sizeof name, "%s.w2.bias", prefix); b2 = ref_tensor(r, layer, name) + e * O;
            snprintf(name, sizeof name, "%s.w3.bias", prefix); b3 = ref_tensor(r, layer, name) + e * H;
        }
        ref_linear(W1 + e * H * D, b1, x, D, H, a);
        ref_linear(W3 + e * H * D, b3, x, D, H, g);
        for (i = 0; i < H; i++)
            a[i] = (d->expert == MOE_EXPERT_GEGLU ? 0.5 * a[i] * (1.0 + erf(a[i] / sqrt(2.0))) : a[i] / (1.0 + exp(-a[i]))) * g[i];
        ref_linear(W2 + e * O * H, b2, a, H, O, y);
        free(a);
        free(g);
        return;
    }
    {
        int L = d->n_hidden_layers, j;
        int64_t width = D, w = D > H ? D : H;
        double *cur = (double *)malloc(sizeof(double) * (size_t)(w > O ? w : O));
        double *nxt = (double *)malloc(sizeof(double) * (size_t)(w > O ? w : O));
        memcpy(cur, x, sizeof(double) * (size_t)D);
        for (j = 0; j <= L; j++) {
            int64_t out = j == L ? O : H;
            const double *W, *b = NULL;
            snprintf(name, sizeof name, "%s.fc%d.weight", prefix, j); W = ref_tensor(r, layer, name);
            if (bias) { snprintf(name, sizeof name, "%s.fc%d.bias", prefix, j); b = ref_tensor(r, layer, name) + e * out; }
            ref_linear(W + e * out * width, b, cur, width, out, nxt);
            if (j < L) for (i = 0; i < out; i++) nxt[i] = ref_act(r, d->activation, nxt[i]);
            memcpy(cur, nxt, sizeof(double) * (size_t)out);
            width = out;
        }
        memcpy(y, cur, sizeof(double) * (size_t)O);
        free(cur);
        free(nxt);
    }
}

static double ref_cv2(const double *v, int64_t n) {
    double m = 0, var = 0;
    int64_t i;
    for (i = 0; i < n; i++) m += v[i];
    m /= (double)n;
    for (i = 0; i < n; i++) var += (v[i] - m) * (v[i] - m);
    var /= (double)n;
    return var / (m * m + 1e-10);
}

static double ref_phi(double z) { return 0.5 * erfc(-z / sqrt(2.0)); }

/* h[a] before h[b] in the selection order (larger first, ties to the lower index) */
static int ref_before(const double *h, int64_t a, int64_t b) { return h[a] > h[b] || (h[a] == h[b] && a < b); }

/* splitmix64 finaliser and the counter-based generator of README.md (Model reference, hash router) */
static uint64_t ref_mix(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* idx[0..n) = the n entries of v[0..m) in the selection order (larger first, ties to the lower
   index; -inf entries never chosen before finite ones); records the order and the runner-up. */
static void ref_pick(ref_run *r, const double *v, int64_t m, int64_t n, int64_t *idx) {
    int64_t s, e, q;
    for (s = 0; s <= n && s < m; s++) {
        int64_t best = -1;
        for (e = 0; e < m; e++) {
            int taken = 0;
            for (q = 0; q < s; q++) taken |= idx[q] == e;
            if (!taken && (best < 0 || ref_before(v, e, best))) best = e;
        }
        if (s < n) idx[s] = best;
        ref_decide(r, (uint64_t)best + (s < n ? 0u : 1000u));
    }
}

/* Soft MoE (README, soft router): logits over E*S slots, combine = softmax over a token's slots,
   dispatch = softmax over the tokens of the group per slot; slot j belongs to expert j / S. */
static void ref_soft(ref_run *r, int layer, const moe_layer_desc *d, const double *x, int64_t T, double *y) {
    int64_t E = d->n_experts, S = d->slots_per_expert, L = E * S, D = d->d_in, O = d->d_out;
    int64_t m = d->soft_group_tokens > 0 ? d->soft_group_tokens : T, G = T / m, t, j, k, c, g;
    const double *Phi = ref_tensor(r, layer, "router.weight");
    double *lg = (double *)malloc(sizeof(double) * (size_t)(T * L)), *C = (double *)malloc(sizeof(double) * (size_t)(T * L));
    double *Dw = (double *)malloc(sizeof(double) * (size_t)(T * L)), *xs = (double *)malloc(sizeof(double) * (size_t)D);
    double *ys = (double *)malloc(sizeof(double) * (size_t)(L * O));
    for (t = 0; t < T; t++) ref_linear(Phi, NULL, x + t * D, D, L, lg + t * L);
    for (t = 0; t < T; t++) {
        double mx = -DBL_MAX, z = 0;
        for (j = 0; j < L; j++) mx = lg[t * L + j] > mx ? lg[t * L + j] : mx;
        for (j = 0; j < L; j++) z += exp(lg[t * L + j] - mx);
        for (j = 0; j < L; j++) C[t * L + j] = exp(lg[t * L + j] - mx) / z;
    }
    for (g = 0; g < G; g++) {
        for (j = 0; j < L; j++) {
            double mx = -DBL_MAX, z = 0;
            for (k = g * m; k < (g + 1) * m; k++) mx = lg[k * L + j] > mx ? lg[k * L + j] : mx;
            for (k = g * m; k < (g + 1) * m; k++) z += exp(lg[k * L + j] - mx);
            for (k = g * m; k < (g + 1) * m; k++) Dw[k * L + j] = exp(lg[k * L + j] - mx) / z;
            for (c = 0; c < D; c++) xs[c] = 0;
            for (k = g * m; k < (g + 1) * m; k++)
                for (c = 0; c < D; c++) xs[c] += Dw[k * L + j] * x[k * D + c];
            ref_expert(r, layer, d, "experts", (int)(j / S), d->d_hidden, xs, ys + j * O);
        }
        for (k = g * m; k < (g + 1) * m; k++)
            for (c = 0; c < O; c++) {
                double v = d->residual ? x[k * D + c] : 0.0;
                for (j = 0; j < L; j++) v += C[k * L + j] * ys[j * O + c];
                y[k * O + c] = v;
            }
    }
    for (j = 0; j < E && j < 64; j++) r->kept[layer][j] = (double)(G * S);
    r->dropped[layer] = 0;
    r->aux[layer][0] = r->aux[layer][1] = r->aux[layer][2] = r->aux[layer][3] = 0;
    free(lg); free(C); free(Dw); free(xs); free(ys);
}

static void ref_moe(ref_run *r, int layer, const moe_layer_desc *d, const double *x, int64_t T, double *y) {
    int64_t E = d->n_experts, K = r->top_k ? r->top_k : d->top_k, D = d->d_in, O = d->d_out, t, e, s, j;
    int hier = d->router == MOE_ROUTER_HIERARCHICAL;
    int noisy = d->router == MOE_ROUTER_NOISY_TOPK || (hier && d->expert_router == MOE_ROUTER_NOISY_TOPK), sigmoid = d->router == MOE_ROUTER_SIGMOID;
    int ec = d->router == MOE_ROUTER_EXPERT_CHOICE, hash = d->router == MOE_ROUTER_HASH;
    int64_t kg = K;           /* hierarchical: experts per chosen group; K becomes the entries per token */
    int64_t KS = ec ? E : hier ? (K = d->top_k_groups * kg) : K;  /* slots per token */
    int64_t HG = hier ? d->n_groups : 1;
    const double *Wg = hier ? ref_tensor(r, layer, "router.group.weight") : NULL;
    const double *bg = hier && d->router_bias == MOE_FLAG_ON ? ref_tensor(r, layer, "router.group.bias") : NULL;
    const double *Wgn = hier && d->group_router == MOE_ROUTER_NOISY_TOPK ? ref_tensor(r, layer, "router.group.noise_weight") : NULL;
    double *ga = (double *)calloc((size_t)(HG + 1), sizeof(double)), *gsd = (double *)calloc((size_t)(HG + 1), sizeof(double));
    double *gpr = (double *)calloc((size_t)(HG + 1), sizeof(double)), *pwt = (double *)calloc((size_t)E, sizeof(double));
    int64_t *hidx = (int64_t *)calloc((size_t)(E + 2), sizeof(int64_t));
    if (d->router == MOE_ROUTER_SOFT) { free(ga); free(gsd); free(gpr); free(pwt); free(hidx); ref_soft(r, layer, d, x, T, y); return; }
    const double *Wr = ref_tensor(r, layer, "router.weight");
    const double *sbias = sigmoid ? ref_tensor(r, layer, "router.selection_bias") : NULL;
    const double *br = d->router_bias == MOE_FLAG_ON ? ref_tensor(r, layer, "router.bias") : NULL;
    const double *Wn = noisy ? ref_tensor(r, layer, "router.noise_weight") : NULL;
    double *u = (double *)malloc(sizeof(double) * (size_t)(T * D));
    double *c = (double *)calloc((size_t)(T * E), sizeof(double)), *sd = (double *)calloc((size_t)(T * E), sizeof(double));
    double *h = (double *)calloc((size_t)(T * E), sizeof(double)), *p = (double *)calloc((size_t)(T * E), sizeof(double));
    double *lse = (double *)calloc((size_t)T, sizeof(double)), *gate = (double *)calloc((size_t)(T * KS), sizeof(double));
    int64_t *sel = (int64_t *)calloc((size_t)(T * KS + 1), sizeof(int64_t));
    int *kept = (int *)calloc((size_t)(T * KS), sizeof(int));
    double *key = (double *)calloc((size_t)E, sizeof(double)), *gsc = (double *)calloc((size_t)E, sizeof(double));
    int64_t *gidx = (int64_t *)calloc((size_t)E + 1, sizeof(int64_t));
    int64_t *count = (int64_t *)calloc((size_t)E, sizeof(int64_t)), *chosen = (int64_t *)calloc((size_t)E, sizeof(int64_t));
    int64_t De = d->d_expert_out;
    int stack = d->combine == MOE_COMBINE_STACK;
    double *fx = (double *)malloc(sizeof(double) * (size_t)(2 * (O > De ? O : De)));  /* Gaussian: mean | log-std */
    double *cat = (double *)calloc((size_t)(E * De), sizeof(double));
    double *aux = r->aux[layer];
    int gauss = d->expert == MOE_EXPERT_GAUSSIAN;
    int64_t W = gauss ? E * (1 + 2 * O) : O;
    int64_t cap = 0;
    /* step 1 */
    for (t = 0; t < T; t++)
        for (j = 0; j < D; j++) {
            double J = 1.0;
            if (r->training && d->jitter > 0.0f) {
                uint64_t stream = ((uint64_t)3 << 56) ^ ((uint64_t)layer << 40) ^ (uint64_t)r->step;
                J = (double)(1.0f - d->jitter + 2.0f * d->jitter * moe_rng_uniform(r->seed, stream, (uint64_t)(t * D + j)));
            }
            u[t * D + j] = x[t * D + j] * J;
        }
    for (t = 0; t < T && !hash; t++) {
        ref_linear(Wr, br, u + t * D, D, E, c + t * E);
        if (noisy) {
            ref_linear(Wn, NULL, u + t * D, D, E, sd + t * E);
            for (e = 0; e < E; e++) {
                double n = r->training && r->noise && r->noise[layer] ? (double)r->noise[layer][t * E + e] : 0.0;
                sd[t * E + e] = ref_softplus(sd[t * E + e]);
                h[t * E + e] = c[t * E + e] + n * sd[t * E + e];
            }
        } else {
            for (e = 0; e < E; e++) h[t * E + e] = c[t * E + e];
        }
    }
    /* steps 2-3 */
    for (t = 0; t < T; t++) {
        const double *ht = h + t * E;
        double m = -DBL_MAX, z = 0;
        int64_t n = K, *st = sel + t * KS;
        double *gt = gate + t * KS, *pt = p + t * E;
        if (hash) {  /* k distinct experts from moe_rng_u64(hash_seed, layer, id << 32 | c) mod E */
            uint64_t id = (uint64_t)(uint32_t)r->token_ids[t] << 32, c2;
            int64_t got = 0, q;
            for (c2 = 0; got < K; c2++) {
                uint64_t v = ref_mix(ref_mix(ref_mix((uint64_t)d->hash_seed) ^ (uint64_t)layer) ^ (id | c2));
                int seen = 0;
                e = (int64_t)(v % (uint64_t)E);
                for (q = 0; q < got; q++) seen |= st[q] == e;
                if (!seen) st[got++] = e;
            }
            for (s = 0; s < K; s++) { gt[s] = 1.0 / (double)K; chosen[st[s]]++; }
            continue;
        }
        if (hier) {  /* group softmax, the best top_k_groups groups; softmax inside each group; k best in each chosen */
            int64_t G = d->n_groups, gn = E / G, q, i2, Kg = d->top_k_groups;
            double gm = -DBL_MAX, gz = 0, gs2 = 0;
            ref_linear(Wg, bg, u + t * D, D, G, ga);
            if (Wgn) {
                ref_linear(Wgn, NULL, u + t * D, D, G, gsd);
                for (q = 0; q < G; q++) {
                    double nz = r->training && r->noise && r->noise[layer] ? (double)r->noise[layer][T * E + t * G + q] : 0.0;
                    ga[q] += nz * ref_softplus(gsd[q]);
                }
            }
            for (q = 0; q < G; q++) gm = ga[q] > gm ? ga[q] : gm;
            for (q = 0; q < G; q++) gz += exp(ga[q] - gm);
            for (q = 0; q < G; q++) gpr[q] = exp(ga[q] - gm) / gz;
            ref_pick(r, ga, G, Kg, gidx);
            for (i2 = 0; i2 < Kg; i2++) gs2 += exp(ga[gidx[i2]] - ga[gidx[0]]);
            for (q = 0; q < G; q++) {
                double wm = -DBL_MAX, wz = 0;
                for (e = q * gn; e < (q + 1) * gn; e++) wm = ht[e] > wm ? ht[e] : wm;
                for (e = q * gn; e < (q + 1) * gn; e++) wz += exp(ht[e] - wm);
                for (e = q * gn; e < (q + 1) * gn; e++) { pwt[e] = exp(ht[e] - wm) / wz; pt[e] = gpr[q] * pwt[e]; }
            }
            for (i2 = 0; i2 < Kg; i2++) {
                int64_t base = gidx[i2] * gn;
                double ggi = d->renormalize == MOE_FLAG_ON ? exp(ga[gidx[i2]] - ga[gidx[0]]) / gs2 : gpr[gidx[i2]], ws = 0;
                ref_pick(r, ht + base, gn, kg, hidx);
                for (s = 0; s < kg; s++) ws += exp(ht[base + hidx[s]] - ht[base + hidx[0]]);
                for (s = 0; s < kg; s++) {
                    st[i2 * kg + s] = base + hidx[s];
                    gt[i2 * kg + s] = ggi * (d->renormalize == MOE_FLAG_ON ? exp(ht[base + hidx[s]] - ht[base + hidx[0]]) / ws : pwt[base + hidx[s]]);
                    chosen[base + hidx[s]]++;
                }
            }
            continue;
        }
        if (sigmoid) {
            int64_t G = d->n_groups, gn = E / G, q, i2;
            double S = 0;
            for (e = 0; e < E; e++) { pt[e] = 1.0 / (1.0 + exp(-ht[e])); key[e] = pt[e] + sbias[e]; }
            if (G > 1) {
                int64_t two[3];
                for (q = 0; q < G; q++) {
                    ref_pick(r, key + q * gn, gn, gn < 2 ? 1 : 2, two);
                    gsc[q] = key[q * gn + two[0]] + (gn < 2 ? 0.0 : key[q * gn + two[1]]);
                }
                ref_pick(r, gsc, G, d->top_k_groups, gidx);
                for (e = 0; e < E; e++) {
                    int in = 0;
                    for (i2 = 0; i2 < d->top_k_groups; i2++) in |= gidx[i2] == e / gn;
                    if (!in) key[e] = -INFINITY;
                }
            }
            ref_pick(r, key, E, K, st);
            for (s = 0; s < K; s++) { S += pt[st[s]]; chosen[st[s]]++; }
            for (s = 0; s < K; s++) gt[s] = (d->renormalize == MOE_FLAG_ON ? pt[st[s]] / S : pt[st[s]]) * (double)d->routed_scaling_factor;
            continue;
        }
        for (e = 0; e < E; e++) m = ht[e] > m ? ht[e] : m;
        for (e = 0; e < E; e++) z += exp(ht[e] - m);
        lse[t] = m + log(z);
        for (e = 0; e < E; e++) pt[e] = exp(ht[e] - lse[t]);
        if (ec) continue;
        ref_pick(r, ht, E, K, st);
        if (r->top_p > 0) {
            double cum = 0;
            for (n = 0; n < K && cum < (double)r->top_p; n++) cum += (double)(float)pt[st[n]];
            ref_decide(r, (uint64_t)n + 77);
        }
        for (s = 0; s < n; s++) chosen[st[s]]++;
        if (d->renormalize == MOE_FLAG_ON) {
            double zs = 0;
            for (s = 0; s < n; s++) zs += exp(ht[st[s]] - ht[st[0]]);
            for (s = 0; s < n; s++) gt[s] = exp(ht[st[s]] - ht[st[0]]) / zs;
        } else {
            for (s = 0; s < n; s++) gt[s] = pt[st[s]];
        }
        for (s = n; s < K; s++) { st[s] = -1; gt[s] = 0; }
    }
    /* step 4 */
    if (d->capacity_factor > 0.0f) cap = (int64_t)ceil((double)d->capacity_factor * (double)T * (double)K / (double)E);
    if (ec) {  /* expert e takes the cap tokens of largest p[., e] (ties: lower token); gate = p */
        double *col = (double *)malloc(sizeof(double) * (size_t)T);
        int64_t *pick = (int64_t *)malloc(sizeof(int64_t) * (size_t)(T + 1));
        if (cap < 1) cap = 1;
        if (cap > T) cap = T;
        for (e = 0; e < E; e++) {
            for (t = 0; t < T; t++) { col[t] = p[t * E + e]; sel[t * E + e] = e; gate[t * E + e] = p[t * E + e]; }
            ref_pick(r, col, T, cap, pick);
            for (s = 0; s < cap; s++) kept[pick[s] * E + e] = 1;
            count[e] = chosen[e] = cap;
        }
        free(col);
        free(pick);
    } else {
        for (s = 0; s < K; s++)
            for (t = 0; t < T; t++) {
                e = sel[t * K + s];
                kept[t * K + s] = e >= 0 && (!cap || count[e] < cap);
                if (kept[t * K + s]) count[e]++;
                ref_decide(r, (uint64_t)kept[t * K + s]);
            }
    }
    for (e = 0; e < E && e < 64; e++) r->kept[layer][e] = (double)count[e];
    r->dropped[layer] = 0;
    /* steps 5-6 */
    for (t = 0; t < T && gauss; t++) {  /* the packed mixture (log pi | means | clamped log-stds) */
        double *yt = y + t * W;
        for (j = 0; j < W; j++) yt[j] = j < E ? -INFINITY : 0.0;
        for (s = 0; s < KS; s++) {
            if (!kept[t * KS + s]) continue;
            e = sel[t * KS + s];
            ref_expert(r, layer, d, "experts", (int)e, d->d_hidden, x + t * D, fx);
            yt[e] = log(gate[t * KS + s]);
            for (j = 0; j < O; j++) {
                double ls = fx[O + j];
                ref_decide(r, (uint64_t)(ls < MOE_MIXTURE_LOG_STD_MIN) + 2u * (uint64_t)(ls > MOE_MIXTURE_LOG_STD_MAX));
                yt[E + e * O + j] = fx[j];
                yt[E + E * O + e * O + j] = ls < MOE_MIXTURE_LOG_STD_MIN ? MOE_MIXTURE_LOG_STD_MIN : ls > MOE_MIXTURE_LOG_STD_MAX ? MOE_MIXTURE_LOG_STD_MAX : ls;
            }
        }
    }
    for (t = 0; t < T && !gauss; t++) {
        double *yt = y + t * O;
        const double *xt = x + t * D;
        int any = 0;
        for (s = 0; s < KS; s++) any |= kept[t * KS + s];
        if (!any) r->dropped[layer] += 1;
        for (j = 0; j < O; j++) yt[j] = (d->residual || (!any && O == D)) ? xt[j] : 0.0;
        for (j = 0; j < E * De; j++) cat[j] = 0.0;
        for (s = 0; s < KS; s++) {
            if (!kept[t * KS + s]) continue;
            ref_expert(r, layer, d, "experts", (int)sel[t * KS + s], d->d_hidden, xt, fx);
            if (stack) for (j = 0; j < De; j++) cat[sel[t * KS + s] * De + j] = gate[t * KS + s] * fx[j];
            else for (j = 0; j < O; j++) yt[j] += gate[t * KS + s] * fx[j];
        }
        if (stack) {  /* y += Wc cat + bc */
            const double *Wc = ref_tensor(r, layer, "combine.weight"), *bc = ref_tensor(r, layer, "combine.bias");
            ref_linear(Wc, bc, cat, E * De, O, fx);
            for (j = 0; j < O; j++) yt[j] += fx[j];
        }
        for (s = 0; s < d->n_shared_experts; s++) {
            double gq = 1.0;
            ref_expert(r, layer, d, "shared", (int)s, d->d_shared_hidden, xt, fx);
            if (d->shared_gate == MOE_FLAG_ON) {  /* sigmoid(x . g_s) */
                const double *G = ref_tensor(r, layer, "shared.gate.weight") + s * D;
                double z = 0.0;
                for (j = 0; j < D; j++) z += G[j] * xt[j];
                gq = 1.0 / (1.0 + exp(-z));
            }
            for (j = 0; j < O; j++) yt[j] += gq * fx[j];
        }
    }
    /* auxiliary losses */
    aux[0] = aux[1] = aux[2] = aux[3] = 0;
    if (d->balance_loss > 0.0f) {
        double sum = 0;
        for (e = 0; e < E; e++) {
            double P = 0;
            for (t = 0; t < T; t++) P += p[t * E + e];
            sum += ((double)chosen[e] / (double)(T * K)) * (P / (double)T);
        }
        aux[0] = d->balance_loss * (double)E * sum;
    }
    if (d->z_loss > 0.0f) {
        double sum = 0;
        for (t = 0; t < T; t++) sum += lse[t] * lse[t];
        aux[1] = d->z_loss * sum / (double)T;
    }
    if (d->importance_loss > 0.0f) {
        double *I = (double *)calloc((size_t)E, sizeof(double));
        for (t = 0; t < T; t++) for (s = 0; s < K; s++) if (sel[t * K + s] >= 0) I[sel[t * K + s]] += gate[t * K + s];
        aux[2] = d->importance_loss * ref_cv2(I, E);
        free(I);
    }
    if (d->load_loss > 0.0f && K < E) {
        double *load = (double *)calloc((size_t)E, sizeof(double));
        double *sorted = (double *)malloc(sizeof(double) * (size_t)E);
        for (t = 0; t < T; t++) {
            const double *ht = h + t * E;
            double th_in, th_out;
            int64_t a, b2;
            memcpy(sorted, ht, sizeof(double) * (size_t)E);
            for (a = 1; a < E; a++)  /* insertion sort, descending */
                for (b2 = a; b2 > 0 && sorted[b2] > sorted[b2 - 1]; b2--) { double tmp = sorted[b2]; sorted[b2] = sorted[b2 - 1]; sorted[b2 - 1] = tmp; }
            th_in = sorted[K];
            th_out = sorted[K - 1];
            for (e = 0; e < E; e++) {
                int in = ht[e] > th_in;
                double th = in ? th_in : th_out;
                ref_decide(r, (uint64_t)in + 7);
                load[e] += ref_phi((c[t * E + e] - th) / sd[t * E + e]);
            }
        }
        aux[3] = d->load_loss * ref_cv2(load, E);
        free(load);
        free(sorted);
    }
    free(u); free(c); free(sd); free(h); free(p); free(lse); free(gate); free(sel); free(kept); free(count); free(chosen); free(fx); free(cat);
    free(key); free(gsc); free(gidx);
    free(ga); free(gsd); free(gpr); free(pwt); free(hidx);
}

/* Output width of a layer: d_out, or the packed mixture E (1 + 2 d_out) of Gaussian experts. */
static int64_t ref_width(const moe_layer_desc *d) {
    return d->kind == MOE_LAYER_MOE && d->expert == MOE_EXPERT_GAUSSIAN ? (int64_t)d->n_experts * (1 + 2 * d->d_out) : d->d_out;
}

/* Multi-task layers (README 3.9): every expert on its input slice; gate g = softmax(W_g x_slice) over
   its experts (task gate: the task's own experts, then the shared ones; shared gate: every task
   expert, task by task, then the shared ones; a gate over one expert is 1). */
static void ref_multitask(ref_run *r, int layer, const moe_layer_desc *d, const double *x, int64_t T, double *y) {
    int towers = d->kind == MOE_LAYER_TASK_TOWERS, nt = d->n_tasks, et = d->n_task_experts, S = towers ? 0 : d->n_experts;
    int single = d->task_input == MOE_TASK_INPUT_SINGLE;
    int gin = single ? 1 : d->task_input == MOE_TASK_INPUT_TASKS ? nt : nt + 1, gout = nt + (d->shared_output ? 1 : 0), g;
    int64_t D = d->d_in / gin, O = d->d_out / gout, n_all = (int64_t)nt * et + S, t, k, j, c;
    moe_layer_desc e = *d;
    double *fx = (double *)malloc(sizeof(double) * (size_t)(n_all * O)), *z = (double *)malloc(sizeof(double) * (size_t)n_all);
    int64_t *member = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * n_all));   /* gate members, then kept flags */
    e.d_in = D;
    e.d_out = O;
    for (t = 0; t < T; t++) {
        const double *xt = x + t * d->d_in;
        for (k = 0; k < (int64_t)nt * et; k++)
            ref_expert(r, layer, &e, towers ? "towers" : "task_experts", (int)k, d->d_hidden, xt + (single ? 0 : k / et) * D, fx + k * O);
        for (k = 0; k < S; k++) ref_expert(r, layer, &e, "experts", (int)k, d->d_hidden, xt + (single ? 0 : nt) * D, fx + (nt * et + k) * O);
        for (g = 0; g < gout; g++) {
            int64_t n = 0;
            double *yt = y + t * d->d_out + g * O;
            if (g < nt) for (k = 0; k < et; k++) member[n++] = (int64_t)g * et + k;
            else for (k = 0; k < (int64_t)nt * et; k++) member[n++] = k;
            for (k = 0; k < S; k++) member[n++] = (int64_t)nt * et + k;
            if (n == 1) {
                z[0] = 1.0;
            } else {
                char name[32];
                const double *W;
                double m = -DBL_MAX, sum = 0;
                snprintf(name, sizeof name, "gates.%d.weight", g);
                W = ref_tensor(r, layer, name);
                ref_linear(W, NULL, xt + (single ? 0 : g) * D, D, n, z);
                for (c = 0; c < n; c++) m = z[c] > m ? z[c] : m;
                if (d->top_k > 0 && d->top_k < n) {
                    /* top-k gate: the k largest logits (ties: lower index), softmax over them, others 0 */
                    int64_t q;
                    for (c = 0; c < n; c++) {
                        int64_t ahead = 0;
                        for (q = 0; q < n; q++) ahead += z[q] > z[c] || (z[q] == z[c] && q < c);
                        member[n + c] = ahead < d->top_k;
                        ref_decide(r, (uint64_t)(ahead * 64 + c));
                    }
                    for (c = 0; c < n; c++) z[c] = member[n + c] ? exp(z[c] - m) : 0.0;
                } else {
                    for (c = 0; c < n; c++) z[c] = exp(z[c] - m);
                }
                for (c = 0; c < n; c++) sum += z[c];
                for (c = 0; c < n; c++) z[c] /= sum;
            }
            for (j = 0; j < O; j++) {
                double s = 0;
                for (c = 0; c < n; c++) s += z[c] * fx[member[c] * O + j];
                yt[j] = s;
            }
        }
    }
    free(fx); free(z); free(member);
}

static void ref_layer(ref_run *r, int layer, const moe_layer_desc *d, const double *x, int64_t T, double *y) {
    int64_t D = d->d_in, O = d->d_out, t, j;
    if (d->kind == MOE_LAYER_MOE) { ref_moe(r, layer, d, x, T, y); return; }
    if (d->kind == MOE_LAYER_MULTIGATE || d->kind == MOE_LAYER_TASK_TOWERS) { ref_multitask(r, layer, d, x, T, y); return; }
    if (d->kind == MOE_LAYER_EMBEDDING) {  /* y[t, p*De + j] = W[x[t, p], j] */
        const double *W = ref_tensor(r, layer, "weight");
        int64_t De = d->d_embedding, p;
        for (t = 0; t < T; t++)
            for (p = 0; p < D; p++)
                for (j = 0; j < De; j++) y[(t * D + p) * De + j] = W[(int64_t)x[t * D + p] * De + j];
        return;
    }
    for (t = 0; t < T; t++) {
        const double *xt = x + t * D;
        double *yt = y + t * O;
        if (d->kind == MOE_LAYER_DENSE) {
            const double *W = ref_tensor(r, layer, "weight"), *b = d->bias == MOE_FLAG_ON ? ref_tensor(r, layer, "bias") : NULL;
            ref_linear(W, b, xt, D, O, yt);
            for (j = 0; j < O; j++) yt[j] = ref_act(r, d->activation, yt[j]);
        } else {
            const double *w = ref_tensor(r, layer, "weight"), *b = d->kind == MOE_LAYER_LAYERNORM ? ref_tensor(r, layer, "bias") : NULL;
            double mean = 0, var = 0;
            if (b) { for (j = 0; j < D; j++) mean += xt[j]; mean /= (double)D; }
            for (j = 0; j < D; j++) var += (xt[j] - mean) * (xt[j] - mean);
            var /= (double)D;
            for (j = 0; j < D; j++) yt[j] = (xt[j] - mean) / sqrt(var + (double)d->eps) * w[j] + (b ? b[j] : 0.0);
        }
        if (d->residual) for (j = 0; j < O; j++) yt[j] += xt[j];
    }
}

/* Forward of the whole model on x [T, d_in] (float input). y [T, d_out] gets the output.
   Returns the sum of the layers' auxiliary losses. */
static double ref_model_forward(ref_run *r, const float *x, int64_t T, double *y) {
    const moe_model_desc *md = moe_model_get_desc(r->model);
    int64_t width = md->d_in, i;
    double *cur = (double *)malloc(sizeof(double) * (size_t)(T * width)), aux = 0;
    int l, q;
    r->sig = 1469598103934665603ull;
    for (i = 0; i < T * width; i++) cur[i] = x[i];
    for (l = 0; l < md->n_layers; l++) {
        const moe_layer_desc *d = &md->layers[l];
        double *nxt = (double *)malloc(sizeof(double) * (size_t)(T * ref_width(d)));
        for (q = 0; q < 4; q++) r->aux[l][q] = 0;
        ref_layer(r, l, d, cur, T, nxt);
        for (q = 0; q < 4; q++) aux += r->aux[l][q];
        free(cur);
        cur = nxt;
        width = ref_width(d);
    }
    memcpy(y, cur, sizeof(double) * (size_t)(T * width));
    free(cur);
    return aux;
}

/* Multi-task loss (README section 4): sum_i w_i * loss_i on the output's task slices; task i's
   labels are labels[i*T ..], its values the block values[off*T ..] of [T, task_d_out[i]]. */
static TEST_UNUSED double ref_task_loss(moe_loss kind, const double *y, int64_t T, int64_t C, const int32_t *labels, const float *values);
static TEST_UNUSED double ref_multi_task_loss(const moe_model_desc *md, const double *y, int64_t T, int64_t C, const int32_t *labels, const float *values) {
    double v = 0;
    int64_t off = 0, t, j;
    int i;
    for (i = 0; i < md->n_tasks; i++) {
        int64_t w = md->task_d_out[i];
        double *ys = (double *)malloc(sizeof(double) * (size_t)(T * w));
        for (t = 0; t < T; t++) for (j = 0; j < w; j++) ys[t * w + j] = y[t * C + off + j];
        v += (double)md->task_weight[i] * ref_task_loss(md->task_loss[i], ys, T, w, labels + i * T, values + off * T);
        free(ys);
        off += w;
    }
    return v;
}

/* Task loss per README.md (Model reference) section 4. */
static TEST_UNUSED double ref_task_loss(moe_loss kind, const double *y, int64_t T, int64_t C, const int32_t *labels, const float *values) {
    double sum = 0;
    int64_t t, c;
    for (t = 0; t < T; t++) {
        const double *yt = y + t * C;
        if (kind == MOE_LOSS_CROSS_ENTROPY) {
            double m = -DBL_MAX, z = 0;
            for (c = 0; c < C; c++) m = yt[c] > m ? yt[c] : m;
            for (c = 0; c < C; c++) z += exp(yt[c] - m);
            sum += m + log(z) - yt[labels[t]];
        } else {
            double s = 0;
            for (c = 0; c < C; c++) {
                double v = yt[c], q = values[t * C + c];
                s += kind == MOE_LOSS_MSE ? (v - q) * (v - q) : ref_softplus(v) - q * v;
            }
            sum += s / (double)C;
        }
    }
    return sum / (double)T;
}

/* Gaussian-mixture NLL (README.md, Model reference, section 4) of y [T, E (1 + 2 O)] against values [T, O]. */
static TEST_UNUSED double ref_mixture_nll(const double *y, int64_t T, int64_t E, int64_t O, const float *values) {
    double sum = 0;
    int64_t t, e, j, W = E * (1 + 2 * O);
    for (t = 0; t < T; t++) {
        const double *yt = y + t * W;
        double m = -INFINITY, z = 0, *le = (double *)malloc(sizeof(double) * (size_t)E);
        for (e = 0; e < E; e++) {
            le[e] = yt[e];
            for (j = 0; j < O; j++) {
                double mu = yt[E + e * O + j], ls = yt[E + E * O + e * O + j], q = ((double)values[t * O + j] - mu) / exp(ls);
                le[e] += -0.5 * q * q - ls - 0.5 * log(2.0 * 3.14159265358979323846);
            }
            m = le[e] > m ? le[e] : m;
        }
        for (e = 0; e < E; e++) z += exp(le[e] - m);
        sum += -(m + log(z));
        free(le);
    }
    return sum / (double)T;
}

#endif
