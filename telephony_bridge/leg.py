"""The caller leg: what the call core (``bridge.Call``) needs from an ingress, and nothing about which one.

A leg is one caller's connection to us: a Twilio Media Streams WebSocket (``twilio/leg.py``) or a SIP dialog
with its RTP (``sip/``). Its driver speaks the ingress protocol; the core speaks only this interface, so
admission, the AI session (and its reconnects), barge-in, pacing, metrics and the "call ended" line exist once.

What a leg delivers, from ``receive()``, in arrival order:

- ``CallerAudio``: 8 kHz μ-law as the caller sent it, with its place on the caller's timeline in ms
  (``timestamp_ms``; Twilio's ``media.timestamp``, or an RTP timestamp / 8). ``None`` means the leg has no
  trustworthy timeline for this chunk: the core places it right after the previous one.
- ``PlayedUpTo(name)``: the caller has heard everything sent before the mark ``name`` (a Twilio mark echo).
- ``Digit(digit)``: one DTMF key (Twilio's ``dtmf`` event, RFC 4733 on SIP). Never logged by the leg.
- ``HungUp(reason, lost)``: the caller's side is over (hung up, disconnected, went silent); always the last event.
  ``lost``: it failed rather than ended (SIP: no ACK, no SDP answer in the ACK, the session timer ran out), so
  the call is ``caller_lost``.
  ``receive()`` never raises for anything the peer sends: garbage is the leg's to count and log.

Caller audio is most of what a leg delivers (50 messages a second), so the core also offers a direct path:
after ``deliver_audio_to(handler)`` a leg may call ``handler(ulaw, timestamp_ms)`` from its transport's
callback as audio is read, with no task switch per frame; it does so only while nothing waits unread in
``receive`` (so events stay in order), and what the handler raises, ``receive`` raises (``DirectAudio``).
``deliver_audio_to(None)`` (the core's, when its pump ends) stops it: a call that has ended handles no more
audio. A leg that has no such callback ignores all this, and its audio comes through ``receive``.
``deliver_marks_to(handler)`` is the same for ``PlayedUpTo``: ``handler(name)`` as the leg learns of it (a mark
echo read, two a second a call), so that a mark wakes no task; it too keeps events in order, and what it raises,
``receive`` raises. The marks a ``clear()`` drops come through ``receive`` (never the handler, which would take
them during the ``clear()`` call, before the core has counted what it dropped).

What the core asks of a leg (from one task at a time, or synchronously from a read callback while that task
sleeps, so messages never interleave):

- ``send_audio(ulaw)``: whole 20 ms frames of 8 kHz μ-law, already paced by ``Outbound`` at most
  ``audio.outbound_lead_ms`` ahead of real time. A leg with a fixed clock (SIP sends RTP at exactly 20 ms,
  and keeps sending comfort silence when nothing is queued) may hold that lead in a small queue of its own.
  While its caller cannot hear it (SIP hold), a leg sends nothing and takes nothing: ``send_audio`` waits and
  ``can_send_now()`` is False until the caller listens again, so the core counts only audible audio as sent.
- ``can_send_now()`` / ``send_audio_nowait(ulaw)``: the same send, synchronously, when the leg can take it
  without waiting (its socket is not applying backpressure). ``Outbound`` sends a frame that is due the moment
  it arrives this way, from the AI leg's read callback, without waking its pacer task (``can_send_now()``
  False: it wakes the pacer, which awaits ``send_audio``).
- ``send_mark(name)``: a marker behind the audio sent so far; the leg answers with ``PlayedUpTo(name)`` once
  the caller has heard it. A leg whose protocol has no marks (SIP) confirms a mark as soon as the audio before
  it has gone onto the wire: the core then sees playback as "sent", which is what barge-in accounting and
  the AI's goodbye need within the pacing lead.
- ``clear()``: drop whatever audio the leg or the far end still holds unplayed (barge-in).
- ``hang_up(outcome)``: end the caller's side, at most once (later calls do nothing). ``outcome`` is the
  call's outcome (``completed``, ``ai_unavailable``, ``no_capacity``, ``error``, ``caller_lost``,
  ``drained``, or, before the call started, ``refused``/``duplicate``): a leg
  chooses what the caller hears from it (Twilio: the close code, and the ``<Connect action>`` request reads
  the recorded outcome; SIP: a fallback recording, then BYE).
- ``inactive()``: returns a reason once the caller's side has gone silent for too long (no message at all:
  Twilio sends media every 20 ms even in silence; RTP likewise), so a peer that vanished without a close
  does not hold a device lease forever. ``Watchdog`` below is the shared implementation.
- ``figures()``: the leg's own figures for the "call ended" line (protocol errors, jitter, loss...).
- ``requests_after_end``: whether the ingress asks us something once the leg has ended (Twilio's ``<Connect
  action>`` request, whose answer is what the caller hears next); the drain waits a moment for it only then.
  SIP asks nothing: its leg plays what the caller hears itself, before the BYE.

Sending to a leg whose peer has gone raises ``CallerGone``.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, ParamSpec, Protocol

from telephony_bridge.clock import Clock

P = ParamSpec("P")

Ingress = Literal["twilio", "sip"]


@dataclass(frozen=True, slots=True)
class CallerAudio:
    ulaw: bytes
    timestamp_ms: int | None


@dataclass(frozen=True, slots=True)
class PlayedUpTo:
    name: str


@dataclass(frozen=True, slots=True)
class Digit:
    digit: str


@dataclass(frozen=True, slots=True)
class HungUp:
    reason: str
    lost: bool = False  # the caller's side failed (a dialog never confirmed or not kept alive): ``caller_lost``


LegEvent = CallerAudio | PlayedUpTo | Digit | HungUp
AudioHandler = Callable[[bytes, int | None], None]  # the core's: (ulaw, timestamp_ms), as ``CallerAudio``
MarkHandler = Callable[[str], None]  # the core's: the name, as ``PlayedUpTo``


class AudioSink(Protocol):
    """Where paced AI audio goes: the sending half of a caller leg (``Outbound`` writes only to this)."""

    async def send_audio(self, ulaw: bytes) -> None: ...
    def can_send_now(self) -> bool: ...
    def send_audio_nowait(self, ulaw: bytes) -> None: ...
    async def send_mark(self, name: str) -> None: ...
    async def clear(self) -> None: ...


class CallerLeg(AudioSink, Protocol):
    """One caller's connection, whatever the ingress (see the module docstring for the contract)."""

    @property
    def ingress(self) -> Ingress: ...
    @property
    def call_id(self) -> str:
        """The call's identity for accounting, outcomes and logs: Twilio's CallSid, or the SIP Call-ID."""
        ...

    @property
    def stream_id(self) -> str:
        """A second identity for logs (Twilio's streamSid); may be empty."""
        ...

    @property
    def requests_after_end(self) -> bool: ...
    @property
    def frame_bytes(self) -> int | None:
        """The caller-audio payload size the ingress promises (Twilio: 160 bytes, 20 ms), so that another is a
        sender's quirk, logged once; None where sizes vary by design (SIP: what the jitter buffer gives out,
        which a DTMF event's gap or another packet time makes longer)."""
        ...

    async def receive(self) -> LegEvent: ...
    def deliver_audio_to(self, handler: AudioHandler | None) -> None: ...
    def deliver_marks_to(self, handler: MarkHandler | None) -> None: ...
    async def hang_up(self, outcome: str) -> None: ...
    async def inactive(self) -> str: ...
    def figures(self) -> dict[str, Any]: ...


class DirectAudio(Generic[P]):
    """A connection's direct path to the core (a leg's ``deliver_audio_to`` and ``deliver_marks_to``, and the
    Savants connection's audio): ``attach`` from the core's task, ``deliver`` from the transport's callback,
    ``check`` in ``receive``, which then raises whatever the handler raised (a callback has nobody to raise it to).

    The handler runs in the context of the task that attached it, so what it logs carries the call's IDs
    (``ops.logging.call_context``) although the transport's callback belongs to no call."""

    # The compiled frame path reads and writes these at their fixed offsets (_pyattrs.h); the rest live in
    # the instance dict.
    __slots__ = ("__dict__", "__weakref__", "_context", "_error", "handler")

    def __init__(self) -> None:
        self.handler: Callable[P, None] | None = None
        self._context = contextvars.Context()
        self._error: Exception | None = None

    def attach(self, handler: Callable[P, None] | None) -> None:
        """``None`` detaches: the connection queues its audio for ``receive`` again (nobody reads it once the
        call has ended), and drops an error nobody checked: its traceback holds the handler's frames, and they
        the call, which holds this; kept, the whole call would wait for a full collection."""
        self.handler = handler
        self._context = contextvars.copy_context()
        if handler is None:
            self._error = None

    def deliver(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """True if the core took the audio; False if it is the connection's to queue for ``receive`` (no
        handler, or the handler raised: the queued audio then wakes ``receive``, and ``check`` raises)."""
        handler = self.handler
        if handler is None:
            return False
        try:
            self._context.run(handler, *args, **kwargs)
        except Exception as exc:
            self._error, self.handler = exc, None
            return False
        return True

    def check(self) -> None:
        """Raises, once, what the handler raised (the same cycle as above otherwise, through this frame)."""
        error = self._error
        if error is not None:
            self._error = None
            try:
                raise error
            finally:
                del error


class Watchdog:
    """Notices a peer that went quiet: ``alive()`` on every message, ``await expired()`` returns once no
    message came for ``timeout_s`` (``None``: never).

    One timer per period rather than one per message: it sleeps until the last sign of life plus the timeout
    and looks again, so 50 messages a second cost nothing but a float store.
    """

    # The compiled frame path reads and writes these at their fixed offsets (_pyattrs.h); the rest live in
    # the instance dict.
    __slots__ = ("__dict__", "__weakref__", "_last")

    def __init__(self, clock: Clock, timeout_s: float | None) -> None:
        self._clock = clock
        self.timeout_s = timeout_s
        self._last = clock.monotonic()

    def alive(self) -> None:
        self._last = self._clock.monotonic()

    async def expired(self) -> float:
        """Wait until the peer has been silent for the timeout; how long it was silent."""
        if self.timeout_s is None:
            await asyncio.Event().wait()  # never set: this peer is never given up for silence
        assert self.timeout_s is not None
        while (due := self._last + self.timeout_s) > self._clock.monotonic():
            await self._clock.sleep_until(due)
        return self._clock.monotonic() - self._last
