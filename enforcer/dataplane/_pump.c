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
 * - The TLS state stays the SSLObject's: the SSL* and its memory BIOs are read from the
 *   _ssl objects (the layout sslkeylog and sslpsk rely on), and every OpenSSL function is
 *   looked up with dlsym() in the _ssl module's own libssl, so both always use the same
 *   library. bind() checks the layout on a live object before the pump is ever used.
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

/* ----------------------------------------------------------------- OpenSSL, by dlsym */
typedef struct ssl_st SSL;
typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_session_st SSL_SESSION;
typedef struct bio_st BIO;
typedef struct {          /* struct buf_mem_st, public in <openssl/buffer.h> */
    size_t length;
    char *data;
    size_t max;
    unsigned long flags;
} BUF_MEM;

#define SSL_ERROR_SSL 1
#define SSL_ERROR_WANT_READ 2
#define SSL_ERROR_SYSCALL 5
#define SSL_ERROR_ZERO_RETURN 6
#define BIO_CTRL_PENDING 10
#define BIO_C_SET_BUF_MEM_EOF_RETURN 130
#define SSL_SENT_SHUTDOWN 1
#define SSL_RECEIVED_SHUTDOWN 2
#define SSL_CTRL_SESS_NUMBER 20
#define SSL_CTRL_SET_SESS_CACHE_SIZE 42
#define SSL_CTRL_GET_SESS_CACHE_SIZE 43
#define BIO_C_SET_BUF_MEM 114
#define BIO_C_GET_BUF_MEM_PTR 115
#define BIO_CLOSE 0x01
#define SSL_CTRL_SET_SESS_CACHE_MODE 44
#define SSL_CTRL_SET_TLSEXT_TICKET_KEYS 59
#define TICKET_KEYS_LEN 80 /* key name 16, HMAC key 32, AES key 32 */
#define SSL_CTRL_GET_SESS_CACHE_MODE 45
#define SSL_SESS_CACHE_CLIENT 0x0001
#define SSL_SESS_CACHE_NO_INTERNAL_STORE 0x0200
#define CRYPTO_EX_INDEX_SSL_CTX 1

static struct {
    int (*SSL_read)(SSL *, void *, int);
    int (*SSL_write)(SSL *, const void *, int);
    int (*SSL_get_error)(const SSL *, int);
    int (*SSL_shutdown)(SSL *);
    BIO *(*SSL_get_rbio)(const SSL *);
    BIO *(*SSL_get_wbio)(const SSL *);
    int (*BIO_write)(BIO *, const void *, int);
    int (*BIO_read)(BIO *, void *, int);
    long (*BIO_ctrl)(BIO *, int, long, void *);
    unsigned long (*ERR_peek_error)(void);
    void (*ERR_clear_error)(void);
    const char *(*ERR_reason_error_string)(unsigned long);
    SSL_CTX *(*SSL_get_SSL_CTX)(const SSL *);
    void (*SSL_set_shutdown)(SSL *, int);
    int (*SSL_set_session)(SSL *, SSL_SESSION *);
    SSL_SESSION *(*SSL_SESSION_dup)(const SSL_SESSION *);
    void (*SSL_SESSION_free)(SSL_SESSION *);
    const unsigned char *(*SSL_SESSION_get_id)(const SSL_SESSION *, unsigned int *);
    long (*SSL_CTX_ctrl)(SSL_CTX *, int, long, void *);
    int (*SSL_free_buffers)(SSL *);
    unsigned long (*OpenSSL_version_num)(void);
    BUF_MEM *(*BUF_MEM_new)(void);
    void (*SSL_CTX_sess_set_new_cb)(SSL_CTX *, int (*)(SSL *, SSL_SESSION *));
    int (*(*SSL_CTX_sess_get_new_cb)(SSL_CTX *))(SSL *, SSL_SESSION *);
    void *(*SSL_CTX_get_ex_data)(const SSL_CTX *, int);
    int (*SSL_CTX_set_ex_data)(SSL_CTX *, int, void *);
    int (*CRYPTO_get_ex_new_index)(int, long, void *, void *, void *,
                                   void (*)(void *, void *, void *, int, long, void *));
    int (*SSL_SESSION_is_resumable)(const SSL_SESSION *);
    int (*SSL_CTX_set_ciphersuites)(SSL_CTX *, const char *);
} ossl;
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

static void emit_tls_error(Pump *p, int side, unsigned long code) {
    const char *reason = code ? ossl.ERR_reason_error_string(code) : NULL;
    ossl.ERR_clear_error();
    emit_str(p, "tls_error", side, reason ? reason : "TLS protocol error");
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

/* The TLS side gives back what only a burst needs: OpenSSL's record buffers (~17 KiB
   each; SSL_MODE_RELEASE_BUFFERS does not free them with memory BIOs) and the peak
   allocation of both memory BIOs, so an idle connection holds none of them (nginx and
   haproxy release theirs too). The next burst allocates them again. */
static void release_buffers(End *e) {
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

/* Plaintext read from side i goes to the other side, encrypted when that side is TLS. */
static int forward(Pump *p, int i, const char *data, size_t len) {
    int j = 1 - i;
    End *d = &p->e[j];
    p->bytes[i] += len;
    if (d->eof_out) {
        return 0; /* cannot happen: side i ended before we ended towards j */
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
            emit_tls_error(p, j, ossl.ERR_peek_error());
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
    if (d->ssl != NULL) {
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
        if (off == len && s->fin_in) {
            /* after the last byte, an empty BIO means end of stream, not "try again" */
            ossl.BIO_ctrl(s->rbio, BIO_C_SET_BUF_MEM_EOF_RETURN, 0, NULL);
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
        if (err == SSL_ERROR_ZERO_RETURN || (s->fin_in && (err == SSL_ERROR_SYSCALL ||
                                                           err == SSL_ERROR_SSL))) {
            ossl.ERR_clear_error();
            eof = 1; /* close_notify, or FIN without one (a truncated stream) */
            break;
        }
        unsigned long code = ossl.ERR_peek_error();
        ossl.ERR_clear_error();
        if (filled && (forward(p, i, plain_buf, filled) < 0 || p->closed)) {
            return;
        }
        emit_tls_error(p, i, code);
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
    }
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
        if (s->ssl == NULL) {
            got_eof(p, i);
            return;
        }
    }
    if (s->ssl != NULL) {
        tls_in(p, i, recv_buf, (size_t)n);
        if (!p->closed && s->fin_in && !s->eof_in) {
            got_eof(p, i);
        }
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

static PyObject *Pump_close(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    pump_close_impl((Pump *)self);
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
   last visit gives them back; every end's burst count starts again. */
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
    }
    Py_RETURN_NONE;
}

static PyObject *Pump_get_keeping(PyObject *self, void *Py_UNUSED(closure)) {
    Pump *p = (Pump *)self;
    return PyLong_FromLong(p->e[0].keeping + p->e[1].keeping);
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
                             "on_event", "client_watch", "upstream_watch", NULL};
    Pump *p = (Pump *)self;
    int fds[2];
    PyObject *tls[2], *poller, *on_event, *watches[2] = {Py_None, Py_None};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOiOOO|OO", kwlist, &fds[0], &tls[0],
                                     &fds[1], &tls[1], &poller, &on_event, &watches[0],
                                     &watches[1])) {
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
    {"close", Pump_close, METH_NOARGS, "Unregister and close both descriptors (idempotent)."},
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
    SSL *ssl = ((SslSocketHead *)obj)->ssl;
    if (ssl == NULL || ossl.SSL_get_rbio(ssl) != in || ossl.SSL_get_wbio(ssl) != out) {
        Py_DECREF(obj);
        PyErr_SetString(PyExc_RuntimeError,
                        "the _ssl object layout is not the expected one (BIOs do not match)");
        return NULL;
    }
    *rbio = in;
    *wbio = out;
    *inner = obj;
    return ssl;
}

#define BIND(name)                                                                           \
    do {                                                                                     \
        *(void **)(&ossl.name) = dlsym(handle, #name);                                       \
        if (ossl.name == NULL) {                                                             \
            PyErr_Format(PyExc_RuntimeError, "%s not found beside the _ssl module", #name); \
            return NULL;                                                                     \
        }                                                                                    \
    } while (0)

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
    BIND(SSL_read);
    BIND(SSL_write);
    BIND(SSL_get_error);
    BIND(SSL_shutdown);
    BIND(SSL_get_rbio);
    BIND(SSL_get_wbio);
    BIND(BIO_write);
    BIND(BIO_read);
    BIND(BIO_ctrl);
    BIND(ERR_peek_error);
    BIND(ERR_clear_error);
    BIND(ERR_reason_error_string);
    BIND(SSL_get_SSL_CTX);
    BIND(SSL_set_shutdown);
    BIND(SSL_set_session);
    BIND(SSL_SESSION_dup);
    BIND(SSL_SESSION_free);
    BIND(SSL_SESSION_get_id);
    BIND(SSL_CTX_ctrl);
    BIND(SSL_free_buffers);
    BIND(OpenSSL_version_num);
    BIND(BUF_MEM_new);
    BIND(SSL_CTX_sess_set_new_cb);
    BIND(SSL_CTX_sess_get_new_cb);
    BIND(SSL_CTX_get_ex_data);
    BIND(SSL_CTX_set_ex_data);
    BIND(CRYPTO_get_ex_new_index);
    BIND(SSL_SESSION_is_resumable);
    BIND(SSL_CTX_set_ciphersuites);
    free_buffers_safe = fixed_free_buffers(ossl.OpenSSL_version_num());
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
        PyErr_SetString(PyExc_RuntimeError,
                        "the _ssl context layout is not the expected one (contexts differ)");
        return NULL;
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
        PyErr_SetString(PyExc_RuntimeError,
                        "the _ssl session layout is not the expected one (ids do not match)");
        return NULL;
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

static void free_latest_session(void *parent, void *ptr, void *ad, int idx, long argl,
                                void *argp) {
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
#define API_VERSION 5

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
    if (PyModule_AddIntConstant(m, "API_VERSION", API_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
