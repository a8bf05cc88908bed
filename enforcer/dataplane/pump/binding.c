/* binding.c: ossl_bind(), the functions of ossl.h resolved in an already loaded library. */
#include <dlfcn.h>
#include <stddef.h>

#include "ossl.h"

struct ossl_functions ossl;

#define OSSL_RESOLVE(name) *(void **)(&ossl.name) = dlsym(handle, #name);
#define OSSL_FIRST_MISSING(name)                                                            \
    if (ossl.name == NULL && missing == NULL) {                                             \
        missing = #name;                                                                    \
    }
#define OSSL_ALL_FOUND(name) found = found && ossl.name != NULL;

const char *ossl_bind(void *handle, int *records) {
    const char *missing = NULL;
    int found = 1;
    OSSL_REQUIRED(OSSL_RESOLVE)
    OSSL_RECORDS(OSSL_RESOLVE)
    OSSL_OPTIONAL(OSSL_RESOLVE)
    OSSL_REQUIRED(OSSL_FIRST_MISSING)
    OSSL_RECORDS(OSSL_ALL_FOUND)
    *records = found;
    return missing;
}
