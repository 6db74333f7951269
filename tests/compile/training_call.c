/* A training call: compiles with the full moe.h, and must not compile with -DMOE_NO_TRAINING
   (the training API is not declared then); tests/run_tests.sh checks both. */
#include "../../moe.h"

moe_result moe_training_probe(moe_model *model, const float *x, const int32_t *labels);
moe_result moe_training_probe(moe_model *model, const float *x, const int32_t *labels) {
    moe_target target = {0, 0, 0};
    target.labels = labels;
    return moe_model_train_step(model, x, &target, 1, NULL);
}
