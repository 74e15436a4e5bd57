/* The per-frame audio work of a call in one compiled call each way: the optional fast path of kernels.py.
 *
 * Numbers only, no policy: the μ-law tables and the half-band taps come from codec.py and resample.py through
 * configure(), so there is one source of truth and the numpy path (the reference) and this one agree bit for
 * bit. Every product of a tap (a multiple of 2**-32) and an int16 sample, and every partial sum of those, is an
 * exactly representable double (see resample.py), so the order of the additions here cannot change a result.
 *
 * State is explicit and owned by the caller: a bytearray per direction per call, laid out as _kernels.h says.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_kernels.h" /* the tables, the taps and the filters themselves */

static int check_state(Py_buffer *state, Py_ssize_t size, const char *what) {
    if (state->len != size) {
        PyErr_Format(PyExc_ValueError, "expected a %zd-byte %s state, got %zd bytes", size, what, state->len);
        return -1;
    }
    if (!configured) {
        PyErr_SetString(PyExc_RuntimeError, "telephony_bridge.audio._kernels used before configure()");
        return -1;
    }
    return 0;
}

static int copy_doubles(PyObject *obj, double *out, Py_ssize_t count, const char *what) {
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) return -1;
    int ok = view.len == count * (Py_ssize_t)sizeof(double);
    if (ok) memcpy(out, view.buf, view.len);
    else PyErr_Format(PyExc_ValueError, "expected %zd float64 %s, got %zd bytes", count, what, view.len);
    PyBuffer_Release(&view);
    return ok ? 0 : -1;
}

static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *up, *down;
    Py_buffer decode, encode;
    if (!PyArg_ParseTuple(args, "OOy*y*", &up, &down, &decode, &encode)) return NULL;
    PyObject *result = NULL;
    double up_given[UP_TAPS], down_given[DOWN_TAPS];
    configured = 0;
    if (decode.len != (Py_ssize_t)sizeof(ulaw_decode) || encode.len != (Py_ssize_t)sizeof(ulaw_encode)) {
        PyErr_SetString(PyExc_ValueError, "expected a 512-byte decode table and a 65536-byte encode table");
        goto done;
    }
    if (copy_doubles(up, up_given, UP_TAPS, "upsampler taps") < 0) goto done;
    if (copy_doubles(down, down_given, DOWN_TAPS, "downsampler taps") < 0) goto done;
    const char *refused = kernels_set(up_given, down_given, decode.buf, encode.buf);
    if (refused != NULL) {
        PyErr_SetString(PyExc_ValueError, refused);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&decode);
    PyBuffer_Release(&encode);
    return result;
}

/* ulaw_up(state, ulaw) -> (pcm_8k, pcm_16k): μ-law decoded (native int16) and upsampled 2x (little-endian,
 * exactly two samples out per sample in). */
static PyObject *ulaw_up(PyObject *self, PyObject *args) {
    Py_buffer state, data;
    if (!PyArg_ParseTuple(args, "w*y*", &state, &data)) return NULL;
    PyObject *pcm8 = NULL, *pcm16 = NULL, *result = NULL;
    double *buf = NULL;
    if (check_state(&state, UP_STATE_BYTES, "upsampler") < 0) goto done;
    Py_ssize_t n = data.len;
    pcm8 = PyBytes_FromStringAndSize(NULL, n * 2);
    pcm16 = PyBytes_FromStringAndSize(NULL, n * 4);
    buf = PyMem_Malloc(UP_WORK_DOUBLES(n) * sizeof(double));
    if (!pcm8 || !pcm16 || !buf) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto done;
    }
    kernels_ulaw_up(state.buf, data.buf, n, (int16_t *)PyBytes_AS_STRING(pcm8), (uint8_t *)PyBytes_AS_STRING(pcm16),
                    buf);
    result = PyTuple_Pack(2, pcm8, pcm16);
done:
    PyMem_Free(buf);
    Py_XDECREF(pcm8);
    Py_XDECREF(pcm16);
    PyBuffer_Release(&state);
    PyBuffer_Release(&data);
    return result;
}

/* down_ulaw(state, pcm) -> ulaw: little-endian 16 kHz PCM (an even byte count) low-passed, halved and μ-law
 * encoded; one byte out per odd-index sample in, as resample.Downsampler2x releases them. */
static PyObject *down_ulaw(PyObject *self, PyObject *args) {
    Py_buffer state, data;
    if (!PyArg_ParseTuple(args, "w*y*", &state, &data)) return NULL;
    PyObject *result = NULL;
    double *buf = NULL;
    if (check_state(&state, DOWN_STATE_BYTES, "downsampler") < 0) goto done;
    if (data.len % 2) {
        PyErr_Format(PyExc_ValueError, "expected an even number of PCM16 bytes, got %zd", data.len);
        goto done;
    }
    Py_ssize_t n = data.len / 2;
    Py_ssize_t count = kernels_down_count(state.buf, n);
    buf = PyMem_Malloc(DOWN_WORK_DOUBLES(n, count) * sizeof(double));
    result = PyBytes_FromStringAndSize(NULL, count);
    if (!buf || !result) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        Py_CLEAR(result);
        goto done;
    }
    kernels_down_ulaw(state.buf, data.buf, n, (uint8_t *)PyBytes_AS_STRING(result), buf);
done:
    PyMem_Free(buf);
    PyBuffer_Release(&state);
    PyBuffer_Release(&data);
    return result;
}

/* mean_square(pcm) -> float: the mean of the squared native int16 samples (0.0 for none), for the VAD's gate. */
static PyObject *mean_square(PyObject *self, PyObject *arg) {
    Py_buffer data;
    if (PyObject_GetBuffer(arg, &data, PyBUF_SIMPLE) < 0) return NULL;
    Py_ssize_t n = data.len / 2;
    const uint8_t *s = data.buf;
    int64_t sum = 0; /* exact: 2**30 per sample, so up to 2**33 samples */
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t v = load_i16(s + 2 * i);
        sum += v * v;
    }
    PyBuffer_Release(&data);
    return PyFloat_FromDouble(n ? (double)sum / (double)n : 0.0);
}

static const char *const ISA_NAMES[] = {"baseline", "avx2"}; /* by KERNELS_BASELINE, KERNELS_AVX2_FMA */

/* isa([name]) -> str: the build of the filters that runs ("avx2" where this build and the CPU have it, chosen by
 * configure(), else "baseline"); with a name, run that build until told otherwise or until the next configure()
 * (tests hold each build to the reference). */
static PyObject *isa(PyObject *self, PyObject *args) {
    const char *name = NULL;
    if (!PyArg_ParseTuple(args, "|s", &name)) return NULL;
    if (name != NULL) {
        int chosen = -1;
        for (int i = 0; i < (int)(sizeof(ISA_NAMES) / sizeof(*ISA_NAMES)); i++)
            if (strcmp(name, ISA_NAMES[i]) == 0) chosen = i;
        if (chosen < 0) {
            PyErr_Format(PyExc_ValueError, "expected 'baseline' or 'avx2', got %R", PyTuple_GET_ITEM(args, 0));
            return NULL;
        }
        if (!kernels_can_run(chosen)) {
#ifdef KERNELS_AVX2
            PyErr_SetString(PyExc_ValueError, "this CPU lacks AVX2 or FMA: only the filters' baseline build runs here");
#else
            PyErr_SetString(PyExc_ValueError,
                            "this extension has no AVX2 build of the filters (x86-64 with GCC or Clang only)");
#endif
            return NULL;
        }
        kernels_isa = chosen;
    }
    return PyUnicode_FromString(ISA_NAMES[kernels_isa]);
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS, "configure(up_taps, down_taps, decode, encode): the tables, once."},
    {"ulaw_up", ulaw_up, METH_VARARGS, "ulaw_up(state, ulaw) -> (pcm_8k, pcm_16k_le)"},
    {"down_ulaw", down_ulaw, METH_VARARGS, "down_ulaw(state, pcm_16k_le) -> ulaw"},
    {"mean_square", mean_square, METH_O, "mean_square(pcm_native) -> float"},
    {"isa", isa, METH_VARARGS, "isa([name]) -> the filters' build that runs: 'avx2' or 'baseline'"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels", "The compiled per-frame audio kernels (see kernels.py).", -1, methods,
};

/* For the other compiled modules (_kernels_capi.h): these functions, with the tables configure() sets here. */
static const KernelsCAPI capi = {kernels_ulaw_up, kernels_down_ulaw, kernels_down_count, &configured};

PyMODINIT_FUNC PyInit__kernels(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    PyObject *capsule = PyCapsule_New((void *)&capi, KERNELS_CAPSULE, NULL);
    if (capsule == NULL || PyModule_AddIntConstant(m, "UP_STATE_BYTES", UP_STATE_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "DOWN_STATE_BYTES", DOWN_STATE_BYTES) < 0 ||
        PyModule_AddObjectRef(m, "C_API", capsule) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(m);
        return NULL;
    }
    Py_DECREF(capsule);
    return m;
}
