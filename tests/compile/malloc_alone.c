/* Must NOT compile: MOE_MALLOC without MOE_FREE. */
#include <stdlib.h>
#define MOE_MALLOC(size, user) malloc(size)
#define MOE_IMPLEMENTATION
#include "../../moe.h"
int main(void) { return 0; }
