/* Caller-owned memory without the library's allocator hooks to vouch for it: this program
   defines malloc, calloc, realloc and free itself (glibc lets a program interpose them), counts
   every call, and checks that moe_model_init_memory and 10,000 forwards of the model it places
   make none. Skipped where the C library is not glibc or a sanitizer owns malloc. */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "test.h"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(memory_sanitizer) || __has_feature(thread_sanitizer)
#define SANITIZED 1
#endif
#endif

#if defined(__GLIBC__) && !defined(SANITIZED)
#define INTERPOSED 1
/* Each call is counted, then served by glibc's allocator through the entry points it exports for
   interposers. (A bump pool that never reuses memory ran out: LLVM's OpenMP runtime allocates
   and frees about 16 KB in every forward, 160 MB over the loop, and crashes on NULL.) */
void *__libc_malloc(size_t n);
void *__libc_calloc(size_t count, size_t n);
void *__libc_realloc(void *old, size_t n);
void __libc_free(void *p);
static long libc_calls;

void *malloc(size_t n) { libc_calls++; return __libc_malloc(n); }
void free(void *p) { if (p) libc_calls++; __libc_free(p); }
void *calloc(size_t count, size_t n) { libc_calls++; return __libc_calloc(count, n); }
void *realloc(void *old, size_t n) { libc_calls++; return __libc_realloc(old, n); }
#endif

static int test_no_libc_allocation(void) {
#ifndef INTERPOSED
    printf("    glibc interposition unavailable here (not glibc, or a sanitizer owns malloc)\n");
    return TEST_SKIP;
#else
    moe_ctx ctx;
    moe_ctx_desc cd;
    moe_layer_desc layers[2];
    moe_model_desc md;
    moe_model *m = NULL, *placed = NULL;
    size_t size = 0, need = 0;
    unsigned char *file = NULL;
    void *memory = NULL;
    float x[8 * 12], y[3];
    long before, loop;
    int f, bad = 0;
    memset(&cd, 0, sizeof cd);
    cd.seed = 5;
    cd.n_threads = 1;
    CHECK_OK(moe_ctx_init(&ctx, &cd), &ctx);
    memset(layers, 0, sizeof layers);
    layers[0].kind = MOE_LAYER_MOE; layers[0].n_experts = 4; layers[0].top_k = 2; layers[0].d_hidden = 16;
    layers[1].kind = MOE_LAYER_DENSE; layers[1].d_out = 3;
    memset(&md, 0, sizeof md);
    md.d_in = 12; md.n_layers = 2; md.layers = layers; md.max_tokens = 8;
    /* set-up may allocate: a model to save, its file, the caller's block */
    before = libc_calls;
    CHECK_OK(moe_model_create(&ctx, &md, &m), &ctx);
    CHECK(libc_calls > before, "the interposed malloc is not the one moe.h calls");
    if (m) CHECK_OK(moe_model_save_memory(m, NULL, 0, &size), &ctx);
    file = (unsigned char *)malloc(size);
    if (m && file) CHECK_OK(moe_model_save_memory(m, file, size, &size), &ctx);
    CHECK_OK(moe_model_memory_size(&ctx, file, size, 0, &need), &ctx);
    memory = malloc(need);
    for (f = 0; f < 8 * 12; f++) x[f] = (float)((f * 37) % 11) / 11.0f - 0.5f;
    /* from here on: not one call into the C library's allocator */
    before = libc_calls;
    CHECK_OK(moe_model_init_memory(&ctx, file, size, 0, memory, need, &placed), &ctx);
    CHECK(libc_calls == before, "%ld allocator calls while loading into caller memory", libc_calls - before);
    for (f = 0; placed && f < 10000; f++) {
        moe_forward_opts opts;
        memset(&opts, 0, sizeof opts);
        opts.top_k = 1 + f % 2;
        if (moe_model_forward(placed, x + (f % 8) * 12, 1, y, &opts) != MOE_OK) bad++;
    }
    CHECK(bad == 0, "%d forwards failed: %s", bad, moe_ctx_error(&ctx));
    loop = libc_calls - before;
    before = libc_calls;
    moe_model_destroy(placed);
    CHECK(libc_calls == before, "%ld allocator calls in destroy", libc_calls - before);
#ifdef _OPENMP
    /* GNU libgomp allocates a team in every parallel region it enters, a serialized one too:
       that is the OpenMP runtime, not moe.h; the build without OpenMP checks the forwards */
    printf("    %ld C library allocator calls in 10,000 forwards, from the OpenMP runtime (model needs %zu bytes)\n", loop, need);
#else
    CHECK(loop == 0, "%ld allocator calls in 10,000 forwards", loop);
    printf("    %ld C library allocator calls in init, 10,000 forwards and destroy (model needs %zu bytes)\n", loop, need);
#endif
    moe_model_destroy(m);
    return 0;
#endif
}

int main(void) {
    RUN(test_no_libc_allocation);
    TEST_END();
}
