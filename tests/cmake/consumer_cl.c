/* Linked through moe::moe_cl: the header and libm come along with the loader library. */
#define MOE_IMPLEMENTATION
#include "moe.h"
#include <stdio.h>

int main(void) {
    printf("moe %s moe_cl target ok\n", moe_version());
    return 0;
}
