/* What the compiled frame path's modules (_caller_path.c, _ai_path.c, _taps.c) share: the attributes of the
 * Python objects whose state they work on, read and written at a slot's offset where they can be (attr_get,
 * attr_set) and as C numbers, and the exception being raised taken as an object. Each returns -1 (or NULL)
 * with the exception set on failure, as PyObject_GetAttr and SetAttr do.
 * Include <Python.h> first.
 */
#ifndef TELEPHONY_BRIDGE_PYATTRS_H
#define TELEPHONY_BRIDGE_PYATTRS_H

#include <stdint.h>
#ifndef Py_T_OBJECT_EX /* before 3.12 */
#include <structmember.h>
#define Py_T_OBJECT_EX T_OBJECT_EX
#define Py_READONLY READONLY
#endif

/* --- slots: an attribute named in its class's __slots__ is read and written at its fixed offset ------------ */

/* Why: looking an attribute up by name (the type's MRO, then the instance's dict) was ~17 % of the bridge's CPU
 * under load, nearly all of it this code's (#10). A slot's member descriptor says where the value lives; this
 * does what the descriptor would, without the look-up. What decides is the type's own look-up, done once per
 * (type, name) and kept while the type is unchanged (its version tag: assigning a class attribute, its bases or
 * __getattribute__ gives it a new one; an object whose __class__ is reassigned is looked up under its new type).
 * Anything other than a plain __slots__ member of a type with Python's generic attribute access goes the
 * generic way. The table is one per process: these single-phase modules are not for subinterpreters (3.12's
 * isolated ones refuse them; a legacy one could meet another interpreter's type at a reused address). */
typedef struct {
    PyTypeObject *type; /* not a reference: the tag tells a type at a reused address from the old one */
    PyObject *name;     /* an interned name the module keeps */
    unsigned int version;
    Py_ssize_t offset; /* 0: not a slot (the generic way) */
} SlotEntry;

#define SLOT_CACHE_SIZE 256 /* a power of two, well above the (type, name) pairs one module reads */
static SlotEntry slot_cache[SLOT_CACHE_SIZE];

/* Whether the type's version tag is one. Up to 3.12 a tag can be non-zero and not valid (assign_version_tag numbers
 * the type before its bases and may then fail on one), so Py_TPFLAGS_VALID_VERSION_TAG decides; 3.13 no longer sets
 * that flag ("Unused. Legacy flag") and numbers the bases first: a tag is valid exactly while it is not 0. */
static inline int type_version_valid(PyTypeObject *type) {
#if PY_VERSION_HEX >= 0x030D0000
    return type->tp_version_tag != 0;
#else
    return type->tp_version_tag != 0 && (type->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG);
#endif
}

static Py_NO_INLINE Py_ssize_t slot_fill(SlotEntry *e, PyTypeObject *type, PyObject *name) {
#ifdef Py_GIL_DISABLED
    return 0; /* the table is not thread-safe without the GIL */
#else
    if (type->tp_getattro != PyObject_GenericGetAttr || type->tp_setattro != PyObject_GenericSetAttr) return 0;
    PyObject *descr = _PyType_Lookup(type, name); /* borrowed; also gives the type a valid version tag */
    if (!type_version_valid(type)) return 0;
    Py_ssize_t offset = 0;
    if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type) &&
        PyType_IsSubtype(type, PyDescr_TYPE(descr))) { /* a descriptor of this type's layout, not another's */
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type == Py_T_OBJECT_EX && !(member->flags & Py_READONLY) && member->offset > 0)
            offset = member->offset;
    }
    e->type = type;
    e->name = name;
    e->version = type->tp_version_tag;
    e->offset = offset;
    return offset;
#endif
}

/* Where obj.name lives if it is a slot, as a byte offset into obj; 0 if it is not. */
static inline Py_ssize_t slot_offset(PyObject *obj, PyObject *name) {
    PyTypeObject *type = Py_TYPE(obj);
    uintptr_t h = ((uintptr_t)type >> 4) * 31u + ((uintptr_t)name >> 4);
    SlotEntry *e = &slot_cache[h & (SLOT_CACHE_SIZE - 1)];
    if (e->type == type && e->name == name && e->version == type->tp_version_tag && type_version_valid(type))
        return e->offset;
    return slot_fill(e, type, name);
}

/* obj.name, a new reference (PyObject_GetAttr). */
static inline PyObject *attr_get(PyObject *obj, PyObject *name) {
    Py_ssize_t offset = slot_offset(obj, name);
    if (offset) {
        PyObject *v = *(PyObject **)((char *)obj + offset);
        if (v != NULL) return Py_NewRef(v);
    }
    return PyObject_GetAttr(obj, name); /* not a slot, or one not set: the error is Python's own */
}

/* obj.name = v, v borrowed (PyObject_SetAttr). */
static inline int attr_set(PyObject *obj, PyObject *name, PyObject *v) {
    Py_ssize_t offset = slot_offset(obj, name);
    if (offset == 0 || v == NULL) return PyObject_SetAttr(obj, name, v);
    PyObject **at = (PyObject **)((char *)obj + offset);
    PyObject *old = *at;
    *at = Py_NewRef(v);
    Py_XDECREF(old);
    return 0;
}

/* --- attributes as C numbers --------------------------------------------------------------------------------- */

static inline int get_double(PyObject *obj, PyObject *name, double *out) {
    PyObject *v = attr_get(obj, name);
    if (v == NULL) return -1;
    *out = PyFloat_AsDouble(v);
    Py_DECREF(v);
    return *out == -1.0 && PyErr_Occurred() ? -1 : 0;
}

static inline int get_i64(PyObject *obj, PyObject *name, int64_t *out) {
    PyObject *v = attr_get(obj, name);
    if (v == NULL) return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

/* 1 if obj.name is truthy, 0 if not, -1 on error. */
static inline int get_truth(PyObject *obj, PyObject *name) {
    PyObject *v = attr_get(obj, name);
    if (v == NULL) return -1;
    int truth = PyObject_IsTrue(v);
    Py_DECREF(v);
    return truth;
}

/* 1 if obj.name is None, 0 if not, -1 on error. */
static inline int get_is_none(PyObject *obj, PyObject *name) {
    PyObject *v = attr_get(obj, name);
    if (v == NULL) return -1;
    int none = v == Py_None;
    Py_DECREF(v);
    return none;
}

/* obj.name = v, the reference to v taken over (NULL: the error that made it). */
static inline int set_steal(PyObject *obj, PyObject *name, PyObject *v) {
    if (v == NULL) return -1;
    int r = attr_set(obj, name, v);
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
    return attr_set(obj, name, v ? Py_True : Py_False);
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
