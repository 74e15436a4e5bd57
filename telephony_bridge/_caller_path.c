/* The caller's audio on its way into a call, in one C call per frame: the compiled twin of the Python path
 * Call._caller_audio -> Inbound.push -> CallerToAi -> Inbound._send_or_wake -> the VAD -> BargeInDetector._frame.
 *
 * Why: each of those steps is cheap, but there are ~20 Python calls per 20 ms frame per call, and at 250 calls
 * a core their interpreter overhead was a fifth of the bridge's CPU (#10). Here they are one call.
 *
 * How, so that it cannot drift from the reference: the state stays where it is, in the Python objects (the
 * Inbound, its timeline, pipeline, queue and detector); this code reads and writes their attributes, as the
 * Python methods do, and only for the common frame: Twilio's 160 bytes, stamped exactly where the last one
 * ended, with nothing carried over, and a VAD with no part frame waiting. It checks that before it changes
 * anything; any other frame goes to the Python handler it was given, whole. Where the Python path would do
 * more than update numbers (an event, a dropped frame, a lone frame's timer, a send), it calls the Python
 * that does it. tests/test_caller_path.py holds the two paths to the same state, events and sends over random
 * streams; Inbound.audio_handler (inbound.py) says which attributes this reads and writes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_pyattrs.h" /* attributes as C numbers */
#include "audio/_kernels_capi.h" /* the kernels, through _kernels' capsule */

#define FRAME_BYTES 160 /* Twilio's 20 ms of 8 kHz mu-law: the only frame taken here */
#define BYTES_PER_MS 8  /* mu-law bytes (samples) per ms at 8 kHz */

static const KernelsCAPI *kernels = NULL;

/* Attribute names, interned once. */
#define NAMES(X)                                                                                                 \
    X(_pipeline) X(timeline) X(_upsampler) X(_state) X(_pending) X(_queue) X(detector) X(_vad) X(_vad_handle)  \
    X(_min_mean_square) X(_frame_bytes) X(_frames_per_message) X(frames_in) X(_last_frame_at) X(untimed_reason) \
    X(_last_stamp) X(_position) X(_stale_run) X(_oldest_at) X(_max_frames) X(_drop_oldest) X(_parked)           \
    X(_lone_timer) X(cancel) X(_conn) X(_next_at) X(can_send_now) X(send_audio_nowait) X(frames_to_ai)        \
    X(_ready) X(set) X(_arm_lone_timer) X(_speaking) X(_onset_s) X(_last_end_s) X(_heard) X(append) X(popleft)   \
    X(_barged) X(_quiet_frames) X(_held_since_s) X(_onset_ai_since_s) X(_speech_frames) X(utterances)            \
    X(barge_ins) X(_listening) X(_speech_frames_needed) X(_end_frames_needed) X(_max_gap_frames)                 \
    X(_min_ai_audible_s) X(_max_hold_s) X(hold_limit)
#define DECLARE(name) static PyObject *str_##name;
NAMES(DECLARE)
#undef DECLARE

typedef struct {
    PyObject_HEAD
    /* Given, and what they hold that stays the same object for the call's life. */
    PyObject *inbound, *fallback, *monotonic, *audible_since, *on_events;
    PyObject *timeline, *pipeline, *state, *queue, *append, *popleft;
    PyObject *detector, *vad, *vad_handle, *vad_process; /* detector and the rest NULL when barge-in is off */
    PyObject *listening, *barge_in, *caller_stopped;      /* Inbound._listening; the detector's event types */
    double min_mean_square;
    /* The detector's settings (fixed for the call) and barge_in.py's constants. */
    int64_t speech_frames_needed, end_frames_needed, max_gap_frames;
    double min_ai_audible_s, max_hold_s, eps_s, vad_frame_s;
    Py_ssize_t per;      /* frames per upstream message */
    double next_gap_s;   /* per * FRAME_S / CATCH_UP_RATE, as Python computes it */
    PyObject *zero, *rate;
    /* Frames taken here, and handed to the fallback: tests read them to see that both paths ran. */
    Py_ssize_t fast, slow;
} CallerPath;

static int call_method0(PyObject *obj, PyObject *name) {
    PyObject *r = PyObject_CallMethodNoArgs(obj, name);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* --- the object -------------------------------------------------------------------------------------------- */

static int CallerPath_init(CallerPath *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"inbound",  "fallback",       "monotonic", "audible_since", "on_events",   "catch_up_rate",
                             "frame_s",  "barge_in",       "caller_stopped", "eps_s",   "vad_frame_s", NULL};
    PyObject *inbound, *fallback, *monotonic, *audible_since, *on_events, *barge_in, *caller_stopped;
    double catch_up_rate, frame_s;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOddOOdd", kwlist, &inbound, &fallback, &monotonic,
                                     &audible_since, &on_events, &catch_up_rate, &frame_s, &barge_in,
                                     &caller_stopped, &self->eps_s, &self->vad_frame_s))
        return -1;
    if (kernels == NULL || !*kernels->configured) {
        PyErr_SetString(PyExc_RuntimeError, "the compiled kernels are not configured (see audio/kernels.py)");
        return -1;
    }
#define KEEP(field, value) Py_XSETREF(self->field, Py_NewRef(value))
    KEEP(inbound, inbound);
    KEEP(fallback, fallback);
    KEEP(monotonic, monotonic);
    KEEP(audible_since, audible_since);
    KEEP(on_events, on_events);
    KEEP(barge_in, barge_in);
    KEEP(caller_stopped, caller_stopped);
#undef KEEP
#define FETCH(field, obj, name)                                                         \
    do {                                                                                \
        PyObject *v_ = attr_get(obj, str_##name);                                       \
        if (v_ == NULL) return -1;                                                      \
        Py_XSETREF(self->field, v_);                                                    \
    } while (0)
    FETCH(pipeline, inbound, _pipeline);
    FETCH(timeline, self->pipeline, timeline);
    PyObject *upsampler = attr_get(self->pipeline, str__upsampler);
    if (upsampler == NULL) return -1;
    PyObject *state = attr_get(upsampler, str__state); /* only the compiled upsampler has one */
    Py_DECREF(upsampler);
    if (state == NULL) return -1;
    Py_XSETREF(self->state, state);
    if (!PyByteArray_CheckExact(state) || PyByteArray_GET_SIZE(state) != UP_STATE_BYTES) {
        PyErr_SetString(PyExc_TypeError, "expected the compiled upsampler's state (a bytearray)");
        return -1;
    }
    FETCH(queue, inbound, _queue);
    FETCH(append, self->queue, append);
    FETCH(popleft, self->queue, popleft);
    FETCH(detector, inbound, detector);
    if (self->detector == Py_None) {
        Py_CLEAR(self->detector);
    } else {
        FETCH(vad, self->detector, _vad);
        FETCH(vad_handle, self->vad, _vad_handle);
        FETCH(listening, inbound, _listening);
        PyObject *d = self->detector;
        if (get_double(self->vad, str__min_mean_square, &self->min_mean_square) < 0 ||
            get_i64(d, str__speech_frames_needed, &self->speech_frames_needed) < 0 ||
            get_i64(d, str__end_frames_needed, &self->end_frames_needed) < 0 ||
            get_i64(d, str__max_gap_frames, &self->max_gap_frames) < 0 ||
            get_double(d, str__min_ai_audible_s, &self->min_ai_audible_s) < 0 ||
            get_double(d, str__max_hold_s, &self->max_hold_s) < 0)
            return -1;
        PyObject *webrtcvad = PyImport_ImportModule("_webrtcvad");
        if (webrtcvad == NULL) return -1;
        PyObject *process = PyObject_GetAttrString(webrtcvad, "process");
        Py_DECREF(webrtcvad);
        if (process == NULL) return -1;
        Py_XSETREF(self->vad_process, process);
    }
#undef FETCH
    int64_t per;
    if (get_i64(inbound, str__frames_per_message, &per) < 0) return -1;
    self->per = (Py_ssize_t)per;
    self->next_gap_s = (double)per * frame_s / catch_up_rate; /* Python: now + per * FRAME_S / CATCH_UP_RATE */
    Py_XSETREF(self->zero, PyLong_FromLong(0));
    Py_XSETREF(self->rate, PyLong_FromLong(FRAME_BYTES * 1000 / 20)); /* 8000 Hz, for webrtcvad */
    return self->zero && self->rate ? 0 : -1;
}

static int CallerPath_traverse(CallerPath *self, visitproc visit, void *arg) {
    Py_VISIT(self->inbound);
    Py_VISIT(self->fallback);
    Py_VISIT(self->monotonic);
    Py_VISIT(self->audible_since);
    Py_VISIT(self->on_events);
    Py_VISIT(self->timeline);
    Py_VISIT(self->pipeline);
    Py_VISIT(self->state);
    Py_VISIT(self->queue);
    Py_VISIT(self->append);
    Py_VISIT(self->popleft);
    Py_VISIT(self->detector);
    Py_VISIT(self->vad);
    Py_VISIT(self->vad_handle);
    Py_VISIT(self->vad_process);
    Py_VISIT(self->listening);
    Py_VISIT(self->barge_in);
    Py_VISIT(self->caller_stopped);
    return 0;
}

static int CallerPath_clear(CallerPath *self) {
    Py_CLEAR(self->inbound);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->monotonic);
    Py_CLEAR(self->audible_since);
    Py_CLEAR(self->on_events);
    Py_CLEAR(self->timeline);
    Py_CLEAR(self->pipeline);
    Py_CLEAR(self->state);
    Py_CLEAR(self->queue);
    Py_CLEAR(self->append);
    Py_CLEAR(self->popleft);
    Py_CLEAR(self->detector);
    Py_CLEAR(self->vad);
    Py_CLEAR(self->vad_handle);
    Py_CLEAR(self->vad_process);
    Py_CLEAR(self->listening);
    Py_CLEAR(self->barge_in);
    Py_CLEAR(self->caller_stopped);
    Py_CLEAR(self->zero);
    Py_CLEAR(self->rate);
    return 0;
}

static void CallerPath_dealloc(CallerPath *self) {
    PyObject_GC_UnTrack(self);
    CallerPath_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* --- the frame ------------------------------------------------------------------------------------------- */

/* Whether this frame is the common one (see the top): 1 yes, 0 no (the fallback takes it), -1 error. Changes
 * nothing. On yes, *ts and *position are the frame's stamp and the timeline's position. */
static int is_common(CallerPath *self, PyObject *ulaw, PyObject *stamp, long long *ts, long long *position) {
    if (!PyBytes_CheckExact(ulaw) || PyBytes_GET_SIZE(ulaw) != FRAME_BYTES || !PyLong_CheckExact(stamp)) return 0;
    int overflow;
    *ts = PyLong_AsLongLongAndOverflow(stamp, &overflow);
    if (overflow || *ts < 0 || *ts > (LLONG_MAX - FRAME_BYTES) / BYTES_PER_MS) return 0; /* position + 160 fits */
    /* The kernels' own checks, which the Python path's ulaw_up makes on every frame: it then raises. */
    if (PyByteArray_GET_SIZE(self->state) != UP_STATE_BYTES || !*kernels->configured) return 0;
    PyObject *frame_bytes = attr_get(self->inbound, str__frame_bytes);
    if (frame_bytes == NULL) return -1;
    long long expected = frame_bytes == Py_None ? FRAME_BYTES : PyLong_AsLongLong(frame_bytes);
    Py_DECREF(frame_bytes);
    if (expected == -1 && PyErr_Occurred()) return -1;
    if (expected != FRAME_BYTES) return 0; /* another size is this sender's quirk: logged there */
    /* InboundTimeline.place's fast branch: the next frame, stamped exactly where the last one ended. */
    PyObject *reason = attr_get(self->timeline, str_untimed_reason);
    if (reason == NULL) return -1;
    int untimed = PyObject_IsTrue(reason);
    Py_DECREF(reason);
    if (untimed != 0) return untimed < 0 ? -1 : 0;
    PyObject *last = attr_get(self->timeline, str__last_stamp);
    if (last == NULL) return -1;
    if (last == Py_None) {
        Py_DECREF(last);
        return 0;
    }
    long long last_ts = PyLong_AsLongLongAndOverflow(last, &overflow);
    Py_DECREF(last);
    if (last_ts == -1 && PyErr_Occurred()) return -1;
    if (overflow) return 0; /* a stamp past int64 (Python's ints have no limit): the fallback's */
    PyObject *at = attr_get(self->timeline, str__position);
    if (at == NULL) return -1;
    *position = PyLong_AsLongLongAndOverflow(at, &overflow);
    Py_DECREF(at);
    if (*position == -1 && PyErr_Occurred()) return -1;
    if (overflow || !(*ts > last_ts && *ts * BYTES_PER_MS == *position)) return 0;
    /* CallerToAi.push: nothing carried over; the VAD: no part frame waiting. */
    PyObject *pending = attr_get(self->pipeline, str__pending);
    if (pending == NULL) return -1;
    Py_ssize_t carried = PyObject_Length(pending);
    Py_DECREF(pending);
    if (carried != 0) return carried < 0 ? -1 : 0;
    if (self->detector != NULL) {
        PyObject *vad_pending = attr_get(self->vad, str__pending);
        if (vad_pending == NULL) return -1;
        Py_ssize_t waiting = PyObject_Length(vad_pending);
        Py_DECREF(vad_pending);
        if (waiting != 0) return waiting < 0 ? -1 : 0;
    }
    return 1;
}

/* The next n queued frames as one message (Inbound._take). */
static PyObject *take(CallerPath *self, Py_ssize_t n) {
    PyObject *message = PyObject_CallNoArgs(self->popleft);
    for (Py_ssize_t i = 1; i < n && message != NULL; i++) {
        PyObject *next = PyObject_CallNoArgs(self->popleft);
        if (next == NULL) {
            Py_CLEAR(message);
            break;
        }
        PyBytes_ConcatAndDel(&message, next);
    }
    return message;
}

/* Inbound._send_or_wake: while its sender is parked, send a whole message the pacing allows, or wake it. */
static int send_or_wake(CallerPath *self, double now, PyObject *now_obj) {
    PyObject *inbound = self->inbound;
    PyObject *timer = attr_get(inbound, str__lone_timer); /* _call_off_lone_timer */
    if (timer == NULL) return -1;
    if (timer != Py_None) {
        int rc = call_method0(timer, str_cancel);
        Py_DECREF(timer);
        if (rc < 0 || attr_set(inbound, str__lone_timer, Py_None) < 0) return -1;
    } else {
        Py_DECREF(timer);
    }
    Py_ssize_t queued = PyObject_Length(self->queue);
    if (queued < 0) return -1;
    if (queued >= self->per) {
        PyObject *conn = attr_get(inbound, str__conn);
        if (conn == NULL) return -1;
        int ready = 0;
        double next_at;
        if (conn != Py_None && get_double(inbound, str__next_at, &next_at) == 0 && next_at <= now) {
            PyObject *can = PyObject_CallMethodNoArgs(conn, str_can_send_now);
            ready = can == NULL ? -1 : PyObject_IsTrue(can);
            Py_XDECREF(can);
        } else if (PyErr_Occurred()) {
            ready = -1;
        }
        if (ready == 1) {
            PyObject *message = take(self, self->per);
            PyObject *sent = message == NULL ? NULL : PyObject_CallMethodOneArg(conn, str_send_audio_nowait, message);
            Py_XDECREF(message);
            if (sent == NULL) ready = -1;
            Py_XDECREF(sent);
            if (ready == 1 && (add_i64(inbound, str_frames_to_ai, self->per) < 0 ||
                               attr_set(inbound, str__oldest_at, now_obj) < 0 ||
                               set_steal(inbound, str__next_at, PyFloat_FromDouble(now + self->next_gap_s)) < 0))
                ready = -1;
        }
        Py_DECREF(conn);
        if (ready < 0) return -1;
        queued = PyObject_Length(self->queue);
        if (queued < 0) return -1;
    }
    if (queued >= self->per) {
        PyObject *flag = attr_get(inbound, str__ready);
        if (flag == NULL) return -1;
        int rc = call_method0(flag, str_set);
        Py_DECREF(flag);
        return rc;
    }
    return queued ? call_method0(inbound, str__arm_lone_timer) : 0;
}

/* BargeInDetector._frame: every state transition, for one frame ending at now; the event (a new reference) or
 * None, and in *listening the detector's ``listening`` after it. The same comparisons on the same doubles, in
 * the same order. */
static PyObject *frame(CallerPath *self, int speech, double now, PyObject *now_obj, int *listening) {
    PyObject *d = self->detector;
    if (attr_set(d, str__last_end_s, now_obj) < 0) return NULL;
    int64_t quiet;
    int speaking = get_truth(d, str__speaking);
    if (speaking < 0) return NULL;
    *listening = 1;
    if (speaking) {
        if (get_i64(d, str__quiet_frames, &quiet) < 0) return NULL;
        quiet = speech ? 0 : quiet + 1;
        if (set_i64(d, str__quiet_frames, quiet) < 0) return NULL;
        int barged = get_truth(d, str__barged);
        if (barged < 0) return NULL;
        if (barged && self->max_hold_s) {
            double held_since;
            if (get_double(d, str__held_since_s, &held_since) < 0) return NULL;
            if (now - held_since >= self->max_hold_s - self->eps_s) { /* the hold reached its limit */
                if (set_bool(d, str__barged, 0) < 0) return NULL;
                PyObject *kwargs = Py_BuildValue("{O:O}", str_hold_limit, Py_True);
                PyObject *args = kwargs == NULL ? NULL : PyTuple_Pack(1, now_obj);
                PyObject *event = args == NULL ? NULL : PyObject_Call(self->caller_stopped, args, kwargs);
                Py_XDECREF(args);
                Py_XDECREF(kwargs);
                return event;
            }
        }
        if (quiet < self->end_frames_needed) Py_RETURN_NONE;
        if (set_bool(d, str__speaking, 0) < 0 || attr_set(d, str__onset_s, Py_None) < 0 ||
            set_i64(d, str__quiet_frames, 0) < 0)
            return NULL;
        *listening = 0;
        if (!barged) Py_RETURN_NONE;
        if (set_bool(d, str__barged, 0) < 0) return NULL;
        return PyObject_CallOneArg(self->caller_stopped, now_obj); /* the utterance that barged in has ended */
    }
    PyObject *onset_obj = attr_get(d, str__onset_s);
    if (onset_obj == NULL) return NULL;
    int candidate = onset_obj != Py_None;
    Py_DECREF(onset_obj);
    if (!speech) {
        *listening = candidate;
        if (candidate) { /* a gap in the candidate: too long, and it is no utterance */
            if (get_i64(d, str__quiet_frames, &quiet) < 0 || set_i64(d, str__quiet_frames, quiet + 1) < 0)
                return NULL;
            if (quiet + 1 > self->max_gap_frames) {
                *listening = 0;
                if (attr_set(d, str__onset_s, Py_None) < 0) return NULL;
            }
        }
        Py_RETURN_NONE;
    }
    int64_t speech_frames = 0;
    if (!candidate) { /* the candidate's first speech frame: its onset, and whether the AI was audible then */
        PyObject *since = PyObject_CallOneArg(self->audible_since, now_obj);
        if (since == NULL) return NULL;
        int rc = set_double(d, str__onset_s, now - self->vad_frame_s);
        if (rc == 0) rc = attr_set(d, str__onset_ai_since_s, since);
        Py_DECREF(since);
        if (rc < 0) return NULL;
    } else if (get_i64(d, str__speech_frames, &speech_frames) < 0) {
        return NULL;
    }
    speech_frames += 1;
    if (set_i64(d, str__speech_frames, speech_frames) < 0 || set_i64(d, str__quiet_frames, 0) < 0) return NULL;
    if (speech_frames < self->speech_frames_needed) Py_RETURN_NONE;
    if (set_bool(d, str__speaking, 1) < 0 || add_i64(d, str_utterances, 1) < 0) return NULL;
    double onset;
    if (get_double(d, str__onset_s, &onset) < 0) return NULL;
    PyObject *since_obj = attr_get(d, str__onset_ai_since_s);
    if (since_obj == NULL) return NULL;
    double since = since_obj == Py_None ? 0.0 : PyFloat_AsDouble(since_obj);
    int none = since_obj == Py_None;
    Py_DECREF(since_obj);
    if (since == -1.0 && PyErr_Occurred()) return NULL;
    if (none || onset - since < self->min_ai_audible_s - self->eps_s) Py_RETURN_NONE; /* not over the AI */
    if (set_bool(d, str__barged, 1) < 0 || attr_set(d, str__held_since_s, now_obj) < 0 ||
        add_i64(d, str_barge_ins, 1) < 0)
        return NULL;
    PyObject *onset_again = PyFloat_FromDouble(onset);
    if (onset_again == NULL) return NULL;
    PyObject *event = PyObject_CallFunctionObjArgs(self->barge_in, onset_again, now_obj, NULL);
    Py_DECREF(onset_again);
    return event;
}

/* The barge-in detector on this frame (BargeInDetector.caller_audio's one-frame branch, then Inbound._heard). */
static int detect(CallerPath *self, const int16_t *pcm8, PyObject *pcm8_obj, double now, PyObject *now_obj) {
    PyObject *args[] = {self->vad_handle, self->rate, pcm8_obj, NULL};
    args[3] = PyLong_FromLong(FRAME_BYTES);
    if (args[3] == NULL) return -1;
    PyObject *voiced = PyObject_Vectorcall(self->vad_process, args, 4, NULL);
    Py_DECREF(args[3]);
    if (voiced == NULL) return -1;
    int speech = PyObject_IsTrue(voiced);
    Py_DECREF(voiced);
    if (speech < 0) return -1;
    if (speech) { /* VoiceActivityDetector._decide's gate: quieter than min_level_dbfs is never speech */
        int64_t sum = 0;
        for (int i = 0; i < FRAME_BYTES; i++) sum += (int32_t)pcm8[i] * pcm8[i];
        speech = (double)sum / (double)FRAME_BYTES >= self->min_mean_square;
    }
    int listening;
    PyObject *event = frame(self, speech, now, now_obj, &listening);
    if (event == NULL) return -1;
    int rc = 0;
    if (event == Py_None) { /* Inbound._heard with no events: the idle watcher wakes while an utterance may be on */
        rc = listening ? call_method0(self->listening, str_set) : 0;
    } else { /* an event: Inbound._heard logs what it must, then the call acts on it */
        PyObject *events = PyList_New(1);
        PyObject *heard = events == NULL ? NULL : (PyList_SET_ITEM(events, 0, Py_NewRef(event)),
                                                   PyObject_CallMethodOneArg(self->inbound, str__heard, events));
        PyObject *done = heard == NULL ? NULL : PyObject_CallOneArg(self->on_events, heard);
        rc = done == NULL ? -1 : 0;
        Py_XDECREF(done);
        Py_XDECREF(heard);
        Py_XDECREF(events);
    }
    Py_DECREF(event);
    return rc;
}

/* __call__(ulaw, timestamp_ms): one frame of the caller's audio, as a leg delivers it (leg.AudioHandler). */
static PyObject *CallerPath_call(CallerPath *self, PyObject *args, PyObject *kwds) {
    PyObject *ulaw, *stamp;
    if (!PyArg_ParseTuple(args, "OO", &ulaw, &stamp)) return NULL;
    if (self->rate == NULL) { /* set last by __init__: __new__ alone, or an __init__ that failed */
        PyErr_SetString(PyExc_RuntimeError, "CallerPath used before __init__");
        return NULL;
    }
    long long ts, position;
    int common = is_common(self, ulaw, stamp, &ts, &position);
    if (common < 0) return NULL;
    if (!common) {
        self->slow++;
        return PyObject_Call(self->fallback, args, kwds);
    }
    self->fast++;
    PyObject *inbound = self->inbound;
    PyObject *now_obj = PyObject_CallNoArgs(self->monotonic); /* Call._caller_audio */
    if (now_obj == NULL) return NULL;
    double now = PyFloat_AsDouble(now_obj);
    PyObject *pcm8 = NULL, *pcm16 = NULL, *result = NULL;
    if (now == -1.0 && PyErr_Occurred()) goto done;
    /* Inbound.push */
    if (add_i64(inbound, str_frames_in, 1) < 0 || attr_set(inbound, str__last_frame_at, now_obj) < 0)
        goto done;
    if (attr_set(self->timeline, str__last_stamp, stamp) < 0 ||
        attr_set(self->timeline, str__stale_run, self->zero) < 0 ||
        set_steal(self->timeline, str__position, PyLong_FromLongLong(position + FRAME_BYTES)) < 0)
        goto done;
    pcm8 = PyBytes_FromStringAndSize(NULL, FRAME_BYTES * 2);
    pcm16 = PyBytes_FromStringAndSize(NULL, FRAME_BYTES * 4);
    if (pcm8 == NULL || pcm16 == NULL) goto done;
    double scratch[UP_WORK_DOUBLES(FRAME_BYTES)];
    kernels->ulaw_up((uint8_t *)PyByteArray_AS_STRING(self->state), (const uint8_t *)PyBytes_AS_STRING(ulaw),
                     FRAME_BYTES, (int16_t *)PyBytes_AS_STRING(pcm8), (uint8_t *)PyBytes_AS_STRING(pcm16), scratch);
    Py_ssize_t queued = PyObject_Length(self->queue);
    if (queued < 0) goto done;
    if (queued == 0 && attr_set(inbound, str__oldest_at, now_obj) < 0) goto done;
    int64_t max_frames;
    if (get_i64(inbound, str__max_frames, &max_frames) < 0) goto done;
    if (queued >= max_frames && call_method0(inbound, str__drop_oldest) < 0) goto done;
    PyObject *appended = PyObject_CallOneArg(self->append, pcm16);
    if (appended == NULL) goto done;
    Py_DECREF(appended);
    int parked = get_truth(inbound, str__parked);
    if (parked < 0 || (parked && send_or_wake(self, now, now_obj) < 0)) goto done;
    if (self->detector != NULL &&
        detect(self, (const int16_t *)PyBytes_AS_STRING(pcm8), pcm8, now, now_obj) < 0)
        goto done;
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(pcm8);
    Py_XDECREF(pcm16);
    Py_DECREF(now_obj);
    return result;
}

static PyObject *CallerPath_counts(CallerPath *self, void *closure) {
    return Py_BuildValue("(nn)", self->fast, self->slow);
}

static PyGetSetDef CallerPath_getset[] = {
    {"counts", (getter)CallerPath_counts, NULL, "(frames taken here, frames handed to the fallback)", NULL},
    {NULL},
};

static PyTypeObject CallerPathType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "telephony_bridge._caller_path.CallerPath",
    .tp_basicsize = sizeof(CallerPath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "CallerPath(inbound, fallback, monotonic, audible_since, on_events, catch_up_rate, frame_s): "
              "a call's caller audio handler (see inbound.CallerPath)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)CallerPath_init,
    .tp_dealloc = (destructor)CallerPath_dealloc,
    .tp_traverse = (traverseproc)CallerPath_traverse,
    .tp_clear = (inquiry)CallerPath_clear,
    .tp_call = (ternaryfunc)CallerPath_call,
    .tp_getset = CallerPath_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_caller_path", "The compiled caller -> AI frame path (see inbound.CallerPath).", -1, NULL,
};

PyMODINIT_FUNC PyInit__caller_path(void) {
#define INTERN(name) \
    if ((str_##name = PyUnicode_InternFromString(#name)) == NULL) return NULL;
    NAMES(INTERN)
#undef INTERN
    kernels = PyCapsule_Import(KERNELS_CAPSULE, 0);
    if (kernels == NULL) return NULL;
    if (PyType_Ready(&CallerPathType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "CallerPath", (PyObject *)&CallerPathType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
