"""The Twilio Media Streams caller leg: the thin driver between Starlette's WebSocket and ``twilio.protocol``
(what Twilio sends) and ``twilio.outbound_messages`` (what we send).

It waits for ``start``, checks the stream token the webhook minted, then hands itself to the call core as a
``leg.CallerLeg``: Twilio's messages become leg events, and the core's audio, marks and clears become Twilio
JSON (spec: twilio-media-streams.md §3, §4). Garbage from Twilio is counted and logged here (the first few
messages of a call get a line each) and never reaches the core.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from typing import Any, Literal, Protocol

from telephony_bridge.audio import kernels
from telephony_bridge.audio.codec import TWILIO_FRAME_BYTES
from telephony_bridge.bridge import Call, CallDeps
from telephony_bridge.clock import Clock, monotonic_of
from telephony_bridge.errors import CallerGone, CallerStalled
from telephony_bridge.leg import (
    AudioHandler,
    CallerAudio,
    Digit,
    DirectAudio,
    HungUp,
    LegEvent,
    MarkHandler,
    PlayedUpTo,
    Watchdog,
)
from telephony_bridge.ops import logging as oplog
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.settings import TwilioSettings
from telephony_bridge.twilio import protocol as tw
from telephony_bridge.twilio.outbound_messages import MediaMessages, clear_message, mark_message
from telephony_bridge.twilio.stream_socket import SendStalled

try:  # built by setup.py where a C compiler is at hand
    from telephony_bridge._taps import MediaTap
except ImportError:
    MediaTap = None

log = logging.getLogger(__name__)

MAX_CLOSE_REASON = 120  # a WebSocket close reason is at most 123 bytes
MAX_LOGGED_PROTOCOL_ERRORS = 3  # one clear line each for the first few bad messages of a call; then counts


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    UNSUPPORTED_DATA = 1003
    POLICY_VIOLATION = 1008
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


# How the stream closes for each outcome; the <Connect action> request then reads the recorded outcome.
_CLOSE_FOR_OUTCOME = {
    "no_capacity": (CloseCode.TRY_AGAIN_LATER, "no capacity"),
    "refused": (CloseCode.POLICY_VIOLATION, "invalid stream token"),
    "duplicate": (CloseCode.POLICY_VIOLATION, "another stream for this CallSid is live"),
}


class TwilioSocket(Protocol):
    """The part of Starlette's ``WebSocket`` a call uses (tests may pass anything shaped like it). A socket that
    can also hand text over as it is read has ``tap_text`` (``stream_socket.StreamSocket``)."""

    async def receive(self) -> Any: ...
    async def send_text(self, data: str) -> None: ...
    async def close(self, code: int = 1000, reason: str | None = None) -> None: ...


async def handle_media_stream(ws: TwilioSocket, deps: CallDeps) -> None:
    """One accepted /media-stream socket: ``start``, then the call core, which first lets ``authorise`` check the
    stream token and the media format, and only then takes the CallSid (one live stream per call)."""
    compiled = kernels.use_compiled(deps.settings.audio.kernels)  # audio.kernels: numpy is all Python
    leg = TwilioLeg(ws, deps.settings.twilio, deps.metrics, deps.clock, compiled=compiled)
    start = await leg.wait_for_start()
    if start is None:
        await leg.close(CloseCode.NORMAL)
        return
    with oplog.call_context(call_sid=start.call_sid, stream_sid=start.stream_sid):
        token = start.custom_parameters.get("token")

        async def authorise() -> bool:
            """The stream token the webhook minted for this CallSid, presented once (spec §5.3), then audio we
            can carry. A stream without the token is not the call's: it leaves the call's reservation alone
            (the real stream may still come; else it lapses). A stream that proved it is the call's but cannot
            carry its audio gives the reservation back at once."""
            if not await deps.admission.stream_token_ok(start.call_sid, token):  # or none needed: see there
                deps.metrics.stream_token_refused.inc()
                log.warning("closing stream: its start carries no valid stream token (missing, foreign or replayed)")
                return False
            if problem := tw.media_format_problem(start):
                deps.metrics.streams_refused.labels(reason="unsupported_media_format").inc()
                log.warning("closing stream: %s", problem)
                await leg.close(CloseCode.UNSUPPORTED_DATA, problem[:MAX_CLOSE_REASON])
                await deps.admission.forget(start.call_sid)
                return False
            return True

        await Call(leg, deps, caller=start.custom_parameters.get("from"), authorise=authorise).run()


class TwilioLeg:
    """A Media Streams WebSocket as a caller leg (``leg.CallerLeg``)."""

    # The compiled frame path reads and writes these at their fixed offsets (_pyattrs.h); the rest live in
    # the instance dict.
    __slots__ = ("__dict__", "__weakref__", "_media", "_open", "_ws")

    ingress: Literal["twilio"] = "twilio"
    # ``Outbound``'s compiled path (``_ai_path.c``) may build this leg's media messages itself and send them on
    # its socket (``_ws.send_utf8_now``, ``_media``'s head and tail, ``_open``), as ``send_audio_nowait`` does.
    compiled_media_messages = True
    frame_bytes: int | None = TWILIO_FRAME_BYTES  # Twilio's media payload: 20 ms of μ-law (spec §3)
    requests_after_end = True  # the <Connect action> request: /stream-ended

    def __init__(
        self, ws: TwilioSocket, settings: TwilioSettings, metrics: Metrics, clock: Clock, *, compiled: bool = True
    ) -> None:
        """``compiled``: read media messages with the compiled ``MediaTap`` where it is built (``_tap``)."""
        self._ws = ws
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._open = True
        self._fault: str | None = None  # why our side closed the stream on Twilio, if it did (``StreamSocket.fault``)
        self.call_id = ""
        self._media = MediaMessages("")  # this stream's media messages (``stream_id``), once ``start`` names it
        self.protocol_errors = 0
        # Twilio sends media every 20 ms, even in silence (spec §3): a quiet socket is a dead one.
        self.watchdog = Watchdog(clock, settings.inactivity_timeout_s or None)
        self._direct: DirectAudio[[bytes, int | None]] = DirectAudio()
        self._marks: DirectAudio[[str]] = DirectAudio()  # mark echoes, read by the same tap as the audio
        self._compiled = compiled and MediaTap is not None
        # A picows ``StreamSocket`` can send without waiting (``writable``/``send_utf8_now``); Starlette's cannot.
        self._writable: Callable[[], bool] | None = getattr(ws, "writable", None)

    @property
    def stream_id(self) -> str:
        return self._media.stream_sid

    @stream_id.setter
    def stream_id(self, stream_sid: str) -> None:
        self._media = MediaMessages(stream_sid)

    # --- before the call -----------------------------------------------------------------------------------

    async def wait_for_start(self) -> tw.Start | None:
        """Twilio's ``start`` (``connected`` may come first), or ``None`` if the stream ended or stayed mute."""
        timeout_s = self._settings.start_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    frame = await self._receive_frame()
                    if frame is None:
                        if self._fault is not None:
                            log.warning("twilio stream closed before 'start': %s", self._fault)
                        else:
                            log.info("twilio stream closed before 'start'")
                        return None
                    event = tw.parse_message(frame)
                    if isinstance(event, tw.Start):
                        self.call_id, self.stream_id = event.call_sid, event.stream_sid
                        return event
                    if isinstance(event, tw.Stop):
                        return None
                    if not isinstance(event, tw.Connected):
                        self._protocol_error(f"expected 'connected' or 'start', got {_describe(event)}")
        except TimeoutError:
            log.warning("twilio stream sent no 'start' within %s s; closing it", timeout_s)
            return None

    # --- caller -> core ------------------------------------------------------------------------------------

    def deliver_audio_to(self, handler: AudioHandler | None) -> None:
        tap_text = getattr(self._ws, "tap_text", None)
        if tap_text is not None:
            self._direct.attach(handler)
            tap_text(self.tap() if handler is not None else None)

    def deliver_marks_to(self, handler: MarkHandler | None) -> None:
        """Mark echoes go to ``handler`` from the audio's tap (``_tapped``), so only while audio goes to the
        core too: a socket without ``tap_text`` delivers them through ``receive``."""
        self._marks.attach(handler)

    def tap(self) -> Callable[[bytes], bool]:
        """What the socket hands each text message to while the core takes audio: ``_tapped``, or its compiled
        twin (``_taps.c``), which reads a message in Twilio's exact shape and hands it to the core in one C call,
        any other going to ``_tapped``; it reads and writes ``_open``, the watchdog's ``_last`` and the
        ``DirectAudio``'s ``handler``, ``_context`` and ``_error`` by name. Made when attached, and held only by
        the socket, which drops it when the core detaches: it holds this leg."""
        if not self._compiled:
            return self._tapped
        return MediaTap(  # type: ignore[no-any-return]
            self,
            self.watchdog,
            self._direct,
            monotonic_of(self._clock),
            self._tapped,
            max_number_digits=tw.MAX_NUMBER_DIGITS,
        )

    def _tapped(self, text: bytes) -> bool:
        """A text message as the socket reads it: media, and a mark echo (every half second) while the core
        takes marks, go to the core at once (parsed once, no task woken); anything else is left for
        ``receive``, which parses it again."""
        if not self._open:
            return False
        audio = tw.media_audio(text)
        if audio is None:  # not Twilio's own shape: a third-party sender's media, or another event
            event = tw.parse_message(text)
            if type(event) is tw.Mark:
                self.watchdog.alive()
                return self._marks.deliver(event.name)
            if type(event) is not tw.Media:
                return False
            audio = event.payload, event.timestamp_ms
        self.watchdog.alive()
        return self._direct.deliver(*audio)

    async def receive(self) -> LegEvent:
        while True:
            frame = await self._receive_frame()
            self._direct.check()  # what the core's audio handler raised (the frame it failed on was queued)
            self._marks.check()  # ...or its mark handler
            if frame is None:
                if self._fault is not None:  # the caller is gone: we closed its stream
                    log.warning("twilio stream closed: %s", self._fault)
                    return HungUp(f"twilio stream closed: {self._fault}", lost=True)
                return HungUp("twilio disconnected")
            event = tw.parse_message(frame)
            if isinstance(event, tw.Media):
                return CallerAudio(event.payload, event.timestamp_ms)
            if isinstance(event, tw.Mark):
                return PlayedUpTo(event.name)
            if isinstance(event, tw.Stop):
                return HungUp("caller hung up")
            if isinstance(event, tw.Dtmf):
                return Digit(event.digit)
            if isinstance(event, tw.Malformed):
                self._protocol_error(event.reason)
            elif isinstance(event, tw.Unknown):
                log.debug("ignoring unknown twilio event %r", event.name)
            else:
                self._protocol_error(f"unexpected {_describe(event)} after 'start'")

    async def inactive(self) -> str:
        silent_s = await self.watchdog.expired()
        return f"twilio silent for {silent_s:.1f} s"

    def figures(self) -> dict[str, Any]:
        return {"protocol_errors": self.protocol_errors}

    async def _receive_frame(self) -> str | bytes | None:
        """The next frame from Twilio, or ``None`` once it has disconnected."""
        if not self._open:
            return None
        message = await self._ws.receive()
        self.watchdog.alive()
        if message["type"] == "websocket.disconnect":
            self._open = False
            self._fault = message.get("fault")
            return None
        text = message.get("text")
        return text if text is not None else message.get("bytes") or b""

    def _protocol_error(self, reason: str) -> None:
        self.protocol_errors += 1
        self._metrics.protocol_errors.labels(peer="twilio").inc()
        if self.protocol_errors <= MAX_LOGGED_PROTOCOL_ERRORS:
            log.warning("bad message from twilio: %s", reason)

    # --- core -> caller ------------------------------------------------------------------------------------

    async def send_audio(self, ulaw: bytes) -> None:
        await self._send(self._media.encode(ulaw).decode())

    def can_send_now(self) -> bool:
        return self._open and self._writable is not None and self._writable()

    def send_audio_nowait(self, ulaw: bytes) -> None:
        """Only right after ``can_send_now()`` said yes (as ``Outbound`` does): the socket checks again only that
        the stream is open (``CallerGone`` if not), not the backpressure."""
        try:
            self._ws.send_utf8_now(self._media.encode(ulaw))  # type: ignore[attr-defined]
        except Exception as exc:
            self._open = False
            raise CallerGone("the twilio stream closed while sending") from exc

    async def send_mark(self, name: str) -> None:
        await self._send(mark_message(self.stream_id, name))

    async def clear(self) -> None:
        await self._send(clear_message(self.stream_id))

    async def hang_up(self, outcome: str) -> None:
        code, reason = _CLOSE_FOR_OUTCOME.get(outcome, (CloseCode.NORMAL, ""))
        await self.close(code, reason)

    async def _send(self, text: str) -> None:
        if not self._open:
            raise CallerGone("the twilio stream is closed")
        try:
            await self._ws.send_text(text)
        except SendStalled as exc:
            self._open = False
            raise CallerStalled(str(exc)) from exc
        except Exception as exc:  # starlette raises several types once the peer is gone
            self._open = False
            raise CallerGone("the twilio stream closed while sending") from exc

    async def close(self, code: CloseCode, reason: str = "") -> None:
        """Close the socket once; Twilio then runs the TwiML after ``<Connect>``."""
        if not self._open:
            return
        self._open = False
        try:
            await self._ws.close(code=int(code), reason=reason or None)
        except Exception:  # already closed underneath us: nothing left to release
            log.debug("twilio socket was already closed")


def _describe(event: object) -> str:
    if isinstance(event, tw.Malformed):
        return f"a malformed message ({event.reason})"
    if isinstance(event, tw.Unknown):
        return f"unknown event {event.name!r}"
    return f"'{type(event).__name__.lower()}'"
