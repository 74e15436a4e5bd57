/* What the compiled frame path's modules (_caller_path.c, _ai_path.c, _taps.c) share: plain attributes of the
 * Python objects whose state they work on, read and written as C numbers, and the exception being raised taken
 * as an object. Each returns -1 with the exception set on failure, as PyObject_GetAttr and SetAttr do.
 * Include <Python.h> first.
 */
#ifndef TELEPHONY_BRIDGE_PYATTRS_H
#define TELEPHONY_BRIDGE_PYATTRS_H

#include <stdint.h>

static inline int get_double(PyObject *obj, PyObject *name, double *out) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) return -1;
    *out = PyFloat_AsDouble(v);
    Py_DECREF(v);
    return *out == -1.0 && PyErr_Occurred() ? -1 : 0;
}

static inline int get_i64(PyObject *obj, PyObject *name, int64_t *out) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

/* 1 if obj.name is truthy, 0 if not, -1 on error. */
static inline int get_truth(PyObject *obj, PyObject *name) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) return -1;
    int truth = PyObject_IsTrue(v);
    Py_DECREF(v);
    return truth;
}

/* 1 if obj.name is None, 0 if not, -1 on error. */
static inline int get_is_none(PyObject *obj, PyObject *name) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) return -1;
    int none = v == Py_None;
    Py_DECREF(v);
    return none;
}

/* obj.name = v, the reference to v taken over (NULL: the error that made it). */
static inline int set_steal(PyObject *obj, PyObject *name, PyObject *v) {
    if (v == NULL) return -1;
    int r = PyObject_SetAttr(obj, name, v);
    Py_DECREF(v);
    return r;
}

static inline int set_double(PyObject *obj, PyObject *name, double v) {
    return set_steal(obj, name, PyFloat_FromDouble(v));
}

static inline int set_i64(PyObject *obj, PyObject *name, int64_t v) {
    return set_steal(obj, name, PyLong_FromLongLong(v));
}

static inline int set_bool(PyObject *obj, PyObject *name, int v) {
    return PyObject_SetAttr(obj, name, v ? Py_True : Py_False);
}

static inline int add_i64(PyObject *obj, PyObject *name, int64_t delta) {
    int64_t v;
    if (get_i64(obj, name, &v) < 0) return -1;
    return set_i64(obj, name, v + delta);
}

/* The exception being raised, taken (PyErr_GetRaisedException from 3.12), its traceback attached. */
static inline PyObject *take_exception(void) {
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (value != NULL && traceback != NULL) PyException_SetTraceback(value, traceback);
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    return value;
#endif
}

#endif
