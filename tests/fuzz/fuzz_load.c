/* Fuzz target of the file reader and model loaders: moe_tensor_file_parse, moe_model_load_memory,
   moe_model_load_checkpoint_memory, moe_model_from_config and, on every file that parses, the
   Hugging Face block importer moe_model_import_hf (top_k 1, no config.json), each on every input
   (so one corpus holds model files, checkpoints, Hugging Face blocks and configurations alike).

   Besides what the sanitizers catch, a counting allocator (the context's allocator) checks:
   - the allocation bound: while reading a file of n bytes, no single allocation exceeds
     FUZZ_FACTOR * n + FUZZ_SLACK bytes, except the activation arena when the file's own max_tokens
     is used (one allocation, bounded by MOE_MAX_BYTES). The factor covers the per-item tables of the
     reader and the model: 32-byte JSON tokens for every 2 header bytes, and a layer struct (about
     7 KB) for every layer, which needs at least one tensor entry (about 90 header bytes) in the file;
   - configurations alone (moe_model_from_config) may describe any model: no allocation exceeds
     MOE_MAX_BYTES (set small here), the library's up-front limit;
   - nothing leaks: every call that fails, and every model once destroyed, leaves no allocation;
     also when allocation number k (chosen by the input's last byte) of a checkpoint load fails.
   A loaded model also runs a forward and a training step.

   libFuzzer:  make fuzz FUZZ_SECONDS=60   (clang -fsanitize=fuzzer,address,undefined)
   replay:     cc -DMOE_FUZZ_REPLAY -fsanitize=address,undefined tests/fuzz/fuzz_load.c -lm
               ./a.out FILE_OR_DIR...   (make test replays tests/fuzz/corpus this way) */
#if defined(MOE_FUZZ_REPLAY) && !defined(_WIN32)
#define _POSIX_C_SOURCE 200809L
#endif
#define MOE_MAX_BYTES ((size_t)16 << 20)
#define MOE_IMPLEMENTATION
#include "../../moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FUZZ_FACTOR 128
#define FUZZ_SLACK ((size_t)1 << 20)

static size_t fuzz_limit;       /* the largest allocation the current call may make */
static int fuzz_big_allowed;    /* allocations above fuzz_limit still allowed (the arena) */
static long fuzz_live;          /* allocations not yet freed */
static size_t fuzz_input_size;
static const char *fuzz_call = "";
static long fuzz_calls, fuzz_fail_at;  /* allocation count; the one that fails (0: none) */

static void fuzz_die(const char *what, size_t size) {
    fprintf(stderr, "fuzz_load: %s: %s (%zu bytes; input %zu bytes, limit %zu)\n", fuzz_call, what, size, fuzz_input_size, fuzz_limit);
    abort();
}

static void *fuzz_alloc(size_t size, void *user) {
    void *p;
    (void)user;
    if (fuzz_fail_at && ++fuzz_calls == fuzz_fail_at) return NULL;
    if (size > fuzz_limit) {
        if (fuzz_big_allowed > 0 && size <= MOE_MAX_BYTES + FUZZ_SLACK) fuzz_big_allowed--;
        else fuzz_die("allocation larger than the input justifies", size);
    }
    p = malloc(size);
    if (p) fuzz_live++;
    return p;
}

static void fuzz_free(void *ptr, void *user) {
    (void)user;
    if (ptr) fuzz_live--;
    free(ptr);
}

static void fuzz_expect_nothing_live(void) {
    if (fuzz_live != 0) fuzz_die("allocations left behind", (size_t)fuzz_live);
}

/* A forward and one training step on a loaded model must work (or fail cleanly). */
static void fuzz_exercise(moe_model *m) {
    const moe_model_desc *d = moe_model_get_desc(m);
    int64_t d_out = moe_model_d_out(m);
    float *x = (float *)calloc((size_t)d->d_in, sizeof(float)), *y = (float *)calloc((size_t)d_out, sizeof(float));
    int32_t label = 0;
    moe_target target, tasks[MOE_MAX_TASKS];
    int i;
    memset(&target, 0, sizeof target);
    target.labels = &label;
    target.values = y;
    for (i = 0; i < MOE_MAX_TASKS; i++) tasks[i] = target;   /* multi-task models: each task's slice of y, label 0 */
    if (d->n_tasks > 0) target.tasks = tasks;
    if (x && y) {
        moe_model_forward(m, x, 1, y, NULL);
        memset(y, 0, sizeof(float) * (size_t)d_out);
        moe_model_train_step(m, x, &target, 1, NULL);
    }
    free(x);
    free(y);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    moe_ctx ctx;
    moe_ctx_desc cd;
    moe_tensor_file *f = NULL;
    moe_model *m = NULL;
    moe_hf_desc hd;
    char *text;
    int64_t max_tokens[2] = {1, 0};
    int i, checkpoint;
    memset(&cd, 0, sizeof cd);
    cd.n_threads = 1;
    cd.seed = 7;
    cd.allocator.alloc = fuzz_alloc;
    cd.allocator.free = fuzz_free;
    if (moe_ctx_init(&ctx, &cd) != MOE_OK) abort();
    fuzz_input_size = size;
    fuzz_live = 0;

    /* the reader */
    fuzz_call = "moe_tensor_file_parse";
    fuzz_limit = FUZZ_FACTOR * size + FUZZ_SLACK;
    fuzz_big_allowed = 0;
    if (moe_tensor_file_parse(&ctx, data, size, &f) == MOE_OK) {
        for (i = 0; i < moe_tensor_file_count(f); i++) {
            const moe_file_tensor *t = moe_tensor_file_get(f, i);
            if (!moe_tensor_file_find(f, t->name)) fuzz_die("a listed tensor cannot be found", 0);
        }
        fuzz_call = "moe_model_import_hf";
        memset(&hd, 0, sizeof hd);
        hd.top_k = 1;
        if (moe_model_import_hf(&ctx, f, &hd, 1, &m) == MOE_OK) {
            fuzz_exercise(m);
            moe_model_destroy(m);
        } else if (m) fuzz_die("a failed import returned a model", 0);
        m = NULL;
        moe_tensor_file_close(f);
    } else if (f) fuzz_die("a failed parse returned a file", 0);
    fuzz_expect_nothing_live();

    /* the loaders, with max_tokens 1 (strict bound) and the file's own (one arena may be larger) */
    for (checkpoint = 0; checkpoint < 2; checkpoint++)
        for (i = 0; i < 2; i++) {
            moe_result r;
            fuzz_call = checkpoint ? "moe_model_load_checkpoint_memory" : "moe_model_load_memory";
            fuzz_big_allowed = max_tokens[i] == 0;
            r = checkpoint ? moe_model_load_checkpoint_memory(&ctx, data, size, max_tokens[i], &m)
                           : moe_model_load_memory(&ctx, data, size, max_tokens[i], &m);
            if (r == MOE_OK) {
                fuzz_exercise(m);
                moe_model_destroy(m);
            } else if (m) fuzz_die("a failed load returned a model", 0);
            m = NULL;
            fuzz_expect_nothing_live();
        }

    /* out of memory at the k-th allocation of a load */
    if (size > 0) {
        fuzz_call = "moe_model_load_checkpoint_memory (failing allocator)";
        fuzz_calls = 0;
        fuzz_fail_at = 1 + data[size - 1] % 32;
        fuzz_big_allowed = 0;
        if (moe_model_load_checkpoint_memory(&ctx, data, size, 1, &m) == MOE_OK) moe_model_destroy(m);
        m = NULL;
        fuzz_fail_at = 0;
        fuzz_expect_nothing_live();
    }

    /* the configuration alone: bounded by MOE_MAX_BYTES only */
    fuzz_call = "moe_model_from_config";
    fuzz_limit = MOE_MAX_BYTES + FUZZ_SLACK;
    fuzz_big_allowed = 0;
    text = (char *)malloc(size + 1);
    if (!text) return 0;
    memcpy(text, data, size);
    text[size] = 0;
    if (moe_model_from_config(&ctx, text, 1, &m) == MOE_OK) {
        fuzz_exercise(m);
        moe_model_destroy(m);
    } else if (m) fuzz_die("a failed create returned a model", 0);
    free(text);
    fuzz_expect_nothing_live();
    return 0;
}

#ifdef MOE_FUZZ_REPLAY
/* Replay files, or every file of directories, through the target; prints the harness's RESULT line. */
#include <dirent.h>

static int fuzz_replay_file(const char *path) {
    FILE *fp = fopen(path, "rb");
    unsigned char *buf;
    long n;
    if (!fp) return 0;
    if (fseek(fp, 0, SEEK_END) != 0 || (n = ftell(fp)) < 0 || fseek(fp, 0, SEEK_SET) != 0) { fclose(fp); return 0; }
    buf = (unsigned char *)malloc((size_t)n + 1);
    if (!buf || fread(buf, 1, (size_t)n, fp) != (size_t)n) { fclose(fp); free(buf); return 0; }
    fclose(fp);
    LLVMFuzzerTestOneInput(buf, (size_t)n);
    free(buf);
    return 1;
}

int main(int argc, char **argv) {
    int i, files = 0, unreadable = 0;
    for (i = 1; i < argc; i++) {
        DIR *dir = opendir(argv[i]);
        if (dir) {
            struct dirent *e;
            char path[4096];
            while ((e = readdir(dir)) != NULL) {
                if (e->d_name[0] == '.') continue;
                snprintf(path, sizeof path, "%s/%s", argv[i], e->d_name);
                if (fuzz_replay_file(path)) files++;
                else unreadable++;
            }
            closedir(dir);
        } else if (fuzz_replay_file(argv[i])) files++;
        else unreadable++;
    }
    printf("replayed %d inputs through moe_tensor_file_parse, moe_model_import_hf, moe_model_load_memory, moe_model_load_checkpoint_memory, moe_model_from_config\n", files);
    printf("RESULT passed=%d failed=%d skipped=0\n", files > 0, files == 0 || unreadable > 0);
    return files > 0 && unreadable == 0 ? 0 : 1;
}
#endif
