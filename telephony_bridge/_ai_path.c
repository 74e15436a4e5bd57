/* The AI → caller direction's per-frame Python glue in one C call: the common case of Outbound.push_pcm.
 *
 * Why: a real-time AI's 20 ms frame went through ~25 Python calls (push_pcm, _append, append_pcm, _send_inline,
 * _take_due, batch_due, _note_playout, steady, take, the converter, the media message, _audio_sent,
 * _track_audibility...): ~7 µs a call per 20 ms at 250 calls (issue #10), most of it the calls themselves. Here
 * that chain is one call (bench/frame_path.py's "AI → caller" rows compare the two).
 *
 * Python is the reference (telephony_bridge/outbound.py and what it calls). This is a transliteration of the
 * fast branches of those methods, and the state stays in the same Python objects: it reads and writes their
 * attributes, with the same operations on the same doubles in the same order, so the results are bit for bit
 * the Python path's. Before it changes anything it checks that the case is the common one, and if not calls
 * Outbound.push_pcm; past that point, a step it does not port (an underrun, a take that needs the queue's
 * bytes, a sink that is not a TwilioLeg) is the Python method for that step alone. tests/test_ai_path.py
 * runs both paths side by side on random operations and compares what they sent and every attribute.
 *
 * The numbers come from Python: the filters' sums are the kernels' own (their capsule, _kernels_capi.h, with
 * the tables kernels.py configured), the constants and the audibility table come through the constructor
 * (outbound.py's _compiled_path).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include "_pyattrs.h" /* attributes as C numbers, take_exception */
#include "audio/_kernels_capi.h" /* the kernels' own down-sampling, through their capsule */

static const KernelsCAPI *kernels = NULL;

/* --- interned attribute names ------------------------------------------------------------------------------ */

#define NAMES(X)                                                                                                     \
    X(_finishing) X(holding) X(_max_queued_bytes) X(_queued_since) X(_last_push_at) X(_batch_frames) X(_parked)      \
    X(_parked_until) X(_clear_pending) X(_fill) X(_unmarked_ms) X(_mark_every_ms) X(_holds_pay) X(_held_part)        \
    X(_spurt_live) X(_note_playout) X(first_audio_at) X(_audible_since) X(_audible_until) X(_sink)                   \
    X(_ready) X(_progress) X(_pacer) X(_buffer) X(prebuffer) X(playback) X(push_pcm) X(size) X(_pcm) X(_data)        \
    X(_pcm_bytes_in) X(_ulaw_out) X(_to_caller) X(take) X(_odd_byte) X(_downsampler) X(_state) X(_play_end)          \
    X(lead_s) X(frame_s) X(value_s) X(base_s) X(step_s) X(calm_s) X(shrinks) X(_changed_at) X(sent_ms)               \
    X(can_send_now) X(send_audio_nowait) X(_ws) X(_media) X(_open) X(_head) X(_tail)                                 \
    X(send_utf8_now) X(_value) X(set)

#define DECLARE(name) static PyObject *s_##name;
NAMES(DECLARE)
#undef DECLARE

static int intern_names(void) {
#define INTERN(name) \
    if ((s_##name = PyUnicode_InternFromString(#name)) == NULL) return -1;
    NAMES(INTERN)
#undef INTERN
    return 0;
}

/* Python's floor division, for the one place an operand may be negative. */
static int64_t floor_div(int64_t a, int64_t b) {
    int64_t q = a / b;
    return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

/* Python's max(a, b) and min(a, b) on floats: the first of equals. */
static inline double py_max(double a, double b) { return b > a ? b : a; }
static inline double py_min(double a, double b) { return b < a ? b : a; }

/* --- the object ---------------------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    /* Outbound and the parts of it whose identity lasts the call. */
    PyObject *outbound, *buffer, *to_caller, *down_state, *pacer, *prebuffer, *playback, *monotonic, *sink;
    PyObject *ready, *progress, *push_pcm;
    PyObject *twilio_leg, *caller_gone; /* the sink type whose media message is built here, and its error */
    /* outbound.py's constants (FRAME_S, FRAME_MS, TWILIO_FRAME_BYTES, LOW_WATER_S, UNDERRUN_GAP_S, SPURT_GAP_S,
     * _EPS) and pacing.py's _EPS. */
    double frame_s, low_water_s, underrun_gap_s, spurt_gap_s, eps, pacing_eps;
    long long frame_ms, frame_bytes;
    uint8_t audible[256];
    /* What ran, for tests: calls, calls that took the fast path, and frames sent from it. */
    Py_ssize_t calls, fast, sent;
} AiAudioPath;

/* --- Flag.set, FakeClock/SystemClock.monotonic --------------------------------------------------------------- */

/* clock.Flag.set(): a call only when it is not set already (set() then does nothing). */
static int flag_set(PyObject *flag) {
    PyObject *value = attr_get(flag, s__value);
    if (value == NULL) return -1;
    int already = value == Py_True;
    Py_DECREF(value);
    if (already) return 0;
    PyObject *r = PyObject_CallMethodNoArgs(flag, s_set);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* --- OutboundPacer ------------------------------------------------------------------------------------------- */

/* ``self._play_end or now``, as a double. */
static int play_end_or(AiAudioPath *self, double now, double *end) {
    PyObject *v = attr_get(self->pacer, s__play_end);
    if (v == NULL) return -1;
    double e = v == Py_None ? now : PyFloat_AsDouble(v);
    Py_DECREF(v);
    if (e == -1.0 && PyErr_Occurred()) return -1;
    *end = e != 0.0 ? e : now;
    return 0;
}

/* OutboundPacer.lead(now). */
static int pacer_lead(AiAudioPath *self, double now, double *lead) {
    double end;
    if (play_end_or(self, now, &end) < 0) return -1;
    *lead = py_max(0.0, end - now);
    return 0;
}

/* OutboundPacer.batch_due(now, available, batch, low_water_s), its _send included. */
static int batch_due(AiAudioPath *self, double now, int64_t available, int64_t batch, double low_water_s,
                     int64_t *due) {
    double end, lead_s, frame_s;
    if (play_end_or(self, now, &end) < 0 || get_double(self->pacer, s_lead_s, &lead_s) < 0 ||
        get_double(self->pacer, s_frame_s, &frame_s) < 0)
        return -1;
    double lead = py_max(0.0, end - now);
    int64_t room = (int64_t)((lead_s - lead) / frame_s + self->pacing_eps); /* int(): towards zero */
    int64_t fit = available < room ? available : room;
    if (fit < batch && lead > low_water_s + self->pacing_eps) {
        *due = 0;
        return 0;
    }
    *due = fit > 0 ? fit : 0;
    return set_double(self->pacer, s__play_end, py_max(end, now) + (double)*due * frame_s);
}

/* --- AdaptivePrebuffer --------------------------------------------------------------------------------------- */

/* AdaptivePrebuffer.frames. */
static int prebuffer_frames(AiAudioPath *self, int64_t *frames) {
    double value_s, step_s;
    if (get_double(self->prebuffer, s_value_s, &value_s) < 0 || get_double(self->prebuffer, s_step_s, &step_s) < 0)
        return -1;
    int64_t step = (int64_t)nearbyint(step_s * 1000); /* round(): half to even, as nearbyint by default */
    if (step == 0) {
        PyErr_SetString(PyExc_ZeroDivisionError, "AdaptivePrebuffer.step_s rounds to no milliseconds");
        return -1;
    }
    int64_t ceil = -floor_div(-(int64_t)nearbyint(value_s * 1000), step);
    *frames = ceil > 1 ? ceil : 1;
    return 0;
}

/* AdaptivePrebuffer.steady(now). */
static int prebuffer_steady(AiAudioPath *self, PyObject *now_obj, double now) {
    PyObject *pb = self->prebuffer;
    double value_s, base_s, changed_at, calm_s, step_s;
    if (get_double(pb, s_value_s, &value_s) < 0 || get_double(pb, s_base_s, &base_s) < 0) return -1;
    if (!(value_s > base_s + self->pacing_eps)) return 0;
    if (get_double(pb, s__changed_at, &changed_at) < 0 || get_double(pb, s_calm_s, &calm_s) < 0) return -1;
    if (!(now - changed_at >= calm_s)) return 0;
    if (get_double(pb, s_step_s, &step_s) < 0 || set_double(pb, s_value_s, py_max(base_s, value_s - step_s)) < 0 ||
        add_i64(pb, s_shrinks, 1) < 0)
        return -1;
    return attr_set(pb, s__changed_at, now_obj);
}

/* --- FrameBuffer --------------------------------------------------------------------------------------------- */

/* FrameBuffer._resize(). */
static int buffer_resize(AiAudioPath *self, int64_t *size) {
    int64_t pcm_in, ulaw_out;
    PyObject *data = attr_get(self->buffer, s__data);
    if (data == NULL) return -1;
    Py_ssize_t data_len = PyObject_Length(data);
    Py_DECREF(data);
    if (data_len < 0 || get_i64(self->buffer, s__pcm_bytes_in, &pcm_in) < 0 ||
        get_i64(self->buffer, s__ulaw_out, &ulaw_out) < 0)
        return -1;
    *size = data_len + pcm_in / 2 / 2 - ulaw_out;
    return set_i64(self->buffer, s_size, *size);
}

/* FrameBuffer.append_pcm(pcm) for bytes. */
static int buffer_append_pcm(AiAudioPath *self, PyObject *pcm, int64_t *size) {
    PyObject *chunks = attr_get(self->buffer, s__pcm);
    if (chunks == NULL) return -1;
    int r = PyList_Check(chunks) ? PyList_Append(chunks, pcm) : -1;
    if (r < 0 && !PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "FrameBuffer._pcm is not a list");
    Py_DECREF(chunks);
    if (r < 0 || add_i64(self->buffer, s__pcm_bytes_in, PyBytes_GET_SIZE(pcm)) < 0) return -1;
    return buffer_resize(self, size);
}

/* The queued chunks as one run of bytes (a lone chunk as it is; else copied into *owned, to free). */
static const uint8_t *joined(PyObject *chunks, Py_ssize_t total, uint8_t **owned) {
    *owned = NULL;
    if (PyList_GET_SIZE(chunks) == 1) return (const uint8_t *)PyBytes_AS_STRING(PyList_GET_ITEM(chunks, 0));
    uint8_t *out = PyMem_Malloc(total ? total : 1);
    if (out == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    Py_ssize_t at = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(chunks); i++) {
        PyObject *chunk = PyList_GET_ITEM(chunks, i);
        memcpy(out + at, PyBytes_AS_STRING(chunk), PyBytes_GET_SIZE(chunk));
        at += PyBytes_GET_SIZE(chunk);
    }
    return *owned = out;
}

#define STACK_DOUBLES DOWN_WORK_DOUBLES(960, 480)

/* The μ-law the queued PCM becomes (FrameBuffer._converted with AiToCaller.push's whole-samples branch and the
 * compiled DownsamplerToUlaw.process), made and accounted for; the queue is then empty. */
static PyObject *convert_all(AiAudioPath *self, PyObject *chunks, Py_ssize_t total, Py_ssize_t count) {
    Py_buffer state;
    if (PyObject_GetBuffer(self->down_state, &state, PyBUF_WRITABLE) < 0) return NULL;
    uint8_t *owned;
    const uint8_t *in = joined(chunks, total, &owned);
    double stack[STACK_DOUBLES]; /* up to 60 ms a take, without a malloc */
    Py_ssize_t needed = DOWN_WORK_DOUBLES(total / 2, count);
    double *work = !in ? NULL : needed <= STACK_DOUBLES ? stack : PyMem_Malloc(needed * sizeof(double));
    PyObject *ulaw = work ? PyBytes_FromStringAndSize(NULL, count) : NULL;
    if (in && !work) PyErr_NoMemory();
    if (ulaw != NULL) kernels->down_ulaw(state.buf, in, total / 2, (uint8_t *)PyBytes_AS_STRING(ulaw), work);
    if (work != stack) PyMem_Free(work);
    PyMem_Free(owned);
    PyBuffer_Release(&state);
    if (ulaw == NULL || PyList_SetSlice(chunks, 0, PyList_GET_SIZE(chunks), NULL) < 0 ||
        add_i64(self->buffer, s__ulaw_out, count) < 0) {
        Py_XDECREF(ulaw);
        return NULL;
    }
    return ulaw;
}

/* 1 if FrameBuffer.take(frames) would hand the converter's output straight out: PCM queued as bytes, no μ-law,
 * no split sample carried or left, and exactly ``n`` bytes out. Sets *total (PCM bytes) and *count. */
static int take_is_direct(AiAudioPath *self, PyObject *chunks, PyObject *data, Py_ssize_t n, Py_ssize_t *total,
                          Py_ssize_t *count) {
    Py_ssize_t queued = PyObject_Length(data);
    if (queued < 0) return -1;
    if (!PyList_Check(chunks) || PyList_GET_SIZE(chunks) == 0 || queued != 0) return 0;
    *total = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(chunks); i++) {
        PyObject *chunk = PyList_GET_ITEM(chunks, i);
        if (!PyBytes_CheckExact(chunk)) return 0;
        *total += PyBytes_GET_SIZE(chunk);
    }
    PyObject *odd = attr_get(self->to_caller, s__odd_byte);
    if (odd == NULL) return -1;
    int carried = PyObject_IsTrue(odd);
    Py_DECREF(odd);
    if (carried != 0 || *total % 2) return carried < 0 ? -1 : 0;
    /* The kernels' own checks, which the Python path's down_ulaw makes on every take: it then raises. */
    if (PyByteArray_GET_SIZE(self->down_state) != DOWN_STATE_BYTES || !*kernels->configured) return 0;
    *count = kernels->down_count((const uint8_t *)PyByteArray_AS_STRING(self->down_state), *total / 2);
    return *count == n;
}

/* FrameBuffer.take(frames): the direct case here, any other by the method. */
static PyObject *buffer_take(AiAudioPath *self, int64_t frames) {
    PyObject *chunks = attr_get(self->buffer, s__pcm);
    PyObject *data = chunks ? attr_get(self->buffer, s__data) : NULL;
    Py_ssize_t total = 0, count = 0;
    int direct = data ? take_is_direct(self, chunks, data, frames * self->frame_bytes, &total, &count) : -1;
    PyObject *ulaw = NULL;
    int64_t size;
    if (direct > 0) {
        ulaw = convert_all(self, chunks, total, count);
        if (ulaw != NULL && buffer_resize(self, &size) < 0) Py_CLEAR(ulaw);
    } else if (direct == 0) {
        PyObject *arg = PyLong_FromLongLong(frames);
        ulaw = arg ? PyObject_CallMethodOneArg(self->buffer, s_take, arg) : NULL;
        Py_XDECREF(arg);
    }
    Py_XDECREF(chunks);
    Py_XDECREF(data);
    return ulaw;
}

/* --- the sink ------------------------------------------------------------------------------------------------ */

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Standard base64 with padding, no newline (binascii.b2a_base64(data, newline=False)); out: 4 * ceil(n / 3). */
static void base64_encode(const uint8_t *in, Py_ssize_t n, char *out) {
    Py_ssize_t i = 0;
    for (; i + 3 <= n; i += 3, out += 4) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[0] = B64[v >> 18], out[1] = B64[v >> 12 & 63], out[2] = B64[v >> 6 & 63], out[3] = B64[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0);
        out[0] = B64[v >> 18], out[1] = B64[v >> 12 & 63];
        out[2] = i + 1 < n ? B64[v >> 6 & 63] : '=', out[3] = '=';
    }
}

/* MediaMessages.encode(ulaw): head + base64 + tail. */
static PyObject *media_message(PyObject *media, PyObject *ulaw) {
    PyObject *head = attr_get(media, s__head), *tail = head ? attr_get(media, s__tail) : NULL;
    PyObject *msg = NULL;
    if (tail != NULL && (!PyBytes_Check(head) || !PyBytes_Check(tail)))
        PyErr_SetString(PyExc_TypeError, "MediaMessages._head and _tail must be bytes");
    else if (tail != NULL) {
        Py_ssize_t h = PyBytes_GET_SIZE(head), n = PyBytes_GET_SIZE(ulaw), b = (n + 2) / 3 * 4;
        msg = PyBytes_FromStringAndSize(NULL, h + b + PyBytes_GET_SIZE(tail));
        if (msg != NULL) {
            char *out = PyBytes_AS_STRING(msg);
            memcpy(out, PyBytes_AS_STRING(head), h);
            base64_encode((const uint8_t *)PyBytes_AS_STRING(ulaw), n, out + h);
            memcpy(out + h + b, PyBytes_AS_STRING(tail), PyBytes_GET_SIZE(tail));
        }
    }
    Py_XDECREF(head);
    Py_XDECREF(tail);
    return msg;
}

/* TwilioLeg.send_audio_nowait's body: ``self._ws.send_utf8_now(self._media.encode(ulaw))``. */
static int twilio_send_body(PyObject *leg, PyObject *ulaw) {
    PyObject *ws = attr_get(leg, s__ws);
    PyObject *media = ws ? attr_get(leg, s__media) : NULL;
    PyObject *msg = media ? media_message(media, ulaw) : NULL;
    PyObject *r = msg ? PyObject_CallMethodOneArg(ws, s_send_utf8_now, msg) : NULL;
    Py_XDECREF(ws);
    Py_XDECREF(media);
    Py_XDECREF(msg);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* TwilioLeg.send_audio_nowait(ulaw), its ``except Exception: ... raise CallerGone(...) from exc`` included. */
static int twilio_send(AiAudioPath *self, PyObject *ulaw) {
    if (twilio_send_body(self->sink, ulaw) == 0) return 0;
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return -1;
    PyObject *value = take_exception();
    if (set_bool(self->sink, s__open, 0) < 0) {
        Py_DECREF(value);
        return -1;
    }
    PyObject *gone = PyObject_CallFunction(self->caller_gone, "s", "the twilio stream closed while sending");
    if (gone == NULL) {
        Py_DECREF(value);
        return -1;
    }
    PyException_SetContext(gone, Py_NewRef(value)); /* as the ``except`` block sets it */
    PyException_SetCause(gone, value);              /* ``from exc`` (steals; suppresses the context) */
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(gone)), gone, NULL); /* no chaining beyond the above */
    return -1;
}

/* ``self._sink.send_audio_nowait(ulaw)``: built here for exactly a TwilioLeg, the method for any other sink. */
static int sink_send(AiAudioPath *self, PyObject *ulaw) {
    if (self->twilio_leg != Py_None && (PyObject *)Py_TYPE(self->sink) == self->twilio_leg)
        return twilio_send(self, ulaw);
    PyObject *r = PyObject_CallMethodOneArg(self->sink, s_send_audio_nowait, ulaw);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* --- Outbound ------------------------------------------------------------------------------------------------ */

/* Outbound._track_audibility(ulaw, play_at). */
static int track_audibility(AiAudioPath *self, PyObject *ulaw, double play_at) {
    const uint8_t *bytes = (const uint8_t *)PyBytes_AS_STRING(ulaw);
    Py_ssize_t frames = PyBytes_GET_SIZE(ulaw) / self->frame_bytes;
    for (Py_ssize_t k = 0; k < frames; k++) {
        const uint8_t *frame = bytes + k * self->frame_bytes;
        int audible = 0;
        for (int64_t i = 0; i < self->frame_bytes && !audible; i++) audible = self->audible[frame[i]] == 1;
        if (!audible) continue;
        double starts = play_at + (double)k * self->frame_s, until;
        int none = get_is_none(self->outbound, s__audible_since);
        if (none < 0 || get_double(self->outbound, s__audible_until, &until) < 0) return -1;
        if ((none || starts > until + self->spurt_gap_s) && set_double(self->outbound, s__audible_since, starts) < 0)
            return -1;
        if (set_double(self->outbound, s__audible_until, starts + self->frame_s) < 0) return -1;
    }
    return 0;
}

/* Outbound._audio_sent(ulaw, play_at). */
static int audio_sent(AiAudioPath *self, PyObject *ulaw, double play_at) {
    if (flag_set(self->progress) < 0) return -1;
    int64_t ms = PyBytes_GET_SIZE(ulaw) / self->frame_bytes * self->frame_ms;
    if (add_i64(self->playback, s_sent_ms, ms) < 0) return -1;
    int none = get_is_none(self->outbound, s_first_audio_at);
    if (none < 0) return -1;
    if (none && set_steal(self->outbound, s_first_audio_at, PyObject_CallNoArgs(self->monotonic)) < 0)
        return -1;
    if (track_audibility(self, ulaw, play_at) < 0) return -1;
    return add_i64(self->outbound, s__unmarked_ms, ms);
}

/* Outbound._low_water_s(). */
static int low_water(AiAudioPath *self, double *out) {
    double value_s, lead_s;
    int64_t batch;
    if (get_double(self->prebuffer, s_value_s, &value_s) < 0 || get_i64(self->outbound, s__batch_frames, &batch) < 0 ||
        get_double(self->pacer, s_lead_s, &lead_s) < 0)
        return -1;
    double low_water_s = py_max(self->low_water_s, value_s - (double)batch * self->frame_s);
    *out = py_min(low_water_s, lead_s - self->frame_s);
    return 0;
}

/* Outbound._hold_low_water_s(). */
static int hold_low_water(AiAudioPath *self, double *out) {
    int pays = get_truth(self->outbound, s__holds_pay);
    if (pays < 0) return -1;
    return pays ? low_water(self, out) : get_double(self->pacer, s_lead_s, out);
}

/* Outbound._note_playout(now, dry_at); dry_at is None or a float. An underrun is the method's: it cannot happen
 * here, as a frame goes out inline only while Twilio still has some (the lead: dry_at is ahead of now). */
static int note_playout(AiAudioPath *self, PyObject *now_obj, double now, PyObject *dry_at_obj) {
    if (dry_at_obj != Py_None) {
        double dry_at = PyFloat_AsDouble(dry_at_obj);
        if (dry_at == -1.0 && PyErr_Occurred()) return -1;
        int live = get_truth(self->outbound, s__spurt_live);
        if (live < 0) return -1;
        double gap = now - dry_at;
        if (live && self->eps < gap && gap <= self->underrun_gap_s) {
            PyObject *r = PyObject_CallMethodObjArgs(self->outbound, s__note_playout, now_obj, dry_at_obj, NULL);
            Py_XDECREF(r);
            return r == NULL ? -1 : 0;
        }
    }
    if (prebuffer_steady(self, now_obj, now) < 0) return -1;
    return set_bool(self->outbound, s__spurt_live, 1);
}

/* Outbound._take_due(now, frames, batch): 1 with *ulaw (new) and *play_at, 0 for None (held), -1 on error. */
static int take_due(AiAudioPath *self, PyObject *now_obj, double now, int64_t frames, int64_t batch, PyObject **ulaw,
                    double *play_at) {
    PyObject *dry_at = attr_get(self->pacer, s__play_end);
    if (dry_at == NULL) return -1;
    double hold_s, lead;
    int64_t due;
    int held = -1;
    if (hold_low_water(self, &hold_s) < 0 || batch_due(self, now, frames, batch, hold_s, &due) < 0) goto fail;
    if (!due) {
        Py_DECREF(dry_at);
        return 0;
    }
    if ((held = get_truth(self->outbound, s__held_part)) < 0) goto fail;
    if (held && due < batch && set_bool(self->outbound, s__holds_pay, 0) < 0) goto fail;
    if (set_bool(self->outbound, s__held_part, 0) < 0 || note_playout(self, now_obj, now, dry_at) < 0 ||
        pacer_lead(self, now, &lead) < 0)
        goto fail;
    Py_DECREF(dry_at);
    *play_at = now + lead - (double)due * self->frame_s;
    *ulaw = buffer_take(self, due);
    if (*ulaw != NULL && !PyBytes_Check(*ulaw)) { /* the Python take always returns bytes */
        PyErr_SetString(PyExc_TypeError, "FrameBuffer.take returned no bytes");
        Py_CLEAR(*ulaw);
    }
    return *ulaw == NULL ? -1 : 1;
fail:
    Py_DECREF(dry_at);
    return -1;
}

/* The checks of Outbound._send_inline before it takes anything: 1 to go on (with *frames), 0 to leave it to the
 * pacer, -1 on error. */
static int inline_allowed(AiAudioPath *self, double now, int64_t *frames) {
    PyObject *ob = self->outbound;
    int truth;
    double lead;
    if ((truth = get_truth(ob, s__parked)) != 1) return truth;
    if ((truth = get_truth(ob, s__clear_pending)) != 0) return truth < 0 ? -1 : 0;
    if ((truth = get_truth(ob, s__finishing)) != 0) return truth < 0 ? -1 : 0;
    if ((truth = get_is_none(ob, s__fill)) != 1) return truth;
    if (pacer_lead(self, now, &lead) < 0) return -1;
    if (lead == 0.0) return 0;
    PyObject *can = PyObject_CallMethodNoArgs(self->sink, s_can_send_now);
    if (can == NULL) return -1;
    truth = PyObject_IsTrue(can);
    Py_DECREF(can);
    if (truth != 1) return truth;
    int64_t size, unmarked, every;
    if (get_i64(self->buffer, s_size, &size) < 0) return -1;
    *frames = floor_div(size, self->frame_bytes);
    if (!*frames) return 0;
    if (get_i64(ob, s__unmarked_ms, &unmarked) < 0 || get_i64(ob, s__mark_every_ms, &every) < 0) return -1;
    return unmarked + *frames * self->frame_ms < every;
}

/* Outbound._send_inline(now): 1 done, 0 the pacer must look, -1 on error. */
static int send_inline(AiAudioPath *self, PyObject *now_obj, double now) {
    int64_t frames, batch, size;
    int allowed = inline_allowed(self, now, &frames);
    if (allowed != 1) return allowed;
    if (get_i64(self->outbound, s__batch_frames, &batch) < 0) return -1;
    PyObject *ulaw;
    double play_at;
    int taken = take_due(self, now_obj, now, frames, batch, &ulaw, &play_at);
    if (taken != 1) return taken;
    int ok = sink_send(self, ulaw) == 0 && audio_sent(self, ulaw, play_at) == 0;
    Py_DECREF(ulaw);
    if (!ok) return -1;
    self->sent++;
    int none = get_is_none(self->outbound, s__parked_until);
    if (none < 0 || get_i64(self->buffer, s_size, &size) < 0) return -1;
    if ((floor_div(size, self->frame_bytes) || none) && flag_set(self->ready) < 0) return -1;
    return 1;
}

/* Whether _append's audio changes what the pacer would do (the condition that wakes it). */
static int wakes_pacer(AiAudioPath *self, int was_empty, int64_t before, int64_t after) {
    int64_t batch, prebuffer;
    if (was_empty || (before == 0 && 0 < after)) return 1;
    if (get_i64(self->outbound, s__batch_frames, &batch) < 0) return -1;
    if (before < batch && batch <= after) return 1;
    if (prebuffer_frames(self, &prebuffer) < 0) return -1;
    return before < prebuffer && prebuffer <= after;
}

/* Outbound._append(pcm, buffer.append_pcm), the overflow excluded (is_common saw there is none). */
static int append(AiAudioPath *self, PyObject *pcm) {
    PyObject *now_obj = PyObject_CallNoArgs(self->monotonic);
    if (now_obj == NULL) return -1;
    double now = PyFloat_AsDouble(now_obj);
    int64_t size, after;
    int r = -1;
    if ((now == -1.0 && PyErr_Occurred()) || get_i64(self->buffer, s_size, &size) < 0) goto done;
    int was_empty = !size;
    if (was_empty && attr_set(self->outbound, s__queued_since, now_obj) < 0) goto done;
    if (attr_set(self->outbound, s__last_push_at, now_obj) < 0) goto done;
    int64_t before = floor_div(size, self->frame_bytes);
    if (buffer_append_pcm(self, pcm, &after) < 0) goto done;
    int wake = wakes_pacer(self, was_empty, before, floor_div(after, self->frame_bytes));
    int done_inline = wake == 1 ? send_inline(self, now_obj, now) : 1;
    if (wake < 0 || done_inline < 0) goto done;
    r = done_inline ? 0 : flag_set(self->ready);
done:
    Py_DECREF(now_obj);
    return r;
}

/* 1 if push_pcm(pcm) is the common case this path covers, 0 if it is Python's, -1 on error. */
static int is_common(AiAudioPath *self, PyObject *pcm) {
    if (!PyBytes_CheckExact(pcm) || PyBytes_GET_SIZE(pcm) == 0 || PyBytes_GET_SIZE(pcm) % 2) return 0;
    PyObject *finishing = attr_get(self->outbound, s__finishing);
    PyObject *holding = finishing ? attr_get(self->outbound, s_holding) : NULL;
    int plain = holding != NULL && finishing == Py_False && holding == Py_False;
    Py_XDECREF(finishing);
    Py_XDECREF(holding);
    if (holding == NULL) return -1;
    if (!plain) return 0;
    /* No overflow: the size after appending stays within _max_queued_bytes (see FrameBuffer._resize). */
    int64_t pcm_in, ulaw_out, max_queued;
    PyObject *data = attr_get(self->buffer, s__data);
    if (data == NULL) return -1;
    Py_ssize_t data_len = PyObject_Length(data);
    Py_DECREF(data);
    if (data_len < 0 || get_i64(self->buffer, s__pcm_bytes_in, &pcm_in) < 0 ||
        get_i64(self->buffer, s__ulaw_out, &ulaw_out) < 0 ||
        get_i64(self->outbound, s__max_queued_bytes, &max_queued) < 0)
        return -1;
    return data_len + (pcm_in + PyBytes_GET_SIZE(pcm)) / 2 / 2 - ulaw_out - max_queued <= 0;
}

/* path(pcm): Outbound.push_pcm(pcm). */
static PyObject *path_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    AiAudioPath *self = (AiAudioPath *)callable;
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "AiAudioPath takes one argument: the AI's PCM");
        return NULL;
    }
    if (self->outbound == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "AiAudioPath used before __init__");
        return NULL;
    }
    self->calls++;
    int common = is_common(self, args[0]);
    if (common < 0) return NULL;
    if (!common) return PyObject_CallOneArg(self->push_pcm, args[0]);
    self->fast++;
    if (append(self, args[0]) < 0) return NULL;
    Py_RETURN_NONE;
}

/* --- construction -------------------------------------------------------------------------------------------- */

/* *slot = obj.name (a new reference; the old one released). */
static int cache(PyObject **slot, PyObject *obj, PyObject *name) {
    Py_XSETREF(*slot, attr_get(obj, name));
    return *slot == NULL ? -1 : 0;
}

static int path_init(AiAudioPath *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"outbound", "audible_codes", "frame_s", "frame_ms", "frame_bytes", "low_water_s",
                               "underrun_gap_s", "spurt_gap_s", "eps", "pacing_eps", "twilio_leg", "caller_gone",
                               "monotonic", NULL};
    PyObject *outbound, *twilio_leg, *caller_gone, *monotonic;
    Py_buffer audible;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O$y*dLLdddddOOO", keywords, &outbound, &audible, &self->frame_s,
                                     &self->frame_ms, &self->frame_bytes, &self->low_water_s, &self->underrun_gap_s,
                                     &self->spurt_gap_s, &self->eps, &self->pacing_eps, &twilio_leg, &caller_gone,
                                     &monotonic))
        return -1;
    int sized = audible.len == 256;
    if (sized) memcpy(self->audible, audible.buf, 256);
    PyBuffer_Release(&audible);
    if (!sized || self->frame_bytes <= 0) {
        PyErr_SetString(PyExc_ValueError, "expected a 256-byte audibility table and a positive frame size");
        return -1;
    }
    if (kernels == NULL || !*kernels->configured) {
        PyErr_SetString(PyExc_RuntimeError, "the compiled kernels are not configured (see audio/kernels.py)");
        return -1;
    }
    Py_XSETREF(self->outbound, Py_NewRef(outbound));
    Py_XSETREF(self->twilio_leg, Py_NewRef(twilio_leg));
    Py_XSETREF(self->caller_gone, Py_NewRef(caller_gone));
    Py_XSETREF(self->monotonic, Py_NewRef(monotonic));
    PyObject *downsampler = NULL;
    int failed = cache(&self->buffer, outbound, s__buffer) < 0 ||
                 cache(&self->to_caller, self->buffer, s__to_caller) < 0 ||
                 cache(&downsampler, self->to_caller, s__downsampler) < 0 ||
                 cache(&self->down_state, downsampler, s__state) < 0 || cache(&self->pacer, outbound, s__pacer) < 0 ||
                 cache(&self->prebuffer, outbound, s_prebuffer) < 0 ||
                 cache(&self->playback, outbound, s_playback) < 0 ||
                 cache(&self->sink, outbound, s__sink) < 0 || cache(&self->ready, outbound, s__ready) < 0 ||
                 cache(&self->progress, outbound, s__progress) < 0 || cache(&self->push_pcm, outbound, s_push_pcm) < 0;
    Py_XDECREF(downsampler);
    if (failed) return -1;
    if (!PyByteArray_CheckExact(self->down_state) || PyByteArray_GET_SIZE(self->down_state) != DOWN_STATE_BYTES) {
        PyErr_SetString(PyExc_ValueError, "expected the compiled downsampler's state (a bytearray)");
        return -1;
    }
    return 0;
}

#define MEMBERS(X)                                                                                               \
    X(outbound) X(buffer) X(to_caller) X(down_state) X(pacer) X(prebuffer) X(playback) X(monotonic) X(sink) X(ready) \
    X(progress) X(push_pcm) X(twilio_leg) X(caller_gone)

static int path_traverse(AiAudioPath *self, visitproc visit, void *arg) {
#define VISIT(member) Py_VISIT(self->member);
    MEMBERS(VISIT)
#undef VISIT
    return 0;
}

static int path_clear(AiAudioPath *self) {
#define CLEAR(member) Py_CLEAR(self->member);
    MEMBERS(CLEAR)
#undef CLEAR
    return 0;
}

static void path_dealloc(AiAudioPath *self) {
    PyObject_GC_UnTrack(self);
    path_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *path_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    AiAudioPath *self = (AiAudioPath *)type->tp_alloc(type, 0);
    if (self != NULL) self->vectorcall = path_vectorcall;
    return (PyObject *)self;
}

static PyMemberDef path_members[] = {
    {"calls", T_PYSSIZET, offsetof(AiAudioPath, calls), READONLY, "AI frames handed to this path"},
    {"fast", T_PYSSIZET, offsetof(AiAudioPath, fast), READONLY, "of those, the ones it took (not push_pcm)"},
    {"sent", T_PYSSIZET, offsetof(AiAudioPath, sent), READONLY, "messages it sent to the caller's leg"},
    {NULL},
};

static PyTypeObject AiAudioPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "telephony_bridge._ai_path.AiAudioPath",
    .tp_doc = "AiAudioPath(outbound, *, ...)(pcm): Outbound.push_pcm(pcm), its common case in C (see _ai_path.c).",
    .tp_basicsize = sizeof(AiAudioPath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = path_new,
    .tp_init = (initproc)path_init,
    .tp_dealloc = (destructor)path_dealloc,
    .tp_traverse = (traverseproc)path_traverse,
    .tp_clear = (inquiry)path_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(AiAudioPath, vectorcall),
    .tp_members = path_members,
};

/* --- the module ---------------------------------------------------------------------------------------------- */

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ai_path", "Outbound.push_pcm's common case in one C call (see _ai_path.c).", -1, NULL,
};

PyMODINIT_FUNC PyInit__ai_path(void) {
    if (intern_names() < 0 || PyType_Ready(&AiAudioPathType) < 0) return NULL;
    kernels = PyCapsule_Import(KERNELS_CAPSULE, 0);
    if (kernels == NULL) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "AiAudioPath", (PyObject *)&AiAudioPathType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
