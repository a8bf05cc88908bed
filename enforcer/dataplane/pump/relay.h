/* relay.h: the Pump (relay.c): one connection's two sockets relayed in C, TLS by OpenSSL
 * or by the own record layer (records.h). poller.c calls relay_readable/relay_writable for
 * a pump's ready socket; the module (_pump.c) exports the type. */
#ifndef ENFORCER_RELAY_H
#define ENFORCER_RELAY_H

#include <Python.h>

#include "ossl.h"
#include "records.h"

#define CHUNK (256 * 1024)           /* one recv() */
#define BIO_SLICE (17 * 1024)        /* > the largest TLS record */
#define WRITE_SLICE (16 * 1024)      /* one full TLS record of plaintext */
#define CIPHER_ROOM (CHUNK + CHUNK / 8) /* 256 KiB of plaintext as records, with headroom */

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

extern PyTypeObject PumpType;

void relay_readable(Pump *p, int i);
void relay_writable(Pump *p, int j);
PyObject *mod_busy_limits(PyObject *module, PyObject *args);

#endif
