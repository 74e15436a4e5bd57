# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The per-frame path of bench/relay_floor.py (``relay-picows``) in C, for bench/relay_c.py (``relay-c``): what a
call would cost if the bridge carried its frames in C, the number that decides whether to move the bridge's
per-frame path there (issue 10: at most 60 µs of bridge CPU per call per 20 ms).

The same work, frame for frame, as relay_floor's listeners, with none of it in Python: both listeners are
Cython subclasses of picows' ``WSListener``, so picows calls their ``on_ws_frame`` through its C vtable and they
read the frame's bytes where picows parsed them; no Python code of ours runs and no object of ours is made per
frame (picows' own remain, as for relay_floor: the WSFrame, and a look at the asyncio transport's buffer per
send).

- Caller leg (Twilio's text frames): a media message in Twilio's exact shape (``media_payload``: a byte scan,
  the one shape Twilio sends, §3) has its base64 payload decoded here (strict: padded, canonical) and goes
  through the bridge's own upsampler (telephony_bridge/audio/_kernels.h, the code of its compiled kernels:
  μ-law 8 kHz -> PCM16 16 kHz); two frames make one 40 ms Savants message. Any other text frame takes
  relay_floor's Python path for that frame: the bridge's ``media_audio`` (then the audio joins the same C
  state), else the event (``start``, ``stop``) goes to the call's Python half.
- AI leg (binary PCM16 16 kHz): through the bridge's downsampler to μ-law (an odd byte carried over, as
  ``AiToCaller``), base64-encoded here, between the head and tail ``MediaMessages`` builds for the stream:
  the bridge's message, byte for byte. Text and close frames take relay_floor's Python path.

Messages are built in a buffer of each listener's own, ``HEADROOM`` bytes in, and sent with picows'
``send_reuse_external_buffer``: ``WSTransport.send`` without its copy (picows writes the frame header in front
and, client side, masks in place). bench/relay_floor_c_check.py checks the bytes against relay_floor's.
"""

cimport cython
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport int16_t, uint8_t
from libc.string cimport memchr, memcmp, memcpy, memset, strlen
from picows.picows cimport WSFrame, WSListener, WSMsgType, WSTransport

import orjson
from relay_floor import answer_close  # bench/, beside this module's source

from telephony_bridge.twilio.protocol import MAX_NUMBER_DIGITS, media_audio


cdef extern from "_kernels.h":
    enum:
        UP_STATE_BYTES
        DOWN_STATE_BYTES
    int configured
    Py_ssize_t UP_WORK_DOUBLES(Py_ssize_t n)
    Py_ssize_t DOWN_WORK_DOUBLES(Py_ssize_t n, Py_ssize_t count)
    const char *kernels_set(const double *up, const double *down, const void *decode, const void *encode)
    void kernels_ulaw_up(uint8_t *state, const uint8_t *ulaw, Py_ssize_t n, int16_t *s8, uint8_t *out, double *buf)
    Py_ssize_t kernels_down_count(const uint8_t *state, Py_ssize_t n)
    void kernels_down_ulaw(uint8_t *state, const uint8_t *pcm, Py_ssize_t n, uint8_t *out, double *buf)


cdef enum:
    HEADROOM = 14  # picows' largest frame header: 2 bytes, 8 of length, a 4-byte mask (client side)


def configure(bytes up_taps, bytes down_taps, bytes ulaw_decode, bytes ulaw_encode):
    """The taps and tables, as kernels.py hands them to telephony_bridge.audio._kernels: once, before any call."""
    if len(up_taps) != 38 * 8 or len(down_taps) != 38 * 8 or len(ulaw_decode) != 512 or len(ulaw_encode) != 65536:
        raise ValueError("expected 38 float64 taps each way, a 512-byte decode and a 65536-byte encode table")
    cdef const char *refused = kernels_set(<const double *><const char *>up_taps,
                                           <const double *><const char *>down_taps,
                                           <const char *>ulaw_decode, <const char *>ulaw_encode)
    if refused != NULL:
        raise ValueError(refused.decode("ascii"))


# --- scratch: the kernels' work space and intermediate audio, shared (one event loop, nothing re-entrant) ----

cdef struct Scratch:
    void *data
    Py_ssize_t size

cdef Scratch decoded_ulaw, joined_pcm, made_ulaw, samples_8k, work


cdef void *room(Scratch *scratch, Py_ssize_t size) except NULL:
    """At least ``size`` bytes of ``scratch`` (never NULL: a zero size still gets a buffer)."""
    cdef void *grown
    if size > scratch.size or scratch.data == NULL:
        grown = PyMem_Realloc(scratch.data, size + 1)
        if grown == NULL:
            raise MemoryError()
        scratch.data, scratch.size = grown, size
    return scratch.data


cdef uint8_t *message_room(uint8_t **buffer, Py_ssize_t *capacity, Py_ssize_t size) except NULL:
    """A listener's message buffer with room for a ``size``-byte message after its ``HEADROOM``, what it holds
    kept; the message's first byte."""
    cdef uint8_t *grown
    if size > capacity[0] or buffer[0] == NULL:
        grown = <uint8_t *>PyMem_Realloc(buffer[0], HEADROOM + size)
        if grown == NULL:
            raise MemoryError()
        buffer[0], capacity[0] = grown, size
    return buffer[0] + HEADROOM


# --- base64 (RFC 4648 §4, the standard alphabet, padded) ---------------------------------------------------

cdef const char *B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
cdef uint8_t B64_VALUE[256]  # 0..63, or 0x80 for any other byte ('=' included)


cdef void _b64_init() noexcept:
    cdef int i
    for i in range(256):
        B64_VALUE[i] = 0x80
    for i in range(64):
        B64_VALUE[<uint8_t>B64[i]] = i


_b64_init()


cdef Py_ssize_t b64_decode(const uint8_t *text, Py_ssize_t size, uint8_t *out) noexcept nogil:
    """The bytes decoded into ``out`` (``size`` / 4 * 3 at most), or -1 unless ``text`` is canonical padded base64:
    what else a peer sends goes the Python path, so this one never accepts what the bridge's reader refuses."""
    cdef Py_ssize_t groups, g, n = 0
    cdef uint8_t s0, s1, s2, s3  # the 6-bit values of a group's four characters
    cdef int pad
    if size % 4:
        return -1
    if size == 0:
        return 0
    pad = 2 if text[size - 2] == c'=' and text[size - 1] == c'=' else 1 if text[size - 1] == c'=' else 0
    groups = size // 4 - (1 if pad else 0)
    for g in range(groups):
        s0, s1, s2, s3 = B64_VALUE[text[0]], B64_VALUE[text[1]], B64_VALUE[text[2]], B64_VALUE[text[3]]
        if (s0 | s1 | s2 | s3) & 0x80:
            return -1
        out[n] = (s0 << 2) | (s1 >> 4)
        out[n + 1] = ((s1 & 0x0F) << 4) | (s2 >> 2)
        out[n + 2] = ((s2 & 0x03) << 6) | s3
        n += 3
        text += 4
    if pad == 2:  # xx==: one byte; the unused 4 bits must be 0
        s0, s1 = B64_VALUE[text[0]], B64_VALUE[text[1]]
        if (s0 | s1) & 0x80 or s1 & 0x0F:
            return -1
        out[n] = (s0 << 2) | (s1 >> 4)
        n += 1
    elif pad == 1:  # xxx=: two bytes; the unused 2 bits must be 0
        s0, s1, s2 = B64_VALUE[text[0]], B64_VALUE[text[1]], B64_VALUE[text[2]]
        if (s0 | s1 | s2) & 0x80 or s2 & 0x03:
            return -1
        out[n] = (s0 << 2) | (s1 >> 4)
        out[n + 1] = ((s1 & 0x0F) << 4) | (s2 >> 2)
        n += 2
    return n


cdef Py_ssize_t b64_encode(const uint8_t *data, Py_ssize_t size, uint8_t *out) noexcept nogil:
    """``data`` as base64 into ``out`` (4 characters per 3 bytes, rounded up, padded); its length."""
    cdef Py_ssize_t i = 0, n = 0
    cdef unsigned int v
    while i + 3 <= size:
        v = (data[i] << 16) | (data[i + 1] << 8) | data[i + 2]
        out[n], out[n + 1], out[n + 2], out[n + 3] = B64[v >> 18], B64[(v >> 12) & 63], B64[(v >> 6) & 63], B64[v & 63]
        i += 3
        n += 4
    if size - i == 1:
        v = data[i] << 16
        out[n], out[n + 1], out[n + 2], out[n + 3] = B64[v >> 18], B64[(v >> 12) & 63], c'=', c'='
        n += 4
    elif size - i == 2:
        v = (data[i] << 16) | (data[i + 1] << 8)
        out[n], out[n + 1], out[n + 2], out[n + 3] = B64[v >> 18], B64[(v >> 12) & 63], B64[(v >> 6) & 63], c'='
        n += 4
    return n


# --- Twilio's media message, exactly as Twilio writes it (§3) ----------------------------------------------
# {"event":"media","sequenceNumber":"N","media":{"track":"inbound","chunk":"N","timestamp":"N","payload":"B64"},
#  "streamSid":"SID"}: numbers of 1 to MAX_NUMBER_DIGITS ASCII digits, as the bridge's reader requires; a SID of
# printable ASCII with nothing escaped.

cdef const char *OPENING = b'{"event":"media","sequenceNumber":"'
cdef const char *AFTER_SEQUENCE = b'","media":{"track":"inbound","chunk":"'
cdef const char *AFTER_CHUNK = b'","timestamp":"'
cdef const char *AFTER_TIMESTAMP = b'","payload":"'
cdef const char *AFTER_PAYLOAD = b'"},"streamSid":"'
cdef const char *CLOSING = b'"}'
cdef size_t OPENING_SIZE = strlen(OPENING), AFTER_SEQUENCE_SIZE = strlen(AFTER_SEQUENCE)
cdef size_t AFTER_CHUNK_SIZE = strlen(AFTER_CHUNK), AFTER_TIMESTAMP_SIZE = strlen(AFTER_TIMESTAMP)
cdef size_t AFTER_PAYLOAD_SIZE = strlen(AFTER_PAYLOAD), CLOSING_SIZE = strlen(CLOSING)
cdef Py_ssize_t MAX_DIGITS = MAX_NUMBER_DIGITS


cdef inline bint literal(const uint8_t **at, const uint8_t *end, const char *text, size_t size) noexcept nogil:
    if <size_t>(end - at[0]) < size or memcmp(at[0], text, size) != 0:
        return False
    at[0] += size
    return True


cdef inline bint number(const uint8_t **at, const uint8_t *end) noexcept nogil:
    cdef const uint8_t *p = at[0]
    while p < end and c'0' <= p[0] <= c'9':
        p += 1
    if p == at[0] or p - at[0] > MAX_DIGITS:
        return False
    at[0] = p
    return True


cdef Py_ssize_t media_payload(const uint8_t *text, Py_ssize_t size, const uint8_t **payload) noexcept nogil:
    """The length of the base64 payload (at ``*payload``) of a media message in Twilio's exact shape, or -1."""
    cdef const uint8_t *p = text
    cdef const uint8_t *end = text + size
    cdef const uint8_t *quote
    if not (literal(&p, end, OPENING, OPENING_SIZE) and number(&p, end)
            and literal(&p, end, AFTER_SEQUENCE, AFTER_SEQUENCE_SIZE) and number(&p, end)
            and literal(&p, end, AFTER_CHUNK, AFTER_CHUNK_SIZE) and number(&p, end)
            and literal(&p, end, AFTER_TIMESTAMP, AFTER_TIMESTAMP_SIZE)):
        return -1
    quote = <const uint8_t *>memchr(p, c'"', end - p)
    if quote == NULL:
        return -1
    payload[0] = p
    p = quote
    if not literal(&p, end, AFTER_PAYLOAD, AFTER_PAYLOAD_SIZE):
        return -1
    while p < end and p[0] != c'"':
        if p[0] < 0x20 or p[0] > 0x7E or p[0] == c'\\':
            return -1
        p += 1
    if not literal(&p, end, CLOSING, CLOSING_SIZE) or p != end:
        return -1
    return quote - payload[0]


cdef Py_ssize_t fast_audio(const uint8_t *text, Py_ssize_t size, uint8_t **ulaw) except -2:
    """The caller's μ-law from a media message in Twilio's exact shape with canonical base64, decoded into scratch
    at ``*ulaw``: its length; -1 for any other text, which goes the Python path."""
    cdef const uint8_t *payload
    cdef Py_ssize_t encoded = media_payload(text, size, &payload)
    if encoded < 0:
        return -1
    ulaw[0] = <uint8_t *>room(&decoded_ulaw, encoded // 4 * 3)
    return b64_decode(payload, encoded, ulaw[0])


def twilio_audio(bytes text):
    """For bench/relay_floor_c_check.py: the μ-law ``CallerLeg`` reads from ``text`` on its fast path, or None
    where ``text`` goes the Python path."""
    cdef uint8_t *ulaw
    cdef Py_ssize_t n = fast_audio(<const uint8_t *><const char *>text, len(text), &ulaw)
    return (<char *>ulaw)[:n] if n >= 0 else None


# --- the listeners ---------------------------------------------------------------------------------------

cdef inline int ready() except -1:
    if not configured:
        raise RuntimeError("relay_floor_c used before configure()")
    return 0


@cython.final  # nothing overrides on_ws_frame: picows' call of it needs no check for Python overrides
cdef class CallerLeg(WSListener):
    """The Twilio media stream of one call. ``call`` is its Python half (relay_floor's ``CallSetup``): it opens
    the Savants leg at ``start`` and sets ``upstream`` once the AI is up (None again at the end)."""

    cdef readonly object call
    cdef public WSTransport upstream
    cdef uint8_t state[UP_STATE_BYTES]  # the upsampler's, as the bridge's UlawUpsampler keeps it
    cdef uint8_t *message  # HEADROOM bytes, then the Savants message being built
    cdef Py_ssize_t capacity
    cdef Py_ssize_t held  # bytes of the message made so far: the first 20 ms, while ``holding``
    cdef bint holding
    cdef Py_ssize_t size  # the message ``read`` or ``carry`` completed

    def __cinit__(self, call):
        ready()
        self.call = call
        self.upstream = None
        memset(self.state, 0, UP_STATE_BYTES)

    def __dealloc__(self):
        PyMem_Free(self.message)

    cdef int carry(self, const uint8_t *ulaw, Py_ssize_t n) except -1:
        """``n`` bytes of caller μ-law through the upsampler into the message: 1 when that completes it (40 ms, two
        frames, as relay_floor: its size in ``size``), else 0."""
        cdef Py_ssize_t at = self.held if self.holding else 0
        cdef uint8_t *out = message_room(&self.message, &self.capacity, at + 4 * n) + at
        kernels_ulaw_up(self.state, ulaw, n, <int16_t *>room(&samples_8k, 2 * n), out,
                        <double *>room(&work, UP_WORK_DOUBLES(n) * sizeof(double)))
        if not self.holding:
            self.holding, self.held = True, 4 * n
            return 0
        self.holding, self.size = False, at + 4 * n
        return 1

    cdef int read(self, const uint8_t *text, Py_ssize_t size) except -2:
        """A text frame: -1 unless ``fast_audio`` reads it, else as ``carry`` (0 while the AI is not up: its audio
        is dropped, as relay_floor drops caller audio until then)."""
        cdef uint8_t *ulaw
        cdef Py_ssize_t n = fast_audio(text, size, &ulaw)
        if n < 0:
            return -1
        if self.upstream is None:
            return 0
        return self.carry(ulaw, n)

    cpdef on_ws_connected(self, WSTransport transport):
        self.call.twilio = transport

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef int made
        cdef bytes data
        if frame.msg_type == WSMsgType.TEXT:
            made = self.read(<const uint8_t *>frame.payload_ptr, frame.payload_size)
            if made < 0:  # not Twilio's exact shape: relay_floor's Python path for this message
                data = frame.get_payload_as_bytes()
                audio = media_audio(data)
                if audio is None:
                    self.call.on_event(orjson.loads(data))
                    return
                made = self.carry_bytes(audio[0]) if self.upstream is not None else 0
            if made:
                self.upstream.send_reuse_external_buffer(WSMsgType.BINARY, <char *>self.message + HEADROOM, self.size)
        elif frame.msg_type == WSMsgType.CLOSE:
            answer_close(transport, frame)

    cpdef on_ws_disconnected(self, WSTransport transport):
        self.call.end()

    cdef int carry_bytes(self, bytes ulaw) except -1:
        return self.carry(<const uint8_t *><const char *>ulaw, len(ulaw))


@cython.final
cdef class SavantsLeg(WSListener):
    """The Savants connection of one call, in front of relay_floor's ``SavantsLeg`` (``leg``: the set-up half,
    which gets every frame but the AI's audio, and the connection's events). ``downstream``: the media stream's,
    set once the AI is up (None again at the end)."""

    cdef readonly object leg
    cdef public WSTransport downstream
    cdef uint8_t state[DOWN_STATE_BYTES]  # the downsampler's, as the bridge's DownsamplerToUlaw keeps it
    cdef int odd_byte  # the first byte of a sample split across frames, or -1 (AiToCaller's ``_odd_byte``)
    cdef bytes head, tail  # the stream's media message around its payload, as MediaMessages makes it
    cdef uint8_t *message
    cdef Py_ssize_t capacity

    def __cinit__(self, leg):
        ready()
        self.leg = leg
        self.downstream = None
        memset(self.state, 0, DOWN_STATE_BYTES)
        self.odd_byte = -1
        media = leg._media  # the leg's MediaMessages, as the bridge's leg keeps one a stream
        self.head, self.tail = media._head, media._tail

    def __dealloc__(self):
        PyMem_Free(self.message)

    cdef Py_ssize_t convert(self, const uint8_t *pcm, Py_ssize_t size) except -1:
        """AI PCM in (any length): the size of the media message it makes (at ``message`` + HEADROOM), or 0 for none."""
        cdef uint8_t *joined
        if self.odd_byte >= 0 or size & 1:  # a sample split across frames, as AiToCaller.push
            if self.odd_byte >= 0:
                joined = <uint8_t *>room(&joined_pcm, size + 1)
                joined[0] = <uint8_t>self.odd_byte
                memcpy(joined + 1, pcm, size)
                pcm, size = joined, size + 1
            self.odd_byte = pcm[size - 1] if size & 1 else -1
            size &= ~1
        if size == 0:
            return 0
        cdef Py_ssize_t n = size // 2
        cdef Py_ssize_t count = kernels_down_count(self.state, n)
        cdef uint8_t *ulaw = <uint8_t *>room(&made_ulaw, count)
        kernels_down_ulaw(self.state, pcm, n, ulaw, <double *>room(&work, DOWN_WORK_DOUBLES(n, count) * sizeof(double)))
        if count == 0:
            return 0
        cdef Py_ssize_t head = len(self.head), tail = len(self.tail)
        cdef uint8_t *out = message_room(&self.message, &self.capacity, head + (count + 2) // 3 * 4 + tail)
        memcpy(out, <const char *>self.head, head)
        cdef Py_ssize_t encoded = b64_encode(ulaw, count, out + head)
        memcpy(out + head + encoded, <const char *>self.tail, tail)
        return head + encoded + tail

    cpdef on_ws_connected(self, WSTransport transport):
        self.leg.on_ws_connected(transport)

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef Py_ssize_t size
        if frame.msg_type == WSMsgType.BINARY:
            if self.downstream is not None:
                size = self.convert(<const uint8_t *>frame.payload_ptr, frame.payload_size)
                if size:
                    self.downstream.send_reuse_external_buffer(WSMsgType.TEXT, <char *>self.message + HEADROOM, size)
        else:
            self.leg.on_ws_frame(transport, frame)

    cpdef on_ws_disconnected(self, WSTransport transport):
        self.leg.on_ws_disconnected(transport)
