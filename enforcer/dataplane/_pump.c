/* The native relay pump: moves bytes between the two sockets of a connection that has
 * reached RELAY, in C, with no Python code run per socket event.
 *
 * How it works
 * - Python does everything up to RELAY (PROXY header, detection, TLS handshake, identity,
 *   policy, upstream connect) with asyncio transports and ssl.SSLObject. It then hands the
 *   two sockets (the descriptors themselves for bare sockets watched through a Watch,
 *   see acceptor.py and rawtransport.py; dup'ed descriptors for asyncio transports) and
 *   the two SSLObjects (or None for plaintext) to a Pump, and closes its transports.
 * - The pumps of one event loop share a Poller: one epoll set holding their sockets, whose
 *   fd alone the loop watches (loop.add_reader(poller.fileno(), poller.run)). For each
 *   ready socket a pump does recv() -> [BIO_write + SSL_read] -> [SSL_write + BIO_read] ->
 *   send(), all in C, into static scratch buffers (the loop is single-threaded and holds
 *   the GIL), so a request costs a few syscalls and no Python objects.
 * - The TLS state starts as the SSLObject's: the SSL* and its memory BIOs are read from
 *   the _ssl objects (the layout sslkeylog and sslpsk rely on), and every OpenSSL function
 *   is looked up with dlsym() in the _ssl module's own libssl, so both always use the same
 *   library. bind() checks the layout on a live object before the pump is ever used.
 * - Once a TLS 1.3 end is in a clean state after its handshake, the pump protects its
 *   records itself (AEAD by OpenSSL's EVP) and lets the SSL object go, ~10 KiB per end
 *   (see "TLS 1.3 records" below); TLS 1.2, and any end not clean yet, stays OpenSSL's.
 * - Flow control: when a send() is short, the rest waits in that socket's out buffer, the
 *   pump watches it for writability and stops reading the other socket until it drains.
 *   Ciphertext enters an incoming BIO at most BIO_SLICE at a time (memory BIOs keep their
 *   peak size), as in tlsengine.py.
 * - Half-close: an EOF (FIN, or close_notify for TLS) from one side becomes close_notify
 *   (TLS) and shutdown(SHUT_WR) on the other, after its pending bytes. Python is told with
 *   on_event("eof", side, "") and, once both directions have ended and everything is
 *   sent, on_event("done", -1, ""). Errors are on_event("reset", side, errno) and
 *   on_event("tls_error", side, reason). Python then calls close() (also for timeouts,
 *   drain and policy revocation), which unregisters and closes both descriptors.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stddef.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* Threads: the static scratch buffers below are shared by every pump of the process, which
 * is safe because all of them run on the one event-loop thread (they may call back into
 * Python mid-relay, so a second thread relaying with pumps would not be).
 */

/* ----------------------------------------------------------------- OpenSSL */
#include "pump/ossl.h"    /* every OpenSSL function, typed from OpenSSL's headers */
#include "pump/records.h" /* the own TLS 1.3 record layer (pure) */

#define TICKET_KEYS_LEN 80 /* key name 16, HMAC key 32, AES key 32 */
static int free_buffers_safe = 0; /* SSL_free_buffers without CVE-2024-4741 */
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

#define CHUNK (256 * 1024)           /* one recv() */
#define BIO_SLICE (17 * 1024)        /* > the largest TLS record */
#define WRITE_SLICE (16 * 1024)      /* one full TLS record of plaintext */
#define CIPHER_ROOM (CHUNK + CHUNK / 8) /* 256 KiB of plaintext as records, with headroom */

static char recv_buf[CHUNK];
static char plain_buf[CHUNK];
static char cipher_buf[CIPHER_ROOM];

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

/* ----------------------------------------------------------------- the poller */
/* One epoll set per event loop for every pumped socket; the loop watches only its fd
   (loop.add_reader(poller.fileno(), poller.run)), so a pumped socket costs the loop no
   handle objects, and a burst of events is one callback. */
typedef struct {
    PyObject_HEAD
    int epfd;
} Poller;

static PyTypeObject PollerType;

/* A socket in the poller's epoll set that is not a pump's (see "watches" below). */
#define WATCH_TAG ((uint64_t)1)

typedef struct {
    PyObject_HEAD
    PyObject *poller; /* the Poller (its epfd); NULL once closed */
    PyObject *callback;
    int fd;
    uint32_t events; /* EPOLLIN / EPOLLOUT as registered; 0 = not in the set */
} Watch;

static PyTypeObject WatchType;

/* ----------------------------------------------------------------- the pump object */
typedef struct PumpObject Pump;

typedef struct {
    Pump *owner;
    int index; /* 0 = client, 1 = upstream */
    int fd;
    SSL *ssl;
    BIO *rbio, *wbio;
    Records *rec;     /* the end's TLS records are ours (ssl is then NULL) */
    PyObject *sslobj; /* keeps the SSL alive (the _ssl._SSLSocket) */
    PyObject *adopt;  /* a Watch whose epoll entry for fd start() takes over, or NULL */
    char *out;        /* bytes waiting for this socket to become writable */
    size_t out_len, out_off, out_cap;
    int fin_in;           /* TCP FIN (or reset) seen */
    int eof_in;           /* the peer finished sending: FIN, or close_notify for TLS */
    int eof_out;          /* we asked to end our direction towards this peer */
    int shut_pending;     /* shutdown(SHUT_WR) once the out buffer drains */
    int shut_done;
    int reading, writing; /* watched in the poller's epoll set */
    unsigned bursts;      /* TLS bursts ended since the last tick (see burst_over) */
    int active;           /* a TLS burst ended since the last tick */
    int keeping;          /* busy: keeps its TLS buffers until a quiet tick */
    int tls_failed;       /* a TLS error was reported for this end */
    int lenient;          /* a FIN without close_notify ends its stream (not truncated) */
} End;

struct PumpObject {
    PyObject_HEAD
    End e[2]; /* 0 = client, 1 = upstream */
    PyObject *poller;
    PyObject *on_event;
    unsigned long long bytes[2];    /* plaintext from e[i] forwarded to the other */
    unsigned long long reported[2]; /* what take_counts() already returned */
    double last_active;             /* CLOCK_MONOTONIC seconds, as time.monotonic() */
    int started, closed, done_sent;
};

static double monotonic_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- calls back into Python ---------------------------------------------------------- */
static void pump_close_impl(Pump *p);

static void emit(Pump *p, const char *kind, int side, PyObject *detail) {
    if (p->closed || p->on_event == NULL) {
        return;
    }
    PyObject *cb = p->on_event;
    Py_INCREF(cb);
    PyObject *r = PyObject_CallFunction(cb, "siO", kind, side, detail ? detail : Py_None);
    Py_DECREF(cb);
    if (r == NULL) {
        PyErr_WriteUnraisable(cb);
        pump_close_impl(p); /* fail closed */
    } else {
        Py_DECREF(r);
    }
}

static void emit_str(Pump *p, const char *kind, int side, const char *text) {
    PyObject *s = PyUnicode_FromString(text);
    if (s == NULL) {
        PyErr_Clear();
    }
    emit(p, kind, side, s);
    Py_XDECREF(s);
}

static void emit_errno(Pump *p, int side, int err) {
    PyObject *n = PyLong_FromLong(err);
    if (n == NULL) {
        PyErr_Clear();
    }
    emit(p, "reset", side, n);
    Py_XDECREF(n);
}

/* SSL_get_error() needs an empty error queue before each TLS call. Emptying one that is
   empty already (nearly always) costs OpenSSL a walk of all its slots; looking is cheap. */
static void clear_errors(void) {
    if (ossl.ERR_peek_error() != 0) {
        ossl.ERR_clear_error();
    }
}

/* ---- close reasons: enforcer's words, from OpenSSL's error codes ---------------------
 * A TLS failure is reported with the name of its SSL_R_* reason code as OpenSSL 3.0's
 * headers spell it (a table built from the constants, so compiled in and checked): never
 * from ERR_reason_error_string(), whose words changed in OpenSSL 3.2-3.5 ("ssl/tls alert
 * handshake failure"). An alert received is SSL_R_* 1000 + its description. OpenSSL >= 3.2
 * reports a record layer failure as the record layer's own reason first, then
 * RECORD_LAYER_FAILURE on top: the cause is the first reason that is not that wrapper. */
/* The cause of a TLS failure in OpenSSL's error queue (emptied), as a reason name. */
static const char *queued_reason(char *buf, size_t room) {
    unsigned long e, cause = 0, first = 0;
    while ((e = ossl.ERR_get_error()) != 0) {
        first = first ? first : e;
        if (!cause && ERR_GET_LIB(e) == ERR_LIB_SSL &&
            ERR_GET_REASON(e) != SSL_R_RECORD_LAYER_FAILURE) {
            cause = e;
        }
    }
    cause = cause ? cause : first;
    if (cause == 0) {
        return "TLS_PROTOCOL_ERROR";
    }
    if (ERR_GET_LIB(cause) != ERR_LIB_SSL) {
        snprintf(buf, room, "LIB_%d_REASON_%d", ERR_GET_LIB(cause), ERR_GET_REASON(cause));
        return buf;
    }
    return tls_reason_name(ERR_GET_REASON(cause), buf, room);
}

/* Report the TLS failure OpenSSL's error queue holds for `side` (the queue is emptied). */
static void emit_tls_error(Pump *p, int side) {
    char buf[40];
    const char *reason = queued_reason(buf, sizeof buf);
    p->e[side].tls_failed = 1;
    emit_str(p, "tls_error", side, reason);
}

/* Start or stop watching one socket for one direction in the poller's epoll set. */
static int watch(Pump *p, int i, int writing, int on) {
    End *e = &p->e[i];
    int *flag = writing ? &e->writing : &e->reading;
    if (*flag == on || p->closed) {
        return 0;
    }
    int was = e->reading || e->writing;
    *flag = on;
    int now = e->reading || e->writing;
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = (e->reading ? EPOLLIN : 0) | (e->writing ? EPOLLOUT : 0);
    ev.data.ptr = e;
    int op = !was ? EPOLL_CTL_ADD : (now ? EPOLL_CTL_MOD : EPOLL_CTL_DEL);
    if (epoll_ctl(((Poller *)p->poller)->epfd, op, e->fd, &ev) < 0) {
        *flag = !on;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

/* A failure we cannot report any better: close everything (the connection fails). */
static void fatal(Pump *p) {
    PyErr_WriteUnraisable((PyObject *)p);
    emit_str(p, "internal", -1, "native relay: epoll registration failed");
    pump_close_impl(p);
}

/* ---- sending ------------------------------------------------------------------------- */
static int out_append(End *e, const char *data, size_t len) {
    size_t used = e->out_len - e->out_off;
    if (e->out_off > 0 && used > 0) {
        memmove(e->out, e->out + e->out_off, used);
    }
    e->out_off = 0;
    e->out_len = used;
    if (used + len > e->out_cap) {
        size_t cap = used + len;
        char *grown = realloc(e->out, cap);
        if (grown == NULL) {
            return -1;
        }
        e->out = grown;
        e->out_cap = cap;
    }
    memcpy(e->out + e->out_len, data, len);
    e->out_len += len;
    return 0;
}

static void out_free(End *e) {
    free(e->out);
    e->out = NULL;
    e->out_len = e->out_off = e->out_cap = 0;
}

static int has_out(End *e) { return e->out_len > e->out_off; }

/* Send data[*sent:len] as far as the socket takes it now, advancing *sent; 0 (all sent, or
   the socket is full), else the errno that ended the connection. */
static int send_some(int fd, const char *data, size_t len, size_t *sent) {
    while (*sent < len) {
        ssize_t n = send(fd, data + *sent, len - *sent, MSG_NOSIGNAL);
        if (n > 0) {
            *sent += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return 0;
        } else {
            return n < 0 ? errno : EPIPE;
        }
    }
    return 0;
}

/* Send to socket j, keeping what the kernel does not take; 0 ok, -1 failed (reported). */
static int send_to(Pump *p, int j, const char *data, size_t len) {
    End *d = &p->e[j];
    size_t sent = 0;
    if (!has_out(d)) {
        int err = send_some(d->fd, data, len, &sent);
        if (err) {
            emit_errno(p, j, err);
            return -1;
        }
    }
    if (sent == len) {
        return 0;
    }
    if (out_append(d, data + sent, len - sent) < 0) {
        emit_errno(p, j, ENOMEM);
        return -1;
    }
    /* Flow control: wait for j to drain before reading more from the other side. */
    if (watch(p, j, 1, 1) < 0 || watch(p, 1 - j, 0, 0) < 0) {
        fatal(p);
        return -1;
    }
    return 0;
}

/* ---- idle buffers -------------------------------------------------------------------- */
/* Bytes a memory BIO holds allocated (its peak size: it never shrinks by itself). */
static size_t bio_capacity(BIO *bio) {
    BUF_MEM *held = NULL;
    ossl.BIO_ctrl(bio, BIO_C_GET_BUF_MEM_PTR, 0, &held);
    return held == NULL ? 0 : held->max;
}

/* A drained memory BIO gets an empty buffer in place of its peak-sized one. */
static void shrink_bio(BIO *bio) {
    if (ossl.BIO_ctrl(bio, BIO_CTRL_PENDING, 0, NULL) != 0 || bio_capacity(bio) == 0) {
        return;
    }
    BUF_MEM *empty = ossl.BUF_MEM_new();
    if (empty != NULL) {
        ossl.BIO_ctrl(bio, BIO_C_SET_BUF_MEM, BIO_CLOSE, empty); /* frees the held one */
    }
}

/* ---- TLS 1.3 records after the handshake (the pump's own record layer) ---------------
 * Why: OpenSSL's SSL object costs a connection ~7.5 KiB for as long as it lives, and its
 * two AEAD contexts ~1.9 KiB more, idle or not (heaptrack: SSL_new is the largest single
 * allocation of an idle mutual-TLS connection). Once a TLS 1.3 handshake is over, all
 * that is left of TLS is record protection (RFC 8446 section 5): an AEAD key and IV per
 * direction, a sequence number per direction, the traffic secrets for KeyUpdate, and a
 * few post-handshake messages. So an end whose handshake is over takes its record layer
 * over from OpenSSL, and the SSL object is freed; the AEAD itself stays OpenSSL's (EVP).
 *
 * How it knows the state OpenSSL was in:
 * - Secrets: the context's keylog callback (SSL_CTX_set_keylog_callback, public API; the
 *   lines SSLKEYLOGFILE writes), set from C by track_records(), gives every tracked SSL's
 *   CLIENT_/SERVER_TRAFFIC_SECRET_0, kept in the SSL's ex_data slot until take-over. A
 *   context that already logs its keys for someone else (SSLKEYLOGFILE) is left alone:
 *   OpenSSL keeps its records. Nothing is ever read from OpenSSL's opaque structures.
 * - Sequence numbers: the SSL's message callback reports every record header read and
 *   written and every handshake message. Encrypted records (outer type 23) are counted
 *   per direction, and the count starts again after the record holding the Finished of
 *   that direction (the key change of RFC 8446 section 7.1; a key change falls on a record
 *   boundary). So the count is the next sequence number of the application keys.
 * - An end is taken over only from a clean state: TLS 1.3 with one of the three AEAD
 *   suites, both Finished seen, no KeyUpdate yet, nothing buffered in the SSL or its BIOs,
 *   no shutdown begun, and (a client) after the server's first record since the handshake
 *   (its NewSessionTickets, which OpenSSL stores for resumption). Otherwise OpenSSL keeps
 *   the end, as before. Handing back is never needed.
 * What it then does: application data both ways; close_notify both ways (a FIN without
 * one is the end of the stream, as with OpenSSL); any other alert fails the connection;
 * KeyUpdate from the peer (answered with ours when asked); NewSessionTicket ignored.
 * Anything else (a record too long, a bad tag, a message TLS 1.3 does not allow here)
 * fails the connection with the reason OpenSSL would give.
 */
typedef struct {
    unsigned char secret[2][48]; /* traffic secret 0: [0] client's, [1] server's */
    unsigned secret_len[2];
    uint64_t records[2];         /* encrypted records since the last key change: [0] read */
    unsigned finished[2];        /* Finished read / written */
    unsigned key_update;         /* a KeyUpdate went either way: no take-over */
    unsigned read_after;         /* a record read after the peer's Finished */
    unsigned refused;            /* not TLS 1.3 or not an AEAD suite we know */
} Tracker;

static int tracker_slot = -1;
static int records_ready = 0; /* bound with every function it needs */
static int records_on = 1;    /* own_records(False) leaves every end to OpenSSL */

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
        if (!w && t->finished[0]) {
            t->read_after = 1;
        }
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
static Records *records_from(SSL *ssl, BIO *rbio, BIO *wbio) {
    Tracker *t = ossl.SSL_get_ex_data(ssl, tracker_slot);
    if (t == NULL || t->refused || t->key_update || !t->finished[0] || !t->finished[1]) {
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

/* The TLS side gives back what only a burst needs: OpenSSL's record buffers (~17 KiB
   each; SSL_MODE_RELEASE_BUFFERS does not free them with memory BIOs) and the peak
   allocation of both memory BIOs, so an idle connection holds none of them (nginx and
   haproxy release theirs too). The next burst allocates them again. */
static void release_buffers(End *e) {
    if (e->rec != NULL) {
        records_release(e->rec);
        return;
    }
    shrink_bio(e->rbio);
    shrink_bio(e->wbio);
    if (free_buffers_safe) {
        ossl.SSL_free_buffers(e->ssl); /* refuses (0) while a record is part-read/written */
    }
}

/* When a burst is over (what one read event brought is relayed, or a write is done). Most
   connections then give their buffers back at once (above). A busy one (a keep-alive
   connection making requests back to back) would free and allocate them again for every
   request, ~3,400 of the ~28,000 user-space instructions a small request costs a sidecar
   (callgrind): an end that has ended more than busy_bursts bursts since the plane's last
   tick (Pump.tick(), every second) keeps them instead, and gives them back at the first
   tick it has been quiet for. At most busy_ends ends of the process keep theirs at a time
   (~35 KiB each), so many moderately busy connections cannot hold memory that idle ones
   would not. */
static unsigned busy_bursts = 8;
static int busy_ends = 256;
static int keeping_ends = 0; /* ends of the process keeping their buffers now */

static void stop_keeping(End *e) {
    if (e->keeping) {
        e->keeping = 0;
        keeping_ends--;
    }
}

static void burst_over(End *e) {
    e->active = 1;
    if (e->keeping) {
        return;
    }
    if (++e->bursts > busy_bursts && keeping_ends < busy_ends) {
        e->keeping = 1;
        keeping_ends++;
        return;
    }
    release_buffers(e);
}

/* Whatever the TLS state machine wrote (records, alerts, close_notify) goes out to j. */
static int flush_wbio(Pump *p, int j) {
    End *d = &p->e[j];
    for (;;) {
        int n = ossl.BIO_read(d->wbio, cipher_buf, CIPHER_ROOM);
        if (n <= 0) {
            return 0;
        }
        if (send_to(p, j, cipher_buf, (size_t)n) < 0) {
            return -1;
        }
    }
}

static int seal_and_send(Pump *p, int j, int type, const char *data, size_t len);

/* Plaintext read from side i goes to the other side, encrypted when that side is TLS. */
static int forward(Pump *p, int i, const char *data, size_t len) {
    int j = 1 - i;
    End *d = &p->e[j];
    p->bytes[i] += len;
    if (d->eof_out) {
        return 0; /* cannot happen: side i ended before we ended towards j */
    }
    if (d->rec != NULL) {
        if (len > 0 && seal_and_send(p, j, RT_APPLICATION_DATA, data, len) < 0) {
            return -1;
        }
        burst_over(d);
        return 0;
    }
    if (d->ssl == NULL) {
        return send_to(p, j, data, len);
    }
    size_t off = 0, filled = 0;
    while (off < len) {
        int slice = (int)(len - off < WRITE_SLICE ? len - off : WRITE_SLICE);
        clear_errors();
        int w = ossl.SSL_write(d->ssl, data + off, slice);
        if (w <= 0) {
            emit_tls_error(p, j);
            return -1;
        }
        off += (size_t)w;
        int n = ossl.BIO_read(d->wbio, cipher_buf + filled, (int)(CIPHER_ROOM - filled));
        if (n > 0) {
            filled += (size_t)n;
        }
        if (CIPHER_ROOM - filled < 2 * WRITE_SLICE) {
            if (send_to(p, j, cipher_buf, filled) < 0) {
                return -1;
            }
            filled = 0;
        }
    }
    if (filled && send_to(p, j, cipher_buf, filled) < 0) {
        return -1;
    }
    if (flush_wbio(p, j) < 0) { /* anything a slice did not fit */
        return -1;
    }
    burst_over(d);
    return 0;
}

/* ---- ending a direction -------------------------------------------------------------- */
static void check_done(Pump *p) {
    End *a = &p->e[0], *b = &p->e[1];
    if (p->closed || p->done_sent) {
        return;
    }
    if (a->eof_in && b->eof_in && a->shut_done && b->shut_done && !has_out(a) && !has_out(b)) {
        p->done_sent = 1;
        emit(p, "done", -1, NULL);
    }
}

static void finish_shutdown(Pump *p, int j) {
    End *d = &p->e[j];
    if (!d->shut_pending || has_out(d)) {
        return;
    }
    d->shut_pending = 0;
    d->shut_done = 1;
    if (shutdown(d->fd, SHUT_WR) < 0 && errno != ENOTCONN) {
        emit_errno(p, j, errno);
    }
}

/* End our direction towards j: close_notify (TLS) then FIN once everything is sent. */
static void send_eof(Pump *p, int j) {
    End *d = &p->e[j];
    if (d->eof_out) {
        return;
    }
    d->eof_out = 1;
    if (d->rec != NULL) {
        static const char close_notify[2] = {1, 0};
        if (seal_and_send(p, j, RT_ALERT, close_notify, sizeof close_notify) < 0) {
            return;
        }
    } else if (d->ssl != NULL) {
        ossl.ERR_clear_error();
        ossl.SSL_shutdown(d->ssl); /* queues close_notify; the reply is not awaited */
        ossl.ERR_clear_error();
        if (flush_wbio(p, j) < 0) {
            return;
        }
    }
    d->shut_pending = 1;
    finish_shutdown(p, j);
}

static void got_eof(Pump *p, int i) {
    End *s = &p->e[i];
    if (s->eof_in) {
        return;
    }
    s->eof_in = 1;
    if (watch(p, i, 0, 0) < 0) {
        fatal(p);
        return;
    }
    emit(p, "eof", i, NULL);
    if (p->closed) {
        return;
    }
    send_eof(p, 1 - i);
    if (!p->closed) {
        check_done(p);
    }
}

/* ---- the pump's side of its own records ----------------------------------------------- */
static int tls_end(const End *e) { return e->ssl != NULL || e->rec != NULL; }

/* After a burst (or at start): an end OpenSSL no longer needs to keep is taken over and its
   SSL object let go (freed once Python holds no reference either). */
static void take_over(Pump *p, int i) {
    End *e = &p->e[i];
    if (!records_on || !records_ready || e->ssl == NULL || p->closed || e->fin_in ||
        e->eof_in || e->eof_out) {
        return;
    }
    Records *r = records_from(e->ssl, e->rbio, e->wbio);
    if (r == NULL) {
        return;
    }
    /* freed without close_notify, OpenSSL would drop the session from the cache; a server
       end keeps the session's id to drop it itself should the connection fail in TLS */
    if (r->server) {
        SSL_CTX *ctx = ossl.SSL_get_SSL_CTX(e->ssl);
        SSL_SESSION *session = ossl.SSL_get_session(e->ssl);
        unsigned len = 0;
        const unsigned char *id = session ? ossl.SSL_SESSION_get_id(session, &len) : NULL;
        if (id != NULL && len > 0 && len <= sizeof r->session_id && ctx != NULL &&
            ossl.SSL_CTX_up_ref(ctx) == 1) {
            memcpy(r->session_id, id, len);
            r->session_id_len = len;
            r->session_ctx = ctx;
        }
    }
    ossl.SSL_set_shutdown(e->ssl, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
    e->rec = r;
    e->ssl = NULL;
    e->rbio = e->wbio = NULL;
    Py_CLEAR(e->sslobj);
}

/* An own-records end failed in TLS: as with OpenSSL's SSL_free after a failure, a server
   end's session leaves the cache (pump_close_impl keeps it otherwise); then report. */
static void records_failed(Pump *p, int i, const char *why) {
    Records *r = p->e[i].rec;
    p->e[i].tls_failed = 1;
    SSL_SESSION *probe = r != NULL && r->session_ctx != NULL ? ossl.SSL_SESSION_new() : NULL;
    if (probe != NULL) { /* the cache finds its session by id and version */
        if (ossl.SSL_SESSION_set1_id(probe, r->session_id, r->session_id_len) == 1 &&
            ossl.SSL_SESSION_set_protocol_version(probe, TLS13_VERSION) == 1) {
            ossl.SSL_CTX_remove_session(r->session_ctx, probe);
        }
        ossl.SSL_SESSION_free(probe);
        ossl.ERR_clear_error();
    }
    if (*why != '\0') {
        emit_str(p, "tls_error", i, why);
    }
}

/* Encrypt data[0:len] towards j as records, sending as cipher_buf fills. 0 ok, -1 failed. */
static int seal_and_send(Pump *p, int j, int type, const char *data, size_t len) {
    Records *r = p->e[j].rec;
    size_t off = 0, filled = 0;
    if (type != RT_HANDSHAKE) {
        r->answered = 0; /* a KeyUpdate request after this needs an answer again */
    }
    do {
        size_t n = len - off < RECORD_PLAIN ? len - off : RECORD_PLAIN;
        int w = records_seal(r, type, (const unsigned char *)data + off, n,
                            (unsigned char *)cipher_buf + filled);
        if (w < 0) {
            records_failed(p, j, "internal error: record encryption failed");
            return -1;
        }
        off += n;
        filled += (size_t)w;
        if (CIPHER_ROOM - filled < RECORD_PLAIN + 64 || off == len) {
            if (send_to(p, j, cipher_buf, filled) < 0) {
                return -1;
            }
            filled = 0;
        }
    } while (off < len);
    return 0;
}





/* Before an own-records end fails: the fatal alert towards it, and nothing after. */
static void send_alert(Pump *p, int i, const char *why) {
    End *s = &p->e[i];
    int alert = records_alert_for(why);
    if (alert < 0 || s->eof_out || s->rec == NULL) {
        return;
    }
    const char record[2] = {2 /* fatal */, (char)alert};
    s->eof_out = 1;
    seal_and_send(p, i, RT_ALERT, record, sizeof record);
}

/* The record layer's callbacks (records.h) for side i: its application data goes to the
   other side; our KeyUpdate answer goes to side i, unless our direction has ended. */
static int relay_data(void *arg, const unsigned char *plain, size_t len) {
    End *s = arg;
    Pump *p = s->owner;
    return forward(p, s->index, (const char *)plain, len) < 0 || p->closed ? -1 : 0;
}

static int relay_key_update(void *arg) {
    static const unsigned char ours[5] = {HS_KEY_UPDATE, 0, 0, 1, 0}; /* not requested */
    End *s = arg;
    Pump *p = s->owner;
    if (s->eof_out) {
        return 1;
    }
    if (seal_and_send(p, s->index, RT_HANDSHAKE, (const char *)ours, sizeof ours) < 0 ||
        p->closed) {
        return -1;
    }
    return 0;
}

/* Side i's records in `len` new bytes (and a record begun earlier), forwarding as we go:
   the counterpart of tls_in() for an end whose records are ours. */
static void records_in(Pump *p, int i, const char *data, size_t len) {
    End *s = &p->e[i];
    RecordSink sink = {s, relay_data, relay_key_update};
    const char *why = NULL;
    int status = records_input(s->rec, (const unsigned char *)data, len,
                               (unsigned char *)plain_buf, CHUNK, &sink, &why);
    if (status == RECORDS_STOPPED || p->closed) {
        return;
    }
    if (status == RECORDS_FAILED) {
        send_alert(p, i, why);
        if (!p->closed) {
            records_failed(p, i, why);
        }
        return;
    }
    burst_over(s);
    if (status == RECORDS_CLOSE_NOTIFY) {
        got_eof(p, i); /* close_notify (a FIN is unclean_eof's) */
    }
}


/* ---- receiving ----------------------------------------------------------------------- */
/* Decrypt what side i's BIO holds plus `len` new bytes of ciphertext, forwarding as we go. */
static void tls_in(Pump *p, int i, const char *data, size_t len) {
    End *s = &p->e[i];
    size_t off = 0, filled = 0;
    int eof = 0;
    for (;;) {
        long pending = ossl.BIO_ctrl(s->rbio, BIO_CTRL_PENDING, 0, NULL);
        if (off < len && pending < BIO_SLICE) {
            size_t room = (size_t)(BIO_SLICE - pending);
            size_t k = len - off < room ? len - off : room;
            ossl.BIO_write(s->rbio, data + off, (int)k);
            off += k;
        }
        clear_errors();
        int r = ossl.SSL_read(s->ssl, plain_buf + filled, (int)(CHUNK - filled));
        if (r > 0) {
            filled += (size_t)r;
            if (filled == CHUNK) {
                if (forward(p, i, plain_buf, filled) < 0 || p->closed) {
                    return;
                }
                filled = 0;
            }
            continue;
        }
        int err = ossl.SSL_get_error(s->ssl, r);
        if (err == SSL_ERROR_WANT_READ) {
            if (off < len) {
                continue;
            }
            break;
        }
        if (err == SSL_ERROR_ZERO_RETURN) {
            ossl.ERR_clear_error();
            eof = 1; /* close_notify (a FIN never reaches OpenSSL: see unclean_eof) */
            break;
        }
        char buf[40];
        const char *why = queued_reason(buf, sizeof buf);
        if (filled && (forward(p, i, plain_buf, filled) < 0 || p->closed)) {
            return;
        }
        /* the fatal alert OpenSSL wrote (bad_record_mac, record_overflow...) goes first */
        if (!s->eof_out && flush_wbio(p, i) < 0) {
            return;
        }
        s->eof_out = 1; /* nothing may follow a fatal alert */
        s->tls_failed = 1;
        emit_str(p, "tls_error", i, why);
        return;
    }
    if (filled && (forward(p, i, plain_buf, filled) < 0 || p->closed)) {
        return;
    }
    /* post-handshake messages (key updates) may have produced a reply */
    if (ossl.BIO_ctrl(s->wbio, BIO_CTRL_PENDING, 0, NULL) > 0 && !s->eof_out &&
        flush_wbio(p, i) < 0) {
        return;
    }
    if (p->closed) {
        return;
    }
    burst_over(s);
    if (eof) {
        got_eof(p, i);
    } else {
        take_over(p, i);
    }
}

/* A TCP FIN from a TLS end that sent no close_notify (that one would have ended reading:
   got_eof). Mid-record (part of a record or of a handshake message held), the stream was
   cut: "truncated". On a record boundary it is "eof_without_close_notify", which a
   lenient end (the listener's or upstream's tls.allow_eof_without_close_notify) takes as
   the end of its stream, as a FIN. Otherwise both sockets are set to reset on close
   (SO_LINGER 0) and Python is told: it fails the connection, and the other side gets an
   RST, never a clean end it could mistake for the whole stream. */
static void unclean_eof(Pump *p, int i) {
    End *s = &p->e[i];
    int truncated = s->rec != NULL
                        ? s->rec->part_len > 0 || s->rec->hs_len > 0
                        : ossl.SSL_has_pending(s->ssl) ||
                              ossl.BIO_ctrl(s->rbio, BIO_CTRL_PENDING, 0, NULL) > 0;
    if (!truncated && s->lenient) {
        got_eof(p, i);
        return;
    }
    static const struct linger reset = {1, 0};
    for (int k = 0; k < 2; k++) {
        if (p->e[k].fd >= 0) {
            setsockopt(p->e[k].fd, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
        }
    }
    if (watch(p, i, 0, 0) < 0) {
        fatal(p);
        return;
    }
    emit_str(p, "unclean", i, truncated ? "truncated" : "eof_without_close_notify");
}

static void on_readable(Pump *p, int i) {
    End *s = &p->e[i];
    if (p->closed || s->eof_in) {
        return;
    }
    ssize_t n;
    do {
        n = recv(s->fd, recv_buf, CHUNK, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return;
        }
        emit_errno(p, i, errno);
        return;
    }
    p->last_active = monotonic_now();
    if (n == 0) {
        s->fin_in = 1;
        if (!tls_end(s)) {
            got_eof(p, i);
        } else {
            unclean_eof(p, i);
        }
        return;
    }
    if (s->rec != NULL) {
        records_in(p, i, recv_buf, (size_t)n);
    } else if (s->ssl != NULL) {
        tls_in(p, i, recv_buf, (size_t)n);
    } else {
        forward(p, i, recv_buf, (size_t)n);
    }
}

static void on_writable(Pump *p, int j) {
    End *d = &p->e[j];
    if (p->closed) {
        return;
    }
    int err = send_some(d->fd, d->out, d->out_len, &d->out_off);
    if (err) {
        emit_errno(p, j, err);
        return;
    }
    if (has_out(d)) {
        return; /* still full: wait for the next writable event */
    }
    out_free(d); /* an idle connection keeps no buffer */
    p->last_active = monotonic_now();
    if (watch(p, j, 1, 0) < 0) {
        fatal(p);
        return;
    }
    finish_shutdown(p, j);
    if (p->closed) {
        return;
    }
    if (!p->e[1 - j].eof_in && watch(p, 1 - j, 0, 1) < 0) {
        fatal(p);
        return;
    }
    check_done(p);
}

/* ---- Python methods ------------------------------------------------------------------ */
static void pump_close_impl(Pump *p) {
    if (p->closed) {
        return;
    }
    for (int i = 0; i < 2; i++) {
        End *e = &p->e[i];
        if ((e->reading || e->writing) && p->poller != NULL) {
            /* while still open: the epoll set forgets the fd before it is closed */
            epoll_ctl(((Poller *)p->poller)->epfd, EPOLL_CTL_DEL, e->fd, NULL);
            e->reading = e->writing = 0;
        }
    }
    p->closed = 1;
    /* The listener's end, still OpenSSL's, keeps its session in the cache although no
       close_notify went (a reset, a timeout), unless it failed in TLS (as nginx does; with
       the SSL object taken over this was done then, see take_over). */
    if (p->e[0].ssl != NULL && !p->e[0].tls_failed) {
        ossl.SSL_set_shutdown(p->e[0].ssl, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
    }
    for (int i = 0; i < 2; i++) {
        End *e = &p->e[i];
        if (e->fd >= 0) {
            close(e->fd);
            e->fd = -1;
        }
        out_free(e);
        stop_keeping(e);
        Py_CLEAR(e->sslobj);
        Py_CLEAR(e->adopt);
        e->ssl = NULL;
        if (e->rec != NULL) {
            records_free(e->rec);
            e->rec = NULL;
        }
    }
    Py_CLEAR(p->on_event);
    Py_CLEAR(p->poller);
}

/* Take over the epoll entry a Watch has for this end's socket (one EPOLL_CTL_MOD instead
   of the Watch's DEL and our ADD): from now on its events come to the pump, and the Watch
   is left closed (no entry, no callback). A Watch not in the set is an ordinary ADD. */
static int adopt_entry(Pump *p, int i) {
    End *e = &p->e[i];
    Watch *w = (Watch *)e->adopt;
    e->adopt = NULL;
    if (w->events == 0 || w->poller == NULL) {
        Py_DECREF(w);
        return watch(p, i, 0, 1);
    }
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN;
    ev.data.ptr = e;
    if (epoll_ctl(((Poller *)p->poller)->epfd, EPOLL_CTL_MOD, e->fd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(w);
        return -1;
    }
    e->reading = 1;
    w->events = 0;
    Py_CLEAR(w->callback);
    Py_CLEAR(w->poller);
    Py_DECREF(w); /* the epoll entry's reference, now the pump's */
    Py_DECREF(w); /* ours */
    return 0;
}

static PyObject *Pump_start(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    Pump *p = (Pump *)self;
    if (p->started || p->closed) {
        PyErr_SetString(PyExc_RuntimeError, "pump already started or closed");
        return NULL;
    }
    p->started = 1;
    p->last_active = monotonic_now();
    for (int i = 0; i < 2 && !p->closed; i++) {
        if ((p->e[i].adopt != NULL ? adopt_entry(p, i) : watch(p, i, 0, 1)) < 0) {
            /* unregister what was registered and close both descriptors, keeping the
               error: the caller fails the connection */
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            pump_close_impl(p);
            PyErr_Restore(type, value, tb);
            return NULL;
        }
    }
    /* Plaintext the handshake reads left in the SSL or its BIO goes first. */
    Py_INCREF(self);
    for (int i = 0; i < 2 && !p->closed; i++) {
        if (p->e[i].ssl != NULL) {
            tls_in(p, i, NULL, 0);
        }
    }
    Py_DECREF(self);
    Py_RETURN_NONE;
}

/* close(reset=False): with reset, SO_LINGER 0 makes the kernel's close send RST, not FIN
   (limits.timeout_close: rst). */
static PyObject *Pump_close(PyObject *self, PyObject *args) {
    Pump *p = (Pump *)self;
    int reset = 0;
    if (!PyArg_ParseTuple(args, "|p:close", &reset)) {
        return NULL;
    }
    for (int i = 0; i < 2 && reset && !p->closed; i++) {
        struct linger now = {1, 0};
        if (p->e[i].fd >= 0) { /* a failure (the peer reset first) leaves a plain close */
            (void)setsockopt(p->e[i].fd, SOL_SOCKET, SO_LINGER, &now, sizeof now);
        }
    }
    pump_close_impl(p);
    Py_RETURN_NONE;
}

static PyObject *Pump_take_counts(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    Pump *p = (Pump *)self;
    unsigned long long d0 = p->bytes[0] - p->reported[0], d1 = p->bytes[1] - p->reported[1];
    p->reported[0] = p->bytes[0];
    p->reported[1] = p->bytes[1];
    return Py_BuildValue("(KK)", d0, d1);
}

/* The plane's periodic visit: an end that kept its buffers and has been quiet since the
   last visit gives them back; every end's burst count starts again; a TLS end still
   OpenSSL's is taken over if it can be now. */
static PyObject *Pump_tick(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    Pump *p = (Pump *)self;
    for (int i = 0; i < 2 && !p->closed; i++) {
        End *e = &p->e[i];
        if (e->keeping && !e->active) {
            stop_keeping(e);
            release_buffers(e);
        }
        e->bursts = 0;
        e->active = 0;
        take_over(p, i); /* an end not clean enough when its last burst ended */
    }
    Py_RETURN_NONE;
}

static PyObject *Pump_get_keeping(PyObject *self, void *Py_UNUSED(closure)) {
    Pump *p = (Pump *)self;
    return PyLong_FromLong(p->e[0].keeping + p->e[1].keeping);
}

static PyObject *Pump_get_own_records(PyObject *self, void *Py_UNUSED(closure)) {
    Pump *p = (Pump *)self;
    return PyLong_FromLong((p->e[0].rec != NULL) + (p->e[1].rec != NULL));
}

static PyObject *Pump_get_cipher_contexts(PyObject *self, void *Py_UNUSED(closure)) {
    Pump *p = (Pump *)self;
    long held = 0;
    for (int i = 0; i < 2; i++) {
        Records *r = p->closed ? NULL : p->e[i].rec;
        held += r != NULL ? (r->dir[0].ctx != NULL) + (r->dir[1].ctx != NULL) : 0;
    }
    return PyLong_FromLong(held);
}

static PyObject *Pump_get_last_active(PyObject *self, void *Py_UNUSED(closure)) {
    return PyFloat_FromDouble(((Pump *)self)->last_active);
}

static PyObject *Pump_get_buffered(PyObject *self, void *Py_UNUSED(closure)) {
    Pump *p = (Pump *)self;
    return PyLong_FromSize_t(p->e[0].out_cap + p->e[1].out_cap);
}

static PyObject *Pump_get_bio_bytes(PyObject *self, void *Py_UNUSED(closure)) {
    Pump *p = (Pump *)self;
    size_t held = 0;
    for (int i = 0; i < 2; i++) {
        if (p->e[i].ssl != NULL && !p->closed) {
            held += bio_capacity(p->e[i].rbio) + bio_capacity(p->e[i].wbio);
        } else if (p->e[i].rec != NULL && !p->closed) {
            held += records_bytes(p->e[i].rec);
        }
    }
    return PyLong_FromSize_t(held);
}

static SSL *ssl_of(PyObject *triple, BIO **rbio, BIO **wbio, PyObject **inner);

static int require_bound(void) {
    if (!ossl_bound) {
        PyErr_SetString(PyExc_RuntimeError, "bind() has not succeeded");
    }
    return ossl_bound;
}

static int Pump_init(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"client_fd", "client_tls", "upstream_fd", "upstream_tls", "poller",
                             "on_event", "client_watch", "upstream_watch", "client_lenient",
                             "upstream_lenient", NULL};
    Pump *p = (Pump *)self;
    int fds[2], lenient[2] = {0, 0};
    PyObject *tls[2], *poller, *on_event, *watches[2] = {Py_None, Py_None};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOiOOO|OOpp", kwlist, &fds[0], &tls[0],
                                     &fds[1], &tls[1], &poller, &on_event, &watches[0],
                                     &watches[1], &lenient[0], &lenient[1])) {
        return -1;
    }
    for (int i = 0; i < 2; i++) {
        Watch *w = (Watch *)watches[i];
        if (watches[i] != Py_None &&
            (!PyObject_TypeCheck(watches[i], &WatchType) || w->poller != poller ||
             w->fd != fds[i])) {
            PyErr_SetString(PyExc_TypeError, "a watch must be of the same poller and socket");
            return -1;
        }
    }
    if (!require_bound()) {
        return -1;
    }
    if (!PyObject_TypeCheck(poller, &PollerType) || ((Poller *)poller)->epfd < 0) {
        PyErr_SetString(PyExc_TypeError, "poller must be an open Poller");
        return -1;
    }
    if (p->poller != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Pump.__init__ called twice");
        return -1;
    }
    for (int i = 0; i < 2; i++) {
        End *e = &p->e[i];
        e->fd = -1;
        if (tls[i] != Py_None) {
            e->ssl = ssl_of(tls[i], &e->rbio, &e->wbio, &e->sslobj);
            if (e->ssl == NULL) {
                return -1;
            }
        }
    }
    p->e[0].fd = fds[0];
    p->e[1].fd = fds[1];
    p->e[0].lenient = lenient[0];
    p->e[1].lenient = lenient[1];
    for (int i = 0; i < 2; i++) {
        if (watches[i] != Py_None) {
            Py_INCREF(watches[i]);
            Py_XSETREF(p->e[i].adopt, watches[i]);
        }
    }
    Py_INCREF(poller);
    p->poller = poller;
    Py_INCREF(on_event);
    p->on_event = on_event;
    return 0;
}

static int Pump_traverse(PyObject *self, visitproc visit, void *arg) {
    Pump *p = (Pump *)self;
    Py_VISIT(p->poller);
    Py_VISIT(p->on_event);
    Py_VISIT(p->e[0].sslobj);
    Py_VISIT(p->e[1].sslobj);
    Py_VISIT(p->e[0].adopt);
    Py_VISIT(p->e[1].adopt);
    return 0;
}

static int Pump_clear(PyObject *self) {
    Pump *p = (Pump *)self;
    Py_CLEAR(p->on_event);
    return 0;
}

static void Pump_dealloc(PyObject *self) {
    Pump *p = (Pump *)self;
    PyObject_GC_UnTrack(self);
    if (!p->closed) {
        /* never normally: Python closes every pump. No Python is called from here. */
        Py_CLEAR(p->on_event);
        pump_close_impl(p);
    }
    Py_TYPE(self)->tp_free(self);
}

static PyObject *Pump_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Pump *p = (Pump *)type->tp_alloc(type, 0);
    if (p != NULL) {
        for (int i = 0; i < 2; i++) {
            p->e[i].owner = p;
            p->e[i].index = i;
            p->e[i].fd = -1;
        }
    }
    return (PyObject *)p;
}

static PyMethodDef Pump_methods[] = {
    {"start", Pump_start, METH_NOARGS, "Register with the loop and relay what is buffered."},
    {"close", Pump_close, METH_VARARGS,
     "close(reset=False): unregister and close both descriptors (idempotent); reset: RST."},
    {"take_counts", Pump_take_counts, METH_NOARGS,
     "Plaintext bytes (from client, to client) relayed since the last call."},
    {"tick", Pump_tick, METH_NOARGS,
     "Periodic visit: a busy TLS end quiet since the last one gives its buffers back."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Pump_getset[] = {
    {"last_active", Pump_get_last_active, NULL, "time.monotonic() of the last I/O", NULL},
    {"buffered", Pump_get_buffered, NULL, "bytes of out buffers allocated now", NULL},
    {"bio_bytes", Pump_get_bio_bytes, NULL, "bytes the memory BIOs hold allocated now", NULL},
    {"keeping", Pump_get_keeping, NULL, "TLS ends keeping their buffers as busy (0-2)", NULL},
    {"own_records", Pump_get_own_records, NULL,
     "TLS ends whose records the pump protects itself, their SSL let go (0-2)", NULL},
    {"cipher_contexts", Pump_get_cipher_contexts, NULL,
     "AEAD contexts those ends hold now (0-4; a quiet end holds none)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PumpType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "enforcer.dataplane._pump.Pump",
    .tp_basicsize = sizeof(Pump),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Relays one connection's two sockets in C (see the module comment).",
    .tp_new = Pump_new,
    .tp_init = Pump_init,
    .tp_dealloc = Pump_dealloc,
    .tp_traverse = Pump_traverse,
    .tp_clear = Pump_clear,
    .tp_methods = Pump_methods,
    .tp_getset = Pump_getset,
};

/* ---- watches: sockets of connections that are not pumped yet ------------------------- */
/* A Watch puts one more socket in the poller's epoll set and calls back into Python when
   it is ready: the bare sockets of rawtransport.py (a connect in progress, an upstream TLS
   handshake) use it instead of loop.add_reader/add_writer, each registration of which
   costs uvloop a poll handle, an ioctl and an add/delete probe of the descriptor. Its
   epoll entry carries the Watch's address with the low bit set (a Pump's End is never odd),
   and holds a reference to the Watch while registered. callback(readable, writable). */
/* (WATCH_TAG and the Watch struct are defined near the top, before the pump uses them.) */

static PyObject *event_owner(uint64_t tag) {
    if (tag & WATCH_TAG) {
        return (PyObject *)(uintptr_t)(tag & ~WATCH_TAG);
    }
    return (PyObject *)((End *)(uintptr_t)tag)->owner;
}

static void watch_event(Watch *w, uint32_t m) {
    if (w->callback == NULL || w->events == 0) {
        return;
    }
    int err = (m & (EPOLLERR | EPOLLHUP)) != 0;
    int readable = (w->events & EPOLLIN) && ((m & EPOLLIN) || err);
    int writable = (w->events & EPOLLOUT) && ((m & EPOLLOUT) || err);
    if (!readable && !writable) {
        return;
    }
    PyObject *cb = w->callback;
    Py_INCREF(cb);
    PyObject *r = PyObject_CallFunction(cb, "OO", readable ? Py_True : Py_False,
                                        writable ? Py_True : Py_False);
    Py_DECREF(cb);
    if (r == NULL) {
        PyErr_WriteUnraisable(cb);
    } else {
        Py_DECREF(r);
    }
}

/* Register for exactly these events (0: leave the set). */
static int watch_update(Watch *w, uint32_t events) {
    if (w->poller == NULL) {
        if (events == 0) {
            return 0;
        }
        PyErr_SetString(PyExc_ValueError, "the watch is closed");
        return -1;
    }
    if (events == w->events) {
        return 0;
    }
    int epfd = ((Poller *)w->poller)->epfd;
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = events;
    ev.data.u64 = (uint64_t)(uintptr_t)w | WATCH_TAG;
    int op = w->events == 0 ? EPOLL_CTL_ADD : (events ? EPOLL_CTL_MOD : EPOLL_CTL_DEL);
    if (epfd < 0 || epoll_ctl(epfd, op, w->fd, &ev) < 0) {
        if (epfd < 0) {
            errno = EBADF;
        }
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (w->events == 0) {
        Py_INCREF(w); /* the epoll entry's reference */
    }
    w->events = events;
    if (events == 0) {
        Py_DECREF(w);
    }
    return 0;
}

static PyObject *Watch_set(PyObject *self, PyObject *args) {
    int readable, writable;
    if (!PyArg_ParseTuple(args, "pp:set", &readable, &writable)) {
        return NULL;
    }
    if (watch_update((Watch *)self, (readable ? EPOLLIN : 0) | (writable ? EPOLLOUT : 0)) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *Watch_set_callback(PyObject *self, PyObject *callback) {
    Watch *w = (Watch *)self;
    if (!PyCallable_Check(callback)) {
        PyErr_SetString(PyExc_TypeError, "the callback must be callable");
        return NULL;
    }
    if (w->poller == NULL) {
        PyErr_SetString(PyExc_ValueError, "the watch is closed");
        return NULL;
    }
    Py_INCREF(callback);
    Py_XSETREF(w->callback, callback);
    Py_RETURN_NONE;
}

static PyObject *Watch_close(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    Watch *w = (Watch *)self;
    Py_INCREF(self);
    if (w->events != 0 && watch_update(w, 0) < 0) {
        PyErr_Clear(); /* the fd is closing anyway; the entry goes with it */
        w->events = 0;
        Py_DECREF(self);
    }
    Py_CLEAR(w->callback);
    Py_CLEAR(w->poller);
    Py_DECREF(self);
    Py_RETURN_NONE;
}

static int Watch_traverse(PyObject *self, visitproc visit, void *arg) {
    Py_VISIT(((Watch *)self)->callback);
    Py_VISIT(((Watch *)self)->poller);
    return 0;
}

static int Watch_clear(PyObject *self) {
    Py_CLEAR(((Watch *)self)->callback);
    return 0;
}

static void Watch_dealloc(PyObject *self) {
    Watch *w = (Watch *)self;
    PyObject_GC_UnTrack(self);
    Py_CLEAR(w->callback);
    Py_CLEAR(w->poller);
    Py_TYPE(self)->tp_free(self);
}

static PyMethodDef Watch_methods[] = {
    {"set", Watch_set, METH_VARARGS, "set(readable, writable): what to be called for."},
    {"set_callback", Watch_set_callback, METH_O, "Call this instead from now on."},
    {"close", Watch_close, METH_NOARGS, "Leave the epoll set and drop the callback."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WatchType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "enforcer.dataplane._pump.Watch",
    .tp_basicsize = sizeof(Watch),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A socket in a poller's epoll set, with a Python callback (Poller.watch).",
    .tp_traverse = Watch_traverse,
    .tp_clear = Watch_clear,
    .tp_dealloc = Watch_dealloc,
    .tp_methods = Watch_methods,
};

static PyObject *Poller_watch(PyObject *self, PyObject *args) {
    int fd;
    PyObject *callback;
    if (!PyArg_ParseTuple(args, "iO:watch", &fd, &callback)) {
        return NULL;
    }
    if (fd < 0 || !PyCallable_Check(callback)) {
        PyErr_SetString(PyExc_ValueError, "watch(fd, callback) needs a descriptor and a callable");
        return NULL;
    }
    Watch *w = PyObject_GC_New(Watch, &WatchType);
    if (w == NULL) {
        return NULL;
    }
    w->fd = fd;
    w->events = 0;
    Py_INCREF(self);
    w->poller = self;
    Py_INCREF(callback);
    w->callback = callback;
    PyObject_GC_Track((PyObject *)w);
    return (PyObject *)w;
}

/* ---- the poller ---------------------------------------------------------------------- */
static PyObject *Poller_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    if (!PyArg_ParseTuple(args, ":Poller")) {
        return NULL;
    }
    Poller *self = (Poller *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (self->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void Poller_dealloc(PyObject *self) {
    Poller *poller = (Poller *)self;
    if (poller->epfd >= 0) {
        close(poller->epfd);
    }
    Py_TYPE(self)->tp_free(self);
}

#define POLL_BATCH 64

/* The loop's callback: relay whatever is ready now, at most POLL_BATCH sockets (the loop
   calls again while more are ready: the epoll fd stays readable). Every pump in the batch
   is held for the whole batch, so one closing another's connection cannot free it. */
static PyObject *Poller_run(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    Poller *poller = (Poller *)self;
    struct epoll_event evs[POLL_BATCH];
    if (poller->epfd < 0) {
        Py_RETURN_NONE;
    }
    int n = epoll_wait(poller->epfd, evs, POLL_BATCH, 0);
    if (n < 0) {
        if (errno == EINTR) {
            Py_RETURN_NONE;
        }
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    for (int k = 0; k < n; k++) {
        Py_INCREF(event_owner(evs[k].data.u64));
    }
    for (int k = 0; k < n; k++) {
        uint64_t tag = evs[k].data.u64;
        uint32_t m = evs[k].events;
        if (tag & WATCH_TAG) {
            watch_event((Watch *)(uintptr_t)(tag & ~WATCH_TAG), m);
            continue;
        }
        End *e = (End *)(uintptr_t)tag;
        Pump *p = e->owner;
        if (!p->closed && e->writing && (m & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
            on_writable(p, e->index);
        }
        if (!p->closed && e->reading && (m & (EPOLLIN | EPOLLERR | EPOLLHUP))) {
            on_readable(p, e->index);
        }
    }
    for (int k = 0; k < n; k++) {
        Py_DECREF(event_owner(evs[k].data.u64));
    }
    Py_RETURN_NONE;
}

static PyObject *Poller_fileno(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(((Poller *)self)->epfd);
}

static PyObject *Poller_close(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    Poller *poller = (Poller *)self;
    if (poller->epfd >= 0) {
        close(poller->epfd);
        poller->epfd = -1;
    }
    Py_RETURN_NONE;
}

static PyMethodDef Poller_methods[] = {
    {"run", Poller_run, METH_NOARGS, "Event loop callback: relay what is ready."},
    {"fileno", Poller_fileno, METH_NOARGS, "The epoll fd, for loop.add_reader."},
    {"watch", Poller_watch, METH_VARARGS,
     "watch(fd, callback) -> Watch: call callback(readable, writable) when the fd is ready."},
    {"close", Poller_close, METH_NOARGS, "Close the epoll fd (after every pump has closed)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PollerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "enforcer.dataplane._pump.Poller",
    .tp_basicsize = sizeof(Poller),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One epoll set for the pumps of one event loop (see the module comment).",
    .tp_new = Poller_new,
    .tp_dealloc = Poller_dealloc,
    .tp_methods = Poller_methods,
};

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
static SSL *ssl_of(PyObject *triple, BIO **rbio, BIO **wbio, PyObject **inner) {
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
static PyObject *mod_bind(PyObject *module, PyObject *args) {
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
static PyObject *mod_session_cache(PyObject *module, PyObject *args) {
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
static PyObject *mod_set_ciphersuites(PyObject *module, PyObject *args) {
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
static PyObject *mod_set_ticket_keys(PyObject *module, PyObject *args) {
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
static PyObject *mod_keep_session(PyObject *module, PyObject *sample) {
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
static PyObject *mod_set_session(PyObject *module, PyObject *args) {
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
static PyObject *mod_track_sessions(PyObject *module, PyObject *args) {
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
static PyObject *mod_resume_latest(PyObject *module, PyObject *sample) {
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
static PyObject *mod_track_records(PyObject *module, PyObject *sample) {
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

/* verification_failures() -> int: pointers from CPython's private layouts that a public
   OpenSSL call did not confirm (see layout_refused), since the process started. */
static PyObject *mod_verification_failures(PyObject *module, PyObject *Py_UNUSED(args)) {
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

static PyObject *mod_record_protect(PyObject *module, PyObject *args) {
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

static PyObject *mod_record_unprotect(PyObject *module, PyObject *args) {
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
        int status = records_input(r, wire.buf, (size_t)wire.len, (unsigned char *)plain_buf,
                                   CHUNK, &sink, &why);
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
static PyObject *mod_own_records(PyObject *module, PyObject *args) {
    int on = records_on;
    if (!PyArg_ParseTuple(args, "|p", &on)) {
        return NULL;
    }
    records_on = on;
    return PyBool_FromLong(records_on && records_ready);
}

/* frees_tls_buffers(version): whether idle pumps free OpenSSL's record buffers with this
   OpenSSL (OPENSSL_VERSION_NUMBER); without an argument, the bound library's answer. */
static PyObject *mod_frees_tls_buffers(PyObject *module, PyObject *args) {
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

/* busy_limits([bursts, ends]) -> (bursts, ends, keeping now): the limits of
   burst_over() (set both, e.g. in tests, or neither) and how many ends keep buffers. */
static PyObject *mod_busy_limits(PyObject *module, PyObject *args) {
    unsigned bursts = busy_bursts;
    int ends = busy_ends;
    if (!PyArg_ParseTuple(args, "|Ii", &bursts, &ends)) {
        return NULL;
    }
    if (ends < 0) {
        PyErr_SetString(PyExc_ValueError, "ends must be >= 0");
        return NULL;
    }
    busy_bursts = bursts;
    busy_ends = ends;
    return Py_BuildValue("(Iii)", busy_bursts, busy_ends, keeping_ends);
}

/* accept(listen_fd) -> (fd, family, address) or None when no connection is waiting.
   accept4 with SOCK_NONBLOCK | SOCK_CLOEXEC, and the peer address as the socket module
   gives it ((host, port) for IPv4, (host, port, flowinfo, scope_id) for IPv6, the path
   for unix sockets), so a listener needs no fcntl and no getpeername per connection. */
static PyObject *mod_accept(PyObject *module, PyObject *arg) {
    int lfd = PyLong_AsLong(arg);
    if (lfd == -1 && PyErr_Occurred()) {
        return NULL;
    }
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    int fd;
    do {
        fd = accept4(lfd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            Py_RETURN_NONE;
        }
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    char host[INET6_ADDRSTRLEN];
    PyObject *addr = NULL;
    if (ss.ss_family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
        addr = Py_BuildValue("(si)", host, ntohs(a->sin_port));
    } else if (ss.ss_family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
        addr = Py_BuildValue("(siII)", host, ntohs(a->sin6_port), ntohl(a->sin6_flowinfo),
                             a->sin6_scope_id);
    } else if (ss.ss_family == AF_UNIX) {
        struct sockaddr_un *a = (struct sockaddr_un *)&ss;
        size_t n = len > offsetof(struct sockaddr_un, sun_path)
                       ? strnlen(a->sun_path, len - offsetof(struct sockaddr_un, sun_path))
                       : 0;
        addr = PyUnicode_DecodeFSDefaultAndSize(a->sun_path, (Py_ssize_t)n);
    } else {
        addr = Py_NewRef(Py_None);
    }
    if (addr == NULL) {
        close(fd);
        return NULL;
    }
    PyObject *r = Py_BuildValue("(iiN)", fd, (int)ss.ss_family, addr);
    if (r == NULL) {
        close(fd);
    }
    return r;
}

static PyMethodDef module_methods[] = {
    {"accept", mod_accept, METH_O, "accept(listen_fd) -> (fd, family, address) or None."},
    {"set_session", mod_set_session, METH_VARARGS, "Resume a copy of a session (see above)."},
    {"track_sessions", mod_track_sessions, METH_VARARGS,
     "Keep a client context's newest session (see above)."},
    {"resume_latest", mod_resume_latest, METH_O,
     "Resume a copy of the context's newest session; False if none."},
    {"keep_session", mod_keep_session, METH_O,
     "Mark an SSL as shut down so its session stays in the server cache."},
    {"set_ciphersuites", mod_set_ciphersuites, METH_VARARGS,
     "Set a context's TLS 1.3 cipher suites, in preference order."},
    {"set_ticket_keys", mod_set_ticket_keys, METH_VARARGS,
     "Set a context's session-ticket keys (80 bytes)."},
    {"session_cache", mod_session_cache, METH_VARARGS,
     "Bound a context's session cache; returns (bound, sessions held now)."},
    {"bind", mod_bind, METH_VARARGS, "Bind to the OpenSSL the _ssl module uses; check layout."},
    {"frees_tls_buffers", mod_frees_tls_buffers, METH_VARARGS,
     "Whether idle pumps free OpenSSL's record buffers (CVE-2024-4741 fixed)."},
    {"track_records", mod_track_records, METH_O,
     "Follow an SSL's keys and record counts from before its handshake (see above)."},
    {"verification_failures", mod_verification_failures, METH_NOARGS,
     "Private-layout pointers a public OpenSSL call did not confirm (fast path refused)."},
    {"record_protect", mod_record_protect, METH_VARARGS,
     "record_protect(suite, client_secret, seq, inner_type, data) -> one TLS 1.3 record."},
    {"record_unprotect", mod_record_unprotect, METH_VARARGS,
     "record_unprotect(suite, client_secret, seq, wire) -> (data, outcome, key updates)."},
    {"own_records", mod_own_records, METH_VARARGS,
     "Whether pumps take TLS 1.3 records over from OpenSSL; set it with a bool."},
    {"busy_limits", mod_busy_limits, METH_VARARGS,
     "(bursts, ends): when busy TLS ends keep their buffers; returns them and the count."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef pump_module = {
    PyModuleDef_HEAD_INIT, "enforcer.dataplane._pump",
    "The native relay pump (see the comment at the top of _pump.c).", -1, module_methods,
};

/* Bumped whenever what Python calls here changes: native.py refuses any other value, so a
   stale build (setup.py keeps the old .so when a compile fails) is reported, not half used. */
#define API_VERSION 8

PyMODINIT_FUNC PyInit__pump(void) {
    if (PyType_Ready(&PumpType) < 0 || PyType_Ready(&PollerType) < 0 ||
        PyType_Ready(&WatchType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&pump_module);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&PumpType);
    if (PyModule_AddObject(m, "Pump", (PyObject *)&PumpType) < 0) {
        Py_DECREF(&PumpType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&PollerType);
    if (PyModule_AddObject(m, "Poller", (PyObject *)&PollerType) < 0) {
        Py_DECREF(&PollerType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&WatchType);
    if (PyModule_AddObject(m, "Watch", (PyObject *)&WatchType) < 0) {
        Py_DECREF(&WatchType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "API_VERSION", API_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
