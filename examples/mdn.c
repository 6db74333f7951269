/* mdn.c - a mixture-density MoE on Bishop's inverse problem (Bishop 1994, "Mixture Density
   Networks"): y ~ U(0, 1), x = y + 0.3 sin(2 pi y) + U(-0.1, 0.1), and the task is to predict y
   from x. For x in about 0.3..0.7 three values of y fit, so the conditional mean, which a network
   trained with MSE learns, lies between the branches where no data is. A MoE with Gaussian
   experts (MOE_EXPERT_GAUSSIAN, loss MOE_LOSS_MIXTURE_NLL) learns the whole conditional density:
   each expert one branch (a mean and a log-std per x), the router how much each branch holds.

     make mdn          (or: build/mdn [SVG] [--seed N] [--epochs N] [--threads N]; SVG default
                        build/mdn.svg, 200 epochs, 1 thread: waking threads costs more than this
                        model's products gain)

   Trains both models on the same 2,000 points, evaluates on 2,000 others and prints
     test_nll=                    the MoE's mixture negative log-likelihood (nats per point)
     test_nll_gaussian_baseline=  the MSE network read as one Gaussian: its prediction as the mean,
                                  its training RMS error as the std
     test_mse_baseline=           the MSE network's mean squared error
     test_mse_mixture_mean=       the MSE of the MoE's mixture mean sum_e pi_e mu_e (moe_mixture_mean)
     test_mse_top_mean=           the MSE of the most probable component's mean (moe_mixture_top_mean)
   and writes an SVG: the data, each component's mean curve with its opacity and width following
   its mixing weight, samples drawn from the mixture (moe_mixture_sample), and the MSE fit. */
#define MOE_IMPLEMENTATION
#include "../moe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N_TRAIN 2000
#define N_TEST 2000
#define BATCH 100
#define COMPONENTS 3
#define GRID 200                 /* x values of the curves in the plot */
#define CHUNK 250                /* rows per evaluation forward (max_tokens) */

/* Point i of stream s: y ~ U(0, 1), x = y + 0.3 sin(2 pi y) + U(-0.1, 0.1); the net sees 2x - 1. */
static void make_data(uint64_t seed, uint64_t stream, int n, float *x, float *y) {
    int i;
    for (i = 0; i < n; i++) {
        float t = moe_rng_uniform(seed, stream, 2 * (uint64_t)i);
        float noise = 0.2f * moe_rng_uniform(seed, stream, 2 * (uint64_t)i + 1) - 0.1f;
        y[i] = t;
        x[i] = 2.0f * (t + 0.3f * sinf(6.2831853f * t) + noise) - 1.0f;
    }
}

/* Train with shuffled mini-batches; prints the mean training loss now and then. */
static int train(moe_model *m, const char *name, const float *x, const float *y, int epochs, uint64_t seed) {
    int order[N_TRAIN], epoch, i;
    float xb[BATCH], yb[BATCH];
    for (i = 0; i < N_TRAIN; i++) order[i] = i;
    for (epoch = 1; epoch <= epochs; epoch++) {
        double sum = 0.0;
        int start;
        for (i = N_TRAIN - 1; i > 0; i--) {  /* Fisher-Yates from the seed and the epoch */
            int j = (int)(moe_rng_u64(seed, 100 + (uint64_t)epoch, (uint64_t)i) % (uint64_t)(i + 1)), tmp = order[i];
            order[i] = order[j];
            order[j] = tmp;
        }
        for (start = 0; start < N_TRAIN; start += BATCH) {
            moe_step_info info;
            moe_target target = {NULL, yb, NULL};
            for (i = 0; i < BATCH; i++) { xb[i] = x[order[start + i]]; yb[i] = y[order[start + i]]; }
            if (moe_model_train_step(m, xb, &target, BATCH, &info) != MOE_OK) return 1;
            sum += info.loss;
        }
        if (epoch % (epochs / 4) == 0 || epoch == 1)
            printf("%-4s epoch=%d train_loss=%.4f\n", name, epoch, sum / (N_TRAIN / BATCH));
    }
    return 0;
}

/* The model's outputs for n inputs, CHUNK rows per forward. */
static int predict(moe_model *m, const float *x, int n, float *out) {
    int64_t w = moe_model_d_out(m);
    int s;
    for (s = 0; s < n; s += CHUNK) {
        int rows = n - s < CHUNK ? n - s : CHUNK;
        if (moe_model_forward(m, x + s, rows, out + (int64_t)s * w, NULL) != MOE_OK) return 1;
    }
    return 0;
}

static double mse(const float *a, const float *b, int n) {
    double s = 0.0;
    int i;
    for (i = 0; i < n; i++) s += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
    return s / n;
}

/* Plot coordinates: x in [-0.15, 1.15] (the raw x), y in [-0.1, 1.1]. */
static double px(float xin) { return 50.0 + ((xin + 1.0) / 2.0 + 0.15) / 1.3 * 560.0; }
static double py(float y) { return 430.0 - (y + 0.1) / 1.2 * 400.0; }

static int write_svg(const char *path, const float *x, const float *y, int n, const float *gx, const float *mix,
                     const float *samples, int n_samples, const float *base) {
    FILE *fp = fopen(path, "w");
    int i, e, W = COMPONENTS * 3;
    static const char *const colors[COMPONENTS] = {"#d62728", "#1f77b4", "#2ca02c"};
    if (!fp) return 1;
    fprintf(fp, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
                "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"640\" height=\"480\" viewBox=\"0 0 640 480\" font-family=\"sans-serif\" font-size=\"12\">\n"
                "<rect width=\"640\" height=\"480\" fill=\"white\"/>\n"
                "<rect x=\"50\" y=\"30\" width=\"560\" height=\"400\" fill=\"none\" stroke=\"#444\"/>\n"
                "<text x=\"330\" y=\"470\" text-anchor=\"middle\">x = y + 0.3 sin(2&#960;y) + U(-0.1, 0.1)</text>\n"
                "<text x=\"14\" y=\"230\" text-anchor=\"middle\" transform=\"rotate(-90 14 230)\">y</text>\n"
                "<text x=\"330\" y=\"20\" text-anchor=\"middle\">mixture-density MoE (%d Gaussian experts) vs. an MSE network</text>\n", COMPONENTS);
    for (i = 0; i <= 4; i++) {
        float v = (float)i * 0.25f;
        fprintf(fp, "<text x=\"%.1f\" y=\"445\" text-anchor=\"middle\">%.2f</text>\n", px(2.0f * v - 1.0f), v);
        fprintf(fp, "<text x=\"44\" y=\"%.1f\" text-anchor=\"end\">%.2f</text>\n", py(v) + 4.0, v);
    }
    for (i = 0; i < n; i++)
        fprintf(fp, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"1.6\" fill=\"#999\" fill-opacity=\"0.5\"/>\n", px(x[i]), py(y[i]));
    /* each component's mean, segment by segment, as opaque and wide as its mixing weight */
    for (e = 0; e < COMPONENTS; e++)
        for (i = 0; i + 1 < GRID; i++) {
            const float *a = mix + (int64_t)i * W, *b = mix + (int64_t)(i + 1) * W;
            double pi = 0.5 * (exp(a[e]) + exp(b[e]));
            fprintf(fp, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-opacity=\"%.3f\" stroke-width=\"%.2f\"/>\n",
                    px(gx[i]), py(a[COMPONENTS + e]), px(gx[i + 1]), py(b[COMPONENTS + e]), colors[e], 0.1 + 0.9 * pi, 0.5 + 4.0 * pi);
        }
    for (i = 0; i < n_samples; i++)
        fprintf(fp, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"1.8\" fill=\"#ff7f0e\"/>\n", px(gx[i % GRID]), py(samples[i]));
    fprintf(fp, "<polyline fill=\"none\" stroke=\"black\" stroke-width=\"1.5\" stroke-dasharray=\"5 3\" points=\"");
    for (i = 0; i < GRID; i++) fprintf(fp, "%.1f,%.1f ", px(gx[i]), py(base[i]));
    fprintf(fp, "\"/>\n"
                "<circle cx=\"70\" cy=\"48\" r=\"3\" fill=\"#999\"/><text x=\"80\" y=\"52\">data</text>\n"
                "<circle cx=\"70\" cy=\"66\" r=\"3\" fill=\"#ff7f0e\"/><text x=\"80\" y=\"70\">samples from the mixture</text>\n"
                "<line x1=\"62\" y1=\"84\" x2=\"78\" y2=\"84\" stroke=\"#d62728\" stroke-width=\"3\"/><text x=\"80\" y=\"88\">component means (opacity, width: mixing weight)</text>\n"
                "<line x1=\"62\" y1=\"102\" x2=\"78\" y2=\"102\" stroke=\"black\" stroke-dasharray=\"5 3\"/><text x=\"80\" y=\"106\">MSE network</text>\n"
                "</svg>\n");
    return fclose(fp) != 0;
}

int main(int argc, char **argv) {
    const char *svg = "build/mdn.svg";
    uint64_t seed = 1;
    int epochs = 200, threads = 1, i, rc = 1;  /* a model this small runs fastest on one thread */
    static float xtr[N_TRAIN], ytr[N_TRAIN], xte[N_TEST], yte[N_TEST], pred[N_TEST], mean[N_TEST], top[N_TEST];
    static float mix[N_TEST * COMPONENTS * 3], gx[GRID], gmix[GRID * COMPONENTS * 3], gbase[GRID], samples[2 * GRID];
    moe_ctx ctx;
    moe_model *mdn = NULL, *net = NULL;
    double nll = 0.0, sigma2, base_nll = 0.0;
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc) seed = strtoull(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--epochs") == 0 && i + 1 < argc) epochs = atoi(argv[++i]);
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) threads = atoi(argv[++i]);
        else if (argv[i][0] != '-') svg = argv[i];
        else { fprintf(stderr, "usage: %s [SVG] [--seed N] [--epochs N] [--threads N]\n", argv[0]); return 2; }
    }
    if (epochs < 4) epochs = 4;
    make_data(seed, 1, N_TRAIN, xtr, ytr);
    make_data(seed, 2, N_TEST, xte, yte);
    if (moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = seed, .n_threads = threads}) != MOE_OK) return 1;
    {
        /* 1 -> dense 24 tanh -> MoE: router over the 24 features, 3 experts 24 -> 16 tanh -> (mean, log-std) */
        moe_layer_desc layers[] = {
            {.kind = MOE_LAYER_DENSE, .d_out = 24, .activation = MOE_ACT_TANH},
            {.kind = MOE_LAYER_MOE, .expert = MOE_EXPERT_GAUSSIAN, .n_experts = COMPONENTS, .d_out = 1, .d_hidden = 16,
             .activation = MOE_ACT_TANH},
        };
        /* the baseline: 1 -> 36 tanh -> 36 tanh -> 1, about as many parameters */
        moe_layer_desc plain[] = {
            {.kind = MOE_LAYER_DENSE, .d_out = 36, .activation = MOE_ACT_TANH},
            {.kind = MOE_LAYER_DENSE, .d_out = 36, .activation = MOE_ACT_TANH},
            {.kind = MOE_LAYER_DENSE, .d_out = 1},
        };
        moe_optimizer_desc adam = {.kind = MOE_OPTIMIZER_ADAM, .lr = 0.005f, .clip_norm = 5.0f,
                                   .total_steps = (int64_t)epochs * (N_TRAIN / BATCH), .min_lr = 0.0005f};
        if (moe_model_create(&ctx, &(moe_model_desc){.d_in = 1, .n_layers = 2, .layers = layers, .loss = MOE_LOSS_MIXTURE_NLL,
                                                     .max_tokens = CHUNK, .optimizer = adam}, &mdn) != MOE_OK ||
            moe_model_create(&ctx, &(moe_model_desc){.d_in = 1, .n_layers = 3, .layers = plain, .loss = MOE_LOSS_MSE,
                                                     .max_tokens = CHUNK, .optimizer = adam}, &net) != MOE_OK) {
            fprintf(stderr, "mdn: %s\n", moe_ctx_error(&ctx));
            goto done;
        }
    }
    printf("mixture-density MoE: %lld parameters; MSE network: %lld parameters; %d training points, %d epochs\n",
           (long long)moe_model_parameter_count(mdn), (long long)moe_model_parameter_count(net), N_TRAIN, epochs);
    if (train(mdn, "moe", xtr, ytr, epochs, seed) || train(net, "mse", xtr, ytr, epochs, seed)) {
        fprintf(stderr, "mdn: training failed: %s\n", moe_ctx_error(&ctx));
        goto done;
    }
    /* test NLL of the mixture, chunk by chunk through the model's own loss */
    for (i = 0; i < N_TEST; i += CHUNK) {
        float loss;
        moe_target target = {NULL, yte + i, NULL};
        if (moe_model_forward(mdn, xte + i, CHUNK, mix + (int64_t)i * COMPONENTS * 3, NULL) != MOE_OK ||
            moe_model_loss(mdn, &target, &loss, NULL) != MOE_OK) goto fail;
        nll += (double)loss * CHUNK / N_TEST;
    }
    if (moe_mixture_mean(&ctx, mix, N_TEST, COMPONENTS, 1, mean) != MOE_OK ||
        moe_mixture_top_mean(&ctx, mix, N_TEST, COMPONENTS, 1, top) != MOE_OK) goto fail;
    /* the MSE network as a single Gaussian: std = its training RMS error */
    if (predict(net, xtr, N_TRAIN, pred)) goto fail;
    sigma2 = mse(pred, ytr, N_TRAIN);
    if (predict(net, xte, N_TEST, pred)) goto fail;
    for (i = 0; i < N_TEST; i++)
        base_nll += (0.5 * log(2.0 * 3.14159265358979 * sigma2) + 0.5 * ((double)yte[i] - pred[i]) * ((double)yte[i] - pred[i]) / sigma2) / N_TEST;
    /* the plot: curves over a grid of x, two samples per grid point */
    for (i = 0; i < GRID; i++) gx[i] = 2.0f * (-0.1f + 1.2f * (float)i / (GRID - 1)) - 1.0f;
    if (predict(mdn, gx, GRID, gmix) || predict(net, gx, GRID, gbase)) goto fail;
    if (moe_mixture_sample(&ctx, gmix, GRID, COMPONENTS, 1, 0, samples) != MOE_OK ||
        moe_mixture_sample(&ctx, gmix, GRID, COMPONENTS, 1, 1, samples + GRID) != MOE_OK) goto fail;
    if (write_svg(svg, xte, yte, 600, gx, gmix, samples, 2 * GRID, gbase)) {
        fprintf(stderr, "mdn: cannot write %s\n", svg);
        goto done;
    }
    printf("test_nll=%.4f\n", nll);
    printf("test_nll_gaussian_baseline=%.4f\n", base_nll);
    printf("test_mse_baseline=%.5f\n", mse(pred, yte, N_TEST));
    printf("test_mse_mixture_mean=%.5f\n", mse(mean, yte, N_TEST));
    printf("test_mse_top_mean=%.5f\n", mse(top, yte, N_TEST));
    printf("svg=%s\n", svg);
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "mdn: %s\n", moe_ctx_error(&ctx));
done:
    moe_model_destroy(mdn);
    moe_model_destroy(net);
    return rc;
}
