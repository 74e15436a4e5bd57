"""Lays Twilio's inbound μ-law frames end to end on the stream's own clock, so the resampler sees no jump.

Twilio stamps each inbound ``media`` message with ``timestamp``: milliseconds since the stream started. A
frame that arrives after a gap (Twilio lost packets) is preceded by μ-law silence for the missing time; a
late or repeated frame is dropped; a frame that overlaps what was already produced keeps only its new tail.
Misalignments smaller than ``jitter_tolerance_s`` (default 10 ms, half a 20 ms frame) are ignored and the
frame is taken whole: Twilio's millisecond stamps wobble, and padding or trimming a few samples would put a
discontinuity into the audio for nothing. The produced stream therefore never drifts from Twilio's clock by
more than that tolerance.

Not every sender stamps its frames (simulators and "Twilio-compatible" clients often leave ``timestamp`` out, or
send one that never moves). A frame without a stamp, or whose stamp equals the previous frame's, or a second frame
in a row whose stamp does not advance, switches the call to *arrival order* for good: each payload follows the
last, its own length long, so audio is never dropped wholesale. ``untimed_reason`` says why (once set, it stays).
A single frame that arrives late (out of order, or behind what was already produced) is still dropped: that is a
Twilio stream with a lost-and-found frame, not a sender without a clock.
"""

from __future__ import annotations

from telephony_bridge.audio.codec import TWILIO_BYTES_PER_MS, ULAW_SILENCE

JITTER_TOLERANCE_S = 0.010
MAX_FILL_S = 1.0
NO_TIMESTAMP = "the client sends no media timestamps"
STALE_TIMESTAMP = "the client's media timestamps do not advance"


class InboundTimeline:
    """Places inbound frames by their ``timestamp``; one per call. Pure: bytes in, bytes out, counters.

    Counters for the "call ended" line: ``filled_bytes`` (silence inserted), ``dropped_frames`` (late or
    duplicate), ``trimmed_bytes`` (overlapping heads cut off), ``skipped_bytes`` (gap beyond ``max_fill_s``
    that was not filled: the timeline jumps instead, so one absurd timestamp cannot allocate hours of silence).
    """

    # The compiled frame path reads and writes these at their fixed offsets (_pyattrs.h); the rest live in
    # the instance dict.
    __slots__ = ("__dict__", "__weakref__", "_last_stamp", "_position", "_stale_run", "untimed_reason")

    def __init__(self, *, jitter_tolerance_s: float = JITTER_TOLERANCE_S, max_fill_s: float = MAX_FILL_S) -> None:
        if jitter_tolerance_s < 0 or max_fill_s < 0:
            raise ValueError(
                f"expected jitter_tolerance_s >= 0 and max_fill_s >= 0, got {jitter_tolerance_s}, {max_fill_s}"
            )
        self._tolerance_bytes = round(jitter_tolerance_s * 1000 * TWILIO_BYTES_PER_MS)
        self._max_fill_bytes = round(max_fill_s * 1000 * TWILIO_BYTES_PER_MS)
        self._position = 0  # timeline position, in μ-law bytes (samples at 8 kHz), of the next byte due
        self._last_stamp: int | None = None  # the previous frame's timestamp_ms
        self._stale_run = 0  # consecutive frames whose stamp did not advance
        self.untimed_reason = ""  # set once the call falls back to arrival order (see the module docstring)
        self.untimed_frames = 0  # frames placed by arrival order
        self.filled_bytes = 0
        self.dropped_frames = 0
        self.trimmed_bytes = 0
        self.skipped_bytes = 0

    @property
    def position_s(self) -> float:
        """Where on the stream's clock the next byte belongs, in seconds."""
        return self._position / (1000 * TWILIO_BYTES_PER_MS)

    def place(self, timestamp_ms: int | None, payload: bytes) -> bytes:
        """Return the μ-law bytes to pass downstream for the frame stamped ``timestamp_ms`` (None: no stamp):
        possibly silence then the payload, the payload's tail, the payload as is, or nothing."""
        last = self._last_stamp
        if (
            payload
            and timestamp_ms is not None
            and last is not None
            and timestamp_ms > last
            and timestamp_ms * TWILIO_BYTES_PER_MS == self._position
            and not self.untimed_reason
        ):
            # Most frames: the next, stamped exactly where the last one ended. What ``_place`` concludes for it
            # (the clock advances; on time, taken whole), in fewer steps; tests/test_timeline.py holds the two
            # to the same bytes and state over random streams.
            self._last_stamp = timestamp_ms
            self._stale_run = 0
            self._position += len(payload)
            return payload
        return self._place(timestamp_ms, payload)

    def _place(self, timestamp_ms: int | None, payload: bytes) -> bytes:
        """``place`` by the general rules, for any frame."""
        if not payload:
            return b""
        if not self.untimed_reason:
            self._check_stamp(timestamp_ms, len(payload))
        if self.untimed_reason or timestamp_ms is None:
            self.untimed_frames += 1
            self._position += len(payload)
            return payload
        start = timestamp_ms * TWILIO_BYTES_PER_MS
        if start + len(payload) <= self._position:  # nothing new: late or duplicate
            self.dropped_frames += 1
            return b""
        offset = start - self._position
        if offset >= self._tolerance_bytes and offset > 0:  # a gap: fill it (up to the cap)
            fill = min(offset, self._max_fill_bytes)
            self.filled_bytes += fill
            self.skipped_bytes += offset - fill
            self._position = start + len(payload)
            return bytes([ULAW_SILENCE]) * fill + payload
        if -offset >= self._tolerance_bytes and offset < 0:  # an overlap: keep the new tail
            self.trimmed_bytes += -offset
            self._position = start + len(payload)
            return payload[-offset:]
        self._position += len(payload)  # on time, or within the jitter tolerance: take it whole
        return payload

    def _check_stamp(self, timestamp_ms: int | None, length: int) -> None:
        """Switch to arrival order if this sender does not stamp its frames on a clock that advances: no stamp,
        the previous frame's stamp again, or twice in a row a stamp that goes back or brings nothing new."""
        if timestamp_ms is None:
            self.untimed_reason = NO_TIMESTAMP
            return
        last, self._last_stamp = self._last_stamp, timestamp_ms
        behind = timestamp_ms * TWILIO_BYTES_PER_MS + length <= self._position
        if last is None or (timestamp_ms > last and not behind):
            self._stale_run = 0
            return
        self._stale_run += 1
        if timestamp_ms == last or self._stale_run >= 2:
            self.untimed_reason = STALE_TIMESTAMP
