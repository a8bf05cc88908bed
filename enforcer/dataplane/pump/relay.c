/* relay.c: the Pump, see "How it works" at the top of _pump.c and, for TLS 1.3 ends the
 * pump protects itself, "TLS 1.3 records" below.
 *
 * Who decides what: the pump is mechanism only. It reports what happened to Python's
 * lifecycle core (connection.py, lifecycle.py) and executes what the core answers; it
 * owns no policy. An end of stream is reported (got_eof) with its kind: a close_notify or
 * a plaintext FIN (None), or a TLS end's FIN without close_notify, "truncated" (mid-record)
 * or "no_close_notify" (on a record boundary): classifying is mechanism, it reads the
 * record state only the pump has. Whether that FIN is an end or a failure
 * (tls.allow_eof_without_close_notify), and every close reason, is the core's. The EOF is
 * passed on only when the core says so (Pump.shut_write: close_notify, then FIN once the
 * bytes buffered for that socket are sent: finish_shutdown); the connection ends with
 * Pump.close (with RST when the core resets it). Timeouts are the core's too. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "poller.h"
#include "relay.h"
#include "tls.h"

/* Threads: the static scratch buffers below are shared by every pump of the process, which
 * is safe because all of them run on the one event-loop thread (they may call back into
 * Python mid-relay, so a second thread relaying with pumps would not be). */
static char recv_buf[CHUNK];
static char plain_buf[CHUNK];
static char cipher_buf[CIPHER_ROOM];

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
 *   no record read in part (its header consumed by OpenSSL, its body still to come),
 *   no shutdown begun, and (a client) after the server's first record since the handshake
 *   (its NewSessionTickets, which OpenSSL stores for resumption). Otherwise OpenSSL keeps
 *   the end, as before. Handing back is never needed.
 * What it then does: application data both ways; close_notify both ways (a FIN without
 * one is the end of the stream, as with OpenSSL); any other alert fails the connection;
 * KeyUpdate from the peer (answered with ours when asked); NewSessionTicket ignored.
 * Anything else (a record too long, a bad tag, a message TLS 1.3 does not allow here)
 * fails the connection with the reason OpenSSL would give.
 */
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

/* Side i finished sending: it is no longer read, and Python is told, with the kind of end
   (NULL: close_notify, or a plaintext end's FIN; else see unclean_kind). Nothing is passed
   on here: the core answers with shut_write (Pump_shut_write), or closes. */
static void got_eof(Pump *p, int i, const char *kind) {
    End *s = &p->e[i];
    if (s->eof_in) {
        return;
    }
    s->eof_in = 1;
    if (watch(p, i, 0, 0) < 0) {
        fatal(p);
        return;
    }
    if (kind == NULL) {
        emit(p, "eof", i, NULL);
    } else {
        emit_str(p, "eof", i, kind);
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
        got_eof(p, i, NULL); /* close_notify (a FIN is relay_readable's) */
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
            eof = 1; /* close_notify (a FIN never reaches OpenSSL: see unclean_kind) */
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
        got_eof(p, i, NULL);
    } else {
        take_over(p, i);
    }
}

/* What a TCP FIN from a TLS end that sent no close_notify (that one would have ended
   reading: got_eof) was. Mid-record (part of a record or of a handshake message held), the
   stream was cut: "truncated"; else "no_close_notify" (on a record boundary). The core
   decides what it does (an end, by tls.allow_eof_without_close_notify, or a failure: then
   it closes the pump with RST, so the other side never sees a clean end it could mistake
   for the whole stream). */
static const char *unclean_kind(const End *s) {
    int truncated = s->rec != NULL
                        ? s->rec->part_len > 0 || s->rec->hs_len > 0
                        : ossl.SSL_has_pending(s->ssl) ||
                              ossl.BIO_ctrl(s->rbio, BIO_CTRL_PENDING, 0, NULL) > 0;
    return truncated ? "truncated" : "no_close_notify";
}

void relay_readable(Pump *p, int i) {
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
        got_eof(p, i, tls_end(s) ? unclean_kind(s) : NULL);
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

void relay_writable(Pump *p, int j) {
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

/* shut_write(side): the core passes an end of stream on towards `side` (0 client,
   1 upstream): close_notify (TLS), then shutdown(SHUT_WR) once the bytes buffered for that
   socket are sent (finish_shutdown, also from relay_writable). Once both directions have
   ended and everything is sent, "done" is reported (possibly before this returns). */
static PyObject *Pump_shut_write(PyObject *self, PyObject *arg) {
    Pump *p = (Pump *)self;
    long j = PyLong_AsLong(arg);
    if (j == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (j != 0 && j != 1) {
        PyErr_SetString(PyExc_ValueError, "shut_write: side must be 0 or 1");
        return NULL;
    }
    if (!p->started) {
        PyErr_SetString(PyExc_RuntimeError, "shut_write: pump not started");
        return NULL;
    }
    Py_INCREF(self); /* a report may make Python drop its last reference */
    if (!p->closed) {
        send_eof(p, (int)j);
    }
    if (!p->closed) {
        check_done(p);
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
    {"shut_write", Pump_shut_write, METH_O,
     "shut_write(side): pass an end of stream on to side 0/1 once its bytes are sent."},
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

PyTypeObject PumpType = {
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

/* busy_limits([bursts, ends]) -> (bursts, ends, keeping now): the limits of
   burst_over() (set both, e.g. in tests, or neither) and how many ends keep buffers. */
PyObject *mod_busy_limits(PyObject *module, PyObject *args) {
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

