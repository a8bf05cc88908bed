/* tls.h: the OpenSSL binding (tls.c) as the relay and the module see it. */
#ifndef ENFORCER_TLS_H
#define ENFORCER_TLS_H

#include <Python.h>

#include "ossl.h"
#include "records.h"

extern int free_buffers_safe; /* SSL_free_buffers is safe here (CVE-2024-4741 fixed) */
extern int records_on;        /* own_records(False) leaves every end to OpenSSL */
extern int records_ready;     /* bound with every function the own records need */

int require_bound(void); /* 1, or 0 with RuntimeError set */
/* The SSL* behind (SSLObject, incoming MemoryBIO, outgoing MemoryBIO), confirmed by its
   BIOs; *inner is a new reference to the _ssl._SSLSocket. NULL with an exception set. */
SSL *ssl_of(PyObject *triple, BIO **rbio, BIO **wbio, PyObject **inner);
/* The own records of a tracked SSL whose state allows a take-over, or NULL. */
Records *records_from(SSL *ssl, BIO *rbio, BIO *wbio);

/* the module's functions (see the method table in _pump.c) */
PyObject *mod_bind(PyObject *module, PyObject *args);
PyObject *mod_session_cache(PyObject *module, PyObject *args);
PyObject *mod_set_ciphersuites(PyObject *module, PyObject *args);
PyObject *mod_set_ticket_keys(PyObject *module, PyObject *args);
PyObject *mod_keep_session(PyObject *module, PyObject *args);
PyObject *mod_set_session(PyObject *module, PyObject *args);
PyObject *mod_track_sessions(PyObject *module, PyObject *args);
PyObject *mod_resume_latest(PyObject *module, PyObject *args);
PyObject *mod_track_records(PyObject *module, PyObject *args);
PyObject *mod_negotiated_group(PyObject *module, PyObject *sample);
PyObject *mod_verification_failures(PyObject *module, PyObject *args);
PyObject *mod_record_protect(PyObject *module, PyObject *args);
PyObject *mod_record_unprotect(PyObject *module, PyObject *args);
PyObject *mod_own_records(PyObject *module, PyObject *args);
PyObject *mod_frees_tls_buffers(PyObject *module, PyObject *args);

#endif
