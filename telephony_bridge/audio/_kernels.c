/* The per-frame audio work of a call in one compiled call each way: the optional fast path of kernels.py.
 *
 * Numbers only, no policy: the μ-law tables and the half-band taps come from codec.py and resample.py through
 * configure(), so there is one source of truth and the numpy path (the reference) and this one agree bit for
 * bit. Every product of a tap (a multiple of 2**-32) and an int16 sample, and every partial sum of those, is an
 * exactly representable double (see resample.py), so the order of the additions here cannot change a result.
 *
 * State is explicit and owned by the caller: a bytearray per direction per call, laid out as below.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define UP_TAPS 38       /* the upsampler's odd-offset taps (doubled) */
#define UP_HISTORY 37    /* its last inputs */
#define UP_COPY_FROM 19  /* resample._COPY_FROM: where the centre-tap phase reads in hist ++ input */
#define DOWN_TAPS 38     /* the downsampler's odd-offset taps */
#define DOWN_HISTORY 75  /* its last inputs */
#define DOWN_CENTRE 37
#define BLOCK 64         /* outputs computed per pass over the taps: a stack buffer, and loops that vectorise */

/* Upsampler state: int16 history[UP_HISTORY]. Downsampler state: int16 history[DOWN_HISTORY], then one byte:
 * 1 when the next input sample has an odd index in the call's stream. */
#define UP_STATE_BYTES (UP_HISTORY * 2)
#define DOWN_STATE_BYTES (DOWN_HISTORY * 2 + 1)

static double up_taps[UP_TAPS];
static double down_taps[DOWN_TAPS];
static int16_t ulaw_decode[256];
static uint8_t ulaw_encode[65536];
static int configured = 0;

/* A native int16 at any address: the buffers callers hand us (a state bytearray, a numpy view made with an
 * odd byte offset) need not be 2-byte aligned, and a cast pointer would let the compiler assume they are.
 * memcpy of two bytes compiles to a plain load or store. */
static inline int16_t load_i16(const void *p) {
    int16_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store_i16(void *p, int16_t v) { memcpy(p, &v, sizeof v); }

static inline int16_t saturate(double v) {
    v = nearbyint(v); /* half to even, as numpy's rint */
    if (v > 32767.0) return 32767;
    if (v < -32768.0) return -32768;
    return (int16_t)v;
}

/* acc[j] += the symmetric FIR taps[0..HALF) (mirrored) over x[j .. j + 2 * HALF - 1], for j < count. Taps are
 * symmetric (configure() checks), so each pair of samples shares one multiply; x is contiguous, so the loop
 * over j vectorises. */
#define HALF (UP_TAPS / 2)
_Static_assert(UP_TAPS == DOWN_TAPS && UP_TAPS % 2 == 0, "both filters share fir_symmetric");
static inline void fir_symmetric(const double *x, Py_ssize_t count, const double *taps, double *acc) {
    for (int k = 0; k < HALF; k++) {
        double t = taps[k];
        const double *lo = x + k, *hi = x + 2 * HALF - 1 - k;
        for (Py_ssize_t j = 0; j < count; j++) acc[j] += t * (lo[j] + hi[j]);
    }
}

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
    configured = 0;
    if (decode.len != (Py_ssize_t)sizeof(ulaw_decode) || encode.len != (Py_ssize_t)sizeof(ulaw_encode)) {
        PyErr_SetString(PyExc_ValueError, "expected a 512-byte decode table and a 65536-byte encode table");
        goto done;
    }
    if (copy_doubles(up, up_taps, UP_TAPS, "upsampler taps") < 0) goto done;
    if (copy_doubles(down, down_taps, DOWN_TAPS, "downsampler taps") < 0) goto done;
    for (int k = 0; k < HALF; k++) {
        if (up_taps[k] != up_taps[UP_TAPS - 1 - k] || down_taps[k] != down_taps[DOWN_TAPS - 1 - k]) {
            PyErr_SetString(PyExc_ValueError, "expected symmetric (linear-phase) taps");
            goto done;
        }
    }
    /* What makes every sum exact, whatever the order of the additions: taps under 1 (2 for the upsampler's
     * doubled ones) in multiples of 2**-32. */
    for (int k = 0; k < UP_TAPS; k++) {
        double up = up_taps[k] * 4294967296.0, down = down_taps[k] * 4294967296.0;
        if (up != nearbyint(up) || down != nearbyint(down) || fabs(up_taps[k]) >= 2.0 || fabs(down_taps[k]) >= 1.0) {
            PyErr_SetString(PyExc_ValueError, "expected taps under 1 in multiples of 2**-32 (see resample.py)");
            goto done;
        }
    }
    memcpy(ulaw_decode, decode.buf, sizeof(ulaw_decode));
    memcpy(ulaw_encode, encode.buf, sizeof(ulaw_encode));
    configured = 1;
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
    double *buf = NULL; /* history ++ input, as doubles: the inner loops then vectorise with no conversions */
    if (check_state(&state, UP_STATE_BYTES, "upsampler") < 0) goto done;
    Py_ssize_t n = data.len;
    pcm8 = PyBytes_FromStringAndSize(NULL, n * 2);
    pcm16 = PyBytes_FromStringAndSize(NULL, n * 4);
    buf = PyMem_Malloc((UP_HISTORY + n + 1) * sizeof(double));
    if (!pcm8 || !pcm16 || !buf) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto done;
    }
    const uint8_t *in = data.buf;
    int16_t *s8 = (int16_t *)PyBytes_AS_STRING(pcm8);
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(pcm16);
    const uint8_t *history = state.buf;
    for (int i = 0; i < UP_HISTORY; i++) buf[i] = load_i16(history + 2 * i);
    for (Py_ssize_t i = 0; i < n; i++) buf[UP_HISTORY + i] = s8[i] = ulaw_decode[in[i]];
    double acc[BLOCK];
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        Py_ssize_t count = n - start < BLOCK ? n - start : BLOCK;
        const double *x = buf + start;
        for (Py_ssize_t j = 0; j < count; j++) acc[j] = 0.0;
        fir_symmetric(x, count, up_taps, acc);
        for (Py_ssize_t j = 0; j < count; j++) {
            Py_ssize_t m = start + j;
            uint16_t filtered = (uint16_t)saturate(acc[j]);
            uint16_t copied = (uint16_t)(int16_t)buf[UP_COPY_FROM + m];
            uint8_t *o = out + 4 * m;
            o[0] = filtered & 0xFF;
            o[1] = filtered >> 8;
            o[2] = copied & 0xFF;
            o[3] = copied >> 8;
        }
    }
    uint8_t *keep = state.buf;
    for (int i = 0; i < UP_HISTORY; i++) store_i16(keep + 2 * i, (int16_t)buf[n + i]);
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
    double *buf = NULL; /* history ++ input, as doubles; then its even-offset samples from ``first`` on */
    if (check_state(&state, DOWN_STATE_BYTES, "downsampler") < 0) goto done;
    if (data.len % 2) {
        PyErr_Format(PyExc_ValueError, "expected an even number of PCM16 bytes, got %zd", data.len);
        goto done;
    }
    Py_ssize_t n = data.len / 2;
    uint8_t *st = state.buf;
    int odd_next = st[DOWN_HISTORY * 2];
    Py_ssize_t first = odd_next ? 0 : 1;
    Py_ssize_t count = n >= first ? (n - first + 1) / 2 : 0;
    buf = PyMem_Malloc((DOWN_HISTORY + n + 1 + count + DOWN_TAPS) * sizeof(double));
    result = PyBytes_FromStringAndSize(NULL, count);
    if (!buf || !result) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        Py_CLEAR(result);
        goto done;
    }
    for (int i = 0; i < DOWN_HISTORY; i++) buf[i] = load_i16(st + 2 * i);
    const uint8_t *in = data.buf;
    for (Py_ssize_t i = 0; i < n; i++) buf[DOWN_HISTORY + i] = (int16_t)(uint16_t)(in[2 * i] | (in[2 * i + 1] << 8));
    /* Output i is the sinc taps over buf[first + 2i + 2k] (k < DOWN_TAPS) plus half of buf[first + 2i + 37]: the
     * even-offset samples are gathered first, so the filter reads them contiguously. */
    double *even = buf + DOWN_HISTORY + n + 1;
    for (Py_ssize_t i = 0; i < count + DOWN_TAPS - 1; i++) even[i] = buf[first + 2 * i];
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(result);
    double acc[BLOCK];
    for (Py_ssize_t start = 0; start < count; start += BLOCK) {
        Py_ssize_t c = count - start < BLOCK ? count - start : BLOCK;
        const double *centre = buf + first + DOWN_CENTRE + 2 * start;
        for (Py_ssize_t j = 0; j < c; j++) acc[j] = centre[2 * j] * 0.5;
        fir_symmetric(even + start, c, down_taps, acc);
        for (Py_ssize_t j = 0; j < c; j++) out[start + j] = ulaw_encode[(uint16_t)saturate(acc[j])];
    }
    for (int i = 0; i < DOWN_HISTORY; i++) store_i16(st + 2 * i, (int16_t)buf[n + i]);
    st[DOWN_HISTORY * 2] = odd_next ^ (n & 1);
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

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS, "configure(up_taps, down_taps, decode, encode): the tables, once."},
    {"ulaw_up", ulaw_up, METH_VARARGS, "ulaw_up(state, ulaw) -> (pcm_8k, pcm_16k_le)"},
    {"down_ulaw", down_ulaw, METH_VARARGS, "down_ulaw(state, pcm_16k_le) -> ulaw"},
    {"mean_square", mean_square, METH_O, "mean_square(pcm_native) -> float"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels", "The compiled per-frame audio kernels (see kernels.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__kernels(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "UP_STATE_BYTES", UP_STATE_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "DOWN_STATE_BYTES", DOWN_STATE_BYTES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
