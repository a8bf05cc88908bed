/* ossl.h: the OpenSSL functions the native code calls, as typed pointers.
 *
 * Every OpenSSL declaration comes from OpenSSL's own headers (libssl-dev): each pointer
 * has the type of the real prototype (__typeof__), so the compiler checks every call. In
 * the extension the symbols are resolved with dlsym() in the libssl/libcrypto that
 * Python's _ssl module loaded (ossl_bind() in binding.c), so the extension and the ssl
 * module share one library, and a library of another major version than the headers is
 * refused (its ABI could differ). The fuzzers and tools link OpenSSL instead
 * (ossl_link(), fuzz/ossl_linked.c). Only public, documented functions are used, and the
 * lists below are the only place a function is named: declaring, binding and linking all
 * expand them, so none can be declared and left unbound.
 */
#ifndef ENFORCER_OSSL_H
#define ENFORCER_OSSL_H

#define OPENSSL_SUPPRESS_DEPRECATED /* HMAC(): the fallback where EVP_MAC cannot be fetched */
#include <openssl/bio.h>
#include <openssl/buffer.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/params.h>
#include <openssl/ssl.h>
#include <openssl/tls1.h>

/* Needed by everything: bind() fails without one of them. */
#define OSSL_REQUIRED(X)                                                                    \
    X(SSL_read) X(SSL_write) X(SSL_get_error) X(SSL_shutdown) X(SSL_get_rbio)               \
    X(SSL_get_wbio) X(SSL_has_pending) X(BIO_write) X(BIO_read) X(BIO_ctrl)                 \
    X(ERR_peek_error) X(ERR_get_error) X(ERR_clear_error) X(SSL_get_SSL_CTX)                \
    X(SSL_set_shutdown) X(SSL_set_session) X(SSL_SESSION_dup) X(SSL_SESSION_free)           \
    X(SSL_SESSION_get_id) X(SSL_CTX_ctrl) X(SSL_free_buffers) X(OpenSSL_version_num)        \
    X(BUF_MEM_new) X(SSL_CTX_sess_set_new_cb) X(SSL_CTX_sess_get_new_cb)                    \
    X(SSL_CTX_get_ex_data) X(SSL_CTX_set_ex_data) X(CRYPTO_get_ex_new_index)                \
    X(SSL_SESSION_is_resumable) X(SSL_CTX_set_ciphersuites)

/* The pump's own TLS 1.3 records: without every one of them OpenSSL keeps every end. */
#define OSSL_RECORDS(X)                                                                     \
    X(SSL_set_msg_callback) X(SSL_ctrl) X(SSL_CTX_set_keylog_callback)                      \
    X(SSL_CTX_get_keylog_callback) X(SSL_get_ex_data) X(SSL_set_ex_data) X(SSL_version)     \
    X(SSL_get_current_cipher) X(SSL_CIPHER_get_id) X(SSL_is_server) X(SSL_pending)          \
    X(SSL_get_shutdown) X(EVP_CIPHER_CTX_new) X(EVP_CIPHER_CTX_free) X(EVP_CipherInit_ex)   \
    X(EVP_CipherUpdate) X(EVP_CipherFinal_ex) X(EVP_CIPHER_CTX_ctrl) X(EVP_aes_128_gcm)     \
    X(EVP_aes_256_gcm) X(EVP_chacha20_poly1305) X(EVP_sha256) X(EVP_sha384) X(HMAC)         \
    X(OPENSSL_cleanse) X(SSL_get_session) X(SSL_SESSION_new) X(SSL_SESSION_set1_id)         \
    X(SSL_SESSION_set_protocol_version) X(SSL_CTX_remove_session) X(SSL_CTX_up_ref)         \
    X(SSL_CTX_free)

/* Faster paths of OpenSSL 3 (records.c: fetched once instead of looked up per call; the
   negotiated group's name without a ctypes round trip). */
#define OSSL_OPTIONAL(X)                                                                    \
    X(EVP_MAC_fetch) X(EVP_MAC_CTX_new) X(EVP_MAC_init) X(EVP_MAC_update) X(EVP_MAC_final)  \
    X(EVP_CIPHER_fetch) X(SSL_group_to_name) X(SSL_is_init_finished)

#define OSSL_FN(name) __typeof__(name) *name;

struct ossl_functions {
    OSSL_REQUIRED(OSSL_FN)
    OSSL_RECORDS(OSSL_FN)
    OSSL_OPTIONAL(OSSL_FN)
};

extern struct ossl_functions ossl;

/* Resolve every function in `handle` (dlopen'ed); NULL, or the name of a required one that
   is missing. *records is set to whether every OSSL_RECORDS one was found. */
const char *ossl_bind(void *handle, int *records);
/* Point every function at the linked OpenSSL (fuzzers, tools; not the extension). */
void ossl_link(void);

#endif
