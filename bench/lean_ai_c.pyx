# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The per-frame work of bench/lean_ai.py's sessions in C (``capacity.py --ai compiled``): what the echo spends
per frame, so the load's one core has more room at 250 calls and a hole the callers hear is less often the echo's
(at 250 calls the Python echo took 0.27 of the load's core, this one 0.21; what is left is mostly the kernel's).

The same frames as ``lean_ai``'s, tick for tick: ``EchoLine`` is ``lean_ai.EchoLine`` in C (tests hold the two
equal), and ``EchoCore`` is ``lean_ai.EchoSession``'s hot half, a Cython subclass of picows' ``WSListener``
under ``lean_ai.CompiledEchoSession``: a confirmed session's whole audio frames in ``on_ws_frame`` and its frame
out in ``on_tick``. Everything else (the token, text, refusals, fragments, the close) goes to the session's
``_other_frame`` in Python, so a violation is judged in one place.
"""

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.string cimport memcpy
from picows.picows cimport WSFrame, WSListener, WSMsgType, WSTransport
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from telephony_bridge.tools.emulator.protocol import FRAME_BYTES as _FRAME_BYTES
from telephony_bridge.tools.emulator.protocol import MAX_AUDIO_FRAME_BYTES as _MAX_AUDIO_FRAME_BYTES

cdef Py_ssize_t FRAME_BYTES = _FRAME_BYTES
cdef Py_ssize_t MAX_AUDIO_FRAME_BYTES = _MAX_AUDIO_FRAME_BYTES
cdef Py_ssize_t COMPACT_AT = 64  # heard messages said in full before the lists drop them


cdef inline double monotonic() noexcept:
    """``time.monotonic()`` (``SystemClock.monotonic``): CPython reads the same clock."""
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return now.tv_sec + now.tv_nsec * 1e-9


@cython.final
cdef class EchoLine:
    """``lean_ai.EchoLine`` in C: the messages heard and when each is due, oldest first from ``_first`` on (the
    model's deque), and ``_offset`` into the oldest. A frame inside one message is a copy of those bytes (the
    model's is a view); one across messages, or the padded last part-frame, is gathered as the model gathers it."""

    cdef list _data
    cdef list _due
    cdef Py_ssize_t _first
    cdef Py_ssize_t _offset
    cdef public double delay_s

    def __init__(self, double delay_s):
        self.delay_s = delay_s
        self._data, self._due = [], []

    cpdef hear(self, bytes pcm, double at_s):
        if pcm is None:
            raise TypeError("EchoLine.hear takes the audio as bytes, not None")
        self._data.append(pcm)
        self._due.append(at_s + self.delay_s)

    cpdef object speak(self, double at_s):
        """The frame for the tick at ``at_s`` (ticks never go back), or None to send nothing."""
        cdef Py_ssize_t first = self._first, start, end, size
        cdef bytes head
        if first == len(self._data) or <double>self._due[first] > at_s:
            return None
        head = self._data[first]
        size = len(head)
        start = self._offset
        end = start + FRAME_BYTES
        if end < size:
            self._offset = end
            return PyBytes_FromStringAndSize(<const char *>head + start, FRAME_BYTES)
        if end == size:
            self._pop()
            return head if start == 0 else PyBytes_FromStringAndSize(<const char *>head + start, FRAME_BYTES)
        return self._gather(at_s)

    cdef object _gather(self, double at_s):
        """A frame across messages, or the padded last part-frame; None while a part-frame waits for audio that
        is heard but not yet due."""
        cdef Py_ssize_t i, due = -self._offset, taken = 0, piece
        cdef bytes data
        cdef bytearray frame = bytearray(FRAME_BYTES)  # zeros: the padding, where nothing is taken
        cdef char *out = frame
        for i in range(self._first, len(self._data)):
            if <double>self._due[i] > at_s:
                if due < FRAME_BYTES:
                    return None  # more is coming: wait for it rather than pad
                break
            due += len(<bytes>self._data[i])
            if due >= FRAME_BYTES:
                break
        while taken < FRAME_BYTES and self._first < len(self._data) and <double>self._due[self._first] <= at_s:
            data = self._data[self._first]
            piece = min(len(data) - self._offset, FRAME_BYTES - taken)
            memcpy(out + taken, <const char *>data + self._offset, piece)
            taken += piece
            self._offset += piece
            if self._offset == len(data):
                self._pop()
        return bytes(frame)

    cdef inline void _pop(self):
        """The oldest message is said in full: its bytes go now (the lists drop their slots only now and then)."""
        self._offset = 0
        self._data[self._first] = None
        self._first += 1
        if self._first == len(self._data):
            self._data.clear()
            self._due.clear()
            self._first = 0
        elif self._first >= COMPACT_AT and 2 * self._first >= len(self._data):
            del self._data[: self._first]
            del self._due[: self._first]
            self._first = 0


cdef class EchoCore(WSListener):
    """A session's hot half: its audio in, its frame out. What it leaves to Python it hands to the subclass
    (``lean_ai.CompiledEchoSession``): ``_other_frame`` for every frame but a confirmed session's whole, well-sized
    audio frame; ``on_ws_connected`` there sets ``_transport``, and ``_authenticate`` sets ``_line`` (an
    ``EchoLine`` of this module)."""

    cdef public WSTransport _transport
    cdef public EchoLine _line

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef EchoLine line = self._line
        cdef Py_ssize_t size = frame.payload_size
        if (
            frame.msg_type == WSMsgType.BINARY
            and line is not None
            and frame.fin
            and 0 < size <= MAX_AUDIO_FRAME_BYTES
            and not size & 1
        ):
            line.hear(frame.get_payload_as_bytes(), monotonic())
        else:
            self._other_frame(transport, frame)

    cpdef on_tick(self, double at_s):
        cdef EchoLine line = self._line
        cdef WSTransport transport = self._transport
        cdef object frame
        if line is not None and transport is not None:
            frame = line.speak(at_s)
            if frame is not None:
                transport.send(WSMsgType.BINARY, frame)
