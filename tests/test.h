/* Minimal test harness: CHECK counts, RUN groups checks into cases, and the last line
   "RESULT passed=P failed=F skipped=S" is what tests/run_tests.sh adds up.
   A test program exits non-zero when any case failed. */
#ifndef MOE_TEST_H
#define MOE_TEST_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#if defined(_WIN32)
#include <direct.h>
#define TEST_MKDIR(path) _mkdir(path)
#define TEST_RMDIR(path) _rmdir(path)
#else
#define TEST_MKDIR(path) mkdir((path), 0777)
#define TEST_RMDIR(path) remove(path)   /* POSIX remove() deletes an empty folder too */
#endif

static int test_case_failed;
static int test_passed, test_failed, test_skipped;
static const char *test_case_name = "";

#define CHECK(cond, ...)                                                                \
    do {                                                                                \
        if (!(cond)) {                                                                  \
            if (test_case_failed < 8) {                                                 \
                fprintf(stderr, "%s:%d: [%s] CHECK(%s) failed: ", __FILE__, __LINE__,   \
                        test_case_name, #cond);                                         \
                fprintf(stderr, __VA_ARGS__);                                           \
                fputc('\n', stderr);                                                    \
            }                                                                           \
            test_case_failed++;                                                         \
        }                                                                               \
    } while (0)

/* Expect a result code; print the context's message when it differs. */
#define CHECK_RESULT(expr, expected, ctx)                                               \
    do {                                                                                \
        moe_result check_r_ = (expr);                                                   \
        CHECK(check_r_ == (expected), "%s returned %s (%d), expected %s; error text: %s", \
              #expr, moe_result_string(check_r_), (int)check_r_, #expected,             \
              moe_ctx_error(ctx));                                                      \
    } while (0)

#define CHECK_OK(expr, ctx) CHECK_RESULT(expr, MOE_OK, ctx)

/* A case returns 0 normally, or TEST_SKIP when it cannot run here (with a reason printed). */
#define TEST_SKIP 77

#define RUN(fn)                                                                         \
    do {                                                                                \
        int run_rc_;                                                                    \
        test_case_failed = 0;                                                           \
        test_case_name = #fn;                                                           \
        run_rc_ = fn();                                                                 \
        if (run_rc_ == TEST_SKIP) { test_skipped++; printf("  skip %s\n", #fn); }      \
        else if (test_case_failed) { test_failed++; printf("  FAIL %s (%d checks failed)\n", #fn, test_case_failed); } \
        else { test_passed++; printf("  ok   %s\n", #fn); }                             \
        fflush(stdout);                                                                 \
    } while (0)

/* A case that is a function of one argument, reported under its own name. */
#define RUN_NAMED(label, fn, arg)                                                       \
    do {                                                                                \
        test_case_failed = 0;                                                           \
        test_case_name = (label);                                                       \
        fn(arg);                                                                        \
        if (test_case_failed) { test_failed++; printf("  FAIL %s (%d checks failed)\n", (label), test_case_failed); } \
        else { test_passed++; printf("  ok   %s\n", (label)); }                        \
        fflush(stdout);                                                                 \
    } while (0)

#define TEST_END()                                                                      \
    do {                                                                                \
        printf("RESULT passed=%d failed=%d skipped=%d\n", test_passed, test_failed, test_skipped); \
        return test_failed ? 1 : 0;                                                     \
    } while (0)

/* |a - b| <= atol + rtol * |b| */
#if defined(__GNUC__) || defined(__clang__)
#define TEST_UNUSED __attribute__((unused))
#else
#define TEST_UNUSED
#endif

/* mkdir -p without a shell (Windows has none that knows -p): 0 when path is a folder afterwards. */
static TEST_UNUSED int test_make_dir(const char *path) {
    char buf[512];
    size_t i, n = strlen(path);
    struct stat st;
    if (n == 0 || n >= sizeof buf) return -1;
    memcpy(buf, path, n + 1);
    for (i = 1; i <= n; i++) {
        char c = buf[i];
        if (c != '/' && c != '\\' && c != 0) continue;
        buf[i] = 0;
        TEST_MKDIR(buf);   /* fails harmlessly where the folder exists */
        buf[i] = c;
    }
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode) ? 0 : -1;
}

static TEST_UNUSED int test_close(double a, double b, double rtol, double atol) {
    return fabs(a - b) <= atol + rtol * fabs(b);
}

/* Largest |a - b| / (atol + rtol * |b|) over n pairs: <= 1 means all within tolerance. */
static TEST_UNUSED double test_worst(const float *a, const float *b, long n, double rtol, double atol, long *where) {
    double worst = 0.0;
    long i;
    if (where) *where = -1;
    for (i = 0; i < n; i++) {
        double e = fabs((double)a[i] - (double)b[i]) / (atol + rtol * fabs((double)b[i]));
        if (!(e <= worst)) { worst = e; if (where) *where = i; }
    }
    return worst;
}

/* The bytes of a file (malloc'd, NULL if it cannot be read) and their count. */
static TEST_UNUSED unsigned char *test_read_file(const char *path, size_t *size) {
    FILE *fp = fopen(path, "rb");
    unsigned char *b = NULL;
    long n;
    *size = 0;
    if (!fp) return NULL;
    if (fseek(fp, 0, SEEK_END) == 0 && (n = ftell(fp)) >= 0 && fseek(fp, 0, SEEK_SET) == 0) {
        b = (unsigned char *)malloc((size_t)n + 1);
        if (b && fread(b, 1, (size_t)n, fp) == (size_t)n) *size = (size_t)n;
        else { free(b); b = NULL; }
    }
    fclose(fp);
    return b;
}

/* 1 when both files exist and hold the same bytes */
static TEST_UNUSED int test_same_files(const char *a, const char *b) {
    size_t na, nb;
    unsigned char *pa = test_read_file(a, &na), *pb = test_read_file(b, &nb);
    int same = pa && pb && na == nb && memcmp(pa, pb, na) == 0;
    free(pa);
    free(pb);
    return same;
}

#endif
