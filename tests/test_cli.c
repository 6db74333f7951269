/* The command-line tool build/moe, run as a user runs it (through the shell):
   forward/backward against the library in-process, the PyTorch fixtures of tests/ref/,
   training, init and info, and every kind of bad input (which must give an error, never a crash).

   usage: test_cli [TOOL [TMPDIR [FIXTURE_DIR]]]   defaults: build/moe build/tmp_cli tests/ref */
#define _POSIX_C_SOURCE 200809L
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "test.h"

#include <dirent.h>
#include <errno.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>

static const char *tool_path = "build/moe";
static const char *tmp_dir = "build/tmp_cli";
static const char *fixture_dir = "tests/ref";
static moe_ctx ctx;

/* What the last run of the tool printed. */
static char tool_out[1 << 16], tool_err[1 << 16];

/* ---- helpers ------------------------------------------------------------------------------- */
/* tmp_dir/name into buf */
static const char *tmp_file(char *buf, size_t cap, const char *name) {
    snprintf(buf, cap, "%s/%s", tmp_dir, name);
    return buf;
}
#define TMP(buf, name) tmp_file(buf, sizeof buf, name)

static int make_dirs(const char *path) {
    char p[1024];
    size_t i;
    snprintf(p, sizeof p, "%s", path);
    for (i = 1; p[i]; i++) {
        if (p[i] != '/') continue;
        p[i] = 0;
        if (mkdir(p, 0777) != 0 && errno != EEXIST) return -1;
        p[i] = '/';
    }
    return mkdir(p, 0777) != 0 && errno != EEXIST ? -1 : 0;
}

/* Append s to the command in single quotes, so that the shell passes it unchanged. */
static void append_quoted(char *cmd, size_t cap, const char *s) {
    size_t n = strlen(cmd);
    if (n + 2 < cap) cmd[n++] = '\'';
    for (; *s && n + 6 < cap; s++) {
        if (*s == '\'') { memcpy(cmd + n, "'\\''", 4); n += 4; }
        else cmd[n++] = *s;
    }
    if (n + 2 < cap) cmd[n++] = '\'';
    cmd[n] = 0;
}

static void read_text(const char *path, char *buf, size_t cap) {
    FILE *fp = fopen(path, "rb");
    size_t n = 0;
    if (fp) { n = fread(buf, 1, cap - 1, fp); fclose(fp); }
    buf[n] = 0;
}

#define CRASHED (-1)

/* Run the tool with args (NULL-terminated). Returns its exit status, or CRASHED when it died
   from a signal or a sanitizer reported an error; stdout and stderr land in tool_out, tool_err. */
static int run_tool(const char *const *args) {
    char cmd[8192], out_path[1024], err_path[1024];
    int status, i;
    cmd[0] = 0;
    append_quoted(cmd, sizeof cmd, tool_path);
    for (i = 0; args[i]; i++) {
        strcat(cmd, " ");
        append_quoted(cmd, sizeof cmd, args[i]);
    }
    strcat(cmd, " >");
    append_quoted(cmd, sizeof cmd, TMP(out_path, "stdout.txt"));
    strcat(cmd, " 2>");
    append_quoted(cmd, sizeof cmd, TMP(err_path, "stderr.txt"));
    fflush(stdout);
    status = system(cmd);
    read_text(out_path, tool_out, sizeof tool_out);
    read_text(err_path, tool_err, sizeof tool_err);
    if (strstr(tool_err, "Sanitizer") || strstr(tool_err, "runtime error:")) {
        fprintf(stderr, "sanitizer report from: %s\n%s\n", cmd, tool_err);
        return CRASHED;
    }
    if (status == -1) return CRASHED;
    if (WIFSIGNALED(status)) return CRASHED;
    if (!WIFEXITED(status)) return CRASHED;
    /* the shell reports a child killed by signal N as 128 + N; the tool itself uses 0, 1 and 2 */
    if (WEXITSTATUS(status) > 2) return CRASHED;
    return WEXITSTATUS(status);
}

#define ARGS(...) ((const char *const[]){__VA_ARGS__, NULL})

/* The tool must succeed. */
#define CHECK_RUN_OK(...)                                                                     \
    do {                                                                                      \
        int rc_ = run_tool(ARGS(__VA_ARGS__));                                                \
        CHECK(rc_ == 0, "exit status %d; stderr: %s", rc_, tool_err);                         \
    } while (0)

/* The tool must fail cleanly with the status `expected`, say why on stderr, and leave no `out`. */
static int expect_failure(int expected, const char *out, const char *const *args) {
    int rc;
    if (out) remove(out);
    rc = run_tool(args);
    CHECK(rc != CRASHED, "the tool crashed (args from \"%s\")", args[0]);
    CHECK(rc == expected, "exit status %d, expected %d (args: %s %s %s); stderr: %s", rc, expected, args[0],
          args[1] ? args[1] : "", args[1] && args[2] ? args[2] : "", tool_err);
    CHECK(strncmp(tool_err, "moe", 3) == 0, "no error message on stderr (args from \"%s\")", args[0]);
    if (out) {
        FILE *fp = fopen(out, "rb");
        CHECK(fp == NULL, "%s was written although the command failed", out);
        if (fp) fclose(fp);
    }
    return rc;
}
#define CHECK_FAILS(expected, out, ...) expect_failure(expected, out, ARGS(__VA_ARGS__))

static int write_bytes(const char *path, const void *data, size_t size) {
    FILE *fp = fopen(path, "wb");
    int ok;
    if (!fp) return 0;
    ok = fwrite(data, 1, size, fp) == size;
    return (fclose(fp) == 0) && ok;
}

/* Write a safetensors file of up to 4 tensors (name NULL ends the list). */
typedef struct wtensor {
    const char *name;
    moe_dtype dtype;
    int ndim;
    int64_t shape[2];
    const void *data;
} wtensor;

static int write_tensors(const char *path, const wtensor *ts) {
    moe_tensor_writer *w = NULL;
    int ok;
    CHECK_OK(moe_tensor_writer_create(&ctx, &w), &ctx);
    if (!w) return 0;
    for (; ts->name; ts++) CHECK_OK(moe_tensor_writer_add(w, ts->name, ts->dtype, ts->ndim, ts->shape, ts->data), &ctx);
    ok = moe_tensor_writer_save(w, path) == MOE_OK;
    CHECK(ok, "writing %s: %s", path, moe_ctx_error(&ctx));
    moe_tensor_writer_destroy(w);
    return ok;
}

/* Tensor `name` of f as F32 with exactly the given shape, or NULL (with a failed check). */
static const float *find_f32(const moe_tensor_file *f, const char *name, int ndim, const int64_t *shape) {
    const moe_file_tensor *t = moe_tensor_file_find(f, name);
    int q, ok;
    CHECK(t != NULL, "no tensor \"%s\" in the output", name);
    if (!t) return NULL;
    ok = t->dtype == MOE_DTYPE_F32 && t->ndim == ndim;
    for (q = 0; ok && q < ndim; q++) ok = t->shape[q] == shape[q];
    CHECK(ok, "tensor \"%s\": dtype %d, %d dimensions, not F32 with the expected shape", name, (int)t->dtype, t->ndim);
    return ok ? (const float *)t->data : NULL;
}

static float load_f32(const float *p, int64_t i) {
    float v;
    memcpy(&v, p + i, sizeof v);   /* file data is not aligned in general */
    return v;
}

/* Worst |a - b| / (tol * max(|b|, floor * max|b| over the tensor)); <= 1 passes.
   a may be unaligned (file data). A tensor of zeros must be matched exactly. */
static double worst_error(const float *a, const float *b, int64_t n, double tol, double floor_frac, int64_t *where) {
    double scale = 0.0, worst = 0.0;
    int64_t i;
    *where = -1;
    for (i = 0; i < n; i++) scale = fabs((double)b[i]) > scale ? fabs((double)b[i]) : scale;
    for (i = 0; i < n; i++) {
        double ref = b[i], got = load_f32(a, i), bound = tol * (fabs(ref) > floor_frac * scale ? fabs(ref) : floor_frac * scale);
        double e = got == ref ? 0.0 : (bound > 0.0 ? fabs(got - ref) / bound : HUGE_VAL);
        if (!(e <= worst)) { worst = e; *where = i; }
    }
    return worst;
}

static void fill_normal(float *p, int64_t n, uint64_t stream, float scale) {
    int64_t i;
    for (i = 0; i < n; i++) p[i] = scale * moe_rng_normal(2024, stream, (uint64_t)i);
}

/* ---- 1. forward/backward against the library ---------------------------------------------- */
#define SMALL_T 13
#define SMALL_D 6
#define SMALL_C 3

/* A MoE layer (noisy router, so that noise in the tool's forward would show; shared experts;
   aux losses and jitter that must stay off) -> layernorm -> dense head. */
static moe_model *small_model(int64_t max_tokens) {
    moe_layer_desc layers[3];
    moe_model_desc d;
    moe_model *m = NULL;
    memset(layers, 0, sizeof layers);
    memset(&d, 0, sizeof d);
    layers[0].kind = MOE_LAYER_MOE;
    layers[0].d_out = 8;
    layers[0].router = MOE_ROUTER_NOISY_TOPK;
    layers[0].n_experts = 4;
    layers[0].top_k = 2;
    layers[0].d_hidden = 10;
    layers[0].activation = MOE_ACT_GELU;
    layers[0].n_shared_experts = 1;
    layers[0].d_shared_hidden = 5;
    layers[0].router_bias = MOE_FLAG_ON;
    layers[0].jitter = 0.1f;
    layers[0].balance_loss = 0.01f;
    layers[0].z_loss = 0.001f;
    layers[0].importance_loss = 0.1f;
    layers[0].load_loss = 0.1f;
    layers[1].kind = MOE_LAYER_LAYERNORM;
    layers[2].kind = MOE_LAYER_DENSE;
    layers[2].d_out = SMALL_C;
    d.d_in = SMALL_D;
    d.n_layers = 3;
    d.layers = layers;
    d.max_tokens = max_tokens;
    CHECK_OK(moe_model_create(&ctx, &d, &m), &ctx);
    return m;
}

static int test_backward_matches_library(void) {
    char model_path[1024], in_path[1024], out_path[1024], fwd_path[1024];
    float x[SMALL_T * SMALL_D], dy[SMALL_T * SMALL_C], y[SMALL_T * SMALL_C], dx[SMALL_T * SMALL_D];
    const int64_t xs[2] = {SMALL_T, SMALL_D}, ys[2] = {SMALL_T, SMALL_C};
    moe_model *m = small_model(SMALL_T);
    moe_tensor_file *out = NULL;
    const float *p;
    int64_t where;
    int i;
    if (!m) return 0;
    /* decisive routing, so that the test would also see a tool that picked different experts */
    for (i = 0; i < moe_model_tensor_count(m); i++) {
        moe_tensor t;
        moe_model_tensor(m, i, &t);
        if (strstr(t.name, "router.")) fill_normal(t.data, t.size, 100 + (uint64_t)i, 1.0f);
    }
    fill_normal(x, SMALL_T * SMALL_D, 1, 1.0f);
    fill_normal(dy, SMALL_T * SMALL_C, 2, 1.0f);
    CHECK_OK(moe_model_save(m, TMP(model_path, "small.safetensors")), &ctx);
    write_tensors(TMP(in_path, "small_in.safetensors"),
                  (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {SMALL_T, SMALL_D}, x}, {"dy", MOE_DTYPE_F32, 2, {SMALL_T, SMALL_C}, dy}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});

    /* the same computation in-process */
    CHECK_OK(moe_model_forward(m, x, SMALL_T, y, NULL), &ctx);
    moe_model_zero_grad(m);
    CHECK_OK(moe_model_backward(m, dy, dx, 0), &ctx);

    CHECK_RUN_OK("backward", model_path, in_path, TMP(out_path, "small_out.safetensors"));
    CHECK_OK(moe_tensor_file_read(&ctx, out_path, &out), &ctx);
    if (out) {
        CHECK(moe_tensor_file_count(out) == 2 + moe_model_tensor_count(m), "OUT holds %d tensors, expected y, dx and %d gradients",
              moe_tensor_file_count(out), moe_model_tensor_count(m));
        if ((p = find_f32(out, "y", 2, ys)))
            CHECK(worst_error(p, y, SMALL_T * SMALL_C, 1e-6, 1.0, &where) <= 1.0, "y[%lld] differs from the library's", (long long)where);
        if ((p = find_f32(out, "dx", 2, xs)))
            CHECK(worst_error(p, dx, SMALL_T * SMALL_D, 1e-6, 1.0, &where) <= 1.0, "dx[%lld] differs from the library's", (long long)where);
        for (i = 0; i < moe_model_tensor_count(m); i++) {
            moe_tensor t;
            char name[160];
            moe_model_tensor(m, i, &t);
            snprintf(name, sizeof name, "grad.%s", t.name);
            if ((p = find_f32(out, name, t.ndim, t.shape)))
                CHECK(worst_error(p, t.grad, t.size, 1e-6, 1.0, &where) <= 1.0, "%s[%lld] differs from the library's", name, (long long)where);
        }
        moe_tensor_file_close(out);
        out = NULL;
    }

    /* forward writes y alone, the same y */
    CHECK_RUN_OK("forward", model_path, in_path, TMP(fwd_path, "small_fwd.safetensors"));
    CHECK_OK(moe_tensor_file_read(&ctx, fwd_path, &out), &ctx);
    if (out) {
        CHECK(moe_tensor_file_count(out) == 1, "forward OUT holds %d tensors, expected only y", moe_tensor_file_count(out));
        if ((p = find_f32(out, "y", 2, ys)))
            CHECK(worst_error(p, y, SMALL_T * SMALL_C, 1e-6, 1.0, &where) <= 1.0, "forward y[%lld] differs from the library's", (long long)where);
        moe_tensor_file_close(out);
    }
    moe_model_destroy(m);
    return 0;
}

/* x in F64 gives the same bits as in F32 (the conversion is exact), and so does any thread count. */
static int test_dtypes_and_threads(void) {
    char model_path[1024], in_path[1024], in64_path[1024], a[1024], b[1024], c[1024];
    float x[SMALL_T * SMALL_D], dy[SMALL_T * SMALL_C];
    double x64[SMALL_T * SMALL_D], dy64[SMALL_T * SMALL_C];
    moe_model *m = small_model(0);
    int i;
    if (!m) return 0;
    CHECK_OK(moe_model_save(m, TMP(model_path, "small2.safetensors")), &ctx);
    moe_model_destroy(m);
    fill_normal(x, SMALL_T * SMALL_D, 3, 1.0f);
    fill_normal(dy, SMALL_T * SMALL_C, 4, 1.0f);
    for (i = 0; i < SMALL_T * SMALL_D; i++) x64[i] = x[i];
    for (i = 0; i < SMALL_T * SMALL_C; i++) dy64[i] = dy[i];
    write_tensors(TMP(in_path, "small2_in.safetensors"),
                  (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {SMALL_T, SMALL_D}, x}, {"dy", MOE_DTYPE_F32, 2, {SMALL_T, SMALL_C}, dy}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    write_tensors(TMP(in64_path, "small2_in64.safetensors"),
                  (const wtensor[]){{"x", MOE_DTYPE_F64, 2, {SMALL_T, SMALL_D}, x64}, {"dy", MOE_DTYPE_F64, 2, {SMALL_T, SMALL_C}, dy64}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_RUN_OK("backward", model_path, in_path, TMP(a, "t_default.safetensors"));
    CHECK_RUN_OK("backward", model_path, in64_path, TMP(b, "t_f64.safetensors"), "--threads", "1");
    CHECK_RUN_OK("backward", "--threads", "3", model_path, in_path, TMP(c, "t_three.safetensors"));
    CHECK(test_same_files(a, b), "F64 input with 1 thread gives other bytes than F32 input");
    CHECK(test_same_files(a, c), "3 threads give other bytes than the default thread count");
    CHECK_RUN_OK("forward", model_path, in64_path, TMP(a, "f_f64.safetensors"));
    CHECK_RUN_OK("forward", model_path, in_path, TMP(b, "f_f32.safetensors"), "--threads", "2");
    CHECK(test_same_files(a, b), "forward: F64 input gives other bytes than F32 input");
    return 0;
}

/* ---- 2. PyTorch fixtures ------------------------------------------------------------------- */
/* Tolerance against the float64 PyTorch reference: element i passes when
     |got_i - ref_i| <= tol * max(|ref_i|, 0.01 * max_j |ref_j|)
   with max_j over the same tensor: relative to the element itself, but never tighter than
   tol/100 of the tensor's scale, where float32 rounding of sums at that scale lives.
   tol = 1e-4 for y, 1e-3 for dx and the parameter gradients. */
#define FIXTURE_TOL_OUTPUT 1e-4
#define FIXTURE_TOL_GRAD 1e-3
#define FIXTURE_FLOOR 0.01

static int compare_fixture_tensor(const char *fixture, const moe_tensor_file *ref, const moe_tensor_file *out, const char *got_name,
                                  const char *ref_name, double tol, double *worst_out) {
    const moe_file_tensor *r = moe_tensor_file_find(ref, ref_name), *g = moe_tensor_file_find(out, got_name);
    float *rv;
    int64_t n = 1, where;
    int q, same_shape;
    double worst;
    CHECK(r != NULL, "%s: no \"%s\"", fixture, ref_name);
    CHECK(g != NULL, "%s: the tool wrote no \"%s\"", fixture, got_name);
    if (!r || !g) return 0;
    same_shape = r->ndim == g->ndim && g->dtype == MOE_DTYPE_F32;
    for (q = 0; same_shape && q < r->ndim; q++) same_shape = r->shape[q] == g->shape[q];
    CHECK(same_shape, "%s: \"%s\" is not F32 shaped like \"%s\"", fixture, got_name, ref_name);
    if (!same_shape) return 0;
    for (q = 0; q < r->ndim; q++) n *= r->shape[q];
    rv = (float *)malloc(sizeof(float) * (size_t)(n ? n : 1));
    CHECK_OK(moe_file_tensor_to_f32(&ctx, r, rv, n), &ctx);
    worst = worst_error((const float *)g->data, rv, n, tol, FIXTURE_FLOOR, &where);
    CHECK(worst <= 1.0, "%s: %s[%lld] = %.9g, reference %.9g (%.3g times the tolerance)", fixture, got_name, (long long)where,
          where >= 0 ? (double)load_f32((const float *)g->data, where) : 0.0, where >= 0 ? (double)rv[where] : 0.0, worst);
    if (worst > *worst_out) *worst_out = worst;
    free(rv);
    return 1;
}

static int compare_names(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

/* "COMMAND FIXTURE FIXTURE OUT [--top-k K] [--top-p P]" (empty K, P: not given); valid until the next call */
static const char *const *fixture_args(const char *command, const char *fixture, const char *out, const char *top_k, const char *top_p) {
    static const char *args[10];
    int n = 0;
    args[n++] = command;
    args[n++] = fixture;
    args[n++] = fixture;
    args[n++] = out;
    if (top_k[0]) { args[n++] = "--top-k"; args[n++] = top_k; }
    if (top_p[0]) { args[n++] = "--top-p"; args[n++] = top_p; }
    args[n] = NULL;
    return args;
}

static int test_pytorch_fixtures(void) {
    DIR *dir = opendir(fixture_dir);
    struct dirent *e;
    char *names[256];
    int n = 0, i;
    if (!dir) { printf("  (no fixture directory %s)\n", fixture_dir); return TEST_SKIP; }
    while ((e = readdir(dir)) != NULL && n < 256) {
        size_t len = strlen(e->d_name);
        if (len > 12 && strcmp(e->d_name + len - 12, ".safetensors") == 0) {
            names[n] = (char *)malloc(strlen(fixture_dir) + len + 2);
            sprintf(names[n], "%s/%s", fixture_dir, e->d_name);
            n++;
        }
    }
    closedir(dir);
    if (n == 0) { printf("  (no fixtures in %s)\n", fixture_dir); return TEST_SKIP; }
    qsort(names, (size_t)n, sizeof names[0], compare_names);
    for (i = 0; i < n; i++) {
        char out_path[1024], fwd_path[1024];
        moe_tensor_file *ref = NULL, *out = NULL;
        double worst_y = 0.0, worst_grad = 0.0;
        int k, n_grads = 0, votes;
        char top_k[32] = "", top_p[32] = "";
        int rc;
        CHECK_OK(moe_tensor_file_read(&ctx, names[i], &ref), &ctx);
        /* a model with a voting layer has no inference backward (README 3.4 step 6): its fixture
           has no eval.dx, and `backward` must refuse it */
        votes = ref && !moe_tensor_file_find(ref, "eval.dx");
        if (ref && moe_tensor_file_find(ref, "call.top_k")) {  /* per-call routing options of the fixture */
            int32_t v = 0;
            moe_file_tensor_to_i32(&ctx, moe_tensor_file_find(ref, "call.top_k"), &v, 1);
            snprintf(top_k, sizeof top_k, "%d", (int)v);
        }
        if (ref && moe_tensor_file_find(ref, "call.top_p")) {
            float v = 0;
            moe_file_tensor_to_f32(&ctx, moe_tensor_file_find(ref, "call.top_p"), &v, 1);
            snprintf(top_p, sizeof top_p, "%.9g", (double)v);
        }
        /* the model loader ignores tensors outside layers.: the fixture is MODEL and IN at once
           (its token_ids included) */
        rc = run_tool(fixture_args("backward", names[i], TMP(out_path, "fixture_out.safetensors"), top_k, top_p));
        if (votes)
            CHECK(rc == 1 && strstr(tool_err, "MOE_ERR_STATE") != NULL, "%s: backward after a vote: exit status %d; stderr: %s", names[i], rc,
                  tool_err);
        else
            CHECK(rc == 0, "exit status %d; stderr: %s", rc, tool_err);
        rc = run_tool(fixture_args("forward", names[i], TMP(fwd_path, "fixture_fwd.safetensors"), top_k, top_p));
        CHECK(rc == 0, "exit status %d; stderr: %s", rc, tool_err);
        if (votes) {
            CHECK_OK(moe_tensor_file_read(&ctx, fwd_path, &out), &ctx);
            if (ref && out) {
                compare_fixture_tensor(names[i], ref, out, "y", "eval.y", FIXTURE_TOL_OUTPUT, &worst_y);
                printf("       %-50s worst/tolerance: y %.3f (votes: no backward)\n", names[i], worst_y);
            }
        } else {
            CHECK_OK(moe_tensor_file_read(&ctx, out_path, &out), &ctx);
        }
        if (!votes && ref && out) {
            compare_fixture_tensor(names[i], ref, out, "y", "eval.y", FIXTURE_TOL_OUTPUT, &worst_y);
            compare_fixture_tensor(names[i], ref, out, "dx", "eval.dx", FIXTURE_TOL_GRAD, &worst_grad);
            for (k = 0; k < moe_tensor_file_count(ref); k++) {
                const char *rn = moe_tensor_file_get(ref, k)->name;
                if (strncmp(rn, "eval.grad.", 10) != 0) continue;
                n_grads += compare_fixture_tensor(names[i], ref, out, rn + 5, rn, FIXTURE_TOL_GRAD, &worst_grad);
            }
            CHECK(n_grads > 0, "%s: no eval.grad.* tensors", names[i]);
            /* and nothing the reference does not know */
            CHECK(moe_tensor_file_count(out) == 2 + n_grads, "%s: the tool wrote %d tensors, the fixture has %d gradients", names[i],
                  moe_tensor_file_count(out), n_grads);
            moe_tensor_file_close(out);
            out = NULL;
            CHECK_OK(moe_tensor_file_read(&ctx, fwd_path, &out), &ctx);
            if (out) compare_fixture_tensor(names[i], ref, out, "y", "eval.y", FIXTURE_TOL_OUTPUT, &worst_y);
            printf("       %-50s worst/tolerance: y %.3f, gradients %.3f\n", names[i], worst_y, worst_grad);
        }
        moe_tensor_file_close(out);
        moe_tensor_file_close(ref);
    }
    for (i = 0; i < n; i++) free(names[i]);
    return 0;
}

/* ---- 3. train ------------------------------------------------------------------------------ */
/* Parse the tool's epoch lines; returns how many were read. */
static int parse_epochs(const char *text, double *loss, double *accuracy, int max, int *has_accuracy) {
    int n = 0;
    const char *line = text;
    *has_accuracy = 0;
    while (*line && n < max) {
        int epoch, used = 0;
        double l, aux, acc;
        if (sscanf(line, "epoch=%d loss=%lf aux=%lf%n", &epoch, &l, &aux, &used) != 3) return -1;
        if (epoch != n + 1) return -1;
        loss[n] = l;
        accuracy[n] = -1.0;
        if (sscanf(line + used, " accuracy=%lf", &acc) == 1) { accuracy[n] = acc; *has_accuracy = 1; }
        n++;
        line = strchr(line, '\n');
        if (!line) break;
        line++;
    }
    return n;
}

#define CLS_N 160
#define CLS_D 4

static void classifier_data(float *x, int64_t *labels) {
    int i, j;
    for (i = 0; i < CLS_N; i++) {
        labels[i] = i % 2;
        for (j = 0; j < CLS_D; j++) x[i * CLS_D + j] = (labels[i] ? 1.0f : -1.0f) + 0.6f * moe_rng_normal(77, 1, (uint64_t)(i * CLS_D + j));
    }
}

/* Create the model a desc describes and save it to path; 1 on success. */
static int save_model(const char *path, const moe_model_desc *desc) {
    moe_model *m = NULL;
    int ok;
    CHECK_OK(moe_model_create(&ctx, desc, &m), &ctx);
    if (!m) return 0;
    ok = moe_model_save(m, path) == MOE_OK;
    CHECK(ok, "saving %s: %s", path, moe_ctx_error(&ctx));
    moe_model_destroy(m);
    return ok;
}

/* MoE (4 experts, top-2, MLP) -> dense head of 2 classes; AdamW with lr 0.01, max_tokens 256. */
static int save_classifier_model(const char *path) {
    moe_layer_desc layers[2] = {
        {.kind = MOE_LAYER_MOE, .d_out = 8, .n_experts = 4, .top_k = 2, .d_hidden = 8, .balance_loss = 0.01f},
        {.kind = MOE_LAYER_DENSE, .d_out = 2},
    };
    moe_model_desc d = {.d_in = CLS_D, .n_layers = 2, .layers = layers, .loss = MOE_LOSS_CROSS_ENTROPY, .optimizer = {.lr = 0.01f}};
    return save_model(path, &d);
}

static int test_train_classifier(void) {
    char model_path[1024], data_path[1024], out_path[1024], out2_path[1024], out3_path[1024], out4_path[1024];
    float x[CLS_N * CLS_D];
    int64_t labels64[CLS_N];
    int32_t pred[CLS_N];
    double loss[32], acc[32];
    moe_model *trained = NULL;
    int n, has_acc, i, correct = 0;
    if (!save_classifier_model(TMP(model_path, "cls.safetensors"))) return 0;
    classifier_data(x, labels64);
    write_tensors(TMP(data_path, "cls_data.safetensors"),
                  (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {CLS_N, CLS_D}, x}, {"labels", MOE_DTYPE_I64, 1, {CLS_N, 0}, labels64}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});

    CHECK_RUN_OK("train", model_path, data_path, TMP(out_path, "cls_out.safetensors"), "--epochs", "8", "--batch", "16", "--seed", "3");
    n = parse_epochs(tool_out, loss, acc, 32, &has_acc);
    CHECK(n == 8, "expected 8 epoch lines, got %d:\n%s", n, tool_out);
    if (n == 8) {
        CHECK(has_acc, "no accuracy in the epoch lines of a cross_entropy model");
        CHECK(loss[7] < 0.5 * loss[0], "the loss did not fall: %g -> %g", loss[0], loss[7]);
        CHECK(acc[7] >= 0.95, "final training accuracy %g", acc[7]);
    }
    /* OUT loads and classifies the data */
    CHECK_OK(moe_model_load(&ctx, out_path, CLS_N, &trained), &ctx);
    if (trained) {
        CHECK_OK(moe_model_predict(trained, x, CLS_N, pred), &ctx);
        for (i = 0; i < CLS_N; i++) correct += pred[i] == labels64[i];
        CHECK(correct >= 0.95 * CLS_N, "the saved model classifies %d of %d rows", correct, CLS_N);
        CHECK(moe_model_get_desc(trained)->optimizer.lr == 0.01f, "OUT's learning rate changed");
        moe_model_destroy(trained);
        trained = NULL;
    }
    /* deterministic: the same seed gives the same bytes; another seed another shuffle */
    CHECK_RUN_OK("train", model_path, data_path, TMP(out2_path, "cls_out2.safetensors"), "--epochs", "8", "--batch", "16", "--seed", "3", "--threads", "1");
    CHECK(test_same_files(out_path, out2_path), "two runs with --seed 3 gave different models");
    CHECK_RUN_OK("train", model_path, data_path, TMP(out3_path, "cls_out3.safetensors"), "--epochs", "8", "--batch", "16", "--seed", "4");
    CHECK(!test_same_files(out_path, out3_path), "--seed 4 gave the same model as --seed 3");
    /* --lr trains differently but OUT keeps MODEL's configuration */
    CHECK_RUN_OK("train", model_path, data_path, TMP(out4_path, "cls_out4.safetensors"), "--epochs", "2", "--batch", "16", "--seed", "3", "--lr", "0.05");
    CHECK_OK(moe_model_load(&ctx, out4_path, 0, &trained), &ctx);
    if (trained) {
        CHECK(moe_model_get_desc(trained)->optimizer.lr == 0.01f, "--lr was written into OUT's configuration");
        CHECK(moe_model_get_desc(trained)->max_tokens == 256, "OUT's max_tokens is %lld, MODEL's was 256",
              (long long)moe_model_get_desc(trained)->max_tokens);
        moe_model_destroy(trained);
    }
    /* a batch larger than the data set is one batch of every row */
    CHECK_RUN_OK("train", model_path, data_path, out4_path, "--epochs", "1", "--batch", "100000");
    return 0;
}

/* --checkpoint: a run stopped after 2 of 4 epochs (last checkpoint at step 18 of 40) and resumed
   with the full command ends with the same OUT as the run that went straight through. */
static int test_train_checkpoint(void) {
    char model_path[1024], data_path[1024], straight[1024], resumed[1024], ck[1024];
    float x[CLS_N * CLS_D];
    int64_t labels64[CLS_N];
    if (!save_classifier_model(TMP(model_path, "ck_cls.safetensors"))) return 0;
    classifier_data(x, labels64);
    write_tensors(TMP(data_path, "ck_data.safetensors"),
                  (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {CLS_N, CLS_D}, x}, {"labels", MOE_DTYPE_I64, 1, {CLS_N, 0}, labels64}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    remove(TMP(ck, "ck_run.ckpt"));
    CHECK_RUN_OK("train", model_path, data_path, TMP(straight, "ck_straight.safetensors"), "--epochs", "4", "--batch", "16", "--seed", "3");
    CHECK_RUN_OK("train", model_path, data_path, TMP(resumed, "ck_resumed.safetensors"), "--epochs", "2", "--batch", "16", "--seed", "3",
                 "--checkpoint", ck, "--every", "3");
    CHECK(!test_same_files(straight, resumed), "2 epochs gave the model of 4");
    CHECK_RUN_OK("train", model_path, data_path, resumed, "--epochs", "4", "--batch", "16", "--seed", "3", "--checkpoint", ck, "--every", "3");
    CHECK(strstr(tool_out, "at step 18") != NULL, "the run resumed at step 18:\n%s", tool_out);
    CHECK(test_same_files(straight, resumed), "the resumed run's OUT differs from the uninterrupted run's");
    /* the checkpoint belongs to these settings */
    CHECK_FAILS(1, TMP(resumed, "ck_other.safetensors"), "train", model_path, data_path, resumed, "--epochs", "4", "--batch", "16", "--seed", "3",
                "--checkpoint", ck, "--lr", "0.05");
    CHECK_FAILS(1, resumed, "train", model_path, data_path, resumed, "--epochs", "4", "--batch", "16", "--seed", "4", "--checkpoint", ck);
    CHECK_FAILS(2, resumed, "train", model_path, data_path, resumed, "--every", "3");
    return 0;
}

#define REG_N 96
#define REG_D 3
#define REG_C 2

/* MoE of 2 linear experts, top-1 -> dense head of 2 outputs; mse. */
static int save_regression_model(const char *path) {
    moe_layer_desc layers[2] = {
        {.kind = MOE_LAYER_MOE, .d_out = 8, .n_experts = 2, .top_k = 1, .expert = MOE_EXPERT_LINEAR},
        {.kind = MOE_LAYER_DENSE, .d_out = REG_C},
    };
    moe_model_desc d = {.d_in = REG_D, .n_layers = 2, .layers = layers, .loss = MOE_LOSS_MSE};
    return save_model(path, &d);
}

static int test_train_regression(void) {
    char model_path[1024], data_path[1024], out_path[1024];
    float x[REG_N * REG_D];
    double y[REG_N * REG_C];
    static const double A[REG_D][REG_C] = {{0.5, -1.0}, {1.5, 0.25}, {-0.75, 0.5}};
    double loss[32], acc[32];
    moe_model *m = NULL;
    int n, has_acc, i, j, k;
    if (!save_regression_model(TMP(model_path, "reg.safetensors"))) return 0;
    fill_normal(x, REG_N * REG_D, 9, 1.0f);
    for (i = 0; i < REG_N; i++)
        for (k = 0; k < REG_C; k++) {
            y[i * REG_C + k] = 0.0;
            for (j = 0; j < REG_D; j++) y[i * REG_C + k] += x[i * REG_D + j] * A[j][k];
        }
    /* targets in F64: any float dtype is read */
    write_tensors(TMP(data_path, "reg_data.safetensors"),
                  (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {REG_N, REG_D}, x}, {"y", MOE_DTYPE_F64, 2, {REG_N, REG_C}, y}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_RUN_OK("train", model_path, data_path, TMP(out_path, "reg_out.safetensors"), "--epochs", "15", "--batch", "8", "--lr", "0.02");
    n = parse_epochs(tool_out, loss, acc, 32, &has_acc);
    CHECK(n == 15, "expected 15 epoch lines, got %d:\n%s", n, tool_out);
    CHECK(!has_acc, "an mse model printed an accuracy");
    if (n == 15) CHECK(loss[14] < 0.2 * loss[0], "the loss did not fall: %g -> %g", loss[0], loss[14]);
    CHECK_OK(moe_model_load(&ctx, out_path, 0, &m), &ctx);
    moe_model_destroy(m);
    return 0;
}

/* A mixture density model from a moe.config: init, info, train on y [N, 1] (not the packed width),
   forward gives the packed mixture [T, E (1 + 2 d_out)]. */
static const char *mixture_config =
    "{\"format\": \"moe.h\", \"version\": 1, \"d_in\": 2, \"loss\": \"mixture_nll\",\n"
    " \"layers\": [{\"kind\": \"dense\", \"d_out\": 8, \"activation\": \"tanh\"},\n"
    "             {\"kind\": \"moe\", \"d_out\": 1, \"experts\": 2, \"expert\": \"gaussian\", \"d_hidden\": 8}],\n"
    " \"optimizer\": {\"kind\": \"adam\", \"lr\": 0.01}}\n";

static int test_train_mixture(void) {
    char cfg_path[1024], model_path[1024], data_path[1024], out_path[1024], in_path[1024], y_path[1024];
    float x[REG_N * 2], y[REG_N];
    double loss[32], acc[32];
    moe_tensor_file *f = NULL;
    int n, has_acc, i;
    write_bytes(TMP(cfg_path, "mixture.json"), mixture_config, strlen(mixture_config));
    CHECK_RUN_OK("init", cfg_path, TMP(model_path, "mixture.safetensors"));
    CHECK_RUN_OK("info", model_path);
    CHECK(strstr(tool_out, "gaussian") && strstr(tool_out, "mixture_nll") && strstr(tool_out, "width 6"),
          "info misses the Gaussian experts, the loss or the mixture width:\n%s", tool_out);
    /* two branches: y = +|x0| or -|x0| by the sign of a hidden coin */
    fill_normal(x, REG_N * 2, 21, 1.0f);
    for (i = 0; i < REG_N; i++) y[i] = (moe_rng_uniform(5, 6, (uint64_t)i) < 0.5f ? 1.0f : -1.0f) * fabsf(x[2 * i]);
    write_tensors(TMP(data_path, "mixture_data.safetensors"),
                  (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {REG_N, 2}, x}, {"y", MOE_DTYPE_F32, 2, {REG_N, 1}, y}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_RUN_OK("train", model_path, data_path, TMP(out_path, "mixture_out.safetensors"), "--epochs", "12", "--batch", "16");
    n = parse_epochs(tool_out, loss, acc, 32, &has_acc);
    CHECK(n == 12 && !has_acc, "expected 12 epoch lines without accuracy, got %d:\n%s", n, tool_out);
    if (n == 12) CHECK(loss[11] < loss[0] - 0.2, "the mixture NLL did not fall: %g -> %g", loss[0], loss[11]);
    write_tensors(TMP(in_path, "mixture_in.safetensors"), (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {4, 2}, x}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_RUN_OK("forward", out_path, in_path, TMP(y_path, "mixture_y.safetensors"));
    CHECK_OK(moe_tensor_file_read(&ctx, y_path, &f), &ctx);
    if (f) {
        const moe_file_tensor *t = moe_tensor_file_find(f, "y");
        CHECK(t && t->ndim == 2 && t->shape[0] == 4 && t->shape[1] == 6, "forward of a 2-component, 1-output mixture is not y [4, 6]");
        moe_tensor_file_close(f);
    }
    /* training data with y of the packed width is refused */
    write_tensors(data_path, (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {2, 2}, x}, {"y", MOE_DTYPE_F32, 2, {2, 6}, y}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_FAILS(1, out_path, "train", model_path, data_path, out_path);
    return 0;
}

/* ---- 4. init and info ---------------------------------------------------------------------- */
static const char *init_config =
    "{\"format\": \"moe.h\", \"version\": 1, \"d_in\": 5, \"loss\": \"cross_entropy\",\n"
    " \"layers\": [{\"kind\": \"moe\", \"d_out\": 6, \"experts\": 3, \"top_k\": 2, \"expert\": \"swiglu\", \"d_hidden\": 4,\n"
    "              \"shared_experts\": 1, \"balance_loss\": 0.01},\n"
    "             {\"kind\": \"rmsnorm\"},\n"
    "             {\"kind\": \"moe\", \"experts\": 2, \"expert\": \"geglu\", \"d_hidden\": 3, \"combine\": \"stack\", \"d_expert_out\": 2},\n"
    "             {\"kind\": \"dense\", \"d_out\": 3}],\n"
    " \"optimizer\": {\"kind\": \"sgd\", \"lr\": 0.1, \"momentum\": 0.9}}\n";

static int test_init_info(void) {
    char cfg_path[1024], a[1024], b[1024], c[1024], expect[256];
    moe_model *m = NULL, *ref = NULL;
    moe_ctx seeded;
    int64_t n_params = 0, n_ref = 0;
    int i;
    write_bytes(TMP(cfg_path, "config.json"), init_config, strlen(init_config));
    CHECK_RUN_OK("init", cfg_path, TMP(a, "init_a.safetensors"), "--seed", "7");
    CHECK_RUN_OK("init", "--seed", "7", cfg_path, TMP(b, "init_b.safetensors"));
    CHECK_RUN_OK("init", cfg_path, TMP(c, "init_c.safetensors"), "--seed", "8");
    CHECK(test_same_files(a, b), "init with the same seed gave different files");
    CHECK(!test_same_files(a, c), "init with another seed gave the same file");
    /* the file is the library's model for that config and seed */
    CHECK_OK(moe_model_load(&ctx, a, 0, &m), &ctx);
    CHECK_OK(moe_ctx_init(&seeded, &(moe_ctx_desc){.seed = 7}), &seeded);
    CHECK_OK(moe_model_from_config(&seeded, init_config, 0, &ref), &seeded);
    if (!m || !ref) { moe_model_destroy(m); moe_model_destroy(ref); return 0; }
    {
        const float *p = moe_model_params(m, &n_params), *q = moe_model_params(ref, &n_ref);
        CHECK(n_params == n_ref && memcmp(p, q, sizeof(float) * (size_t)n_params) == 0, "init's parameters differ from moe_model_from_config with seed 7");
    }
    CHECK(moe_model_get_desc(m)->optimizer.kind == MOE_OPTIMIZER_SGD && moe_model_get_desc(m)->optimizer.lr == 0.1f, "optimizer settings lost");

    CHECK_RUN_OK("info", a);
    snprintf(expect, sizeof expect, "parameters %lld\n", (long long)moe_model_parameter_count(m));
    CHECK(strstr(tool_out, expect) != NULL, "info does not print \"%s\":\n%s", expect, tool_out);
    CHECK(strstr(tool_out, "swiglu") && strstr(tool_out, "rmsnorm") && strstr(tool_out, "sgd") && strstr(tool_out, "cross_entropy"),
          "info misses the layer kinds, loss or optimizer:\n%s", tool_out);
    CHECK(strstr(tool_out, "experts geglu") && strstr(tool_out, "combine stack: d_expert_out 2"), "info misses GeGLU or stacking:\n%s", tool_out);
    for (i = 0; i < moe_model_tensor_count(m); i++) {
        moe_tensor t;
        char line[256];
        moe_model_tensor(m, i, &t);
        CHECK(strstr(tool_out, t.name) != NULL, "info does not list %s", t.name);
        if (t.ndim == 3) {
            snprintf(line, sizeof line, "[%lld, %lld, %lld]", (long long)t.shape[0], (long long)t.shape[1], (long long)t.shape[2]);
            CHECK(strstr(strstr(tool_out, t.name) ? strstr(tool_out, t.name) : tool_out, line) != NULL, "info does not give %s's shape %s", t.name, line);
        }
    }
    /* --json prints a moe.config that builds the same model */
    CHECK_RUN_OK("info", a, "--json");
    {
        moe_model *again = NULL;
        CHECK_OK(moe_model_from_config(&ctx, tool_out, 0, &again), &ctx);
        if (again) {
            int64_t n_again;
            moe_model_params(again, &n_again);
            CHECK(n_again == n_params, "info --json describes %lld parameters, not %lld", (long long)n_again, (long long)n_params);
        }
        moe_model_destroy(again);
    }
    /* a model made by init runs */
    {
        float x[2 * 5];
        char in_path[1024], out_path[1024];
        fill_normal(x, 10, 5, 1.0f);
        write_tensors(TMP(in_path, "init_in.safetensors"), (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {2, 5}, x}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
        CHECK_RUN_OK("forward", a, in_path, TMP(out_path, "init_out.safetensors"));
    }
    moe_model_destroy(m);
    moe_model_destroy(ref);
    return 0;
}

/* A character model: embedding of 3 ids, a hash-routed MoE on the last id, a dense head. */
static const char *embedding_config =
    "{\"format\": \"moe.h\", \"version\": 1, \"d_in\": 3, \"loss\": \"cross_entropy\",\n"
    " \"layers\": [{\"kind\": \"embedding\", \"vocab_size\": 9, \"d_embedding\": 4},\n"
    "             {\"kind\": \"moe\", \"router\": \"hash\", \"experts\": 4, \"top_k\": 2, \"d_hidden\": 8},\n"
    "             {\"kind\": \"dense\", \"d_out\": 9}]}\n";

static int test_init_embedding(void) {
    char cfg_path[1024], model[1024], in_path[1024], out_path[1024], trained[1024];
    float x[4 * 3] = {1, 2, 3, 8, 0, 4, 5, 5, 5, 0, 0, 7};
    int32_t labels[4] = {4, 1, 5, 7};
    write_bytes(TMP(cfg_path, "embedding.json"), embedding_config, strlen(embedding_config));
    CHECK_RUN_OK("init", cfg_path, TMP(model, "embedding.safetensors"));
    CHECK_RUN_OK("info", model);
    CHECK(strstr(tool_out, "embedding") && strstr(tool_out, "vocab_size 9, d_embedding 4") && strstr(tool_out, "[9, 4]"),
          "info misses the embedding layer:\n%s", tool_out);
    /* no token_ids in IN: the hash router takes each row's last id */
    write_tensors(TMP(in_path, "embedding_in.safetensors"), (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {4, 3}, x}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_RUN_OK("forward", model, in_path, TMP(out_path, "embedding_out.safetensors"));
    write_tensors(TMP(in_path, "embedding_data.safetensors"), (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {4, 3}, x},
                  {"labels", MOE_DTYPE_I32, 1, {4}, labels}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_RUN_OK("train", model, in_path, TMP(trained, "embedding_trained.safetensors"), "--epochs", "2", "--batch", "2");
    x[4] = 9.0f;  /* out of the vocabulary */
    write_tensors(TMP(in_path, "embedding_bad.safetensors"), (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {4, 3}, x}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_FAILS(1, out_path, "forward", model, in_path, out_path);
    CHECK(strstr(tool_err, "token id") != NULL, "the error names the bad id: %s", tool_err);
    return 0;
}

/* ---- 5. errors ----------------------------------------------------------------------------- */
static int test_usage(void) {
    char out[1024];
    TMP(out, "usage_out.safetensors");
    CHECK_RUN_OK("help");
    CHECK(strstr(tool_out, "usage") && strstr(tool_out, "backward"), "help prints no usage:\n%s", tool_out);
    {
        int rc = run_tool((const char *const[]){NULL});
        CHECK(rc == 0 && strstr(tool_out, "usage"), "no arguments: status %d, stdout %s", rc, tool_out);
    }
    CHECK_FAILS(2, NULL, "frobnicate");
    CHECK_FAILS(2, NULL, "forward", "a");
    CHECK_FAILS(2, out, "forward", "a", "b", out, "d");
    CHECK_FAILS(2, out, "train", "a", "b", out, "--epochs");
    CHECK_FAILS(2, out, "train", "a", "b", out, "--epochs", "0");
    CHECK_FAILS(2, out, "train", "a", "b", out, "--epochs", "ten");
    CHECK_FAILS(2, out, "train", "a", "b", out, "--batch", "-3");
    CHECK_FAILS(2, out, "train", "a", "b", out, "--lr", "-1");
    CHECK_FAILS(2, out, "train", "a", "b", out, "--lr", "nan");
    CHECK_FAILS(2, out, "train", "a", "b", out, "--seed", "-1");
    CHECK_FAILS(2, out, "train", "a", "b", out, "--threads", "x");
    CHECK_FAILS(2, out, "train", "a", "b", out, "--bogus", "1");
    CHECK_FAILS(2, out, "forward", "a", "b", out, "--epochs", "3");
    CHECK_FAILS(2, out, "info", "a", "--seed", "3");
    return 0;
}

static int test_bad_files(void) {
    char model[1024], missing[1024], cut[1024], in[1024], out[1024], cfg[1024], noise[1024];
    float x[SMALL_T * (SMALL_D + 1)], dy[SMALL_T * (SMALL_C + 1)];
    int32_t xi[SMALL_T * SMALL_D];
    unsigned char *bytes;
    size_t size, cuts[7];
    moe_model *m = small_model(0);
    int i;
    if (!m) return 0;
    CHECK_OK(moe_model_save(m, TMP(model, "bad_model.safetensors")), &ctx);
    moe_model_destroy(m);
    TMP(out, "bad_out.safetensors");
    TMP(in, "bad_in.safetensors");
    TMP(missing, "does_not_exist.safetensors");
    fill_normal(x, SMALL_T * (SMALL_D + 1), 6, 1.0f);
    fill_normal(dy, SMALL_T * (SMALL_C + 1), 7, 1.0f);
    for (i = 0; i < SMALL_T * SMALL_D; i++) xi[i] = i % 5;

    /* files that do not exist */
    write_tensors(in, (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {SMALL_T, SMALL_D}, x}, {"dy", MOE_DTYPE_F32, 2, {SMALL_T, SMALL_C}, dy}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_FAILS(1, out, "forward", missing, in, out);
    CHECK_FAILS(1, out, "forward", model, missing, out);
    CHECK_FAILS(1, out, "backward", missing, in, out);
    CHECK_FAILS(1, NULL, "info", missing);
    CHECK_FAILS(1, out, "train", missing, in, out);
    CHECK_RUN_OK("forward", model, in, out);   /* the inputs above are good */

    /* a model file cut short anywhere, and one that is not a safetensors file */
    bytes = test_read_file(model, &size);
    CHECK(bytes != NULL && size > 64, "cannot read %s back", model);
    if (!bytes) return 0;
    cuts[0] = 0; cuts[1] = 7; cuts[2] = 8; cuts[3] = 40; cuts[4] = size / 2; cuts[5] = size - 4; cuts[6] = size - 1;
    TMP(cut, "cut.safetensors");
    for (i = 0; i < 7; i++) {
        write_bytes(cut, bytes, cuts[i]);
        CHECK_FAILS(1, out, "forward", cut, in, out);
        CHECK_FAILS(1, NULL, "info", cut);
        CHECK_FAILS(1, out, "forward", model, cut, out);   /* ... as IN */
    }
    for (i = 8; i < (int)size; i++) bytes[i] = (unsigned char)(moe_rng_u64(5, 5, (uint64_t)i) & 0xFF);
    write_bytes(TMP(noise, "noise.safetensors"), bytes, size);
    CHECK_FAILS(1, out, "backward", noise, in, out);
    free(bytes);

    /* a model whose file lacks a tensor, or has one of the wrong shape */
    {
        moe_tensor_file *f = NULL;
        moe_tensor_writer *w = NULL;
        int pass;
        CHECK_OK(moe_tensor_file_read(&ctx, model, &f), &ctx);
        for (pass = 0; f && pass < 2; pass++) {
            int64_t shape[8];
            CHECK_OK(moe_tensor_writer_create(&ctx, &w), &ctx);
            if (!w) break;
            moe_tensor_writer_metadata(w, "moe.config", moe_tensor_file_metadata(f, "moe.config"));
            for (i = 0; i < moe_tensor_file_count(f); i++) {
                const moe_file_tensor *t = moe_tensor_file_get(f, i);
                if (pass == 0 && i == 2) continue;   /* drop one */
                memcpy(shape, t->shape, sizeof shape);
                if (pass == 1 && i == 2) {           /* transpose one */
                    int64_t s = shape[t->ndim - 1];
                    shape[t->ndim - 1] = shape[t->ndim - 2];
                    shape[t->ndim - 2] = s;
                }
                moe_tensor_writer_add(w, t->name, t->dtype, t->ndim, shape, t->data);
            }
            CHECK_OK(moe_tensor_writer_save(w, cut), &ctx);
            moe_tensor_writer_destroy(w);
            CHECK_FAILS(1, out, "forward", cut, in, out);
            CHECK_FAILS(1, out, "backward", cut, in, out);
        }
        moe_tensor_file_close(f);
    }

    /* IN without x, or with x of the wrong width, rank, dtype, rows; bad dy */
    write_tensors(in, (const wtensor[]){{"z", MOE_DTYPE_F32, 2, {SMALL_T, SMALL_D}, x}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_FAILS(1, out, "forward", model, in, out);
    write_tensors(in, (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {SMALL_T, SMALL_D + 1}, x}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_FAILS(1, out, "forward", model, in, out);
    write_tensors(in, (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {SMALL_T, SMALL_D - 1}, x}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_FAILS(1, out, "forward", model, in, out);
    write_tensors(in, (const wtensor[]){{"x", MOE_DTYPE_F32, 1, {SMALL_T * SMALL_D, 0}, x}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_FAILS(1, out, "forward", model, in, out);
    write_tensors(in, (const wtensor[]){{"x", MOE_DTYPE_I32, 2, {SMALL_T, SMALL_D}, xi}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_FAILS(1, out, "forward", model, in, out);
    write_tensors(in, (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {0, SMALL_D}, x}, {"dy", MOE_DTYPE_F32, 2, {0, SMALL_C}, dy}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_FAILS(1, out, "forward", model, in, out);
    CHECK_FAILS(1, out, "backward", model, in, out);
    x[5] = (float)NAN;
    write_tensors(in, (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {SMALL_T, SMALL_D}, x}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_FAILS(1, out, "forward", model, in, out);
    x[5] = 0.5f;
    write_tensors(in, (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {SMALL_T, SMALL_D}, x}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_FAILS(1, out, "backward", model, in, out);   /* no dy */
    write_tensors(in, (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {SMALL_T, SMALL_D}, x}, {"dy", MOE_DTYPE_F32, 2, {SMALL_T, SMALL_C + 1}, dy}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_FAILS(1, out, "backward", model, in, out);
    write_tensors(in, (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {SMALL_T, SMALL_D}, x}, {"dy", MOE_DTYPE_F32, 2, {SMALL_T - 1, SMALL_C}, dy}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_FAILS(1, out, "backward", model, in, out);
    write_tensors(in, (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {SMALL_T, SMALL_D}, x}, {"dy", MOE_DTYPE_I32, 2, {SMALL_T, SMALL_C}, xi}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_FAILS(1, out, "backward", model, in, out);

    /* an output that cannot be written */
    write_tensors(in, (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {SMALL_T, SMALL_D}, x}, {"dy", MOE_DTYPE_F32, 2, {SMALL_T, SMALL_C}, dy}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    {
        char nowhere[1024];
        snprintf(nowhere, sizeof nowhere, "%s/no_such_dir/out.safetensors", tmp_dir);
        CHECK_FAILS(1, NULL, "backward", model, in, nowhere);
        write_bytes(TMP(cfg, "good.json"), init_config, strlen(init_config));
        CHECK_FAILS(1, NULL, "init", cfg, nowhere);
    }

    /* init: a configuration that does not parse, or names an unknown field */
    {
        static const char *const bad[] = {
            "{\"format\": \"moe.h\", \"version\": 1, \"d_in\": 4, \"layers\": [",
            "{\"format\": \"moe.h\", \"version\": 1, \"d_in\": 4, \"layers\": [{\"kind\": \"dense\", \"widht\": 3}]}",
            "{\"format\": \"moe.h\", \"version\": 1, \"d_in\": -4, \"layers\": [{\"kind\": \"dense\"}]}",
            "",
        };
        for (i = 0; i < 4; i++) {
            write_bytes(TMP(cfg, "bad.json"), bad[i], strlen(bad[i]));
            CHECK_FAILS(1, out, "init", cfg, out);
        }
    }
    CHECK_FAILS(1, out, "init", missing, out);
    return 0;
}

static int test_bad_training_data(void) {
    char model[1024], reg_model[1024], data[1024], out[1024];
    float x[CLS_N * CLS_D], fl[CLS_N];
    int64_t labels[CLS_N];
    int32_t labels32[CLS_N];
    int i;
    classifier_data(x, labels);
    for (i = 0; i < CLS_N; i++) { fl[i] = (float)labels[i]; labels32[i] = (int32_t)labels[i]; }
    if (!save_classifier_model(TMP(model, "bad_cls.safetensors")) || !save_regression_model(TMP(reg_model, "bad_reg.safetensors"))) return 0;
    TMP(data, "bad_data.safetensors");
    TMP(out, "bad_train_out.safetensors");
    /* I32 labels are fine */
    write_tensors(data, (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {CLS_N, CLS_D}, x}, {"labels", MOE_DTYPE_I32, 1, {CLS_N, 0}, labels32}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_RUN_OK("train", model, data, out, "--epochs", "1");
    /* float labels */
    write_tensors(data, (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {CLS_N, CLS_D}, x}, {"labels", MOE_DTYPE_F32, 1, {CLS_N, 0}, fl}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_FAILS(1, out, "train", model, data, out, "--epochs", "1");
    /* one label short */
    write_tensors(data, (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {CLS_N, CLS_D}, x}, {"labels", MOE_DTYPE_I32, 1, {CLS_N - 1, 0}, labels32}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_FAILS(1, out, "train", model, data, out, "--epochs", "1");
    /* a label outside the classes */
    labels32[17] = 2;
    write_tensors(data, (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {CLS_N, CLS_D}, x}, {"labels", MOE_DTYPE_I32, 1, {CLS_N, 0}, labels32}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_FAILS(1, out, "train", model, data, out, "--epochs", "1");
    labels32[17] = -1;
    write_tensors(data, (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {CLS_N, CLS_D}, x}, {"labels", MOE_DTYPE_I32, 1, {CLS_N, 0}, labels32}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_FAILS(1, out, "train", model, data, out, "--epochs", "1");
    labels32[17] = 1;
    /* no labels; labels for an mse model (which needs y); x of the wrong width; no rows */
    write_tensors(data, (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {CLS_N, CLS_D}, x}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_FAILS(1, out, "train", model, data, out, "--epochs", "1");
    write_tensors(data, (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {CLS_N / 4, REG_D}, x}, {"labels", MOE_DTYPE_I32, 1, {CLS_N / 4, 0}, labels32}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_FAILS(1, out, "train", reg_model, data, out, "--epochs", "1");
    write_tensors(data, (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {CLS_N / 4, REG_D}, x}, {"y", MOE_DTYPE_F32, 2, {CLS_N / 4, REG_C + 1}, x}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_FAILS(1, out, "train", reg_model, data, out, "--epochs", "1");
    write_tensors(data, (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {CLS_N, CLS_D - 1}, x}, {"labels", MOE_DTYPE_I32, 1, {CLS_N, 0}, labels32}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_FAILS(1, out, "train", model, data, out, "--epochs", "1");
    write_tensors(data, (const wtensor[]){{"x", MOE_DTYPE_F32, 2, {0, CLS_D}, x}, {"labels", MOE_DTYPE_I32, 1, {0, 0}, labels32}, {NULL, MOE_DTYPE_F32, 0, {0, 0}, NULL}});
    CHECK_FAILS(1, out, "train", model, data, out, "--epochs", "1");
    return 0;
}

/* ---- 6. import of Hugging Face MoE blocks ---------------------------------------------------- */
/* `moe import` of each tests/ref/gen_hf.py fixture, then `moe forward` of the model file against
   the PyTorch block's output; the same block found by --layer / --top-k without config.json;
   bad command lines and files. */
static int test_import(void) {
    static const char *const archs[3] = {"mixtral", "qwen2_moe", "deepseek_v3"};
    char src[1024], cfg[1024], io[1024], model[1024], model2[1024], out[1024], cut[1024];
    int c;
    for (c = 0; c < 3; c++) {
        moe_tensor_file *f = NULL, *ref = NULL;
        snprintf(src, sizeof src, "%s/hf/%s.safetensors", fixture_dir, archs[c]);
        snprintf(cfg, sizeof cfg, "%s/hf/%s.config.json", fixture_dir, archs[c]);
        snprintf(io, sizeof io, "%s/hf/%s.io.safetensors", fixture_dir, archs[c]);
        CHECK_RUN_OK("import", src, TMP(model, "hf_model.safetensors"), "--arch", archs[c], "--config", cfg);
        CHECK(strstr(tool_out, "experts") != NULL, "import prints no summary: %s", tool_out);
        CHECK_RUN_OK("forward", model, io, TMP(out, "hf_y.safetensors"));
        CHECK_OK(moe_tensor_file_read(&ctx, out, &f), &ctx);
        CHECK_OK(moe_tensor_file_read(&ctx, io, &ref), &ctx);
        if (f && ref) {
            const moe_file_tensor *y = moe_tensor_file_find(f, "y"), *want = moe_tensor_file_find(ref, "y");
            CHECK(y && want && y->ndim == 2 && want->ndim == 2 && y->shape[0] == want->shape[0] && y->shape[1] == want->shape[1], "%s: y shape", archs[c]);
            if (y && want && y->ndim == 2 && want->ndim == 2 && y->shape[0] == want->shape[0] && y->shape[1] == want->shape[1]) {
                int64_t n = y->shape[0] * y->shape[1], where;
                float *a = (float *)malloc(sizeof(float) * (size_t)n), *b = (float *)malloc(sizeof(float) * (size_t)n);
                double worst;
                moe_file_tensor_to_f32(&ctx, y, a, n);
                moe_file_tensor_to_f32(&ctx, want, b, n);
                worst = worst_error(a, b, n, 1e-4, 1e-2, &where);
                CHECK(worst <= 1.0, "%s: moe forward of the imported block: y[%lld] %.8f, PyTorch %.8f", archs[c], (long long)where,
                      where >= 0 ? a[where] : 0.0, where >= 0 ? b[where] : 0.0);
                free(a);
                free(b);
            }
        }
        moe_tensor_file_close(f);
        moe_tensor_file_close(ref);
        if (c == 1) {
            CHECK_RUN_OK("info", model);
            CHECK(strstr(tool_out, "gated") && strstr(tool_out, "layers.0.shared.gate.weight"), "info of the qwen2_moe model:\n%s", tool_out);
        }
        if (c == 0) {  /* without config.json: the block of --layer 1 with --top-k 2 is the same model */
            CHECK_RUN_OK("import", src, TMP(model2, "hf_model2.safetensors"), "--layer", "1", "--top-k", "2");
            CHECK(test_same_files(model, model2), "mixtral: --layer 1 --top-k 2 gave another file than --config");
            CHECK_RUN_OK("import", src, model2, "--prefix", "model.layers.1.block_sparse_moe.", "--top-k", "2", "--arch", "mixtral");
            CHECK(test_same_files(model, model2), "mixtral: --prefix gave another file than --config");
            CHECK_RUN_OK("info", model);
            CHECK(strstr(tool_out, "layers.0.experts.w1.weight") != NULL, "info of the imported model:\n%s", tool_out);
        }
    }
    snprintf(src, sizeof src, "%s/hf/mixtral.safetensors", fixture_dir);
    snprintf(cfg, sizeof cfg, "%s/hf/mixtral.config.json", fixture_dir);
    TMP(out, "hf_bad.safetensors");
    CHECK_FAILS(2, out, "import", src);
    CHECK_FAILS(2, out, "import", src, out, "--arch", "llama");
    CHECK_FAILS(2, out, "import", src, out, "--layer", "-1");
    CHECK_FAILS(2, out, "import", src, out, "--layer", "1", "--prefix", "model.layers.1.");
    CHECK_FAILS(2, out, "import", src, out, "--config", "");
    CHECK_FAILS(1, out, "import", src, out);                                  /* no top_k */
    CHECK_FAILS(1, out, "import", src, out, "--config", cfg, "--layer", "5");  /* no such block */
    CHECK_FAILS(1, out, "import", src, out, "--config", cfg, "--top-k", "5");  /* more than E */
    CHECK_FAILS(1, out, "import", src, out, "--config", TMP(cut, "no_such_config.json"));
    CHECK_FAILS(1, out, "import", src, out, "--config", cfg, "--arch", "qwen2_moe");  /* no gate_proj */
    CHECK_FAILS(1, out, "import", TMP(cut, "no_such_file.safetensors"), out, "--config", cfg);
    {
        size_t size;
        unsigned char *bytes = test_read_file(src, &size);
        CHECK(bytes != NULL, "read %s", src);
        if (bytes) {
            write_bytes(TMP(cut, "hf_cut.safetensors"), bytes, size - 5);
            CHECK_FAILS(1, out, "import", cut, out, "--config", cfg);
        }
        free(bytes);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 1) tool_path = argv[1];
    if (argc > 2) tmp_dir = argv[2];
    if (argc > 3) fixture_dir = argv[3];
    printf("test_cli (%s, temporary files in %s)\n", tool_path, tmp_dir);
    if (make_dirs(tmp_dir) != 0) {
        fprintf(stderr, "cannot create %s: %s\n", tmp_dir, strerror(errno));
        return 1;
    }
    if (moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = 11}) != MOE_OK) return 1;
    RUN(test_backward_matches_library);
    RUN(test_dtypes_and_threads);
    RUN(test_pytorch_fixtures);
    RUN(test_train_classifier);
    RUN(test_train_checkpoint);
    RUN(test_train_regression);
    RUN(test_train_mixture);
    RUN(test_init_info);
    RUN(test_init_embedding);
    RUN(test_usage);
    RUN(test_bad_files);
    RUN(test_bad_training_data);
    RUN(test_import);
    TEST_END();
}
