#define MOE_STATIC
#define MOE_IMPLEMENTATION
#include "../../moe.h"

int static_b(void) { return moe_result_string(MOE_ERR_SHAPE)[0] == 0; }
