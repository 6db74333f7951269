/* MOE_MALLOC and MOE_FREE together replace the default allocator. */
#include <stdio.h>
#include <stdlib.h>
static long my_live;
static void *my_malloc(size_t n) { my_live++; return malloc(n); }
static void my_free(void *p) { if (p) my_live--; free(p); }
#define MOE_MALLOC(size, user) ((void)(user), my_malloc(size))
#define MOE_FREE(ptr, user) ((void)(user), my_free(ptr))
#define MOE_IMPLEMENTATION
#include "../../moe.h"
int main(void) {
    moe_ctx ctx;
    moe_layer *l = NULL;
    moe_ctx_init(&ctx, NULL);
    if (moe_layer_create(&ctx, &(moe_layer_desc){.kind = MOE_LAYER_DENSE, .d_in = 3}, 4, &l) != MOE_OK) return 1;
    if (my_live == 0) return 2;
    moe_layer_destroy(l);
    return my_live != 0;
}
