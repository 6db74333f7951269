// The C++ side of the consumer: moe.h's implementation compiled as C++11.
#define MOE_IMPLEMENTATION
#include "moe.h"
#include <cstdio>

int main() {
    moe_ctx ctx;
    moe_ctx_desc cd = moe_ctx_desc();
    int openmp = 0;
#ifdef _OPENMP
    openmp = 1;
#endif
    if (moe_ctx_init(&ctx, &cd) != MOE_OK) return 1;
    std::printf("moe %s C++ ok openmp=%d\n", moe_version(), openmp);
    return 0;
}
