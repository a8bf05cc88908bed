/* ossl_linked.c: the functions of ossl.h pointed at the OpenSSL the program links (the
 * fuzzers; the extension resolves them with dlsym instead, binding.c). */
#include "../enforcer/dataplane/pump/ossl.h"

struct ossl_functions ossl;

#define OSSL_LINK(name) ossl.name = &name;

void ossl_link(void) {
    OSSL_REQUIRED(OSSL_LINK)
    OSSL_RECORDS(OSSL_LINK)
    OSSL_OPTIONAL(OSSL_LINK)
}
