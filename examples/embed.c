/* embed.c - moe.h inside a game loop: place the model `make demo` saved in memory the game owns
   (moe_model_memory_size, then moe_model_init_memory: the library allocates nothing for it), run
   one inference per simulated frame, changing how many experts each call may use, and report the
   latency per frame and how often the library touched the heap after start-up (it must be never).

     make embed          (or: build/embed [MODEL] [--frames N] [--threads N])

   Prints p50 / p99 / max latency in microseconds and "heap_allocations=0". The input of each
   frame is a digit image from the bundled data set, as a game would feed sensor readings. */
#define _POSIX_C_SOURCE 199309L   /* clock_gettime */
#define MOE_IMPLEMENTATION
#include "../moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Every allocation of the library goes through here: the loop must not reach it. */
typedef struct heap_counter {
    long allocations, frees;
} heap_counter;

static void *counted_alloc(size_t size, void *user) {
    ((heap_counter *)user)->allocations++;
    return malloc(size);
}

static void counted_free(void *ptr, void *user) {
    if (ptr) ((heap_counter *)user)->frees++;
    free(ptr);
}

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e6 + (double)t.tv_nsec * 1e-3;
}

static int compare_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* The whole file in a new buffer (the game would have it in its asset pack). */
static unsigned char *read_file(const char *path, size_t *size) {
    FILE *fp = fopen(path, "rb");
    unsigned char *bytes = NULL;
    long n = -1;
    if (fp && fseek(fp, 0, SEEK_END) == 0 && (n = ftell(fp)) > 0 && fseek(fp, 0, SEEK_SET) == 0) {
        bytes = (unsigned char *)malloc((size_t)n);
        if (bytes && fread(bytes, 1, (size_t)n, fp) != (size_t)n) { free(bytes); bytes = NULL; }
    }
    if (fp) fclose(fp);
    *size = bytes ? (size_t)n : 0;
    return bytes;
}

/* The bundled UCI digits (examples/data): 8x8 images as 64 floats in [0, 1]. */
static float *load_images(const char *path, long *count) {
    FILE *fp = fopen(path, "rb");
    unsigned char header[16];
    unsigned char *bytes = NULL;
    float *images = NULL;
    long n = 0, i;
    if (fp && fread(header, 1, 16, fp) == 16 && header[2] == 8 && header[3] == 3) {
        n = (long)header[4] << 24 | (long)header[5] << 16 | (long)header[6] << 8 | header[7];
        bytes = n > 0 && n < 1000000 ? (unsigned char *)malloc((size_t)n * 64) : NULL;
        images = bytes ? (float *)malloc((size_t)n * 64 * sizeof(float)) : NULL;
        if (images && fread(bytes, 64, (size_t)n, fp) == (size_t)n) {
            for (i = 0; i < n * 64; i++) images[i] = (float)bytes[i] / 16.0f;
        } else {
            free(images);
            images = NULL;
        }
    }
    if (fp) fclose(fp);
    free(bytes);
    *count = images ? n : 0;
    return images;
}

int main(int argc, char **argv) {
    const char *model_path = "build/digits.safetensors";
    long frames = 10000, n_images = 0, f, threads = 1;
    int i;
    heap_counter heap = {0, 0};
    moe_ctx ctx;
    moe_model *model = NULL;
    float *images, *latency;
    int32_t cls;
    int64_t k_max = 1;
    long allocations_before, per_k[9] = {0};
    unsigned char *file;
    void *memory = NULL;
    size_t file_size = 0, memory_size = 0;
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--frames") == 0 && i + 1 < argc) frames = strtol(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) threads = strtol(argv[++i], NULL, 10);
        else if (argv[i][0] != '-') model_path = argv[i];
        else {
            fprintf(stderr, "usage: embed [MODEL] [--frames N] [--threads N]\n");
            return 2;
        }
    }
    if (frames < 1 || frames > 100000000 || threads < 0 || threads > 4096) {
        fprintf(stderr, "embed: --frames wants 1..1e8 and --threads 0..4096\n");
        return 2;
    }
    images = load_images("examples/data/digits-images-idx3-ubyte", &n_images);
    latency = (float *)malloc((size_t)frames * sizeof(float));
    if (!images || !latency) {
        fprintf(stderr, "embed: cannot read examples/data/digits-images-idx3-ubyte (run from the repository root)\n");
        return 1;
    }

    /* start-up: the model file from the assets, the size of its block for one token per call */
    moe_ctx_init(&ctx, &(moe_ctx_desc){.n_threads = (int)threads, .allocator = {counted_alloc, counted_free, &heap}});
    file = read_file(model_path, &file_size);
    if (!file || moe_model_memory_size(&ctx, file, file_size, 1, &memory_size) != MOE_OK) {
        fprintf(stderr, "embed: %s: %s (run `make demo` first)\n", model_path, file ? moe_ctx_error(&ctx) : "cannot read");
        return 1;
    }
    /* the game's own memory (a static array or an arena would do as well) */
    memory = malloc(memory_size);
    allocations_before = heap.allocations;
    if (!memory || moe_model_init_memory(&ctx, file, file_size, 1, memory, memory_size, &model) != MOE_OK) {
        fprintf(stderr, "embed: %s\n", memory ? moe_ctx_error(&ctx) : "out of memory");
        return 1;
    }
    if (heap.allocations != allocations_before) {
        fprintf(stderr, "embed: loading into the game's memory allocated %ld times\n", heap.allocations - allocations_before);
        return 1;
    }
    if (moe_model_get_desc(model)->d_in != 64) {
        fprintf(stderr, "embed: %s takes %lld inputs, the digits have 64\n", model_path, (long long)moe_model_get_desc(model)->d_in);
        moe_model_destroy(model);
        return 1;
    }
    for (i = 0; i < moe_model_get_desc(model)->n_layers; i++)
        if (moe_model_get_desc(model)->layers[i].kind == MOE_LAYER_MOE && moe_model_get_desc(model)->layers[i].max_top_k > k_max)
            k_max = moe_model_get_desc(model)->layers[i].max_top_k;
    printf("embed: %s placed in %zu bytes of the game's memory; %ld frames, one inference each, k cycling 1..%lld, %d thread(s)\n",
           model_path, memory_size, frames, (long long)k_max, ctx.n_threads);

    /* the game loop */
    allocations_before = heap.allocations;
    for (f = 0; f < frames; f++) {
        moe_forward_opts opts;
        const float *x = images + (f % n_images) * 64;
        double t0;
        memset(&opts, 0, sizeof opts);
        opts.top_k = (int)(1 + f % k_max);   /* a quality knob a game turns per frame */
        t0 = now_us();
        if (moe_model_forward(model, x, 1, NULL, &opts) != MOE_OK) {
            fprintf(stderr, "embed: frame %ld: %s\n", f, moe_ctx_error(&ctx));
            moe_model_destroy(model);
            return 1;
        }
        {
            const float *y = moe_model_output(model);
            int c;
            cls = 0;
            for (c = 1; c < (int)moe_model_d_out(model); c++)
                if (y[c] > y[cls]) cls = c;
        }
        latency[f] = (float)(now_us() - t0);
        per_k[opts.top_k < 9 ? opts.top_k : 8]++;
    }

    {
        double *sorted = (double *)malloc((size_t)frames * sizeof(double));
        long allocations = heap.allocations - allocations_before;
        if (!sorted) return 1;
        for (f = 0; f < frames; f++) sorted[f] = latency[f];
        qsort(sorted, (size_t)frames, sizeof *sorted, compare_double);
        printf("last frame: class %d; frames with k = 1, 2: %ld, %ld\n", (int)cls, per_k[1], per_k[2]);
        printf("latency_p50_us=%.1f\nlatency_p99_us=%.1f\nlatency_max_us=%.1f\n", sorted[frames / 2],
               sorted[(frames * 99) / 100], sorted[frames - 1]);
        printf("heap_allocations=%ld\n", allocations);
        free(sorted);
        moe_model_destroy(model);   /* frees nothing: the memory is the game's */
        free(memory);
        free(file);
        free(images);
        free(latency);
        return allocations == 0 && heap.allocations == heap.frees ? 0 : 1;
    }
}
