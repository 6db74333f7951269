/* charlm.c - a character-level Mixture-of-Experts language model on The Devil's Dictionary.

   make charlm                     train the MoE and its dense twin, then sample (about 3 minutes
                                   on 2 cores)
   ./build/charlm --router hash    experts chosen by a hash of the last character (no router weights)

   Model: the n characters before a position (their ids 0..V-1) -> embedding (n x d_embedding,
   concatenated) -> MoE layer (E MLP experts, k per token) -> MoE layer (residual) -> dense head
   over the V characters (softmax cross-entropy). The dense twin is the same network with one
   expert per MoE layer (top_k 1, router output constant 1) whose hidden width is k x d_hidden:
   its expert weights equal the k experts a token of the MoE model runs, so both models have the
   same active parameters up to the MoE routers' E x d_in weights (the counts are printed).

   Data: examples/data/devils-dictionary.txt (examples/data/README.md). The vocabulary is the set
   of bytes in the file, in byte order (id = rank). Fixed split: the first 90% of the characters
   are for training, the last 10% for validation; every validation character is predicted from
   the n characters before it (the first few of those contexts reach into the training part).

   Output: per-epoch training loss, then key=value lines (val_bpc=, val_bpc_dense=, the parameter
   counts, train seconds) and a sample: --length characters continuing --prompt, drawn with a
   seeded generator at --temperature, the same text on every run and thread count.
   Run ./build/charlm --help for the options. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MOE_IMPLEMENTATION
#include "../moe.h"

/* the architecture (README "Examples" gives the measured numbers for these) */
#define CONTEXT 16         /* characters the model sees */
#define D_EMBEDDING 16     /* width of one character's embedding */
#define D_MODEL 128        /* width between the MoE layers */
#define N_EXPERTS 8
#define TOP_K 2
#define D_HIDDEN 128       /* hidden width of one expert */
#define BATCH 256          /* default characters per training step */
/* our own streams of moe_rng_u64, apart from the ones the library uses */
#define SHUFFLE_STREAM 0x43485546ull
#define SAMPLE_STREAM 0x43534d50ull

typedef struct options {
    const char *data_path, *out_path, *prompt;
    moe_router router;
    int epochs, threads, length, dense, batch;
    long max_chars;
    float lr, temperature;
    uint64_t seed;
} options;

/* The text as ids, and the vocabulary. */
typedef struct corpus {
    unsigned char *ids;    /* [n] */
    int64_t n, split;      /* training targets: CONTEXT..split-1; validation: split..n-1 */
    int vocab;
    unsigned char chars[256]; /* id -> byte */
    int id_of[256];        /* byte -> id, -1 if absent */
} corpus;

static void usage(FILE *f) {
    fprintf(f,
        "usage: charlm [options]\n"
        "  --data FILE        the text (default examples/data/devils-dictionary.txt)\n"
        "  --router R         topk (softmax top-%d, default) or hash (the last character's id)\n"
        "  --epochs N         passes over the training characters (default 1)\n"
"  --batch N          characters per training step (default %d)\n"
        "  --lr X             peak learning rate, warm-up then cosine decay (default 0.003)\n"
        "  --max-chars N      use only the first N characters of the text (default all)\n"
        "  --no-dense         skip the dense comparison model\n"
        "  --prompt TEXT      start of the sample (default \"LOVE, n.  \")\n"
        "  --length N         characters to sample (default 300)\n"
        "  --temperature X    sampling temperature (default 0.8)\n"
        "  --seed S           seed of weights, order and sampling (default 1)\n"
        "  --threads N        worker threads, 0 = all (default 0); results do not depend on it\n"
        "  --out FILE         save the MoE model (default build/charlm.safetensors; \"\": do not save)\n", TOP_K, BATCH);
}

static int parse_long(const char *name, const char *text, long lo, long hi, long *value) {
    char *end;
    errno = 0;
    *value = strtol(text, &end, 10);
    if (errno || end == text || *end || *value < lo || *value > hi) {
        fprintf(stderr, "charlm: %s wants an integer in %ld..%ld, not \"%s\"\n", name, lo, hi, text);
        return 0;
    }
    return 1;
}

static int parse_float(const char *name, const char *text, float lo, float hi, float *value) {
    char *end;
    double v;
    errno = 0;
    v = strtod(text, &end);
    if (errno || end == text || *end || !(v > lo && v <= hi)) {
        fprintf(stderr, "charlm: %s wants a number in (%g, %g], not \"%s\"\n", name, (double)lo, (double)hi, text);
        return 0;
    }
    *value = (float)v;
    return 1;
}

static int parse_options(int argc, char **argv, options *o) {
    int i;
    long v;
    memset(o, 0, sizeof *o);
    o->data_path = "examples/data/devils-dictionary.txt";
    o->out_path = "build/charlm.safetensors";
    o->prompt = "LOVE, n.  ";
    o->router = MOE_ROUTER_TOPK;
    o->epochs = 1;
    o->batch = BATCH;
    o->length = 300;
    o->dense = 1;
    o->lr = 3e-3f;
    o->temperature = 0.8f;
    o->seed = 1;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) { usage(stdout); exit(0); }
        if (strcmp(a, "--no-dense") == 0) { o->dense = 0; continue; }
        if (!val) { fprintf(stderr, "charlm: %s needs a value (or unknown option)\n", a); usage(stderr); return 0; }
        i++;
        if (strcmp(a, "--data") == 0) o->data_path = val;
        else if (strcmp(a, "--out") == 0) o->out_path = val;
        else if (strcmp(a, "--prompt") == 0) o->prompt = val;
        else if (strcmp(a, "--router") == 0) {
            if (strcmp(val, "topk") == 0) o->router = MOE_ROUTER_TOPK;
            else if (strcmp(val, "hash") == 0) o->router = MOE_ROUTER_HASH;
            else { fprintf(stderr, "charlm: --router is topk or hash, not \"%s\"\n", val); return 0; }
        } else if (strcmp(a, "--epochs") == 0) { if (!parse_long(a, val, 1, 1000, &v)) return 0; o->epochs = (int)v; }
        else if (strcmp(a, "--batch") == 0) { if (!parse_long(a, val, 1, 65536, &v)) return 0; o->batch = (int)v; }
        else if (strcmp(a, "--length") == 0) { if (!parse_long(a, val, 0, 1000000, &v)) return 0; o->length = (int)v; }
        else if (strcmp(a, "--threads") == 0) { if (!parse_long(a, val, 0, 1024, &v)) return 0; o->threads = (int)v; }
        else if (strcmp(a, "--max-chars") == 0) { if (!parse_long(a, val, 1000, 1L << 30, &v)) return 0; o->max_chars = v; }
        else if (strcmp(a, "--seed") == 0) { if (!parse_long(a, val, 0, 2147483647L, &v)) return 0; o->seed = (uint64_t)v; }
        else if (strcmp(a, "--lr") == 0) { if (!parse_float(a, val, 0.0f, 1.0f, &o->lr)) return 0; }
        else if (strcmp(a, "--temperature") == 0) { if (!parse_float(a, val, 0.0f, 100.0f, &o->temperature)) return 0; }
        else { fprintf(stderr, "charlm: unknown option %s\n", a); usage(stderr); return 0; }
    }
    return 1;
}

static int succeeded(const moe_ctx *ctx, moe_result result) {
    if (result == MOE_OK) return 1;
    fprintf(stderr, "charlm: %s\n", ctx->error[0] ? moe_ctx_error(ctx) : moe_result_string(result));
    return 0;
}

static double seconds_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// >>data --------------------------------------------------------------------
static int corpus_load(corpus *c, const char *path, long max_chars) {
    FILE *f = fopen(path, "rb");
    long size;
    int64_t i;
    int b, seen[256] = {0};
    memset(c, 0, sizeof *c);
    if (!f) { fprintf(stderr, "charlm: cannot open %s: %s\n", path, strerror(errno)); return 0; }
    if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fprintf(stderr, "charlm: cannot read %s\n", path);
        fclose(f);
        return 0;
    }
    if (max_chars > 0 && size > max_chars) size = max_chars;
    c->ids = (unsigned char *)malloc((size_t)size + 1);
    if (!c->ids || fread(c->ids, 1, (size_t)size, f) != (size_t)size) {
        fprintf(stderr, "charlm: cannot read %s\n", path);
        fclose(f);
        return 0;
    }
    fclose(f);
    c->n = size;
    c->split = c->n * 9 / 10;
    if (c->split <= CONTEXT || c->n - c->split < 1) { fprintf(stderr, "charlm: %s is too short\n", path); return 0; }
    for (i = 0; i < c->n; i++) seen[c->ids[i]] = 1;
    for (b = 0; b < 256; b++) {
        c->id_of[b] = seen[b] ? c->vocab : -1;
        if (seen[b]) c->chars[c->vocab++] = (unsigned char)b;
    }
    for (i = 0; i < c->n; i++) c->ids[i] = (unsigned char)c->id_of[c->ids[i]];
    return 1;
}

/* Row r of x: the CONTEXT ids before position pos[r]; labels[r]: the id at pos[r]. */
static void gather(const corpus *c, const int64_t *pos, int64_t count, float *x, int32_t *labels) {
    int64_t r, j;
    for (r = 0; r < count; r++) {
        for (j = 0; j < CONTEXT; j++) x[r * CONTEXT + j] = (float)c->ids[pos[r] - CONTEXT + j];
        labels[r] = c->ids[pos[r]];
    }
}

// >>model -------------------------------------------------------------------
/* n_experts 1 is the dense twin (see the top of the file). */
static int build_model(moe_ctx *ctx, const corpus *c, const options *o, int n_experts, int64_t total_steps, moe_model **out) {
    moe_layer_desc layers[4];
    moe_model_desc desc;
    int dense = n_experts == 1, l;
    memset(layers, 0, sizeof layers);
    memset(&desc, 0, sizeof desc);
    layers[0].kind = MOE_LAYER_EMBEDDING;
    layers[0].vocab_size = c->vocab;
    layers[0].d_embedding = D_EMBEDDING;
    for (l = 1; l <= 2; l++) {
        layers[l].kind = MOE_LAYER_MOE;
        layers[l].d_out = D_MODEL;
        layers[l].n_experts = n_experts;
        layers[l].top_k = dense ? 1 : TOP_K;
        layers[l].router = dense ? MOE_ROUTER_TOPK : o->router;
        layers[l].expert = MOE_EXPERT_MLP;
        layers[l].activation = MOE_ACT_RELU;
        layers[l].d_hidden = dense ? TOP_K * D_HIDDEN : D_HIDDEN;
        layers[l].residual = l == 2;
        if (!dense && o->router == MOE_ROUTER_TOPK) layers[l].balance_loss = 0.01f;
    }
    layers[3].kind = MOE_LAYER_DENSE;
    layers[3].d_out = c->vocab;
    desc.d_in = CONTEXT;
    desc.n_layers = 4;
    desc.layers = layers;
    desc.loss = MOE_LOSS_CROSS_ENTROPY;
    desc.max_tokens = o->batch;
    desc.optimizer.kind = MOE_OPTIMIZER_ADAMW;
    desc.optimizer.lr = o->lr;
    desc.optimizer.warmup_steps = 100;
    desc.optimizer.total_steps = total_steps;
    desc.optimizer.clip_norm = 1.0f;
    return succeeded(ctx, moe_model_create(ctx, &desc, out));
}

/* Parameters one token uses: all but the experts it does not run. */
static int64_t active_parameters(moe_model *m) {
    int64_t n = moe_model_parameter_count(m);
    const moe_model_desc *d = moe_model_get_desc(m);
    int i, t;
    for (i = 0; i < d->n_layers; i++) {
        const moe_layer_desc *l = &d->layers[i];
        char prefix[32];
        if (l->kind != MOE_LAYER_MOE) continue;
        snprintf(prefix, sizeof prefix, "layers.%d.experts.", i);
        for (t = 0; t < moe_model_tensor_count(m); t++) {
            moe_tensor tt;
            moe_model_tensor(m, t, &tt);
            if (strncmp(tt.name, prefix, strlen(prefix)) == 0) n -= tt.size / l->n_experts * (l->n_experts - l->top_k);
        }
    }
    return n;
}

// >>training ----------------------------------------------------------------
static void shuffle(int64_t *pos, int64_t n, uint64_t seed, int epoch) {
    int64_t i;
    for (i = n - 1; i > 0; i--) {
        uint64_t r = moe_rng_u64(seed, SHUFFLE_STREAM, (uint64_t)epoch * (uint64_t)n + (uint64_t)i);
        int64_t j = (int64_t)(r % (uint64_t)(i + 1)), t = pos[i];
        pos[i] = pos[j];
        pos[j] = t;
    }
}

/* Mean cross-entropy over the validation characters, in bits. */
static int validation_bpc(moe_ctx *ctx, moe_model *m, const corpus *c, int64_t batch, float *x, int32_t *labels, int64_t *pos,
                          double *bpc) {
    int64_t first, count, i;
    double nats = 0.0;
    for (first = c->split; first < c->n; first += count) {
        float loss;
        count = c->n - first < batch ? c->n - first : batch;
        for (i = 0; i < count; i++) pos[i] = first + i;
        gather(c, pos, count, x, labels);
        if (!succeeded(ctx, moe_model_forward(m, x, count, NULL, NULL)) ||
            !succeeded(ctx, moe_model_loss(m, &(moe_target){.labels = labels}, &loss, NULL))) return 0;
        nats += (double)loss * (double)count;
    }
    *bpc = nats / (double)(c->n - c->split) / log(2.0);
    return 1;
}

static int train(moe_ctx *ctx, moe_model *m, const corpus *c, const options *o, const char *name, float *x, int32_t *labels,
                 double *seconds) {
    int64_t n = c->split - CONTEXT, *pos = (int64_t *)malloc(sizeof(int64_t) * (size_t)n), i, first;
    double t0 = seconds_now();
    int epoch;
    if (!pos) { fprintf(stderr, "charlm: out of memory\n"); return 0; }
    for (i = 0; i < n; i++) pos[i] = CONTEXT + i;
    for (epoch = 0; epoch < o->epochs; epoch++) {
        double loss_sum = 0.0;
        shuffle(pos, n, o->seed, epoch);
        for (first = 0; first < n; first += o->batch) {
            int64_t count = n - first < o->batch ? n - first : o->batch;
            moe_step_info info;
            gather(c, pos + first, count, x, labels);
            if (!succeeded(ctx, moe_model_train_step(m, x, &(moe_target){.labels = labels}, count, &info))) { free(pos); return 0; }
            loss_sum += (double)info.loss * (double)count;
        }
        printf("%s epoch %d/%d  train loss %.4f (%.3f bits/char)  %.1f s\n", name, epoch + 1, o->epochs, loss_sum / (double)n,
               loss_sum / (double)n / log(2.0), seconds_now() - t0);
        fflush(stdout);
    }
    *seconds = seconds_now() - t0;
    free(pos);
    return 1;
}

// >>sampling ----------------------------------------------------------------
/* The prompt, then `length` characters drawn from softmax(logits / temperature), each from
   draw i of our sampling stream: the same text for a seed on any machine thread count. */
/* Every byte of the prompt must be in the vocabulary (checked before training). */
static int prompt_ok(const corpus *c, const char *prompt) {
    const unsigned char *p;
    for (p = (const unsigned char *)prompt; *p; p++)
        if (c->id_of[*p] < 0) {
            fprintf(stderr, "charlm: the prompt's byte %d ('%c') is not in the vocabulary of the text\n", *p, *p >= 32 && *p < 127 ? *p : '?');
            return 0;
        }
    return 1;
}

static int sample(moe_ctx *ctx, moe_model *m, const corpus *c, const options *o) {
    int64_t plen = (int64_t)strlen(o->prompt), i, j, total = plen + o->length;
    int space = c->id_of[(unsigned char)' '];
    unsigned char *text = (unsigned char *)malloc((size_t)total + 1);
    float x[CONTEXT], p[256];
    const float *y;
    if (!text) return 0;
    for (i = 0; i < plen; i++) text[i] = (unsigned char)c->id_of[(unsigned char)o->prompt[i]];
    for (i = plen; i < total; i++) {
        double sum = 0.0, u, acc = 0.0;
        float mx;
        int v, pick;
        /* the CONTEXT ids before i; before the prompt's start: spaces (or id 0) */
        for (j = 0; j < CONTEXT; j++) {
            int64_t k = i - CONTEXT + j;
            x[j] = (float)(k >= 0 ? text[k] : space >= 0 ? space : 0);
        }
        if (!succeeded(ctx, moe_model_forward(m, x, 1, NULL, NULL))) { free(text); return 0; }
        y = moe_model_output(m);
        mx = y[0];
        for (v = 1; v < c->vocab; v++) mx = y[v] > mx ? y[v] : mx;
        for (v = 0; v < c->vocab; v++) { p[v] = expf((y[v] - mx) / o->temperature); sum += p[v]; }
        u = (double)moe_rng_uniform(o->seed, SAMPLE_STREAM, (uint64_t)i) * sum;
        pick = c->vocab - 1;
        for (v = 0; v < c->vocab; v++) {
            acc += p[v];
            if (u < acc) { pick = v; break; }
        }
        text[i] = (unsigned char)pick;
    }
    printf("sample (seed %llu, temperature %g):\n", (unsigned long long)o->seed, (double)o->temperature);
    for (i = 0; i < total; i++) putchar(c->chars[text[i]]);
    printf("\n");
    free(text);
    return 1;
}

// >>main --------------------------------------------------------------------
int main(int argc, char **argv) {
    options o;
    corpus c;
    moe_ctx ctx;
    moe_model *moe = NULL, *dense = NULL;
    float *x = NULL;
    int32_t *labels = NULL;
    int64_t *pos = NULL;
    double bpc = 0.0, bpc_dense = 0.0, sec = 0.0, sec_dense = 0.0;
    int64_t steps;
    int status = 1;
    if (!parse_options(argc, argv, &o)) return 2;
    if (!corpus_load(&c, o.data_path, o.max_chars)) return 1;
    if (!prompt_ok(&c, o.prompt)) { free(c.ids); return 1; }
    if (!succeeded(&ctx, moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = o.seed, .n_threads = o.threads}))) return 1;
    x = (float *)malloc(sizeof(float) * (size_t)o.batch * CONTEXT);
    labels = (int32_t *)malloc(sizeof(int32_t) * (size_t)o.batch);
    pos = (int64_t *)malloc(sizeof(int64_t) * (size_t)o.batch);
    if (!x || !labels || !pos) { fprintf(stderr, "charlm: out of memory\n"); goto done; }
    steps = (int64_t)o.epochs * ((c.split - CONTEXT + o.batch - 1) / o.batch);
    printf("%s: %lld characters, vocabulary %d; train %lld, validation %lld (the last 10%%)\n", o.data_path, (long long)c.n, c.vocab,
           (long long)(c.split - CONTEXT), (long long)(c.n - c.split));
    printf("model: %d chars x %d embedding -> MoE %d experts (%s, k %d, d_hidden %d) -> MoE (residual) -> %d-way softmax; %d threads\n",
           CONTEXT, D_EMBEDDING, N_EXPERTS, o.router == MOE_ROUTER_HASH ? "hash of the last char" : "softmax top-k", TOP_K, D_HIDDEN,
           c.vocab, ctx.n_threads);
    fflush(stdout);
    if (!build_model(&ctx, &c, &o, N_EXPERTS, steps, &moe) || !train(&ctx, moe, &c, &o, "moe", x, labels, &sec)) goto done;
    if (!validation_bpc(&ctx, moe, &c, o.batch, x, labels, pos, &bpc)) goto done;
    if (o.out_path[0] && !succeeded(&ctx, moe_model_save(moe, o.out_path))) goto done;
    if (o.dense) {
        if (!build_model(&ctx, &c, &o, 1, steps, &dense) || !train(&ctx, dense, &c, &o, "dense", x, labels, &sec_dense)) goto done;
        if (!validation_bpc(&ctx, dense, &c, o.batch, x, labels, pos, &bpc_dense)) goto done;
    }
    printf("router=%s\n", o.router == MOE_ROUTER_HASH ? "hash" : "topk");
    printf("params_moe=%lld\nactive_params_moe=%lld\n", (long long)moe_model_parameter_count(moe), (long long)active_parameters(moe));
    printf("train_seconds=%.1f\n", sec);
    if (dense) {
        printf("params_dense=%lld\nactive_params_dense=%lld\n", (long long)moe_model_parameter_count(dense), (long long)active_parameters(dense));
        printf("train_seconds_dense=%.1f\n", sec_dense);
    }
    if (!sample(&ctx, moe, &c, &o)) goto done;
    printf("val_bpc=%.4f\n", bpc);
    if (dense) printf("val_bpc_dense=%.4f\n", bpc_dense);
    status = 0;
done:
    moe_model_destroy(moe);
    moe_model_destroy(dense);
    free(x);
    free(labels);
    free(pos);
    free(c.ids);
    return status;
}
