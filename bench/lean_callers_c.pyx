# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The per-frame work of bench/lean_callers.py's calls in C (``capacity.py --callers compiled``): what a load
process spends per frame, so the load's one core has room to spare at 250 calls and a hole it hears is the
bridge's rather than its own (docs/performance.md: at 250 calls the lean callers took ~0.52 of a core, most of it
the interpreter's).

The same work, frame for frame, as ``lean_callers.LeanCall``'s: ``CallCore`` is its hot half (the beat's
``tick``, and the bridge's text frames in ``on_ws_frame``), a Cython subclass of picows' ``WSListener`` under
``lean_callers.CompiledCall``, which adds the rest in Python (``start`` and ``stop``, marks, anything but a
well-formed ``media``, the result). ``Playout`` and ``RoundTrips`` are ``tools.twilio_playout.Playout`` and
``tools.round_trips.RoundTrips`` in C, with the same public counters: tests hold each to its Python model.

A ``media`` message from the bridge in its exact shape (``MediaMessages``: ``{"event":"media","streamSid":...,
"media":{"payload":"..."}}``, this stream's sid) whose payload is strict base64 is read here; anything else
goes to ``read_outbound``, the strict reader both callers share, so a violation is judged in one place.
"""

cimport cython
from libc.stdint cimport uint8_t
from libc.string cimport memcmp, memcpy
from picows.picows cimport WSFrame, WSListener, WSMsgType, WSTransport
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

import binascii

from lean_wire import QUIET_ULAW, SILENCE_B64  # bench/, beside this module's source

from telephony_bridge.audio.codec import FRAME_S as _FRAME_S
from telephony_bridge.audio.codec import TWILIO_BYTES_PER_MS as _BYTES_PER_MS
from telephony_bridge.audio.codec import TWILIO_FRAME_BYTES as _FRAME_BYTES
from telephony_bridge.audio.codec import ULAW_SILENCE as _SILENCE

cdef double FRAME_S = _FRAME_S
cdef Py_ssize_t FRAME_BYTES = _FRAME_BYTES
if FRAME_BYTES > 512:
    raise ImportError("Playout._frame holds 512 bytes: a Twilio frame must fit")
cdef double BYTES_PER_MS = _BYTES_PER_MS
cdef uint8_t QUIET[256]  # 1 for the μ-law codes ``lean_wire.audible`` deletes as quiet
for _code in range(256):
    QUIET[_code] = 0
for _code in QUIET_ULAW:
    QUIET[_code] = 1
cdef bytes MEDIA_TAIL = b'"}}'
_a2b = binascii.a2b_base64
_Error = binascii.Error


cdef inline double monotonic() noexcept:
    """``time.monotonic()``: CPython reads the same clock."""
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return now.tv_sec + now.tv_nsec * 1e-9


cdef inline bint audible(const uint8_t *ulaw, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i
    for i in range(n):
        if not QUIET[ulaw[i]]:
            return True
    return False


@cython.final
cdef class Playout:
    """``tools.twilio_playout.Playout`` in C. The queue is kept as audio chunks and marks placed by the audio
    queued before them (``_audio_in`` when they came, against ``_audio_out``, the play head: both count every
    byte queued since the call began, cleared ones included), which is the Python model's one deque."""

    cdef list _chunks  # queued audio (bytes) from ``_first`` on
    cdef Py_ssize_t _first
    cdef Py_ssize_t _head_played  # bytes of the first chunk already played
    cdef list _marks  # queued marks, oldest first, from ``_first_mark`` on: (place, name)
    cdef Py_ssize_t _first_mark
    cdef long long _audio_in
    cdef long long _audio_out
    cdef list _in_flight
    cdef bint _frame_has_audio
    cdef long long _max_gap_bytes
    cdef long long _gap  # -1: not inside a stream (the model's None)
    cdef long long _ticked_bytes
    cdef public long long buffered_bytes, max_buffered_bytes, bytes_received, bytes_played, bytes_cleared
    cdef public long long marks_received, marks_echoed, clears, underruns, underrun_bytes
    cdef public list underrun_ends_ms
    cdef uint8_t _frame[512]  # the frame ``_tick`` plays, for its audibility (a frame is 160 bytes)

    def __init__(self, double max_gap_ms=250.0):
        self._chunks, self._marks, self._in_flight = [], [], []
        self._max_gap_bytes = <long long>round(max_gap_ms * BYTES_PER_MS)
        self._gap = -1
        self.underrun_ends_ms = []

    @property
    def underrun_ms(self):
        return self.underrun_bytes / BYTES_PER_MS

    @property
    def max_lead_ms(self):
        return self.max_buffered_bytes / BYTES_PER_MS

    cpdef push_media(self, bytes ulaw):
        cdef Py_ssize_t n = len(ulaw)
        if not n:
            return
        self._chunks.append(ulaw)
        self._audio_in += n
        self.buffered_bytes += n
        self.bytes_received += n
        if self.buffered_bytes > self.max_buffered_bytes:
            self.max_buffered_bytes = self.buffered_bytes

    def push_mark(self, str name):
        self.marks_received += 1
        if self.buffered_bytes or self._first_mark < len(self._marks):
            self._marks.append((self._audio_in, name))
            return []
        if self._frame_has_audio or self._in_flight:
            self._in_flight.append(name)
            return []
        self.marks_echoed += 1
        return [name]

    def clear(self):
        marks = self._in_flight + [name for _, name in self._marks[self._first_mark:]]
        self.bytes_cleared += self.buffered_bytes
        self._chunks, self._first, self._head_played = [], 0, 0
        self._marks, self._first_mark = [], 0
        self._audio_out = self._audio_in
        self._in_flight = []
        self.buffered_bytes = 0
        self._frame_has_audio = False
        self._gap = -1
        self.clears += 1
        self.marks_echoed += len(marks)
        return marks

    def tick(self, Py_ssize_t n_bytes):
        """As the model's: what the caller hears (silence-padded) and the marks due now; ``n_bytes`` <= 512."""
        if not 0 <= n_bytes <= 512:
            raise ValueError("a tick plays at most 512 bytes here")
        cdef Py_ssize_t played
        due = self._tick(n_bytes, &played)
        return bytes(self._frame[:played]) + bytes([_SILENCE]) * (n_bytes - played), due

    cdef list _tick(self, Py_ssize_t n_bytes, Py_ssize_t *played_out):
        """Play the next ``n_bytes`` into ``_frame`` (their count in ``played_out``); the marks due now."""
        cdef list due = self._in_flight
        cdef list marks = self._marks
        cdef bytes chunk
        cdef Py_ssize_t take, size, played = 0
        self._in_flight = []
        while self._first_mark < len(marks) and <long long>marks[self._first_mark][0] <= self._audio_out:
            due.append(marks[self._first_mark][1])
            self._first_mark += 1
        while played < n_bytes and self._first < len(self._chunks):
            chunk = <bytes>self._chunks[self._first]
            size = len(chunk)
            take = min(n_bytes - played, size - self._head_played)
            memcpy(&self._frame[played], <const char *>chunk + self._head_played, take)
            played += take
            self._head_played += take
            if self._head_played == size:
                self._first += 1
                self._head_played = 0
        self._audio_out += played
        if played:
            while self._first_mark < len(marks) and <long long>marks[self._first_mark][0] <= self._audio_out:
                self._in_flight.append(marks[self._first_mark][1])
                self._first_mark += 1
        if self._first > 64 and 2 * self._first > len(self._chunks):
            del self._chunks[:self._first]
            self._first = 0
        if self._first_mark > 64 and 2 * self._first_mark > len(marks):
            del marks[:self._first_mark]
            self._first_mark = 0
        self.buffered_bytes -= played
        self.bytes_played += played
        self._frame_has_audio = played > 0
        self._count_gap(played, n_bytes)
        self._ticked_bytes += n_bytes
        self.marks_echoed += len(due)
        played_out[0] = played
        return due

    cdef void _count_gap(self, Py_ssize_t played, Py_ssize_t n_bytes):
        if played:
            if self._gap > 0:
                self.underruns += 1
                self.underrun_bytes += self._gap
                self.underrun_ends_ms.append(self._ticked_bytes / BYTES_PER_MS)
            self._gap = n_bytes - played
        elif self._gap >= 0:
            self._gap += n_bytes
        if self._gap > self._max_gap_bytes:
            self._gap = -1


@cython.final
cdef class RoundTrips:
    """``tools.round_trips.RoundTrips`` in C, over this module's ``Playout``."""

    cdef Playout _playout
    cdef public list sent_at, arrivals_s, heard_s
    cdef list _awaiting  # (first byte's index in the AI audio, caller frame), from ``_first`` on
    cdef Py_ssize_t _first

    def __init__(self, Playout playout):
        self._playout = playout
        self.sent_at, self.arrivals_s, self.heard_s, self._awaiting = [], [], [], []

    cpdef received(self, bytes payload, double now):
        cdef Playout playout = self._playout
        cdef Py_ssize_t frame = playout.bytes_received // FRAME_BYTES
        if not playout.clears and frame < len(self.sent_at) and len(payload):
            self.arrivals_s.append(now - <double>self.sent_at[frame])
            self._awaiting.append((playout.bytes_received, frame))

    cpdef played(self, Py_ssize_t tick):
        cdef Playout playout = self._playout
        cdef list awaiting = self._awaiting
        if playout.clears:
            del awaiting[:]
            self._first = 0
        while self._first < len(awaiting) and <long long>awaiting[self._first][0] < playout.bytes_played:
            self.heard_s.append((tick - <Py_ssize_t>awaiting[self._first][1]) * FRAME_S)
            self._first += 1
        if self._first > 64 and 2 * self._first > len(awaiting):
            del awaiting[:self._first]
            self._first = 0


cdef class CallCore(WSListener):
    """A call's hot half: the beat's ``tick`` and the bridge's text frames. What it leaves to Python it hands
    to methods of the subclass (``lean_callers.CompiledCall``): ``_begin``, ``_echo``, ``_stop``,
    ``_receive``, ``_other_frame`` (and ``on_ws_connected``, which sets ``_transport``)."""

    cdef public WSTransport _transport
    cdef public Playout _playout
    cdef public RoundTrips _round_trips
    cdef public list _frames
    cdef public bytes _media  # the ``media`` template (``lean_wire.media_template``)
    cdef public bytes _media_head  # what the bridge's media messages start with, up to the payload
    cdef public Py_ssize_t _n_frames, _next, _audible_frames
    cdef public long long _seq
    cdef public double _t0
    cdef public object _started_at, _first_audio_s, _first_heard_s
    cdef public bint _stopped, _gone

    def __cinit__(self, *args, **kwargs):
        self._frames = []
        self._media = self._media_head = b""
        self._started_at = self._first_audio_s = self._first_heard_s = None

    cpdef bint tick(self, double due, double now) except -1:
        """``LeanCall.tick``: every frame due by ``now`` played and sent; False once no more ticks are needed."""
        cdef WSTransport transport = self._transport
        cdef Playout playout = self._playout
        cdef RoundTrips round_trips = self._round_trips
        cdef list frames = self._frames, sent_at
        cdef Py_ssize_t i, last = self._n_frames, n_bytes, played
        cdef list marks
        if self._gone or transport is None:
            return False
        if playout is None or round_trips is None:
            raise RuntimeError("CallCore.tick before its _playout and _round_trips were set")
        sent_at = round_trips.sent_at
        if self._started_at is None:
            self._begin(due)
        i = self._next
        while i <= last and self._t0 + i * FRAME_S <= now + 1e-6:
            # The last tick plays nothing: it only releases marks whose audio finished with the call.
            n_bytes = 0 if i == last else FRAME_BYTES
            marks = playout._tick(n_bytes, &played)
            round_trips.played(i)
            if n_bytes and audible(playout._frame, played):
                self._audible_frames += 1
                if self._first_heard_s is None:
                    self._first_heard_s = monotonic() - <double>self._started_at
            for name in marks:
                self._echo(name)
            if i == last:
                self._stop(transport)
                return False
            self._seq += 1
            transport.send(
                WSMsgType.TEXT,
                self._media % (self._seq, i + 1, i * 20, frames[i] if i < len(frames) else SILENCE_B64),
            )
            sent_at.append(monotonic())
            i += 1
        self._next = i
        return True

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef bytes data
        if frame.msg_type == WSMsgType.TEXT and frame.fin:
            data = frame.get_payload_as_bytes()
            if self._stopped or self._started_at is None or not self._media_read(data):
                self._receive(data)
        else:
            self._other_frame(transport, frame)

    cdef bint _media_read(self, bytes data) except -1:
        """A well-formed ``media`` for this stream, taken as ``LeanCall._receive`` takes it: True if done."""
        cdef Py_ssize_t size = len(data), head = len(self._media_head), n = size - head - 3
        cdef const char *text = data
        cdef bytes payload
        if (
            not head  # no head set: nothing is read here
            or n < 0
            or n % 4
            or memcmp(text, <const char *>self._media_head, head) != 0
            or memcmp(text + size - 3, <const char *>MEDIA_TAIL, 3) != 0
        ):
            return False
        try:
            payload = _a2b(data[head:size - 3], strict_mode=True)
        except _Error:
            return False
        # Strict mode lets padding after a whole quad through on 3.11 ("AAAA="), which msgspec rejects: the bytes
        # must be what a canonical text of this length decodes to.
        if n and len(payload) != n // 4 * 3 - (text[size - 4] == c'=') - (text[size - 5] == c'='):
            return False
        cdef double now = monotonic()
        self._round_trips.received(payload, now)
        self._playout.push_media(payload)
        if self._first_audio_s is None and audible(<const uint8_t *><const char *>payload, len(payload)):
            self._first_audio_s = monotonic() - <double>self._started_at
        return True
