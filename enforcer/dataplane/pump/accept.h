/* accept.h: accept(listen_fd) (accept.c). */
#ifndef ENFORCER_ACCEPT_H
#define ENFORCER_ACCEPT_H

#include <Python.h>

PyObject *mod_accept(PyObject *module, PyObject *arg);

#endif
