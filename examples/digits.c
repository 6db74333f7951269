/* digits.c - train a Mixture-of-Experts classifier on handwritten digits with moe.h.

   make demo                       UCI 8x8 digits from examples/data (a few seconds)
   ./build/digits --mnist DIR      MNIST 28x28 from the four raw IDX files in DIR

   It trains with mini-batches, reports loss and test accuracy after every epoch, shows which
   experts the router sends each digit to, saves the model and ends with "test_accuracy=0.xxxx".
   Run ./build/digits --help for the options. */
#define _POSIX_C_SOURCE 200809L /* isatty, fileno */

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _WIN32
#include <io.h>
#define stdout_is_terminal() _isatty(_fileno(stdout))
#else
#include <unistd.h>
#define stdout_is_terminal() isatty(fileno(stdout))
#endif

#define MOE_IMPLEMENTATION
#include "../moe.h"

#define N_CLASSES 10
/* our own streams of moe_rng_u64, apart from the ones the library uses */
#define SHUFFLE_STREAM 0x53485546ull
#define SHIFT_STREAM 0x53484946ull

/* Everything that differs between the two datasets. */
typedef struct setup {
    const char *name;
    int64_t side;          /* images are side x side pixels */
    int max_pixel;         /* inputs are pixel / max_pixel, in [0, 1] */
    int epochs, batch;
    float lr;
    moe_optimizer_kind optimizer;
    int cosine_decay;      /* nonzero: the learning rate decays to 0 over the run */
    int shift;             /* nonzero: move some training images by a pixel (see shift_some) */
    int64_t d_model;       /* width of the MoE layer's output */
    int64_t d_hidden;      /* hidden width of each MLP expert */
} setup;

static const setup DIGITS_SETUP = {
    .name = "digits", .side = 8, .max_pixel = 16, .epochs = 30, .batch = 32, .lr = 3e-3f,
    .optimizer = MOE_OPTIMIZER_ADAMW, .cosine_decay = 1, .shift = 1, .d_model = 64, .d_hidden = 128
};
/* the classic MNIST setup: Adam at a fixed 1e-3, batch 128, 10 epochs, no augmentation */
static const setup MNIST_SETUP = {
    .name = "mnist", .side = 28, .max_pixel = 255, .epochs = 10, .batch = 128, .lr = 1e-3f,
    .optimizer = MOE_OPTIMIZER_ADAM, .d_model = 128, .d_hidden = 128
};

#define N_EXPERTS 4
#define TOP_K 2

/* Command line. As in moe.h's descs, 0 (or NULL) means "the setup's default". */
typedef struct options {
    const char *data_dir;
    const char *mnist_dir;
    const char *out_path;
    int epochs, batch, threads;
    float lr;
    uint64_t seed;
} options;

/* Images as stored (uint8) with their labels; scaled to float one batch at a time. */
typedef struct dataset {
    unsigned char *pixels; /* [n, d] */
    unsigned char *labels; /* [n] */
    int64_t n, d;
} dataset;

/* A list of samples of one dataset: the training or the test set. */
typedef struct sample_set {
    const dataset *data;
    int64_t *index;        /* [n] */
    int64_t n;
} sample_set;

/* One batch, scaled for the model. */
typedef struct batch {
    float *x;              /* [capacity, d] */
    int32_t *labels;       /* [capacity] */
    int64_t capacity;
} batch;

static void usage(FILE *f) {
    fprintf(f,
        "usage: digits [options]\n"
        "  --data DIR     UCI digits IDX files (default examples/data)\n"
        "  --mnist DIR    train on MNIST instead: the four raw IDX files in DIR\n"
        "  --out FILE     where to save the model (default build/digits.safetensors)\n"
        "  --epochs N     passes over the training set (digits %d, MNIST %d)\n"
        "  --batch N      samples per training step (digits %d, MNIST %d)\n"
        "  --lr X         peak learning rate (digits %g, MNIST %g)\n"
        "  --seed S       seed of the initialisation and the shuffle (default 1)\n"
        "  --threads N    worker threads, 0 = all (default 0); results do not depend on it\n",
        DIGITS_SETUP.epochs, MNIST_SETUP.epochs, DIGITS_SETUP.batch, MNIST_SETUP.batch,
        (double)DIGITS_SETUP.lr, (double)MNIST_SETUP.lr);
}

/* Integer option value in [lo, hi]; returns 0 (after a message) when it is not one. */
static int parse_int(const char *name, const char *text, long lo, long hi, long *value) {
    char *end;
    errno = 0;
    *value = strtol(text, &end, 10);
    if (errno || end == text || *end || *value < lo || *value > hi) {
        fprintf(stderr, "digits: %s wants an integer in %ld..%ld, not \"%s\"\n", name, lo, hi, text);
        return 0;
    }
    return 1;
}

static int parse_options(int argc, char **argv, options *opt) {
    int i;
    memset(opt, 0, sizeof *opt);
    opt->data_dir = "examples/data";
    opt->out_path = "build/digits.safetensors";
    opt->seed = 1;
    for (i = 1; i < argc; i++) {
        const char *name = argv[i], *value = i + 1 < argc ? argv[i + 1] : NULL;
        long v;
        if (strcmp(name, "--help") == 0 || strcmp(name, "-h") == 0) {
            usage(stdout);
            exit(0);
        }
        if (!value) {
            fprintf(stderr, "digits: %s\n", strncmp(name, "--", 2) == 0 ? "option needs a value" : "unknown argument");
            usage(stderr);
            return 0;
        }
        i++;
        if (strcmp(name, "--data") == 0) opt->data_dir = value;
        else if (strcmp(name, "--mnist") == 0) opt->mnist_dir = value;
        else if (strcmp(name, "--out") == 0) opt->out_path = value;
        else if (strcmp(name, "--epochs") == 0) {
            if (!parse_int(name, value, 1, 100000, &v)) return 0;
            opt->epochs = (int)v;
        } else if (strcmp(name, "--batch") == 0) {
            if (!parse_int(name, value, 1, 65536, &v)) return 0;
            opt->batch = (int)v;
        } else if (strcmp(name, "--threads") == 0) {
            if (!parse_int(name, value, 0, 4096, &v)) return 0;
            opt->threads = (int)v;
        } else if (strcmp(name, "--seed") == 0) {
            char *end;
            errno = 0;
            opt->seed = strtoull(value, &end, 10);
            if (errno || end == value || *end || value[0] == '-') {
                fprintf(stderr, "digits: --seed wants a non-negative integer, not \"%s\"\n", value);
                return 0;
            }
        } else if (strcmp(name, "--lr") == 0) {
            char *end;
            double lr = strtod(value, &end);
            if (end == value || *end || !(lr > 0.0 && lr < 10.0)) {
                fprintf(stderr, "digits: --lr wants a number in (0, 10), not \"%s\"\n", value);
                return 0;
            }
            opt->lr = (float)lr;
        } else {
            fprintf(stderr, "digits: unknown option %s\n", name);
            usage(stderr);
            return 0;
        }
    }
    return 1;
}

/* Prints a failed moe.h call's message; returns 1 when the call succeeded. */
static int moe_ok(const moe_ctx *ctx, moe_result result) {
    if (result == MOE_OK) return 1;
    fprintf(stderr, "digits: %s\n", ctx->error[0] ? moe_ctx_error(ctx) : moe_result_string(result));
    return 0;
}

// >>idx ---------------------------------------------------------------------
/* IDX files (MNIST's format): a big-endian header of 32-bit integers, then uint8 values. */
static uint32_t read_be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

/* The whole file, or NULL after a message. */
static unsigned char *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    unsigned char *data = NULL;
    long end = 0;
    if (!f) {
        fprintf(stderr, "digits: cannot open %s: %s\n", path, strerror(errno));
        return NULL;
    }
    if (fseek(f, 0, SEEK_END) != 0 || (end = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fprintf(stderr, "digits: cannot read %s\n", path);
    } else if (!(data = (unsigned char *)malloc(end > 0 ? (size_t)end : 1))) {
        fprintf(stderr, "digits: out of memory reading %s\n", path);
    } else if (fread(data, 1, (size_t)end, f) != (size_t)end) {
        fprintf(stderr, "digits: cannot read %s\n", path);
        free(data);
        data = NULL;
    }
    fclose(f);
    *size = (size_t)end;
    return data;
}

/* An IDX file with the given magic number and rank: its values, sizes in dims[]. */
static unsigned char *read_idx(const char *path, uint32_t magic, int rank, int64_t *dims) {
    size_t size, header = 4 + 4 * (size_t)rank, count = 1;
    unsigned char *data = read_file(path, &size);
    int i;
    if (!data) return NULL;
    if (size < header || read_be32(data) != magic) {
        fprintf(stderr, "digits: %s is not an IDX file of rank %d (magic 0x%08x expected)\n", path, rank, (unsigned)magic);
        free(data);
        return NULL;
    }
    for (i = 0; i < rank; i++) {
        dims[i] = read_be32(data + 4 + 4 * i);
        count *= (size_t)dims[i];
    }
    if (size - header != count) {
        fprintf(stderr, "digits: %s holds %zu bytes of values, its header says %zu\n", path, size - header, count);
        free(data);
        return NULL;
    }
    memmove(data, data + header, count);
    return data;
}

static void dataset_free(dataset *ds) {
    free(ds->pixels);
    free(ds->labels);
    memset(ds, 0, sizeof *ds);
}

/* Images and labels from two IDX files, checked against the setup; 0 after a message. */
static int dataset_load(dataset *ds, const char *dir, const char *images, const char *labels, const setup *su) {
    char path[4096];
    int64_t image_dims[3], label_dims[1], i;
    memset(ds, 0, sizeof *ds);
    snprintf(path, sizeof path, "%s/%s", dir, images);
    if (!(ds->pixels = read_idx(path, 0x803, 3, image_dims))) return 0;
    if (image_dims[1] != su->side || image_dims[2] != su->side || image_dims[0] == 0) {
        fprintf(stderr, "digits: %s holds %lldx%lld images, %s needs %lldx%lld\n", path,
                (long long)image_dims[1], (long long)image_dims[2], su->name, (long long)su->side, (long long)su->side);
        goto fail;
    }
    ds->n = image_dims[0];
    ds->d = su->side * su->side;
    for (i = 0; i < ds->n * ds->d; i++) {
        if (ds->pixels[i] > su->max_pixel) {
            fprintf(stderr, "digits: %s has a pixel value %d, %s pixels run 0..%d\n", path, ds->pixels[i], su->name, su->max_pixel);
            goto fail;
        }
    }
    snprintf(path, sizeof path, "%s/%s", dir, labels);
    if (!(ds->labels = read_idx(path, 0x801, 1, label_dims))) goto fail;
    if (label_dims[0] != ds->n) {
        fprintf(stderr, "digits: %s has %lld labels for %lld images\n", path, (long long)label_dims[0], (long long)ds->n);
        goto fail;
    }
    for (i = 0; i < ds->n; i++) {
        if (ds->labels[i] >= N_CLASSES) {
            fprintf(stderr, "digits: %s: label %d of sample %lld is not a digit\n", path, ds->labels[i], (long long)i);
            goto fail;
        }
    }
    return 1;
fail:
    dataset_free(ds);
    return 0;
}

// >>samples -----------------------------------------------------------------
static int sample_set_alloc(sample_set *set, const dataset *data, int64_t n) {
    set->data = data;
    set->n = n;
    set->index = (int64_t *)malloc((size_t)(n > 0 ? n : 1) * sizeof *set->index);
    if (!set->index) fprintf(stderr, "digits: out of memory\n");
    return set->index != NULL;
}

/* The UCI digits have no split of their own. Counting the samples of each digit in file
   order from 0, every fifth one (count % 5 == 4) is a test sample: 1442 train, 355 test,
   34 to 36 test samples per digit (examples/data/README.md). */
static int split_digits(const dataset *data, sample_set *train, sample_set *test) {
    int64_t seen[N_CLASSES] = { 0 }, n_test = 0, i;
    for (i = 0; i < data->n; i++)
        if (seen[data->labels[i]]++ % 5 == 4) n_test++;
    if (!sample_set_alloc(train, data, data->n - n_test) || !sample_set_alloc(test, data, n_test)) return 0;
    memset(seen, 0, sizeof seen);
    train->n = test->n = 0;
    for (i = 0; i < data->n; i++) {
        sample_set *to = seen[data->labels[i]]++ % 5 == 4 ? test : train;
        to->index[to->n++] = i;
    }
    return 1;
}

static int all_samples(const dataset *data, sample_set *set) {
    int64_t i;
    if (!sample_set_alloc(set, data, data->n)) return 0;
    for (i = 0; i < data->n; i++) set->index[i] = i;
    return 1;
}

/* Fisher-Yates with the library's counter-based generator: the order of epoch e is a pure
   function of (seed, e), so a run repeats exactly for any thread count. */
static void shuffle(sample_set *set, uint64_t seed, int epoch) {
    int64_t i;
    for (i = set->n - 1; i > 0; i--) {
        uint64_t r = moe_rng_u64(seed, SHUFFLE_STREAM, (uint64_t)epoch * (uint64_t)set->n + (uint64_t)i);
        int64_t j = (int64_t)(r % (uint64_t)(i + 1)), t = set->index[i];
        set->index[i] = set->index[j];
        set->index[j] = t;
    }
}

/* Samples [first, first + count) of the set into the batch, pixels scaled to [0, 1]. */
static void gather(const sample_set *set, int64_t first, int64_t count, float scale, batch *b) {
    const dataset *ds = set->data;
    int64_t i, j;
    for (i = 0; i < count; i++) {
        int64_t s = set->index[first + i];
        for (j = 0; j < ds->d; j++) b->x[i * ds->d + j] = (float)ds->pixels[s * ds->d + j] * scale;
        b->labels[i] = ds->labels[s];
    }
}

/* Moves a quarter of the images one pixel up, down, left or right (1/16 each), filling the
   edge with background. The digits in the small UCI set are all centred the same way, so a
   network trained on them alone overfits; these slightly off-centre copies lift its test
   accuracy by about a point. counter numbers the images so each draw is used once. */
static void shift_some(batch *b, int64_t count, int64_t side, uint64_t seed, uint64_t counter) {
    size_t row = (size_t)side * sizeof *b->x, rest = (size_t)(side * (side - 1)) * sizeof *b->x;
    int64_t i, r;
    for (i = 0; i < count; i++) {
        float *image = b->x + i * side * side;
        switch (moe_rng_u64(seed, SHIFT_STREAM, counter + (uint64_t)i) % 16) {
        case 0: /* up */
            memmove(image, image + side, rest);
            memset(image + side * (side - 1), 0, row);
            break;
        case 1: /* down */
            memmove(image + side, image, rest);
            memset(image, 0, row);
            break;
        case 2: /* left */
            for (r = 0; r < side; r++) {
                memmove(image + r * side, image + r * side + 1, row - sizeof *image);
                image[r * side + side - 1] = 0.0f;
            }
            break;
        case 3: /* right */
            for (r = 0; r < side; r++) {
                memmove(image + r * side + 1, image + r * side, row - sizeof *image);
                image[r * side] = 0.0f;
            }
            break;
        default: /* three images in four stay as they are */
            break;
        }
    }
}

// >>model -------------------------------------------------------------------
/* pixels -> MoE (4 MLP experts, top-2 router) -> dense 10-way head (logits). */
static int build_model(moe_ctx *ctx, const setup *su, int64_t d_in, int64_t max_tokens, int64_t total_steps,
                       moe_model **model) {
    moe_layer_desc layers[2];
    moe_model_desc desc;
    memset(layers, 0, sizeof layers);
    memset(&desc, 0, sizeof desc);
    layers[0].kind = MOE_LAYER_MOE;
    layers[0].d_out = su->d_model;
    layers[0].n_experts = N_EXPERTS;
    layers[0].top_k = TOP_K;
    layers[0].expert = MOE_EXPERT_MLP;
    layers[0].d_hidden = su->d_hidden;
    layers[0].balance_loss = 0.01f; /* keeps all four experts in use */
    layers[0].z_loss = 0.001f;      /* keeps router logits small */
    layers[1].kind = MOE_LAYER_DENSE;
    layers[1].d_out = N_CLASSES;
    desc.d_in = d_in;
    desc.n_layers = 2;
    desc.layers = layers;
    desc.loss = MOE_LOSS_CROSS_ENTROPY;
    desc.max_tokens = max_tokens;
    desc.optimizer.kind = su->optimizer;
    desc.optimizer.lr = su->lr;
    if (su->cosine_decay) desc.optimizer.total_steps = total_steps;
    return moe_ok(ctx, moe_model_create(ctx, &desc, model));
}

// >>training ----------------------------------------------------------------
/* Redraws the bar in place; only called when stdout is a terminal. */
static void progress(int epoch, int epochs, int64_t done, int64_t total, double loss) {
    enum { WIDTH = 30 };
    char bar[WIDTH + 1];
    int i, filled = (int)(WIDTH * done / total);
    for (i = 0; i < WIDTH; i++) bar[i] = i < filled ? '#' : '.';
    bar[WIDTH] = '\0';
    printf("\repoch %3d/%d [%s] %3d%%  loss %.4f", epoch, epochs, bar, (int)(100 * done / total), loss);
    fflush(stdout);
}

/* One pass over the shuffled training set; mean task and auxiliary loss per sample. */
static int train_epoch(moe_ctx *ctx, moe_model *model, const setup *su, sample_set *train, batch *b, int epoch,
                       int epochs, uint64_t seed, int batch_size, int show_bar, double *loss, double *aux) {
    int64_t first, last_percent = -1;
    double loss_sum = 0.0, aux_sum = 0.0;
    shuffle(train, seed, epoch);
    for (first = 0; first < train->n; first += batch_size) {
        int64_t count = train->n - first < batch_size ? train->n - first : batch_size;
        moe_target target;
        moe_step_info info;
        gather(train, first, count, 1.0f / (float)su->max_pixel, b);
        if (su->shift) shift_some(b, count, su->side, seed, (uint64_t)epoch * (uint64_t)train->n + (uint64_t)first);
        target.labels = b->labels;
        target.values = NULL;
        if (!moe_ok(ctx, moe_model_train_step(model, b->x, &target, count, &info))) return 0;
        loss_sum += (double)info.loss * (double)count;
        aux_sum += (double)info.aux_loss * (double)count;
        if (show_bar && 100 * (first + count) / train->n != last_percent) {
            last_percent = 100 * (first + count) / train->n;
            progress(epoch + 1, epochs, first + count, train->n, loss_sum / (double)(first + count));
        }
    }
    *loss = loss_sum / (double)train->n;
    *aux = aux_sum / (double)train->n;
    return 1;
}

static int evaluate(moe_ctx *ctx, moe_model *model, const setup *su, const sample_set *test, batch *b,
                    int32_t *predicted, double *accuracy) {
    int64_t first, i, correct = 0;
    for (first = 0; first < test->n; first += b->capacity) {
        int64_t count = test->n - first < b->capacity ? test->n - first : b->capacity;
        gather(test, first, count, 1.0f / (float)su->max_pixel, b);
        if (!moe_ok(ctx, moe_model_predict(model, b->x, count, predicted))) return 0;
        for (i = 0; i < count; i++) correct += predicted[i] == b->labels[i];
    }
    *accuracy = (double)correct / (double)test->n;
    return 1;
}

// >>routing -----------------------------------------------------------------
/* Where the router sends the test samples, digit by digit. */
typedef struct routing {
    int64_t samples[N_CLASSES];
    int64_t assignments[N_CLASSES][N_EXPERTS]; /* (sample, expert) pairs: k per sample */
    double entropy_sum;                       /* router entropy summed over samples */
} routing;

/* Forwards the test samples of each digit on their own (in chunks that fit the model) and
   adds up the MoE layer's tokens_per_expert. */
static int route_by_digit(moe_ctx *ctx, moe_model *model, const setup *su, const sample_set *test, batch *b,
                          routing *rt) {
    sample_set digit;
    int c, ok = 1;
    memset(rt, 0, sizeof *rt);
    if (!sample_set_alloc(&digit, test->data, test->n)) return 0;
    for (c = 0; c < N_CLASSES && ok; c++) {
        int64_t i, first;
        digit.n = 0;
        for (i = 0; i < test->n; i++)
            if (test->data->labels[test->index[i]] == c) digit.index[digit.n++] = test->index[i];
        for (first = 0; first < digit.n; first += b->capacity) {
            int64_t count = digit.n - first < b->capacity ? digit.n - first : b->capacity;
            moe_stats stats = { 0 }; /* gcc -O3 cannot tell that a successful call fills it */
            int e;
            gather(&digit, first, count, 1.0f / (float)su->max_pixel, b);
            if (!moe_ok(ctx, moe_model_forward(model, b->x, count, NULL, NULL)) ||
                !moe_ok(ctx, moe_model_stats(model, 0, &stats))) {
                ok = 0;
                break;
            }
            for (e = 0; e < N_EXPERTS; e++) rt->assignments[c][e] += stats.tokens_per_expert[e];
            rt->entropy_sum += (double)stats.router_entropy * (double)count;
        }
        rt->samples[c] = digit.n;
    }
    free(digit.index);
    return ok;
}

static void print_routing(const routing *rt) {
    int64_t load[N_EXPERTS] = { 0 }, total = 0, samples = 0;
    double mean, var = 0.0;
    int c, e;
    printf("\nWhich experts handle each digit: %% of the digit's test samples routed to each expert\n"
           "(every sample goes to %d of the %d experts, so a row adds up to %d%%)\n\n  digit  samples",
           TOP_K, N_EXPERTS, 100 * TOP_K);
    for (e = 0; e < N_EXPERTS; e++) printf("  expert %d", e);
    printf("\n");
    for (c = 0; c < N_CLASSES; c++) {
        printf("  %5d  %7lld", c, (long long)rt->samples[c]);
        for (e = 0; e < N_EXPERTS; e++) {
            double share = rt->samples[c] ? 100.0 * (double)rt->assignments[c][e] / (double)rt->samples[c] : 0.0;
            printf("  %7.1f%%", share);
            load[e] += rt->assignments[c][e];
        }
        printf("\n");
        samples += rt->samples[c];
    }
    /* load CV over the whole test set, as moe_stats.load_cv defines it for one forward */
    for (e = 0; e < N_EXPERTS; e++) total += load[e];
    mean = (double)total / N_EXPERTS;
    for (e = 0; e < N_EXPERTS; e++) var += ((double)load[e] - mean) * ((double)load[e] - mean) / N_EXPERTS;
    printf("\nRouting over the test set\n  expert load:");
    for (e = 0; e < N_EXPERTS; e++) printf("  %.1f%%", total ? 100.0 * (double)load[e] / (double)total : 0.0);
    printf("\n  load CV (std/mean of the expert loads, 0 = even): %.4f\n", mean > 0.0 ? sqrt(var) / mean : 0.0);
    printf("  router entropy (mean per sample, max ln %d = %.4f): %.4f\n", N_EXPERTS, log((double)N_EXPERTS),
           samples ? rt->entropy_sum / (double)samples : 0.0);
}

// >>main --------------------------------------------------------------------
int main(int argc, char **argv) {
    options opt;
    setup su;
    moe_ctx ctx;
    moe_ctx_desc ctx_desc;
    moe_model *model = NULL;
    dataset train_data, test_data;
    sample_set train, test;
    batch b;
    routing rt;
    int32_t *predicted = NULL;
    int epoch, show_bar = stdout_is_terminal(), status = 1;
    int64_t steps_per_epoch, n_params;
    double accuracy = 0.0;

    memset(&train_data, 0, sizeof train_data);
    memset(&test_data, 0, sizeof test_data);
    memset(&train, 0, sizeof train);
    memset(&test, 0, sizeof test);
    memset(&b, 0, sizeof b);
    if (!parse_options(argc, argv, &opt)) return 2;
    su = opt.mnist_dir ? MNIST_SETUP : DIGITS_SETUP;
    if (opt.epochs) su.epochs = opt.epochs;
    if (opt.batch) su.batch = opt.batch;
    if (opt.lr > 0.0f) su.lr = opt.lr;

    if (opt.mnist_dir) {
        if (!dataset_load(&train_data, opt.mnist_dir, "train-images-idx3-ubyte", "train-labels-idx1-ubyte", &su) ||
            !dataset_load(&test_data, opt.mnist_dir, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", &su) ||
            !all_samples(&train_data, &train) || !all_samples(&test_data, &test))
            goto done;
    } else {
        if (!dataset_load(&train_data, opt.data_dir, "digits-images-idx3-ubyte", "digits-labels-idx1-ubyte", &su) ||
            !split_digits(&train_data, &train, &test))
            goto done;
    }

    memset(&ctx_desc, 0, sizeof ctx_desc);
    ctx_desc.n_threads = opt.threads;
    ctx_desc.seed = opt.seed;
    if (!moe_ok(&ctx, moe_ctx_init(&ctx, &ctx_desc))) goto done;
    /* one buffer serves training batches and evaluation chunks */
    b.capacity = su.batch > 256 ? su.batch : 256;
    b.x = (float *)malloc((size_t)(b.capacity * train_data.d) * sizeof *b.x);
    b.labels = (int32_t *)malloc((size_t)b.capacity * sizeof *b.labels);
    predicted = (int32_t *)malloc((size_t)b.capacity * sizeof *predicted);
    if (!b.x || !b.labels || !predicted) {
        fprintf(stderr, "digits: out of memory\n");
        goto done;
    }
    steps_per_epoch = (train.n + su.batch - 1) / su.batch;
    if (!build_model(&ctx, &su, train_data.d, b.capacity, steps_per_epoch * su.epochs, &model)) goto done;
    moe_model_params(model, &n_params);

    printf("%s: %lld training and %lld test images of %lldx%lld pixels\n", su.name, (long long)train.n,
           (long long)test.n, (long long)su.side, (long long)su.side);
    printf("model: %lld inputs -> MoE (%d MLP experts of hidden width %lld, top-%d) -> %lld -> dense -> %d classes, "
           "%lld parameters\n", (long long)train_data.d, N_EXPERTS, (long long)su.d_hidden, TOP_K,
           (long long)su.d_model, N_CLASSES, (long long)n_params);
    printf("training: %d epochs, batch %d, %s lr %g%s, seed %llu, %d threads\n\n", su.epochs, su.batch,
           su.optimizer == MOE_OPTIMIZER_ADAM ? "Adam" : "AdamW", (double)su.lr,
           su.cosine_decay ? " (cosine decay)" : "", (unsigned long long)opt.seed, ctx.n_threads);

    for (epoch = 0; epoch < su.epochs; epoch++) {
        double loss, aux;
        if (!train_epoch(&ctx, model, &su, &train, &b, epoch, su.epochs, opt.seed, su.batch, show_bar, &loss, &aux) ||
            !evaluate(&ctx, model, &su, &test, &b, predicted, &accuracy))
            goto done;
        /* longer than the progress bar, so it covers it */
        printf("%sepoch %3d/%d  train loss %.4f  aux loss %.4f  test accuracy %.4f\n", show_bar ? "\r" : "",
               epoch + 1, su.epochs, loss, aux, accuracy);
        fflush(stdout);
    }

    if (!route_by_digit(&ctx, model, &su, &test, &b, &rt)) goto done;
    print_routing(&rt);
    if (!moe_ok(&ctx, moe_model_save(model, opt.out_path))) goto done;
    printf("\nmodel saved to %s\n", opt.out_path);
    printf("test_accuracy=%.4f\n", accuracy);
    status = 0;
done:
    moe_model_destroy(model);
    free(predicted);
    free(b.x);
    free(b.labels);
    free(train.index);
    free(test.index);
    dataset_free(&train_data);
    dataset_free(&test_data);
    return status;
}
