/* MOE_STATIC: two translation units each hold a private copy; linking them must not clash. */
#define MOE_STATIC
#define MOE_IMPLEMENTATION
#include "../../moe.h"

int static_b(void);

int main(void) {
    moe_ctx ctx;
    return (moe_ctx_init(&ctx, NULL) != MOE_OK) + static_b();
}
