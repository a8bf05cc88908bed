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
 *   the _ssl objects (the layout sslkeylog and sslpsk rely on) and used only once
 *   SSL_get_rbio/SSL_get_wbio confirm them (tls.c); every OpenSSL function is declared by
 *   OpenSSL's headers and looked up with dlsym() in the _ssl module's own libssl, so both
 *   always use the same library (ossl.h). docs/tls-data-plane.md says what it may not do.
 * - Once a TLS 1.3 end is in a clean state after its handshake, the pump protects its
 *   records itself (AEAD by OpenSSL's EVP) and lets the SSL object go, ~10 KiB per end
 *   (see "TLS 1.3 records" in pump/relay.c); TLS 1.2, and any end not clean yet, stays OpenSSL's.
 * - Flow control: when a send() is short, the rest waits in that socket's out buffer, the
 *   pump watches it for writability and stops reading the other socket until it drains.
 *   Ciphertext enters an incoming BIO at most BIO_SLICE at a time (memory BIOs keep their
 *   peak size), as in tlsengine.py.
 * - The pump has no policy: Python's lifecycle core (lifecycle.py, through connection.py)
 *   decides half-close, timeouts and close reasons for both relays; the pump reports and
 *   executes. An EOF from one side stops reading it and is reported as
 *   on_event("eof", side, kind): kind None for close_notify (TLS) or a plaintext FIN,
 *   "truncated" or "no_close_notify" for a TLS end's FIN without close_notify, mid-record
 *   or on a record boundary. The core answers with shut_write(other side) (close_notify
 *   for TLS, then shutdown(SHUT_WR) once that socket's pending bytes are sent) or with
 *   close(). Once both directions have ended and everything is sent, on_event("done",
 *   -1, None). Errors are on_event("reset", side, errno) and on_event("tls_error", side,
 *   reason) (after the alert OpenSSL would send). Python calls close(reset) to end (also
 *   for timeouts, drain and policy revocation, and with reset=True for an unclean end the
 *   core refuses), which unregisters and closes both descriptors.
 */
/* Files (each with a header for its boundary):
 * - pump/poller.c  the epoll set and the watches (poller.h)
 * - pump/relay.c   the Pump: relay, flow control, half-close, close semantics (relay.h)
 * - pump/records.c the own TLS 1.3 record layer, pure C, fuzzed (records.h)
 * - pump/tls.c     the OpenSSL objects behind Python's ssl objects, sessions, bind (tls.h)
 * - pump/binding.c OpenSSL's functions, typed from its headers, resolved by dlsym (ossl.h)
 * - pump/accept.c  accept4 for the listeners (accept.h)
 * This file is the module: its functions and types.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "pump/accept.h"
#include "pump/poller.h"
#include "pump/relay.h"
#include "pump/tls.h"

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
    {"negotiated_group", mod_negotiated_group, METH_O,
     "The key-exchange group of a finished handshake, as OpenSSL names it, or None."},
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
#define API_VERSION 11

PyMODINIT_FUNC PyInit__pump(void) {
    PyObject *m = PyModule_Create(&pump_module);
    if (m == NULL) {
        return NULL;
    }
    /* PyModule_AddType readies each type and adds it under its short tp_name */
    if (PyModule_AddType(m, &PumpType) < 0 || PyModule_AddType(m, &PollerType) < 0 ||
        PyModule_AddType(m, &WatchType) < 0 ||
        PyModule_AddIntConstant(m, "API_VERSION", API_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

