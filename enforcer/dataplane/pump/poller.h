/* poller.h: one epoll set per event loop (Poller), and sockets in it that are not a
 * pump's yet (Watch: a connect in progress, an upstream TLS handshake). poller.c runs the
 * set (Poller.run, the loop's callback) and hands a pump's ready socket to relay.c. */
#ifndef ENFORCER_POLLER_H
#define ENFORCER_POLLER_H

#include <Python.h>
#include <stdint.h>

/* One epoll set per event loop for every pumped socket; the loop watches only its fd
   (loop.add_reader(poller.fileno(), poller.run)), so a pumped socket costs the loop no
   handle objects, and a burst of events is one callback. */
typedef struct {
    PyObject_HEAD
    int epfd;
} Poller;


/* A socket in the poller's epoll set that is not a pump's (see "watches" below). */
#define WATCH_TAG ((uint64_t)1)

typedef struct {
    PyObject_HEAD
    PyObject *poller; /* the Poller (its epfd); NULL once closed */
    PyObject *callback;
    int fd;
    uint32_t events; /* EPOLLIN / EPOLLOUT as registered; 0 = not in the set */
} Watch;



extern PyTypeObject PollerType, WatchType;

#endif
