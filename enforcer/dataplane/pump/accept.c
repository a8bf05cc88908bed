/* accept.c: accept4 for the listeners (acceptor.py). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "accept.h"

/* accept(listen_fd) -> (fd, family, address) or None when no connection is waiting.
   accept4 with SOCK_NONBLOCK | SOCK_CLOEXEC, and the peer address as the socket module
   gives it ((host, port) for IPv4, (host, port, flowinfo, scope_id) for IPv6, the path
   for unix sockets), so a listener needs no fcntl and no getpeername per connection. */
PyObject *mod_accept(PyObject *module, PyObject *arg) {
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

