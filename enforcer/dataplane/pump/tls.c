/* tls.c: the OpenSSL objects behind Python's ssl objects. The pointers come from CPython's
 * private _ssl layouts and are used only once a public OpenSSL call has confirmed them
 * (layout_refused); the TLS 1.3 traffic secrets and record counts a pump needs to take an
 * end over come from OpenSSL's public keylog and message callbacks (the tracker); the
 * session helpers (cache bound, ticket keys, newest session, copies) and the bind() that
 * resolves every OpenSSL function (binding.c) in the library _ssl loaded. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

#include "ossl.h"
#include "records.h"
#include "tls.h"

#define TICKET_KEYS_LEN 80 /* key name 16, HMAC key 32, AES key 32 */
int free_buffers_safe = 0; /* SSL_free_buffers without CVE-2024-4741 */
static int ossl_bound = 0;

/* SSL_free_buffers could free a buffer still in use before these releases (CVE-2024-4741):
   3.0.14, 3.1.6, 3.2.2, 3.3.1, 1.1.1y. Older libraries keep their buffers. */
static int fixed_free_buffers(unsigned long v) {
    if ((v >> 28) >= 3) { /* 0xMNN00PP0 */
        unsigned long minor = (v >> 20) & 0xff, patch = (v >> 4) & 0xff;
        static const unsigned long first_fixed[] = {14, 6, 2, 1};
        return (v >> 28) > 3 || minor >= 4 || patch >= first_fixed[minor];
    }
    return v >= 0x1010119fUL; /* 1.1.1y */
}

/* The leading fields of CPython's _ssl objects (Modules/_ssl.c, unchanged 3.7 - 3.13). */
typedef struct {
    PyObject_HEAD
    PyObject *Socket;
    SSL *ssl;
} SslSocketHead;

typedef struct {
    PyObject_HEAD
    BIO *bio;
} MemoryBioHead;

typedef struct {
    PyObject_HEAD
    SSL_CTX *ctx;
} SslContextHead;

typedef struct {
    PyObject_HEAD
    SSL_SESSION *session;
} SslSessionHead;

typedef struct {
    unsigned char secret[2][48]; /* traffic secret 0: [0] client's, [1] server's */
    unsigned secret_len[2];
    uint64_t records[2];         /* encrypted records since the last key change: [0] read */
    unsigned finished[2];        /* Finished read / written */
    unsigned key_update;         /* a KeyUpdate went either way: no take-over */
    unsigned read_after;         /* a record read after the peer's Finished */
    unsigned reading;            /* an encrypted record's header read, its body not yet */
    unsigned refused;            /* not TLS 1.3 or not an AEAD suite we know */
} Tracker;

static int tracker_slot = -1;
int records_ready = 0; /* bound with every function it needs */
int records_on = 1;    /* own_records(False) leaves every end to OpenSSL */

static void free_tracker(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl,
                         void *argp) {
    if (ptr != NULL) {
        ossl.OPENSSL_cleanse(ptr, sizeof(Tracker));
        free(ptr);
    }
}

/* OpenSSL's message callback (see above): counts records, notes key changes. */
static void on_tls_message(int write_p, int version, int content_type, const void *buf,
                           size_t len, SSL *ssl, void *arg) {
    Tracker *t = arg;
    const unsigned char *b = buf;
    int w = write_p ? 1 : 0;
    if (t == NULL || len == 0) {
        return;
    }
    if (content_type == RT_HEADER && b[0] == RT_APPLICATION_DATA) {
        t->records[w]++;
        t->reading |= !w;
        if (!w && t->finished[0]) {
            t->read_after = 1;
        }
    } else if (content_type == SSL3_RT_INNER_CONTENT_TYPE && !w) {
        t->reading = 0; /* the record is decrypted: OpenSSL is between records again */
    } else if (content_type == RT_HANDSHAKE && b[0] == HS_FINISHED) {
        t->records[w] = 0; /* the next record is the first under the application keys */
        t->finished[w] = 1;
    } else if (content_type == RT_HANDSHAKE && b[0] == HS_KEY_UPDATE) {
        t->key_update = 1;
    }
}

static int unhex(const char *s, unsigned char *out, size_t room) {
    size_t n = 0;
    while (s[0] && s[1] && s[0] != ' ' && n < room) {
        unsigned v = 0;
        for (int k = 0; k < 2; k++) {
            char c = s[k];
            v = v * 16 + (unsigned)(c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                   : c >= 'A' && c <= 'F' ? c - 'A' + 10 : 99);
        }
        if (v > 255) {
            return -1;
        }
        out[n++] = (unsigned char)v;
        s += 2;
    }
    return (s[0] == '\0' || s[0] == ' ') ? (int)n : -1;
}

/* The context's keylog callback: keeps the application traffic secrets of tracked SSLs. */
static void on_keylog(const SSL *ssl, const char *line) {
    Tracker *t = ossl.SSL_get_ex_data(ssl, tracker_slot);
    int which = strncmp(line, "CLIENT_TRAFFIC_SECRET_0 ", 24) == 0   ? 0
                : strncmp(line, "SERVER_TRAFFIC_SECRET_0 ", 24) == 0 ? 1
                                                                      : -1;
    if (t == NULL || which < 0) {
        return;
    }
    const char *secret = strchr(line + 24, ' '); /* after the client random */
    int n = secret ? unhex(secret + 1, t->secret[which], sizeof t->secret[which]) : -1;
    t->secret_len[which] = n == 32 || n == 48 ? (unsigned)n : 0;
}












/* The records of an SSL whose state allows it (see above), or NULL (OpenSSL keeps it). */
Records *records_from(SSL *ssl, BIO *rbio, BIO *wbio) {
    Tracker *t = ossl.SSL_get_ex_data(ssl, tracker_slot);
    if (t == NULL || t->refused || t->key_update || !t->finished[0] || !t->finished[1]) {
        return NULL;
    }
    /* A record whose header OpenSSL has read and whose body has not come yet: its BIO and
       buffers are empty (SSL_has_pending() is 0: the header's five bytes are consumed), but
       the next bytes on the wire are that body, not a header. Taken over now, the body's
       first bytes would be read as a header (ENCRYPTED_LENGTH_TOO_LONG at random). */
    if (t->reading) {
        return NULL;
    }
    int server = ossl.SSL_is_server(ssl);
    if (!server && !t->read_after) {
        return NULL; /* the server's tickets may still be on their way */
    }
    const EVP_MD *md = NULL;
    int key_len = 0;
    unsigned long suite = 0;
    if (ossl.SSL_version(ssl) == TLS13_VERSION) {
        const SSL_CIPHER *cipher = ossl.SSL_get_current_cipher(ssl);
        suite = cipher ? ossl.SSL_CIPHER_get_id(cipher) : 0;
    }
    if (records_suite(suite, &key_len, &md) == NULL || md == NULL ||
        t->secret_len[0] != t->secret_len[1]) {
        t->refused = 1;
        return NULL;
    }
    if (ossl.SSL_get_shutdown(ssl) != 0 || ossl.SSL_pending(ssl) > 0 ||
        ossl.SSL_has_pending(ssl) || ossl.BIO_ctrl(rbio, BIO_CTRL_PENDING, 0, NULL) != 0 ||
        ossl.BIO_ctrl(wbio, BIO_CTRL_PENDING, 0, NULL) != 0) {
        return NULL;
    }
    Records *r = records_new(suite, server, t->secret[0], t->secret[1], t->secret_len[0],
                             t->records[0], t->records[1]);
    if (r == NULL) {
        t->refused = 1; /* a secret of the wrong length for the suite, or no memory */
    }
    return r;
}


int require_bound(void) {
    if (!ossl_bound) {
        PyErr_SetString(PyExc_RuntimeError, "bind() has not succeeded");
    }
    return ossl_bound;
}

/* ---- binding to the _ssl module's OpenSSL -------------------------------------------- */
/* Pointers taken from CPython's private _ssl layouts are used only once a public OpenSSL
   call has confirmed them (the SSL's BIOs, its context, a session's id). When one does not
   confirm, the native path is refused (RuntimeError: Python carries on with the public
   path), and counted: verification_failures() (native.py logs it as a warning and /status
   and the metrics show it). */
static unsigned long long verification_failures = 0;

static void *layout_refused(const char *why) {
    verification_failures++;
    PyErr_SetString(PyExc_RuntimeError, why);
    return NULL;
}

static int check_type_name(PyObject *obj, const char *want) {
    const char *name = Py_TYPE(obj)->tp_name;
    if (strcmp(name, want) != 0) {
        PyErr_Format(PyExc_TypeError, "expected %s, got %s", want, name);
        return -1;
    }
    return 0;
}

static BIO *bio_of(PyObject *b) {
    if (check_type_name(b, "_ssl.MemoryBIO") < 0) {
        return NULL;
    }
    return ((MemoryBioHead *)b)->bio;
}

/* The SSL* behind (ssl.SSLObject, incoming MemoryBIO, outgoing MemoryBIO), checked against
   the two BIOs (read independently): if the layout were not the expected one, they would
   not agree. On success *inner is a new reference to the _ssl._SSLSocket. */
SSL *ssl_of(PyObject *triple, BIO **rbio, BIO **wbio, PyObject **inner) {
    PyObject *sslobject, *in_obj, *out_obj;
    if (!PyArg_ParseTuple(triple, "OOO;tls must be (SSLObject, MemoryBIO, MemoryBIO) or None",
                          &sslobject, &in_obj, &out_obj)) {
        return NULL;
    }
    BIO *in = bio_of(in_obj);
    BIO *out = in ? bio_of(out_obj) : NULL;
    if (out == NULL) {
        return NULL;
    }
    PyObject *obj = PyObject_GetAttrString(sslobject, "_sslobj");
    if (obj == NULL) {
        return NULL;
    }
    if (check_type_name(obj, "_ssl._SSLSocket") < 0) {
        Py_DECREF(obj);
        return NULL;
    }
    SSL *ssl = Py_TYPE(obj)->tp_basicsize >= (Py_ssize_t)sizeof(SslSocketHead)
                   ? ((SslSocketHead *)obj)->ssl
                   : NULL;
    if (ssl == NULL || ossl.SSL_get_rbio(ssl) != in || ossl.SSL_get_wbio(ssl) != out) {
        Py_DECREF(obj);
        return layout_refused("the _ssl object layout is not the expected one (BIOs do not "
                              "match)");
    }
    *rbio = in;
    *wbio = out;
    *inner = obj;
    return ssl;
}

/* What the own records need besides the functions: the tracker's ex_data slot. */
static void bind_records(int found) {
    records_ready = found;
    if (records_ready) {
        records_init();
    }
    if (records_ready && tracker_slot < 0) {
        tracker_slot = ossl.CRYPTO_get_ex_new_index(CRYPTO_EX_INDEX_SSL, 0, NULL, NULL, NULL,
                                                    free_tracker);
        if (tracker_slot < 0) {
            ossl.ERR_clear_error();
            records_ready = 0;
        }
    }
}

/* bind(path of the _ssl extension, (SSLObject, MemoryBIO, MemoryBIO) freshly made): resolve OpenSSL in the library
   _ssl itself uses, then check the object layout on the sample. */
PyObject *mod_bind(PyObject *module, PyObject *args) {
    const char *path;
    PyObject *sample;
    if (!PyArg_ParseTuple(args, "sO", &path, &sample)) {
        return NULL;
    }
    void *handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (handle == NULL) {
        PyErr_Format(PyExc_RuntimeError, "the _ssl module is not loaded from %s", path);
        return NULL;
    }
    int records = 0;
    const char *missing = ossl_bind(handle, &records);
    if (missing != NULL) {
        PyErr_Format(PyExc_RuntimeError, "%s not found beside the _ssl module", missing);
        return NULL;
    }
    unsigned long runtime = ossl.OpenSSL_version_num();
    if ((runtime >> 28) != OPENSSL_VERSION_MAJOR) {
        PyErr_Format(PyExc_RuntimeError,
                     "Python's ssl module uses OpenSSL %lx, the extension was built with "
                     "OpenSSL %d's headers", runtime, OPENSSL_VERSION_MAJOR);
        return NULL;
    }
    free_buffers_safe = fixed_free_buffers(runtime);
    bind_records(records);
    BIO *r, *w;
    PyObject *inner;
    if (ssl_of(sample, &r, &w, &inner) == NULL) {
        return NULL;
    }
    Py_DECREF(inner);
    ossl_bound = 1;
    Py_RETURN_NONE;
}

/* The SSL_CTX* of an ssl.SSLContext (a Python subclass of _ssl._SSLContext: same head),
   with the extension bound, checked against the SSL_CTX of a sample (SSLObject,
   MemoryBIO, MemoryBIO) made from it. */
static SSL_CTX *ctx_of(PyObject *context, PyObject *sample) {
    if (!require_bound()) {
        return NULL;
    }
    PyTypeObject *t = Py_TYPE(context);
    while (t != NULL && strcmp(t->tp_name, "_ssl._SSLContext") != 0) {
        t = t->tp_base;
    }
    if (t == NULL) {
        PyErr_Format(PyExc_TypeError, "expected an ssl.SSLContext, got %s",
                     Py_TYPE(context)->tp_name);
        return NULL;
    }
    BIO *r, *w;
    PyObject *inner;
    SSL *ssl = ssl_of(sample, &r, &w, &inner);
    if (ssl == NULL) {
        return NULL;
    }
    Py_DECREF(inner);
    SSL_CTX *ctx = ((SslContextHead *)context)->ctx;
    if (ctx == NULL || ossl.SSL_get_SSL_CTX(ssl) != ctx) {
        return layout_refused("the _ssl context layout is not the expected one (contexts "
                              "differ)");
    }
    return ctx;
}

/* session_cache(SSLContext, sample, size): bound the context's session cache to `size`
   sessions (size < 0: leave it); returns (bound, sessions held now). */
PyObject *mod_session_cache(PyObject *module, PyObject *args) {
    PyObject *context, *sample;
    long size;
    if (!PyArg_ParseTuple(args, "OOl", &context, &sample, &size)) {
        return NULL;
    }
    SSL_CTX *ctx = ctx_of(context, sample);
    if (ctx == NULL) {
        return NULL;
    }
    if (size >= 0) {
        ossl.SSL_CTX_ctrl(ctx, SSL_CTRL_SET_SESS_CACHE_SIZE, size, NULL);
    }
    return Py_BuildValue("(ll)", ossl.SSL_CTX_ctrl(ctx, SSL_CTRL_GET_SESS_CACHE_SIZE, 0, NULL),
                         ossl.SSL_CTX_ctrl(ctx, SSL_CTRL_SESS_NUMBER, 0, NULL));
}

/* set_ciphersuites(SSLContext, sample, "TLS_...:TLS_..."): the context's TLS 1.3 cipher
   suites, in preference order (Python's ssl module can set only the TLS 1.2 ones). */
PyObject *mod_set_ciphersuites(PyObject *module, PyObject *args) {
    PyObject *context, *sample;
    const char *suites;
    if (!PyArg_ParseTuple(args, "OOs", &context, &sample, &suites)) {
        return NULL;
    }
    SSL_CTX *ctx = ctx_of(context, sample);
    if (ctx == NULL) {
        return NULL;
    }
    if (ossl.SSL_CTX_set_ciphersuites(ctx, suites) != 1) {
        ossl.ERR_clear_error();
        PyErr_Format(PyExc_ValueError, "OpenSSL refused the TLS 1.3 cipher suites %s", suites);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* set_ticket_keys(SSLContext, sample, keys): the context's session-ticket keys, OpenSSL's
   80-byte block (key name, HMAC key, AES key), instead of the random ones it drew itself:
   worker processes that share them resume each other's tickets. */
PyObject *mod_set_ticket_keys(PyObject *module, PyObject *args) {
    PyObject *context, *sample;
    Py_buffer keys;
    if (!PyArg_ParseTuple(args, "OOy*", &context, &sample, &keys)) {
        return NULL;
    }
    SSL_CTX *ctx = NULL;
    if (keys.len != TICKET_KEYS_LEN) {
        PyErr_Format(PyExc_ValueError, "ticket keys are %d bytes, got %zd", TICKET_KEYS_LEN,
                     keys.len);
    } else if ((ctx = ctx_of(context, sample)) != NULL &&
               ossl.SSL_CTX_ctrl(ctx, SSL_CTRL_SET_TLSEXT_TICKET_KEYS, TICKET_KEYS_LEN,
                                 keys.buf) != 1) {
        ossl.ERR_clear_error();
        PyErr_SetString(PyExc_ValueError, "OpenSSL refused the ticket keys");
        ctx = NULL;
    }
    PyBuffer_Release(&keys);
    if (ctx == NULL) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* The SSL* of a (SSLObject, MemoryBIO, MemoryBIO) sample, with the extension bound and the
   layout checked; NULL with an exception set otherwise. */
static SSL *bound_ssl_of(PyObject *sample) {
    PyObject *inner;
    BIO *r, *w;
    if (!require_bound()) {
        return NULL;
    }
    SSL *ssl = ssl_of(sample, &r, &w, &inner);
    if (ssl != NULL) {
        Py_DECREF(inner);
    }
    return ssl;
}

/* Resume a copy of `session` on `ssl` (made with SSL_SESSION_dup: OpenSSL changes a session
   while it resumes with it, so a shared one would resume only once). 1 done, 0 refused by
   OpenSSL, -1 out of memory (exception set). */
static int resume_copy(SSL *ssl, SSL_SESSION *session) {
    SSL_SESSION *copy = ossl.SSL_SESSION_dup(session);
    if (copy == NULL) {
        ossl.ERR_clear_error();
        PyErr_NoMemory();
        return -1;
    }
    int ok = ossl.SSL_set_session(ssl, copy);
    ossl.SSL_SESSION_free(copy); /* the SSL holds its own reference */
    if (ok != 1) {
        ossl.ERR_clear_error();
        return 0;
    }
    return 1;
}

/* keep_session((SSLObject, MemoryBIO, MemoryBIO)): mark the connection as shut down, so
   that freeing it does not drop its session from the server's cache (OpenSSL drops the
   session of any SSL freed without having sent close_notify, e.g. after a reset or a
   timeout; nginx marks connections the same way). Fatal TLS errors drop it regardless. */
PyObject *mod_keep_session(PyObject *module, PyObject *sample) {
    SSL *ssl = bound_ssl_of(sample);
    if (ssl == NULL) {
        return NULL;
    }
    ossl.SSL_set_shutdown(ssl, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
    Py_RETURN_NONE;
}

/* set_session((SSLObject, MemoryBIO, MemoryBIO), SSLSession): resume a copy of the session
   made with SSL_SESSION_dup (a memory copy that shares the certificates by reference)
   instead of CPython's copy, which encodes the session and decodes it again, parsing the
   peer's certificate (~150 us). A copy it must be: OpenSSL changes a session while it
   resumes with it, so a shared one resumes only once. The session pointer is checked
   against the session's id as Python reports it. */
PyObject *mod_set_session(PyObject *module, PyObject *args) {
    PyObject *sample, *session;
    if (!require_bound()) {
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OO", &sample, &session)) {
        return NULL;
    }
    if (check_type_name(session, "_ssl.SSLSession") < 0) {
        return NULL;
    }
    SSL_SESSION *sess = ((SslSessionHead *)session)->session;
    PyObject *want = PyObject_GetAttrString(session, "id");
    if (want == NULL) {
        return NULL;
    }
    unsigned int len = 0;
    const unsigned char *id = sess ? ossl.SSL_SESSION_get_id(sess, &len) : NULL;
    int same = PyBytes_Check(want) && id != NULL && (Py_ssize_t)len == PyBytes_GET_SIZE(want) &&
               memcmp(id, PyBytes_AS_STRING(want), len) == 0;
    Py_DECREF(want);
    if (!same) {
        return layout_refused("the _ssl session layout is not the expected one (ids do not "
                              "match)");
    }
    SSL *ssl = bound_ssl_of(sample);
    if (ssl == NULL) {
        return NULL;
    }
    int done = resume_copy(ssl, sess);
    if (done <= 0) {
        if (done == 0) {
            PyErr_SetString(PyExc_ValueError, "OpenSSL refused the session");
        }
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ---- the newest client session -------------------------------------------------------
 * A client context tracked with track_sessions() keeps the newest session the server gave
 * it (with TLS 1.3: the last NewSessionTicket, which arrives after the handshake), in the
 * context's own ex_data slot, and resume_latest() resumes a copy of it on a new connection.
 * Taking the session only when a connection ends is not enough: a ticket presented by every
 * connection of a burst ages out of the server's bounded cache while those connections are
 * still open, and every later one then makes a full handshake. The slot is freed with the
 * context (a reload makes a new one). The callback runs inside OpenSSL calls on the event
 * loop thread, sometimes with the GIL released: it touches no Python object. */
static int latest_session_slot = -1;

static void free_latest_session(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx,
                                long argl, void *argp) {
    if (ptr != NULL) {
        ossl.SSL_SESSION_free((SSL_SESSION *)ptr);
    }
}

static int on_new_session(SSL *ssl, SSL_SESSION *session) {
    SSL_CTX *ctx = ossl.SSL_get_SSL_CTX(ssl);
    SSL_SESSION *old = ossl.SSL_CTX_get_ex_data(ctx, latest_session_slot);
    if (!ossl.SSL_CTX_set_ex_data(ctx, latest_session_slot, session)) {
        return 0; /* OpenSSL keeps its reference; the old session stays */
    }
    if (old != NULL) {
        ossl.SSL_SESSION_free(old);
    }
    return 1; /* the slot holds the reference OpenSSL passed us */
}

/* track_sessions(SSLContext, sample): from now on, keep the context's newest session. */
PyObject *mod_track_sessions(PyObject *module, PyObject *args) {
    PyObject *context, *sample;
    if (!PyArg_ParseTuple(args, "OO", &context, &sample)) {
        return NULL;
    }
    SSL_CTX *ctx = ctx_of(context, sample);
    if (ctx == NULL) {
        return NULL;
    }
    if (latest_session_slot < 0) {
        latest_session_slot = ossl.CRYPTO_get_ex_new_index(CRYPTO_EX_INDEX_SSL_CTX, 0, NULL,
                                                           NULL, NULL, free_latest_session);
        if (latest_session_slot < 0) {
            ossl.ERR_clear_error();
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL gave no ex_data slot for sessions");
            return NULL;
        }
    }
    int (*current)(SSL *, SSL_SESSION *) = ossl.SSL_CTX_sess_get_new_cb(ctx);
    if (current != NULL && current != on_new_session) {
        PyErr_SetString(PyExc_RuntimeError, "the context already has a new-session callback");
        return NULL;
    }
    long mode = ossl.SSL_CTX_ctrl(ctx, SSL_CTRL_GET_SESS_CACHE_MODE, 0, NULL);
    ossl.SSL_CTX_ctrl(ctx, SSL_CTRL_SET_SESS_CACHE_MODE,
                      mode | SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE, NULL);
    ossl.SSL_CTX_sess_set_new_cb(ctx, on_new_session);
    Py_RETURN_NONE;
}

/* resume_latest((SSLObject, MemoryBIO, MemoryBIO)) -> bool: before a client handshake,
   resume a copy of its context's newest session; False when there is none to resume (the
   context is not tracked, no session came yet, or the last one is no longer resumable). */
PyObject *mod_resume_latest(PyObject *module, PyObject *sample) {
    SSL *ssl = bound_ssl_of(sample);
    if (ssl == NULL) {
        return NULL;
    }
    if (latest_session_slot < 0) {
        Py_RETURN_FALSE;
    }
    SSL_CTX *ctx = ossl.SSL_get_SSL_CTX(ssl);
    SSL_SESSION *latest = ossl.SSL_CTX_get_ex_data(ctx, latest_session_slot);
    if (latest == NULL) {
        Py_RETURN_FALSE;
    }
    if (!ossl.SSL_SESSION_is_resumable(latest)) { /* e.g. its connection was reset */
        ossl.SSL_CTX_set_ex_data(ctx, latest_session_slot, NULL);
        ossl.SSL_SESSION_free(latest);
        Py_RETURN_FALSE;
    }
    int done = resume_copy(ssl, latest);
    if (done < 0) {
        return NULL;
    }
    return PyBool_FromLong(done);
}

/* track_records((SSLObject, MemoryBIO, MemoryBIO)) -> bool: before its handshake, follow
   an SSL's keys and record counts so that a pump can take its records over later (see
   "TLS 1.3 records"). False when that cannot be: the library lacks what it needs, own
   records are off, or the context already logs its keys elsewhere (SSLKEYLOGFILE). */
PyObject *mod_track_records(PyObject *module, PyObject *sample) {
    SSL *ssl = bound_ssl_of(sample);
    if (ssl == NULL) {
        return NULL;
    }
    if (!records_ready || !records_on) {
        Py_RETURN_FALSE;
    }
    SSL_CTX *ctx = ossl.SSL_get_SSL_CTX(ssl);
    void (*logging)(const SSL *, const char *) = ossl.SSL_CTX_get_keylog_callback(ctx);
    if (logging != NULL && logging != on_keylog) {
        Py_RETURN_FALSE; /* needs the keylog for the secrets, and someone else has it */
    }
    if (ossl.SSL_get_ex_data(ssl, tracker_slot) != NULL) {
        Py_RETURN_TRUE;
    }
    Tracker *t = calloc(1, sizeof *t);
    if (t == NULL) {
        return PyErr_NoMemory();
    }
    if (!ossl.SSL_set_ex_data(ssl, tracker_slot, t)) {
        ossl.ERR_clear_error();
        free(t);
        Py_RETURN_FALSE;
    }
    if (logging == NULL) {
        ossl.SSL_CTX_set_keylog_callback(ctx, on_keylog);
    }
    ossl.SSL_set_msg_callback(ssl, on_tls_message);
    ossl.SSL_ctrl(ssl, SSL_CTRL_SET_MSG_CALLBACK_ARG, 0, t);
    Py_RETURN_TRUE;
}

/* negotiated_group((SSLObject, MemoryBIO, MemoryBIO)) -> str | None: the key-exchange group
   of a finished handshake as OpenSSL names it (SSL_get_negotiated_group, a macro over
   SSL_ctrl, and SSL_group_to_name; OpenSSL 3.0+), "0x...." for a group it has no name for,
   None before the handshake is done or without a key exchange. The same public calls as
   tlsconf/groups.py makes with ctypes, on an SSL verified through its BIOs, for a few
   hundred instructions instead of some fifteen thousand per connection. */
PyObject *mod_negotiated_group(PyObject *module, PyObject *sample) {
    if (ossl_bound && (ossl.SSL_group_to_name == NULL || ossl.SSL_is_init_finished == NULL ||
                       ossl.SSL_ctrl == NULL || ossl.SSL_get_session == NULL)) {
        PyErr_SetString(PyExc_RuntimeError, "SSL_group_to_name is not in this OpenSSL");
        return NULL;
    }
    SSL *ssl = bound_ssl_of(sample);
    if (ssl == NULL) {
        return NULL;
    }
    /* OpenSSL 3.0 reads the session's group without checking there is a session yet */
    if (ossl.SSL_is_init_finished(ssl) != 1 || ossl.SSL_get_session(ssl) == NULL) {
        Py_RETURN_NONE;
    }
    long nid = ossl.SSL_ctrl(ssl, SSL_CTRL_GET_NEGOTIATED_GROUP, 0, NULL);
    if (nid <= 0) {
        Py_RETURN_NONE;
    }
    const char *name = ossl.SSL_group_to_name(ssl, (int)nid);
    if (name != NULL) {
        return PyUnicode_DecodeASCII(name, (Py_ssize_t)strlen(name), "replace");
    }
    if (nid & TLSEXT_nid_unknown) {
        return PyUnicode_FromFormat("0x%04x", (unsigned)(nid & 0xFFFF));
    }
    Py_RETURN_NONE;
}

/* verification_failures() -> int: pointers from CPython's private layouts that a public
   OpenSSL call did not confirm (see layout_refused), since the process started. */
PyObject *mod_verification_failures(PyObject *module, PyObject *Py_UNUSED(args)) {
    return PyLong_FromUnsignedLongLong(verification_failures);
}

/* ---- known-answer hooks of the record layer (tests/e2e/test_tls_records_kat.py) ---------
 * The record layer's own code, on given secrets and sequence numbers, with no connection:
 * record_protect seals one record with a client's traffic secret; record_unprotect reads
 * records sealed with one, as a server end does (KeyUpdates followed and answered). */
static Records *kat_records(unsigned long suite, Py_buffer *secret, unsigned long long seq) {
    if (!require_bound() || !records_ready) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_RuntimeError, "own records are not available");
        }
        return NULL;
    }
    Records *r = records_new(suite, 1, secret->buf, secret->buf, (size_t)secret->len, seq, seq);
    if (r == NULL) {
        PyErr_SetString(PyExc_ValueError, "unknown suite or a secret of the wrong length");
    }
    return r;
}

PyObject *mod_record_protect(PyObject *module, PyObject *args) {
    unsigned long suite;
    unsigned long long seq;
    int type;
    Py_buffer secret, data;
    if (!PyArg_ParseTuple(args, "ky*Kiy*", &suite, &secret, &seq, &type, &data)) {
        return NULL;
    }
    PyObject *out = NULL;
    Records *r = data.len <= RECORD_PLAIN ? kat_records(suite, &secret, seq) : NULL;
    if (r == NULL && !PyErr_Occurred()) {
        PyErr_SetString(PyExc_ValueError, "more than one record of data");
    }
    if (r != NULL) {
        r->server = 0; /* it writes with the client's secret: the one given */
        unsigned char *buf = malloc((size_t)data.len + 22);
        int n = buf ? records_seal(r, type, data.buf, (size_t)data.len, buf) : -1;
        out = n < 0 ? PyErr_Format(PyExc_RuntimeError, "sealing failed")
                    : PyBytes_FromStringAndSize((const char *)buf, n);
        free(buf);
        records_free(r);
    }
    PyBuffer_Release(&secret);
    PyBuffer_Release(&data);
    return out;
}

typedef struct {
    PyObject *data; /* bytearray */
    int answers;
} KatSink;

static int kat_data(void *arg, const unsigned char *plain, size_t len) {
    KatSink *k = arg;
    PyObject *chunk = PyByteArray_FromStringAndSize((const char *)plain, (Py_ssize_t)len);
    if (chunk == NULL) {
        return -1;
    }
    PyObject *joined = PySequence_InPlaceConcat(k->data, chunk);
    Py_DECREF(chunk);
    Py_XDECREF(joined);
    return joined == NULL ? -1 : 0;
}

static int kat_key_update(void *arg) {
    ((KatSink *)arg)->answers++;
    return 0;
}

PyObject *mod_record_unprotect(PyObject *module, PyObject *args) {
    unsigned long suite;
    unsigned long long seq;
    Py_buffer secret, wire;
    if (!PyArg_ParseTuple(args, "ky*Ky*", &suite, &secret, &seq, &wire)) {
        return NULL;
    }
    PyObject *out = NULL;
    Records *r = kat_records(suite, &secret, seq);
    KatSink k = {PyByteArray_FromStringAndSize(NULL, 0), 0};
    if (r != NULL && k.data != NULL) {
        RecordSink sink = {&k, kat_data, kat_key_update};
        const char *why = NULL;
        static unsigned char plain[2 * RECORD_MAX];
        int status = records_input(r, wire.buf, (size_t)wire.len, plain, sizeof plain, &sink,
                                   &why);
        const char *outcome = status == RECORDS_MORE            ? "more"
                              : status == RECORDS_CLOSE_NOTIFY ? "close_notify"
                              : status == RECORDS_FAILED       ? why
                                                               : NULL;
        if (outcome != NULL) {
            out = Py_BuildValue("(Osi)", k.data, outcome, k.answers);
        }
    }
    if (r != NULL) {
        records_free(r);
    }
    Py_XDECREF(k.data);
    PyBuffer_Release(&secret);
    PyBuffer_Release(&wire);
    return out;
}

/* own_records([on]) -> bool: whether pumps take TLS 1.3 records over from OpenSSL (set it,
   e.g. in tests, to compare); False also when the bound library lacks what it needs. */
PyObject *mod_own_records(PyObject *module, PyObject *args) {
    int on = records_on;
    if (!PyArg_ParseTuple(args, "|p", &on)) {
        return NULL;
    }
    records_on = on;
    return PyBool_FromLong(records_on && records_ready);
}

/* frees_tls_buffers(version): whether idle pumps free OpenSSL's record buffers with this
   OpenSSL (OPENSSL_VERSION_NUMBER); without an argument, the bound library's answer. */
PyObject *mod_frees_tls_buffers(PyObject *module, PyObject *args) {
    unsigned long version = 0;
    if (!PyArg_ParseTuple(args, "|k", &version)) {
        return NULL;
    }
    if (PyTuple_GET_SIZE(args) == 0) {
        if (!require_bound()) {
            return NULL;
        }
        return PyBool_FromLong(free_buffers_safe);
    }
    return PyBool_FromLong(fixed_free_buffers(version));
}

