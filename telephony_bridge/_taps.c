/* The sockets' taps in C: a frame read and handed to its call in one C call, 50 times a second a call each way.
 *
 * - MediaTap, the compiled twin of TwilioLeg._tapped (protocol.media_audio, the watchdog, DirectAudio.deliver).
 *   It takes only a message in Twilio's exact shape (spec §3; the one Twilio sends) with canonical padded
 *   base64: what it reads from such a message is what media_audio reads, and it accepts nothing media_audio
 *   refuses. Any other message goes to the Python tap it was given, which is the reference.
 *   tests/test_taps.py holds the two to the same answers.
 * - AudioTap, the compiled twin of SavantsConnection._tapped (VoiceSession.is_audio, then DirectAudio.deliver):
 *   the AI's binary frame handed to the call while nothing waits unread before it.
 *
 * Both work on the Python objects' own attributes, as the Python code does (_pyattrs.h: by name, or at a slot's
 * offset).
 *
 * {"event":"media","sequenceNumber":"N","media":{"track":"inbound","chunk":"N","timestamp":"N","payload":"B64"},
 *  "streamSid":"SID"}: numbers of 1 to MAX_NUMBER_DIGITS ASCII digits; a SID of printable ASCII, none escaped.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

#include "_pyattrs.h" /* take_exception */

#define MAX_NUMBER_DIGITS 18 /* protocol.MAX_NUMBER_DIGITS: MediaTap checks the two agree */
#define MAX_PAYLOAD 4096     /* base64 characters taken here (3 KB of audio); a longer payload goes the Python way */

static PyObject *str__open, *str__last, *str_handler, *str__context, *str__error, *str__events, *str_state;

static const char OPENING[] = "{\"event\":\"media\",\"sequenceNumber\":\"";
static const char AFTER_SEQUENCE[] = "\",\"media\":{\"track\":\"inbound\",\"chunk\":\"";
static const char AFTER_CHUNK[] = "\",\"timestamp\":\"";
static const char AFTER_TIMESTAMP[] = "\",\"payload\":\"";
static const char AFTER_PAYLOAD[] = "\"},\"streamSid\":\"";
static const char CLOSING[] = "\"}";

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static uint8_t b64_value[256]; /* 0..63, or 0x80 for any other byte ('=' included) */

/* --- the scan ------------------------------------------------------------------------------------------ */

static int literal(const char **at, const char *end, const char *text, size_t size) {
    if ((size_t)(end - *at) < size || memcmp(*at, text, size) != 0) return 0;
    *at += size;
    return 1;
}
#define LITERAL(at, end, text) literal(at, end, text, sizeof(text) - 1)

/* 1 to MAX_NUMBER_DIGITS ASCII digits; their value into *value when value is not NULL. */
static int number(const char **at, const char *end, long long *value) {
    const char *p = *at;
    long long v = 0;
    while (p < end && *p >= '0' && *p <= '9') {
        if (p - *at == MAX_NUMBER_DIGITS) return 0; /* one digit more: refused before it could overflow int64 */
        v = v * 10 + (*p++ - '0');                  /* 18 digits fit */
    }
    if (p == *at) return 0;
    *at = p;
    if (value != NULL) *value = v;
    return 1;
}

/* The bytes decoded into out (size / 4 * 3 at most), or -1 unless text is canonical padded base64, as msgspec
 * and a2b_base64(strict_mode=True) read it; anything else goes the Python way, which decides. */
static Py_ssize_t b64_decode(const uint8_t *text, Py_ssize_t size, uint8_t *out) {
    if (size % 4) return -1;
    if (size == 0) return 0;
    int pad = text[size - 1] != '=' ? 0 : text[size - 2] == '=' ? 2 : 1;
    Py_ssize_t groups = size / 4 - (pad ? 1 : 0), n = 0;
    for (Py_ssize_t g = 0; g < groups; g++, text += 4) {
        uint8_t s0 = b64_value[text[0]], s1 = b64_value[text[1]], s2 = b64_value[text[2]], s3 = b64_value[text[3]];
        if ((s0 | s1 | s2 | s3) & 0x80) return -1;
        out[n++] = (uint8_t)((s0 << 2) | (s1 >> 4));
        out[n++] = (uint8_t)(((s1 & 0x0F) << 4) | (s2 >> 2));
        out[n++] = (uint8_t)(((s2 & 0x03) << 6) | s3);
    }
    if (pad == 2) { /* xx==: one byte; its unused 4 bits must be 0 */
        uint8_t s0 = b64_value[text[0]], s1 = b64_value[text[1]];
        if ((s0 | s1) & 0x80 || s1 & 0x0F) return -1;
        out[n++] = (uint8_t)((s0 << 2) | (s1 >> 4));
    } else if (pad == 1) { /* xxx=: two bytes; their unused 2 bits must be 0 */
        uint8_t s0 = b64_value[text[0]], s1 = b64_value[text[1]], s2 = b64_value[text[2]];
        if ((s0 | s1 | s2) & 0x80 || s2 & 0x03) return -1;
        out[n++] = (uint8_t)((s0 << 2) | (s1 >> 4));
        out[n++] = (uint8_t)(((s1 & 0x0F) << 4) | (s2 >> 2));
    }
    return n;
}

/* The caller's audio and its timestamp from a message in Twilio's exact shape: the audio's length, decoded into
 * out (MAX_PAYLOAD / 4 * 3 bytes), or -1 for any other message. */
static Py_ssize_t media_audio(const char *text, Py_ssize_t size, uint8_t *out, long long *timestamp_ms) {
    const char *p = text, *end = text + size;
    if (!(LITERAL(&p, end, OPENING) && number(&p, end, NULL) && LITERAL(&p, end, AFTER_SEQUENCE) &&
          number(&p, end, NULL) && LITERAL(&p, end, AFTER_CHUNK) && number(&p, end, timestamp_ms) &&
          LITERAL(&p, end, AFTER_TIMESTAMP)))
        return -1;
    const char *payload = p, *quote = memchr(p, '"', end - p);
    if (quote == NULL || quote - payload > MAX_PAYLOAD) return -1;
    p = quote;
    if (!LITERAL(&p, end, AFTER_PAYLOAD)) return -1;
    for (; p < end && *p != '"'; p++) {
        if (*p < 0x20 || *p > 0x7E || *p == '\\') return -1;
    }
    if (!LITERAL(&p, end, CLOSING) || p != end) return -1;
    return b64_decode((const uint8_t *)payload, quote - payload, out);
}

/* A call on an object __new__ made and no __init__ set up (its references are still NULL). */
static PyObject *used_before_init(const char *name) {
    PyErr_Format(PyExc_RuntimeError, "%s used before __init__", name);
    return NULL;
}

/* --- Twilio's media: MediaTap ------------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *leg, *watchdog, *direct, *monotonic, *fallback;
} MediaTap;

static int MediaTap_init(MediaTap *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"leg", "watchdog", "direct", "monotonic", "fallback", "max_number_digits", NULL};
    PyObject *leg, *watchdog, *direct, *monotonic, *fallback;
    int digits;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOi", kwlist, &leg, &watchdog, &direct, &monotonic, &fallback,
                                     &digits))
        return -1;
    if (digits != MAX_NUMBER_DIGITS) {
        PyErr_Format(PyExc_ValueError, "built for numbers of %d digits, not %d", MAX_NUMBER_DIGITS, digits);
        return -1;
    }
    Py_XSETREF(self->leg, Py_NewRef(leg));
    Py_XSETREF(self->watchdog, Py_NewRef(watchdog));
    Py_XSETREF(self->direct, Py_NewRef(direct));
    Py_XSETREF(self->monotonic, Py_NewRef(monotonic));
    Py_XSETREF(self->fallback, Py_NewRef(fallback));
    return 0;
}

static int MediaTap_traverse(MediaTap *self, visitproc visit, void *arg) {
    Py_VISIT(self->leg);
    Py_VISIT(self->watchdog);
    Py_VISIT(self->direct);
    Py_VISIT(self->monotonic);
    Py_VISIT(self->fallback);
    return 0;
}

static int MediaTap_clear(MediaTap *self) {
    Py_CLEAR(self->leg);
    Py_CLEAR(self->watchdog);
    Py_CLEAR(self->direct);
    Py_CLEAR(self->monotonic);
    Py_CLEAR(self->fallback);
    return 0;
}

static void MediaTap_dealloc(MediaTap *self) {
    PyObject_GC_UnTrack(self);
    MediaTap_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* DirectAudio.deliver(*args): the handler, in the context it was attached in; what it raises is kept for
 * ``check`` and the handler detached (False: the frame is the socket's to queue). */
static PyObject *deliver(PyObject *direct, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *handler = attr_get(direct, str_handler);
    if (handler == NULL) return NULL;
    if (handler == Py_None) {
        Py_DECREF(handler);
        Py_RETURN_FALSE;
    }
    PyObject *context = attr_get(direct, str__context);
    if (context == NULL) {
        Py_DECREF(handler);
        return NULL;
    }
    PyObject *result = NULL;
    if (PyContext_Enter(context) == 0) {
        result = PyObject_Vectorcall(handler, args, nargs, NULL);
        if (PyContext_Exit(context) < 0) Py_CLEAR(result);
    }
    Py_DECREF(context);
    Py_DECREF(handler);
    if (result != NULL) {
        Py_DECREF(result);
        Py_RETURN_TRUE;
    }
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return NULL; /* KeyboardInterrupt and the like go on up */
    PyObject *exc = take_exception();
    int rc = attr_set(direct, str__error, exc);
    Py_DECREF(exc);
    if (rc < 0 || attr_set(direct, str_handler, Py_None) < 0) return NULL;
    Py_RETURN_FALSE;
}

/* __call__(text) -> bool: the socket's tap (StreamSocket.tap_text), as TwilioLeg._tapped. */
static PyObject *MediaTap_call(MediaTap *self, PyObject *args, PyObject *kwds) {
    PyObject *text;
    if (!PyArg_ParseTuple(args, "O", &text)) return NULL;
    if (self->fallback == NULL) return used_before_init("MediaTap");
    PyObject *open = attr_get(self->leg, str__open);
    if (open == NULL) return NULL;
    int is_open = PyObject_IsTrue(open);
    Py_DECREF(open);
    if (is_open <= 0) return is_open < 0 ? NULL : Py_NewRef(Py_False);
    uint8_t audio[MAX_PAYLOAD / 4 * 3];
    long long timestamp_ms = 0;
    Py_ssize_t n = PyBytes_CheckExact(text)
                       ? media_audio(PyBytes_AS_STRING(text), PyBytes_GET_SIZE(text), audio, &timestamp_ms)
                       : -1;
    if (n < 0) return PyObject_Call(self->fallback, args, kwds); /* not Twilio's shape: the reference decides */
    PyObject *now = PyObject_CallNoArgs(self->monotonic); /* Watchdog.alive */
    if (now == NULL) return NULL;
    int rc = attr_set(self->watchdog, str__last, now);
    Py_DECREF(now);
    if (rc < 0) return NULL;
    PyObject *ulaw = PyBytes_FromStringAndSize((const char *)audio, n);
    PyObject *stamp = PyLong_FromLongLong(timestamp_ms);
    PyObject *handed[] = {ulaw, stamp};
    PyObject *result = ulaw && stamp ? deliver(self->direct, handed, 2) : NULL;
    Py_XDECREF(ulaw);
    Py_XDECREF(stamp);
    return result;
}

static PyTypeObject MediaTapType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "telephony_bridge._taps.MediaTap",
    .tp_basicsize = sizeof(MediaTap),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "MediaTap(leg, watchdog, direct, monotonic, fallback, max_number_digits): a Twilio leg's media tap "
              "(see TwilioLeg.deliver_audio_to)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)MediaTap_init,
    .tp_dealloc = (destructor)MediaTap_dealloc,
    .tp_traverse = (traverseproc)MediaTap_traverse,
    .tp_clear = (inquiry)MediaTap_clear,
    .tp_call = (ternaryfunc)MediaTap_call,
};

/* --- the AI's audio: AudioTap -------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *connection, *session, *direct, *connected;
    Py_ssize_t max_frame_bytes;
} AudioTap;

static int AudioTap_init(AudioTap *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"connection", "session", "direct", "connected", "max_frame_bytes", NULL};
    PyObject *connection, *session, *direct, *connected;
    Py_ssize_t max_frame_bytes;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOn", kwlist, &connection, &session, &direct, &connected,
                                     &max_frame_bytes))
        return -1;
    Py_XSETREF(self->connection, Py_NewRef(connection));
    Py_XSETREF(self->session, Py_NewRef(session));
    Py_XSETREF(self->direct, Py_NewRef(direct));
    Py_XSETREF(self->connected, Py_NewRef(connected));
    self->max_frame_bytes = max_frame_bytes;
    return 0;
}

static int AudioTap_traverse(AudioTap *self, visitproc visit, void *arg) {
    Py_VISIT(self->connection);
    Py_VISIT(self->session);
    Py_VISIT(self->direct);
    Py_VISIT(self->connected);
    return 0;
}

static int AudioTap_clear(AudioTap *self) {
    Py_CLEAR(self->connection);
    Py_CLEAR(self->session);
    Py_CLEAR(self->direct);
    Py_CLEAR(self->connected);
    return 0;
}

static void AudioTap_dealloc(AudioTap *self) {
    PyObject_GC_UnTrack(self);
    AudioTap_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* __call__(data) -> bool: a whole binary frame from Savants; True if the call took it as the AI's audio, False
 * if it is the connection's to read as an event (something waits unread before it, the session is not
 * connected, or the frame is empty or too big: VoiceSession.receive_binary then says what it is). */
static PyObject *AudioTap_call(AudioTap *self, PyObject *args, PyObject *kwds) {
    PyObject *data;
    if (!PyArg_ParseTuple(args, "O", &data)) return NULL;
    if (self->connected == NULL) return used_before_init("AudioTap");
    PyObject *events = attr_get(self->connection, str__events);
    if (events == NULL) return NULL;
    Py_ssize_t waiting = PyObject_Length(events);
    Py_DECREF(events);
    if (waiting != 0) return waiting < 0 ? NULL : Py_NewRef(Py_False);
    PyObject *state = attr_get(self->session, str_state);
    if (state == NULL) return NULL;
    int connected = state == self->connected;
    Py_DECREF(state);
    Py_ssize_t size = PyObject_Length(data);
    if (size < 0) return NULL;
    if (!connected || size == 0 || size > self->max_frame_bytes) Py_RETURN_FALSE;
    return deliver(self->direct, &data, 1);
}

static PyTypeObject AudioTapType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "telephony_bridge._taps.AudioTap",
    .tp_basicsize = sizeof(AudioTap),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "AudioTap(connection, session, direct, connected, max_frame_bytes): a Savants connection's audio "
              "tap (see SavantsConnection)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)AudioTap_init,
    .tp_dealloc = (destructor)AudioTap_dealloc,
    .tp_traverse = (traverseproc)AudioTap_traverse,
    .tp_clear = (inquiry)AudioTap_clear,
    .tp_call = (ternaryfunc)AudioTap_call,
};

/* For tests: what the scan reads from ``text``, (ulaw, timestamp_ms), or None where the Python path decides. */
static PyObject *read_media(PyObject *module, PyObject *text) {
    if (!PyBytes_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "expected bytes");
        return NULL;
    }
    uint8_t audio[MAX_PAYLOAD / 4 * 3];
    long long timestamp_ms = 0;
    Py_ssize_t n = media_audio(PyBytes_AS_STRING(text), PyBytes_GET_SIZE(text), audio, &timestamp_ms);
    if (n < 0) Py_RETURN_NONE;
    return Py_BuildValue("(y#L)", (const char *)audio, n, timestamp_ms);
}

/* For tests: _pyattrs.h's attribute access, which all three modules use on the Python objects' state. Its cache
 * knows a name by its address, so the name is interned and kept for good, as the modules keep theirs. */
static PyObject *kept_name(PyObject *name) {
    Py_INCREF(name);
    PyUnicode_InternInPlace(&name); /* the reference is never given back */
    return name;
}

static PyObject *get_attribute(PyObject *module, PyObject *args) {
    PyObject *obj, *name;
    if (!PyArg_ParseTuple(args, "OU:get_attribute", &obj, &name)) return NULL;
    return attr_get(obj, kept_name(name));
}

static PyObject *set_attribute(PyObject *module, PyObject *args) {
    PyObject *obj, *name, *value;
    if (!PyArg_ParseTuple(args, "OUO:set_attribute", &obj, &name, &value)) return NULL;
    if (attr_set(obj, kept_name(name), value) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *slot_offset_of(PyObject *module, PyObject *args) {
    PyObject *obj, *name;
    if (!PyArg_ParseTuple(args, "OU:slot_offset", &obj, &name)) return NULL;
    return PyLong_FromSsize_t(slot_offset(obj, kept_name(name)));
}

static PyMethodDef methods[] = {
    {"read_media", read_media, METH_O, "read_media(text) -> (ulaw, timestamp_ms) | None: the scan alone (tests)"},
    {"get_attribute", get_attribute, METH_VARARGS, "obj.name as the C reads it (tests)"},
    {"set_attribute", set_attribute, METH_VARARGS, "obj.name = value (tests)"},
    {"slot_offset", slot_offset_of, METH_VARARGS,
     "where the C reads and writes obj.name: a byte offset, or 0 for the generic way (tests)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_taps", "The sockets' taps in C (see TwilioLeg and SavantsConnection).", -1, methods,
};

PyMODINIT_FUNC PyInit__taps(void) {
    for (int i = 0; i < 256; i++) b64_value[i] = 0x80;
    for (int i = 0; i < 64; i++) b64_value[(uint8_t)B64[i]] = (uint8_t)i;
    if ((str__open = PyUnicode_InternFromString("_open")) == NULL ||
        (str__last = PyUnicode_InternFromString("_last")) == NULL ||
        (str_handler = PyUnicode_InternFromString("handler")) == NULL ||
        (str__context = PyUnicode_InternFromString("_context")) == NULL ||
        (str__error = PyUnicode_InternFromString("_error")) == NULL ||
        (str__events = PyUnicode_InternFromString("_events")) == NULL ||
        (str_state = PyUnicode_InternFromString("state")) == NULL)
        return NULL;
    if (PyType_Ready(&MediaTapType) < 0 || PyType_Ready(&AudioTapType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "MediaTap", (PyObject *)&MediaTapType) < 0 ||
        PyModule_AddObjectRef(m, "AudioTap", (PyObject *)&AudioTapType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
