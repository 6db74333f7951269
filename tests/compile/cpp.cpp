// moe.h compiles as C++11 and its API is usable from C++.
#define MOE_IMPLEMENTATION
#include "../../moe.h"
#include <cstdio>
#include <vector>

int main() {
    moe_ctx ctx;
    moe_ctx_desc cd = moe_ctx_desc();
    cd.seed = 3;
    if (moe_ctx_init(&ctx, &cd) != MOE_OK) return 1;
    moe_layer_desc layer = moe_layer_desc();
    layer.kind = MOE_LAYER_MOE;
    layer.d_in = 4;
    layer.n_experts = 3;
    layer.top_k = 2;
    moe_layer *l = nullptr;
    if (moe_layer_create(&ctx, &layer, 8, &l) != MOE_OK) return 2;
    std::vector<float> x(8 * 4, 0.5f), y(8 * 4), dy(8 * 4, 1.0f), dx(8 * 4);
    if (moe_layer_forward(l, x.data(), 8, y.data(), nullptr) != MOE_OK) return 3;
    if (moe_layer_backward(l, dy.data(), dx.data(), MOE_BACKWARD_AUX) != MOE_OK) return 4;
    moe_layer_destroy(l);
    std::printf("C++ ok\n");
    return 0;
}
