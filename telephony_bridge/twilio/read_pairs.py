"""The media stream read a pair of messages at a time: the kernel holds a lone message until its partner is in.

Twilio sends a media message every 20 ms, and the call core sends the caller's audio to Savants 40 ms per
message (``audio.upstream_message_ms``), so the first of each pair waits for the second anyway. With the
socket's receive low-water mark (``SO_RCVLOWAT``) above one message and below two, the kernel wakes the bridge
once a pair rather than once a message: half the stream's reads and wake-ups, and the first frame's
wait-for-its-partner timer is never armed (``bench/capacity.py --variant``: ~10 % less CPU a call at 100-250
calls, docs/performance.md). The caller's audio reaches Savants no later: its message would have waited for
the second frame in any case; what is read in the stream's messages alone (marks, keypad digits, the VAD that
notices the caller speaking over the AI) is read up to one frame later.

A held message must never wait for a partner that is not coming (the stream's ``stop`` and close frame; a
client that sends only while someone speaks). So a stream pairs only once its messages come steadily, of the
size of one 20 ms media message (``MIN_BYTES``-``MAX_BYTES``: Twilio's are about 310 bytes), and ``ReadPairs``
ticks every ``TICK_S`` while any stream is paired, letting go of each one that read nothing over a whole tick
(its mark back to one byte: the kernel wakes the reader at once). A lone message waits two ticks at most. Our
own close lets go first, so the peer's close frame is read at once. A stream let go pairs again once its
messages come steadily again.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from telephony_bridge.clock import Clock, Timer

log = logging.getLogger(__name__)

TICK_S = 0.05  # a paired stream reads every 40 ms; a lone message is let through within two ticks
STEADY_RUN = 10  # like-sized messages in a row (200 ms of media) before a stream pairs
MIN_BYTES, MAX_BYTES = 240, 400  # a 20 ms media message's text: larger ones are longer audio, not worth a wait
LIKE = 0.1  # messages within this fraction of the run's first are "like-sized"
# The masked client frame's header around a text message of MIN-MAX bytes: 2 bytes, a 16-bit length, a 4-byte mask.
FRAME_HEADER_BYTES = 8


class Pairing:
    """One stream's state: ``ReadPairs.seen`` counts its messages (in ``reads``) to notice a quiet one."""

    __slots__ = ("_first", "_largest", "_pairs", "_sock", "armed", "lowat", "reads", "run", "seen")

    def __init__(self, sock: Any, pairs: ReadPairs) -> None:
        self._sock = sock  # the transport's socket: anything with setsockopt
        self._pairs = pairs
        self._first = 0  # the size of the run's first message
        self._largest = 0  # and of its largest
        self.run = 0  # like-sized messages in a row, while not armed
        self.armed = False
        self.reads = 0
        self.seen = 0
        self.lowat = 1

    def heard(self, size: int) -> None:
        """A text message of ``size`` bytes was read while the stream is not paired (``armed`` False): pair it
        once ``STEADY_RUN`` like-sized media messages have come in a row, with the mark at one and a half of the
        run's largest (a message and a mark or a keypad digit can pass it; a lone message cannot)."""
        first = self._first
        if MIN_BYTES <= size <= MAX_BYTES and abs(size - first) <= first * LIKE:
            self.run += 1
            self._largest = max(self._largest, size)
            if self.run >= STEADY_RUN:
                self._pairs.arm(self, (self._largest + FRAME_HEADER_BYTES) * 3 // 2)
        else:
            self._first = self._largest = size
            self.run = 1

    def set_lowat(self, lowat: int) -> bool:
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
        except (OSError, ValueError):  # the socket is closing, or closed: it reads nothing more anyway
            return False
        self.lowat = lowat
        return True

    def let_go(self) -> None:
        """Read every message as it comes again (our close, the stream's end); safe to call more than once."""
        self._pairs.let_go(self)


class ReadPairs:
    """The process's paired streams, and the tick that lets go of a quiet one. Ticks only while one is paired."""

    def __init__(self, clock: Clock, tick_s: float = TICK_S) -> None:
        self._clock = clock
        self._tick_s = tick_s
        self._paired: set[Pairing] = set()
        self._timer: Timer | None = None
        self.let_go_quiet = 0  # streams let go for reading nothing over a tick (tests, and a debug line)

    def pairing(self, sock: Any) -> Pairing | None:
        """A stream's pairing, for a transport whose socket takes ``SO_RCVLOWAT`` (None: read it as it comes)."""
        return Pairing(sock, self) if sock is not None and hasattr(socket, "SO_RCVLOWAT") else None

    def __len__(self) -> int:
        return len(self._paired)

    def arm(self, pairing: Pairing, lowat: int) -> None:
        pairing.run = 0
        if not pairing.set_lowat(lowat):
            return
        pairing.armed = True
        pairing.seen = pairing.reads
        self._paired.add(pairing)
        if self._timer is None:
            self._timer = self._clock.call_at(self._clock.monotonic() + self._tick_s, self._tick)

    def let_go(self, pairing: Pairing) -> None:
        if not pairing.armed:
            return
        pairing.armed = False
        pairing.run = 0
        self._paired.discard(pairing)
        pairing.set_lowat(1)  # the kernel wakes the reader at once for what it holds

    def _tick(self) -> None:
        self._timer = None
        for pairing in list(self._paired):
            if pairing.reads == pairing.seen:
                self.let_go_quiet += 1
                log.debug("a media stream read nothing for a tick: reading its messages one by one")
                self.let_go(pairing)
            else:
                pairing.seen = pairing.reads
        if self._paired:
            self._timer = self._clock.call_at(self._clock.monotonic() + self._tick_s, self._tick)

    def close(self) -> None:
        """Stop ticking and let every stream go (the app is stopping)."""
        for pairing in list(self._paired):
            self.let_go(pairing)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
