/* poller.c: see poller.h. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "poller.h"
#include "relay.h"

/* ---- watches: sockets of connections that are not pumped yet ------------------------- */
/* A Watch puts one more socket in the poller's epoll set and calls back into Python when
   it is ready: the bare sockets of rawtransport.py (a connect in progress, an upstream TLS
   handshake) use it instead of loop.add_reader/add_writer, each registration of which
   costs uvloop a poll handle, an ioctl and an add/delete probe of the descriptor. Its
   epoll entry carries the Watch's address with the low bit set (a Pump's End is never odd),
   and holds a reference to the Watch while registered. callback(readable, writable). */
/* (WATCH_TAG and the Watch struct: poller.h.) */

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

PyTypeObject WatchType = {
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
            relay_writable(p, e->index);
        }
        if (!p->closed && e->reading && (m & (EPOLLIN | EPOLLERR | EPOLLHUP))) {
            relay_readable(p, e->index);
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

PyTypeObject PollerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "enforcer.dataplane._pump.Poller",
    .tp_basicsize = sizeof(Poller),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One epoll set for the pumps of one event loop (see the module comment).",
    .tp_new = Poller_new,
    .tp_dealloc = Poller_dealloc,
    .tp_methods = Poller_methods,
};

