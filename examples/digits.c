/* digits.c - train a Mixture-of-Experts classifier on handwritten digits with moe.h.

   make demo                       UCI 8x8 digits from examples/data (a few seconds)
   ./build/digits --mnist DIR      MNIST 28x28 from the four raw IDX files in DIR

   It trains with mini-batches, reports loss and test accuracy after every epoch, shows which
   experts the router sends each digit to (a table, and an SVG heatmap: --svg, default
   build/digits_routing.svg), saves the model and ends with "test_accuracy=0.xxxx".
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
#define N_EXPERTS 4
#define TOP_K 2
/* our own streams of moe_rng_u64, apart from the ones the library uses */
#define SHUFFLE_STREAM 0x53485546ull
#define SHIFT_STREAM 0x53484946ull

/* Everything that differs between the two datasets. */
typedef struct setup_desc {
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
} setup_desc;

static const setup_desc DIGITS_SETUP = {
    .name = "digits", .side = 8, .max_pixel = 16, .epochs = 30, .batch = 32, .lr = 3e-3f,
    .optimizer = MOE_OPTIMIZER_ADAMW, .cosine_decay = 1, .shift = 1, .d_model = 64, .d_hidden = 128
};
/* the classic MNIST setup: Adam at a fixed 1e-3, batch 128, 10 epochs, no augmentation */
static const setup_desc MNIST_SETUP = {
    .name = "mnist", .side = 28, .max_pixel = 255, .epochs = 10, .batch = 128, .lr = 1e-3f,
    .optimizer = MOE_OPTIMIZER_ADAM, .d_model = 128, .d_hidden = 128
};

/* Command line. As in moe.h's descs, 0 (or NULL) means "the setup's default". */
typedef struct options {
    const char *data_dir;
    const char *mnist_dir;
    const char *out_path;
    const char *svg_path;
    int epochs, batch, threads;
    float lr;
    uint64_t seed;
} options;

/* Images as stored (uint8) with their labels; scaled to float one batch at a time. */
typedef struct dataset {
    unsigned char *pixels; /* [n, d] */
    unsigned char *labels; /* [n] */
    int64_t n, d;
    float scale;           /* 1 / max_pixel */
} dataset;

/* A list of samples of one dataset: the training or the test set. */
typedef struct sample_set {
    const dataset *data;
    int64_t *index;        /* [n] */
    int64_t n;
} sample_set;

/* What training and evaluation share. */
typedef struct trainer {
    moe_ctx ctx;           /* outlives the model, which keeps a pointer to it */
    moe_model *model;
    setup_desc setup;      /* with the command line's changes */
    uint64_t seed;
    int show_bar;          /* stdout is a terminal */
    /* one batch, scaled for the model; it also holds the chunks of an evaluation */
    float *x;              /* [capacity, d] */
    int32_t *labels;       /* [capacity] */
    int32_t *predicted;    /* [capacity] */
    int64_t capacity;
} trainer;

static void usage(FILE *f) {
    fprintf(f,
        "usage: digits [options]\n"
        "  --data DIR     UCI digits IDX files (default examples/data)\n"
        "  --mnist DIR    train on MNIST instead: the four raw IDX files in DIR\n"
        "  --out FILE     where to save the model (default build/digits.safetensors,\n"
        "                 or build/mnist.safetensors with --mnist)\n"
        "  --svg FILE     routing heatmap, experts x digits (default build/digits_routing.svg,\n"
        "                 or build/mnist_routing.svg with --mnist; \"\": none)\n"
        "  --epochs N     passes over the training set (digits %d, MNIST %d)\n"
        "  --batch N      samples per training step (digits %d, MNIST %d)\n"
        "  --lr X         learning rate (digits %g, decaying to 0 on a cosine; MNIST %g)\n"
        "  --seed S       seed of everything random: weights, order, shifts (default 1)\n"
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
    opt->out_path = NULL;  /* set after the loop: it depends on --mnist */
    opt->seed = 1;
    for (i = 1; i < argc; i++) {
        const char *name = argv[i], *value;
        long v;
        if (strcmp(name, "--help") == 0 || strcmp(name, "-h") == 0) {
            usage(stdout);
            exit(0);
        }
        if (strncmp(name, "--", 2) != 0 || i + 1 == argc) {
            fprintf(stderr, strncmp(name, "--", 2) ? "digits: unexpected argument %s\n" : "digits: %s needs a value\n", name);
            usage(stderr);
            return 0;
        }
        value = argv[++i];
        if (strcmp(name, "--data") == 0) opt->data_dir = value;
        else if (strcmp(name, "--mnist") == 0) opt->mnist_dir = value;
        else if (strcmp(name, "--out") == 0) opt->out_path = value;
        else if (strcmp(name, "--svg") == 0) opt->svg_path = value;
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
    if (!opt->out_path) opt->out_path = opt->mnist_dir ? "build/mnist.safetensors" : "build/digits.safetensors";
    if (!opt->svg_path) opt->svg_path = opt->mnist_dir ? "build/mnist_routing.svg" : "build/digits_routing.svg";
    return 1;
}

/* Prints a failed moe.h call's message; returns 1 when the call succeeded. */
static int succeeded(const moe_ctx *ctx, moe_result result) {
    if (result == MOE_OK) return 1;
    fprintf(stderr, "digits: %s\n", ctx->error[0] ? moe_ctx_error(ctx) : moe_result_string(result));
    return 0;
}

// >>idx ---------------------------------------------------------------------
/* IDX files (MNIST's format): a big-endian header of 32-bit integers, then uint8 values. */
static uint32_t read_be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

/* The values of an IDX file with the given magic number and rank (at most 3), its sizes
   in dims[]; NULL after a message. */
static unsigned char *read_idx(const char *path, uint32_t magic, int rank, int64_t *dims) {
    unsigned char header[16];
    size_t header_size = 4 + 4 * (size_t)rank, size, count = 1;
    unsigned char *values = NULL;
    long end;
    int i;
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "digits: cannot open %s: %s\n", path, strerror(errno));
        return NULL;
    }
    if (fread(header, 1, header_size, f) != header_size) {
        fprintf(stderr, "digits: cannot read %s: %s\n", path, ferror(f) ? strerror(errno) : "too short for an IDX header");
        goto done;
    }
    if (read_be32(header) != magic) {
        fprintf(stderr, "digits: %s is not an IDX file of rank %d (magic 0x%08x expected)\n", path, rank, (unsigned)magic);
        goto done;
    }
    if (fseek(f, 0, SEEK_END) != 0 || (end = ftell(f)) < 0 || fseek(f, (long)header_size, SEEK_SET) != 0) {
        fprintf(stderr, "digits: cannot read %s\n", path);
        goto done;
    }
    size = (size_t)end - header_size;
    for (i = 0; i < rank; i++) {
        dims[i] = read_be32(header + 4 + 4 * i);
        if (dims[i] > 0 && count > size / (size_t)dims[i]) break; /* before count can overflow */
        count *= (size_t)dims[i];
    }
    if (i < rank || count != size) {
        fprintf(stderr, "digits: %s is truncated or corrupt: its size does not match its header\n", path);
        goto done;
    }
    if (!(values = (unsigned char *)malloc(count > 0 ? count : 1))) {
        fprintf(stderr, "digits: out of memory reading %s\n", path);
    } else if (fread(values, 1, count, f) != count) {
        fprintf(stderr, "digits: cannot read %s\n", path);
        free(values);
        values = NULL;
    }
done:
    fclose(f);
    return values;
}

static void dataset_free(dataset *ds) {
    free(ds->pixels);
    free(ds->labels);
    memset(ds, 0, sizeof *ds);
}

/* Images and labels from two IDX files, checked against the setup; 0 after a message. */
static int dataset_load(dataset *ds, const char *dir, const char *images, const char *labels, const setup_desc *setup) {
    char path[4096];
    int64_t image_dims[3], label_dims[1], i;
    memset(ds, 0, sizeof *ds);
    snprintf(path, sizeof path, "%s/%s", dir, images);
    if (!(ds->pixels = read_idx(path, 0x803, 3, image_dims))) return 0;
    if (image_dims[0] == 0) {
        fprintf(stderr, "digits: %s holds no images\n", path);
        goto fail;
    }
    if (image_dims[1] != setup->side || image_dims[2] != setup->side) {
        fprintf(stderr, "digits: %s holds %lldx%lld images, %s needs %lldx%lld\n", path,
                (long long)image_dims[1], (long long)image_dims[2], setup->name, (long long)setup->side, (long long)setup->side);
        goto fail;
    }
    ds->n = image_dims[0];
    ds->d = setup->side * setup->side;
    ds->scale = 1.0f / (float)setup->max_pixel;
    for (i = 0; i < ds->n * ds->d; i++) {
        if (ds->pixels[i] > setup->max_pixel) {
            fprintf(stderr, "digits: %s has a pixel value %d, %s pixels run 0..%d\n", path, ds->pixels[i], setup->name, setup->max_pixel);
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
static void gather(trainer *tr, const sample_set *set, int64_t first, int64_t count) {
    const dataset *ds = set->data;
    int64_t i, j;
    for (i = 0; i < count; i++) {
        int64_t s = set->index[first + i];
        for (j = 0; j < ds->d; j++) tr->x[i * ds->d + j] = (float)ds->pixels[s * ds->d + j] * ds->scale;
        tr->labels[i] = ds->labels[s];
    }
}

/* Moves a quarter of the images one pixel up, down, left or right (1/16 each), filling the
   edge with background. The digits in the small UCI set are all centred the same way, so a
   network trained on them alone overfits; these slightly off-centre copies lift its test
   accuracy by about a point. counter numbers the images so each draw is used once. */
static void shift_some(trainer *tr, int64_t count, uint64_t counter) {
    int64_t i, r, side = tr->setup.side;
    size_t row = (size_t)side * sizeof *tr->x, rest = (size_t)(side * (side - 1)) * sizeof *tr->x;
    for (i = 0; i < count; i++) {
        float *image = tr->x + i * side * side;
        switch (moe_rng_u64(tr->seed, SHIFT_STREAM, counter + (uint64_t)i) % 16) {
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
static int build_model(trainer *tr, int64_t d_in, int64_t total_steps) {
    const setup_desc *setup = &tr->setup;
    moe_layer_desc layers[2];
    moe_model_desc desc;
    memset(layers, 0, sizeof layers);
    memset(&desc, 0, sizeof desc);
    layers[0].kind = MOE_LAYER_MOE;
    layers[0].d_out = setup->d_model;
    layers[0].n_experts = N_EXPERTS;
    layers[0].top_k = TOP_K;
    layers[0].expert = MOE_EXPERT_MLP;
    layers[0].d_hidden = setup->d_hidden;
    layers[0].balance_loss = 0.01f; /* keeps all four experts in use */
    layers[0].z_loss = 0.001f;      /* keeps router logits small */
    layers[1].kind = MOE_LAYER_DENSE;
    layers[1].d_out = N_CLASSES;
    desc.d_in = d_in;
    desc.n_layers = 2;
    desc.layers = layers;
    desc.loss = MOE_LOSS_CROSS_ENTROPY;
    desc.max_tokens = tr->capacity;
    desc.optimizer.kind = setup->optimizer;
    desc.optimizer.lr = setup->lr;
    if (setup->cosine_decay) desc.optimizer.total_steps = total_steps;
    return succeeded(&tr->ctx, moe_model_create(&tr->ctx, &desc, &tr->model));
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
static int train_epoch(trainer *tr, sample_set *train, int epoch, double *loss, double *aux) {
    int64_t first, batch_size = tr->setup.batch, last_percent = -1;
    double loss_sum = 0.0, aux_sum = 0.0;
    shuffle(train, tr->seed, epoch);
    for (first = 0; first < train->n; first += batch_size) {
        int64_t count = train->n - first < batch_size ? train->n - first : batch_size;
        moe_target target;
        moe_step_info info;
        gather(tr, train, first, count);
        if (tr->setup.shift) shift_some(tr, count, (uint64_t)epoch * (uint64_t)train->n + (uint64_t)first);
        target.labels = tr->labels;
        target.values = NULL;
        if (!succeeded(&tr->ctx, moe_model_train_step(tr->model, tr->x, &target, count, &info))) return 0;
        loss_sum += (double)info.loss * (double)count;
        aux_sum += (double)info.aux_loss * (double)count;
        if (tr->show_bar && 100 * (first + count) / train->n != last_percent) {
            last_percent = 100 * (first + count) / train->n;
            progress(epoch + 1, tr->setup.epochs, first + count, train->n, loss_sum / (double)(first + count));
        }
    }
    *loss = loss_sum / (double)train->n;
    *aux = aux_sum / (double)train->n;
    return 1;
}

static int evaluate(trainer *tr, const sample_set *test, double *accuracy) {
    int64_t first, i, correct = 0;
    for (first = 0; first < test->n; first += tr->capacity) {
        int64_t count = test->n - first < tr->capacity ? test->n - first : tr->capacity;
        gather(tr, test, first, count);
        if (!succeeded(&tr->ctx, moe_model_predict(tr->model, tr->x, count, tr->predicted))) return 0;
        for (i = 0; i < count; i++) correct += tr->predicted[i] == tr->labels[i];
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
static int route_by_digit(trainer *tr, const sample_set *test, routing *rt) {
    sample_set digit;
    int c, ok = 1;
    memset(rt, 0, sizeof *rt);
    if (!sample_set_alloc(&digit, test->data, test->n)) return 0;
    for (c = 0; c < N_CLASSES && ok; c++) {
        int64_t i, first;
        digit.n = 0;
        for (i = 0; i < test->n; i++)
            if (test->data->labels[test->index[i]] == c) digit.index[digit.n++] = test->index[i];
        for (first = 0; first < digit.n; first += tr->capacity) {
            int64_t count = digit.n - first < tr->capacity ? digit.n - first : tr->capacity;
            moe_stats stats = { 0 }; /* gcc -O3 cannot tell that a successful call fills it */
            int e;
            gather(tr, &digit, first, count);
            if (!succeeded(&tr->ctx, moe_model_forward(tr->model, tr->x, count, NULL, NULL)) ||
                !succeeded(&tr->ctx, moe_model_stats(tr->model, 0, &stats))) {
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

/* The table above as an SVG heatmap: a row per expert, a column per digit; a cell's shade and
   number are the share of that digit's test samples routed to that expert (0..100%). */
static int write_routing_svg(const routing *rt, const char *path) {
    enum { CELL = 56, LEFT = 90, TOP = 64 };
    int c, e, width = LEFT + N_CLASSES * CELL + 20, height = TOP + N_EXPERTS * CELL + 56;
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "digits: cannot write %s: %s\n", path, strerror(errno));
        return 0;
    }
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" font-size=\"13\">\n",
            width, height);
    fprintf(f, "<rect width=\"%d\" height=\"%d\" fill=\"white\"/>\n", width, height);
    fprintf(f, "<text x=\"%d\" y=\"18\" font-size=\"15\">Routing: %% of each digit's test samples sent to each expert (top-%d of %d)</text>\n",
            LEFT, TOP_K, N_EXPERTS);
    for (c = 0; c < N_CLASSES; c++)
        fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">%d</text>\n", LEFT + c * CELL + CELL / 2, TOP - 10, c);
    fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">digit</text>\n", LEFT + N_CLASSES * CELL / 2, TOP - 27);
    for (e = 0; e < N_EXPERTS; e++) {
        fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"end\">expert %d</text>\n", LEFT - 10, TOP + e * CELL + CELL / 2 + 5, e);
        for (c = 0; c < N_CLASSES; c++) {
            double share = rt->samples[c] ? (double)rt->assignments[c][e] / (double)rt->samples[c] : 0.0;
            /* white (0%) to dark blue (100%) */
            int r = (int)(255.0 - share * (255.0 - 8.0)), g = (int)(255.0 - share * (255.0 - 48.0)), b = (int)(255.0 - share * (255.0 - 107.0));
            fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"rgb(%d,%d,%d)\" stroke=\"#ccc\"/>\n",
                    LEFT + c * CELL, TOP + e * CELL, CELL, CELL, r, g, b);
            fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\" fill=\"%s\">%.0f</text>\n", LEFT + c * CELL + CELL / 2,
                    TOP + e * CELL + CELL / 2 + 5, share > 0.5 ? "white" : "black", 100.0 * share);
        }
    }
    fprintf(f, "<text x=\"%d\" y=\"%d\" fill=\"#555\">each column adds up to %d%%: every sample goes to %d experts</text>\n",
            LEFT, TOP + N_EXPERTS * CELL + 30, 100 * TOP_K, TOP_K);
    fprintf(f, "</svg>\n");
    if (fclose(f) != 0) {
        fprintf(stderr, "digits: cannot write %s\n", path);
        return 0;
    }
    return 1;
}

// >>main --------------------------------------------------------------------
int main(int argc, char **argv) {
    options opt;
    moe_ctx_desc ctx_desc;
    trainer tr;
    dataset train_data, test_data;
    sample_set train, test;
    routing rt;
    int epoch, q, status = 1;
    int64_t n_params;
    double accuracy = 0.0;

    memset(&tr, 0, sizeof tr);
    memset(&train_data, 0, sizeof train_data);
    memset(&test_data, 0, sizeof test_data);
    memset(&train, 0, sizeof train);
    memset(&test, 0, sizeof test);
    if (!parse_options(argc, argv, &opt)) return 2;
    tr.setup = opt.mnist_dir ? MNIST_SETUP : DIGITS_SETUP;
    if (opt.epochs) tr.setup.epochs = opt.epochs;
    if (opt.batch) tr.setup.batch = opt.batch;
    if (opt.lr > 0.0f) tr.setup.lr = opt.lr;
    tr.seed = opt.seed;
    tr.show_bar = stdout_is_terminal();

    if (opt.mnist_dir) {
        if (!dataset_load(&train_data, opt.mnist_dir, "train-images-idx3-ubyte", "train-labels-idx1-ubyte", &tr.setup) ||
            !dataset_load(&test_data, opt.mnist_dir, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", &tr.setup) ||
            !all_samples(&train_data, &train) || !all_samples(&test_data, &test))
            goto done;
    } else {
        if (!dataset_load(&train_data, opt.data_dir, "digits-images-idx3-ubyte", "digits-labels-idx1-ubyte", &tr.setup) ||
            !split_digits(&train_data, &train, &test))
            goto done;
        if (test.n == 0) {
            fprintf(stderr, "digits: too few images to split off a test set\n");
            goto done;
        }
    }

    memset(&ctx_desc, 0, sizeof ctx_desc);
    ctx_desc.n_threads = opt.threads;
    ctx_desc.seed = opt.seed;
    if (!succeeded(&tr.ctx, moe_ctx_init(&tr.ctx, &ctx_desc))) goto done;
    tr.capacity = tr.setup.batch > 256 ? tr.setup.batch : 256;
    tr.x = (float *)malloc((size_t)(tr.capacity * train_data.d) * sizeof *tr.x);
    tr.labels = (int32_t *)malloc((size_t)tr.capacity * sizeof *tr.labels);
    tr.predicted = (int32_t *)malloc((size_t)tr.capacity * sizeof *tr.predicted);
    if (!tr.x || !tr.labels || !tr.predicted) {
        fprintf(stderr, "digits: out of memory\n");
        goto done;
    }
    if (!build_model(&tr, train_data.d, (train.n + tr.setup.batch - 1) / tr.setup.batch * tr.setup.epochs)) goto done;
    n_params = moe_model_parameter_count(tr.model);

    printf("%s: %lld training and %lld test images of %lldx%lld pixels\n", tr.setup.name, (long long)train.n,
           (long long)test.n, (long long)tr.setup.side, (long long)tr.setup.side);
    printf("model: %lld inputs -> MoE (%d MLP experts of hidden width %lld, top-%d) -> %lld -> dense -> %d classes, "
           "%lld parameters\n", (long long)train_data.d, N_EXPERTS, (long long)tr.setup.d_hidden, TOP_K,
           (long long)tr.setup.d_model, N_CLASSES, (long long)n_params);
    printf("training: %d epochs, batch %d, %s lr %g%s, seed %llu, %d threads\n\n", tr.setup.epochs, tr.setup.batch,
           tr.setup.optimizer == MOE_OPTIMIZER_ADAM ? "Adam" : "AdamW", (double)tr.setup.lr,
           tr.setup.cosine_decay ? " (cosine decay)" : "", (unsigned long long)tr.seed, tr.ctx.n_threads);

    for (epoch = 0; epoch < tr.setup.epochs; epoch++) {
        double loss, aux;
        if (!train_epoch(&tr, &train, epoch, &loss, &aux) || !evaluate(&tr, &test, &accuracy)) goto done;
        /* longer than the progress bar, so it covers it */
        printf("%sepoch %3d/%d  train loss %.4f  aux loss %.4f  test accuracy %.4f\n", tr.show_bar ? "\r" : "",
               epoch + 1, tr.setup.epochs, loss, aux, accuracy);
        fflush(stdout);
    }

    if (!route_by_digit(&tr, &test, &rt)) goto done;
    print_routing(&rt);
    if (opt.svg_path[0]) {
        if (!write_routing_svg(&rt, opt.svg_path)) goto done;
        printf("  heatmap of this table: %s\n", opt.svg_path);
    }
    /* the same model with reduced-precision expert weights (inference only), then back to f32 */
    for (q = 0; q < 2; q++) {
        double reduced;
        if (!succeeded(&tr.ctx, moe_model_quantize(tr.model, q ? MOE_DTYPE_I8 : MOE_DTYPE_BF16)) || !evaluate(&tr, &test, &reduced))
            goto done;
        printf("%sexpert weights in %s: test accuracy %.4f (%+.2f points)\n", q ? "" : "\n", q ? "int8" : "bf16", reduced, 100.0 * (reduced - accuracy));
    }
    if (!succeeded(&tr.ctx, moe_model_quantize(tr.model, MOE_DTYPE_F32))) goto done;
    if (!succeeded(&tr.ctx, moe_model_save(tr.model, opt.out_path))) goto done;
    printf("\nmodel saved to %s\n", opt.out_path);
    printf("test_accuracy=%.4f\n", accuracy);
    status = 0;
done:
    moe_model_destroy(tr.model);
    free(tr.x);
    free(tr.labels);
    free(tr.predicted);
    free(train.index);
    free(test.index);
    dataset_free(&train_data);
    dataset_free(&test_data);
    return status;
}
