/* A second translation unit that only declares: links against impl.c. */
#include <stdio.h>
#include <string.h>
#include "../../moe.h"

int main(void) {
    moe_ctx ctx;
    moe_model *m = NULL;
    moe_layer_desc layers[2] = {{.kind = MOE_LAYER_MOE, .n_experts = 2, .top_k = 1}, {.kind = MOE_LAYER_DENSE, .d_out = 2}};
    float x[3] = {1, 2, 3}, y[2];
    if (moe_ctx_init(&ctx, NULL) != MOE_OK) return 1;
    if (moe_model_create(&ctx, &(moe_model_desc){.d_in = 3, .n_layers = 2, .layers = layers}, &m) != MOE_OK) return 2;
    if (moe_model_forward(m, x, 1, y, NULL) != MOE_OK) return 3;
    moe_model_destroy(m);
    printf("linked moe.h %s\n", moe_version());
    return strcmp(moe_version(), MOE_VERSION_STRING) != 0;
}
