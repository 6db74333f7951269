/* Builds a small MoE model, runs it and says whether OpenMP reached this program. */
#define MOE_IMPLEMENTATION
#include "moe.h"
#include <stdio.h>

int main(void) {
    moe_ctx ctx;
    moe_model *model = NULL;
    moe_layer_desc layers[] = {
        {.kind = MOE_LAYER_MOE, .d_out = 8, .n_experts = 4, .top_k = 2},
        {.kind = MOE_LAYER_DENSE, .d_out = 3},
    };
    float x[2 * 6] = {0.5f, -1.0f, 0.25f, 2.0f, 0.0f, 1.0f, -0.5f, 1.5f, -2.0f, 0.75f, 0.1f, -0.3f}, y[2 * 3];
    int openmp = 0;
#ifdef _OPENMP
    openmp = 1;
#endif
    if (moe_ctx_init(&ctx, &(moe_ctx_desc){.seed = 1}) != MOE_OK ||
        moe_model_create(&ctx, &(moe_model_desc){.d_in = 6, .n_layers = 2, .layers = layers}, &model) != MOE_OK ||
        moe_model_forward(model, x, 2, y, NULL) != MOE_OK) {
        printf("error: %s\n", moe_ctx_error(&ctx));
        return 1;
    }
    printf("moe %s C ok openmp=%d y0=%g\n", moe_version(), openmp, (double)y[0]);
    moe_model_destroy(model);
    return 0;
}
