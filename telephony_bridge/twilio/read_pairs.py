"""The media stream read a pair of messages at a time: the kernel holds a lone message until its partner is in.

Twilio sends a media message every 20 ms, and the call core sends the caller's audio to Savants 40 ms per
message (``audio.upstream_message_ms``), so the first of each pair waits for the second anyway. With the
socket's receive low-water mark (``SO_RCVLOWAT``) above one message and below two, the kernel wakes the bridge
once a pair rather than once a message: a quarter fewer reads and wake-ups for the call, and 9-14 % less CPU a
call at 50-250 calls (``bench/ab.py`` against the code before it, docs/performance.md). The caller's audio
reaches Savants no later while the stream is steady: its message would have waited for the second frame in any
case. The first frame of each pair reaches the VAD that notices the caller speaking over the AI 20 ms later,
and a mark or a keypad digit up to 40 ms later (with one media message it stays under the mark, and waits for
the next pair). The sender must not wait for our ACK: a held message is not read, so the kernel acknowledges it
only when its delayed-ACK timer fires, and a sender that leaves Nagle's algorithm on (no ``TCP_NODELAY``) would
hold the second message back until then (up to ~40 ms; Go, Java, Node, nginx, Envoy and HAProxy set
``TCP_NODELAY`` on such connections). Turn ``twilio.paired_reads`` off in front of one that does not.

A held message must never wait for a partner that is not coming (the stream's ``stop`` and close frame; a
client that sends only while someone speaks; a packet late on the network). So a stream pairs only once its
messages come steadily, of the size of one 20 ms media message (``MIN_BYTES``-``MAX_BYTES``: Twilio's are
373-389 bytes), and ``ReadPairs`` ticks every ``TICK_S`` while any stream is paired, letting go of each one
that read nothing over a whole tick (its mark back to one byte, which makes the kernel wake the reader at once).
A lone message waits two ticks at most. Our own close lets go first, so the peer's close frame is read at
once. A stream let go pairs again once its messages come steadily again.

Only where the kernel wakes the reader when the mark is lowered (Linux since 4.18): ``kernel_lets_go`` tries it
once on a loopback connection, and without it nothing pairs.
"""

from __future__ import annotations

import functools
import select
import socket
import sys
from collections.abc import Callable
from typing import Any

from telephony_bridge.clock import Clock, Timer

# A paired stream reads every 40 ms; 30 ms of slack for a late pair or a lagging loop before it is let go (it
# pairs again 200 ms later). A lone message waits two ticks at most.
TICK_S = 0.07
STEADY_RUN = 10  # like-sized messages in a row (200 ms of media) before a stream pairs
# A 20 ms media message's text (Twilio's 373-389 bytes over a 4 h call, a lean client's ~305); a 40 ms one
# (~590) is not held: waiting for a second would delay audio the core would have sent at once.
MIN_BYTES, MAX_BYTES = 240, 480
LIKE = 0.1  # messages within this fraction of the run's first are "like-sized"
# The masked client frame's header around a text message of MIN-MAX bytes: 2 bytes, a 16-bit length, a 4-byte mask.
FRAME_HEADER_BYTES = 8


def low_water_mark(message_bytes: int) -> int:
    """The receive mark for messages of this much text: one and a half of them on the wire, so that one alone
    stays under it and two pass it."""
    return (message_bytes + FRAME_HEADER_BYTES) * 3 // 2


@functools.cache
def kernel_lets_go() -> bool:
    """Whether this kernel wakes an epoll waiter when a socket's ``SO_RCVLOWAT`` is lowered under what it holds
    (Linux since 4.18; not macOS, whose sockets still hold the bytes). Tried once a process, on loopback."""
    if sys.platform != "linux" or not hasattr(socket, "SO_RCVLOWAT"):
        return False
    try:
        with socket.create_server(("127.0.0.1", 0)) as listener, socket.socket() as sender:
            sender.connect(listener.getsockname())
            receiver, _ = listener.accept()
            with receiver, select.epoll() as epoll:
                receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 2)
                epoll.register(receiver.fileno(), select.EPOLLIN)
                sender.sendall(b"x")
                if epoll.poll(0.01):
                    return False  # the mark is not honoured at all
                receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                return bool(epoll.poll(1.0))
    except OSError:
        return False


class Pairing:
    """One stream's state: ``ReadPairs`` compares ``reads`` with ``seen`` at each tick to notice a quiet one."""

    __slots__ = ("_first", "_largest", "_pairs", "_sock", "armed", "reads", "run", "seen")

    def __init__(self, sock: Any, pairs: ReadPairs) -> None:
        self._sock = sock  # the transport's socket: anything with setsockopt
        self._pairs = pairs
        self._first = 0  # the size of the run's first message
        self._largest = 0  # and of its largest
        self.run = 0  # like-sized messages in a row, while not armed
        self.armed = False
        self.reads = 0
        self.seen = 0

    def heard(self, size: int) -> None:
        """A text message of ``size`` bytes was read while the stream is not paired (``armed`` False): pair it
        once ``STEADY_RUN`` like-sized media messages have come in a row, with the mark at one and a half of the
        run's largest."""
        first = self._first
        if MIN_BYTES <= size <= MAX_BYTES and abs(size - first) <= first * LIKE:
            self.run += 1
            self._largest = max(self._largest, size)
            if self.run >= STEADY_RUN:
                self._pairs.arm(self, low_water_mark(self._largest))
        else:
            self._first = self._largest = size
            self.run = 1

    def set_lowat(self, lowat: int) -> bool:
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
        except (OSError, ValueError):  # the socket is closing, or closed: it reads nothing more anyway
            return False
        return True

    def let_go(self) -> None:
        """Read every message as it comes again (our close); safe to call more than once."""
        self._pairs.let_go(self)

    def forget(self) -> None:
        """The connection is gone (its descriptor closed, perhaps reused): out of the tick, no ``setsockopt``."""
        self._pairs.forget(self)


class ReadPairs:
    """The process's paired streams, and the tick that lets go of a quiet one. Ticks only while one is paired.
    ``count`` hears ``"paired"`` and ``"let_go"`` (a quiet tick), for the metrics."""

    def __init__(
        self, clock: Clock, tick_s: float = TICK_S, count: Callable[[str], None] = lambda change: None
    ) -> None:
        self._clock = clock
        self._tick_s = tick_s
        self._count = count
        self._paired: set[Pairing] = set()
        self._timer: Timer | None = None

    def pairing(self, sock: Any) -> Pairing | None:
        """A stream's pairing, for a transport that has a socket (None: read it as it comes)."""
        return Pairing(sock, self) if sock is not None else None

    def __len__(self) -> int:
        return len(self._paired)

    def arm(self, pairing: Pairing, lowat: int) -> None:
        """Pair a stream: the kernel holds what it reads until ``lowat`` bytes are in."""
        pairing.run = 0
        if not pairing.set_lowat(lowat):
            return
        pairing.armed = True
        pairing.seen = pairing.reads
        self._paired.add(pairing)
        self._count("paired")
        if self._timer is None:
            self._timer = self._clock.call_at(self._clock.monotonic() + self._tick_s, self._tick)

    def let_go(self, pairing: Pairing) -> None:
        """Read a paired stream's messages as they come again; the kernel wakes its reader for what it holds."""
        if pairing.armed:
            self.forget(pairing)
            pairing.set_lowat(1)  # the kernel wakes the reader at once for what it holds

    def forget(self, pairing: Pairing) -> None:
        """Out of the tick (the connection is gone, or ``let_go`` lowers its mark next)."""
        pairing.armed = False
        pairing.run = 0
        self._paired.discard(pairing)

    def _tick(self) -> None:
        self._timer = None
        for pairing in list(self._paired):
            if pairing.reads == pairing.seen:
                self._count("let_go")
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
