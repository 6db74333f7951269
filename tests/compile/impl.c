/* The implementation translation unit of the link test. */
#define MOE_IMPLEMENTATION
#include "../../moe.h"
