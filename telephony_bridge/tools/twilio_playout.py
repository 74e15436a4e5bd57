"""Twilio's outbound playback buffer as a pure model (spec: twilio-media-streams.md §4, G6, G7).

Twilio buffers every ``media`` a bridge sends and plays it in real time; a ``mark`` waits behind the audio
sent before it and is echoed when playback reaches it (at once if nothing is buffered); ``clear`` drops the
unplayed audio at once and echoes every pending mark. The simulated caller drives this model on its 20 ms
clock, so what a bridge's caller *hears* and when its marks come back follow from what the bridge sent.

Time is passed in as bytes of μ-law (8 per ms). ``tick(n)`` starts playing the next ``n`` bytes; a mark whose
audio ends inside that frame is echoed at the next ``tick`` (when the frame has finished), never earlier, so
a bridge that closes on a mark echo (G8) is not flattered by an early echo.
"""

from __future__ import annotations

from collections import deque

from telephony_bridge.audio.codec import TWILIO_BYTES_PER_MS, ULAW_SILENCE


class Playout:
    """One call's playback buffer; counters are public attributes, read them at any time.

    An *underrun* is a gap in playback that audio resumes after within ``max_gap_ms``: the bridge fell
    behind real time mid-stream, and the caller hears a hole. Longer silences count as pauses between
    utterances, and silence after a ``clear`` is intended. Marks do not matter here: bridges that mark
    every frame are common.
    """

    def __init__(self, max_gap_ms: float = 250.0) -> None:
        self._queue: deque[bytes | str] = deque()  # audio chunks (bytes) and mark names (str), in order
        self._head_played = 0  # bytes of the first chunk already played (no copying of long chunks)
        self._in_flight: list[str] = []  # marks whose audio ends inside the frame now playing
        self._frame_has_audio = False
        self._max_gap_bytes = round(max_gap_ms * TWILIO_BYTES_PER_MS)
        self._gap: int | None = None  # silence played since audio last played; None: not inside a stream
        self.buffered_bytes = 0
        self.max_buffered_bytes = 0
        self.bytes_received = 0
        self.bytes_played = 0
        self.bytes_cleared = 0
        self.marks_received = 0
        self.marks_echoed = 0
        self.clears = 0
        self.underruns = 0
        self.underrun_bytes = 0  # silence inside those gaps
        self.underrun_ends_ms: list[float] = []  # for each underrun, when audio resumed: ms of ticks played before
        self._ticked_bytes = 0  # every tick's bytes, played or padded: the playback clock

    @property
    def underrun_ms(self) -> float:
        return self.underrun_bytes / TWILIO_BYTES_PER_MS

    @property
    def max_lead_ms(self) -> float:
        """The most audio the bridge ever had queued ahead of playback."""
        return self.max_buffered_bytes / TWILIO_BYTES_PER_MS

    def push_media(self, ulaw: bytes) -> None:
        if not ulaw:
            return
        self._queue.append(bytes(ulaw))
        self.buffered_bytes += len(ulaw)
        self.bytes_received += len(ulaw)
        self.max_buffered_bytes = max(self.max_buffered_bytes, self.buffered_bytes)

    def push_mark(self, name: str) -> list[str]:
        """Queue a mark; returns ``[name]`` when it is due at once (nothing left to play before it)."""
        self.marks_received += 1
        if self._queue:
            self._queue.append(name)
            return []
        if self._frame_has_audio or self._in_flight:
            self._in_flight.append(name)
            return []
        self.marks_echoed += 1
        return [name]

    def clear(self) -> list[str]:
        """Drop all unplayed audio; returns every pending mark, in order, to echo now (§4)."""
        marks = self._in_flight + [item for item in self._queue if isinstance(item, str)]
        self.bytes_cleared += self.buffered_bytes
        self._queue.clear()
        self._head_played = 0
        self._in_flight = []
        self.buffered_bytes = 0
        self._frame_has_audio = False
        self._gap = None
        self.clears += 1
        self.marks_echoed += len(marks)
        return marks

    def tick(self, n_bytes: int) -> tuple[bytes, list[str]]:
        """Play the next ``n_bytes``: returns what the caller hears (silence-padded) and the marks due now.

        The marks due are those whose audio finished with the previous frame; marks reached in this frame
        are held until the next call, which is when this frame has finished playing.
        """
        due = self._in_flight
        self._in_flight = []
        out = bytearray()
        while self._queue:
            item = self._queue[0]
            if isinstance(item, str):
                self._queue.popleft()
                (self._in_flight if out else due).append(item)
            elif len(out) < n_bytes:
                take = min(n_bytes - len(out), len(item) - self._head_played)
                out += item[self._head_played : self._head_played + take]
                self._head_played += take
                if self._head_played == len(item):
                    self._queue.popleft()
                    self._head_played = 0
            else:
                break
        played = len(out)
        self.buffered_bytes -= played
        self.bytes_played += played
        self._frame_has_audio = played > 0
        self._count_gap(played, n_bytes)
        self._ticked_bytes += n_bytes
        self.marks_echoed += len(due)
        out += bytes([ULAW_SILENCE]) * (n_bytes - played)
        return bytes(out), due

    def _count_gap(self, played: int, n_bytes: int) -> None:
        # Within a tick audio comes first, then padding: a gap ends at the start of a tick that plays audio.
        if played:
            if self._gap:
                self.underruns += 1
                self.underrun_bytes += self._gap
                self.underrun_ends_ms.append(self._ticked_bytes / TWILIO_BYTES_PER_MS)
            self._gap = n_bytes - played
        elif self._gap is not None:
            self._gap += n_bytes
        if self._gap is not None and self._gap > self._max_gap_bytes:
            self._gap = None
