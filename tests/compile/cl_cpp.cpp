// moe_cl.h compiles as C++11 (loader mode, no OpenCL header needed) and falls back to the CPU on request.
#define MOE_IMPLEMENTATION
#include "../../moe.h"
#define MOE_CL_IMPLEMENTATION
#include "../../moe_cl.h"
#include <cstdio>

int main() {
    moe_ctx ctx;
    moe_cl_ctx *cl = nullptr;
    if (moe_ctx_init(&ctx, nullptr) != MOE_OK) return 1;
    moe_cl_desc desc = moe_cl_desc();
    desc.device = "none";
    if (moe_cl_ctx_init(&ctx, &desc, &cl) != MOE_OK || !moe_cl_ctx_fallback(cl)) return 2;
    moe_cl_ctx_destroy(cl);
    std::printf("C++ moe_cl ok\n");
    return 0;
}
