/* MOE_NO_STDIO: the implementation pulls in no <stdio.h> (EOF and BUFSIZ are its macros);
   tests/run_tests.sh also checks that the object file references no stdio function. */
#define MOE_NO_STDIO
#define MOE_IMPLEMENTATION
#include "../../moe.h"
#if defined(EOF) || defined(BUFSIZ)
#error "moe.h included <stdio.h> under MOE_NO_STDIO"
#endif

int moe_no_stdio_probe(void) { return moe_version()[0] == '0'; }
