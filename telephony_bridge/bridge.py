"""One call: the only code that holds both sockets.

Four tasks run in one ``TaskGroup`` per call: the caller pump (Twilio's messages: caller audio into
``Inbound``, mark echoes, DTMF, hang-up), the AI side (the Savants session, then ``Inbound`` → Savants and
Savants → ``Outbound``), the outbound pump (``Outbound`` → Twilio in real time) and the lease heartbeat. The
first to finish ends the call: it raises ``_CallEnded`` and the group cancels the rest. Whatever happens, the
Savants socket is closed, the Twilio socket is closed (so the TwiML after ``<Connect>`` runs) and the device
lease is released, exactly once, in ``run``'s ``finally``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from telephony_bridge.accounting.base import AccountingUnavailable, Lease
from telephony_bridge.admission import Admission
from telephony_bridge.audio.barge_in import BargeIn
from telephony_bridge.audio.codec import FRAME_S
from telephony_bridge.audio.pipeline import AiToCaller
from telephony_bridge.clock import Clock
from telephony_bridge.dtmf import DtmfLog
from telephony_bridge.errors import AdmissionError, SavantsError, SessionError
from telephony_bridge.inbound import Inbound
from telephony_bridge.ops import logging as oplog
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.outbound import Outbound
from telephony_bridge.registry import CallRegistry
from telephony_bridge.savants.client import SavantsConnection
from telephony_bridge.savants.protocol import Audio
from telephony_bridge.settings import Settings
from telephony_bridge.store import StoreUnavailable
from telephony_bridge.twilio import protocol as tw

log = logging.getLogger(__name__)

GOODBYE_MARGIN_S = 2.0  # beyond the queued audio, how long the AI's last words may take to be heard
MAX_LOGGED_PROTOCOL_ERRORS = 3  # one clear line each for the first few bad messages of a call; then counts


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    POLICY_VIOLATION = 1008
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


class TwilioSocket(Protocol):
    """The part of Starlette's ``WebSocket`` a call uses (tests may pass anything shaped like it)."""

    async def receive(self) -> Any: ...
    async def send_text(self, data: str) -> None: ...
    async def close(self, code: int = 1000, reason: str | None = None) -> None: ...


@dataclass(frozen=True)
class CallDeps:
    settings: Settings
    admission: Admission
    metrics: Metrics
    clock: Clock
    registry: CallRegistry


class _CallEnded(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _TwilioGone(Exception):
    """The Twilio socket is closed; nothing more can be sent to the caller."""


class Call:
    def __init__(self, ws: TwilioSocket, deps: CallDeps) -> None:
        self._ws = ws
        self._deps = deps
        self._clock = deps.clock
        self._metrics = deps.metrics
        settings = deps.settings
        self.call_sid = ""
        self.stream_sid = ""
        self.device_id = ""
        self.end_reason = ""
        self.outcome = "completed"
        self._started_at = 0.0
        self._ai_connected_at: float | None = None
        self._savants: SavantsConnection | None = None
        self._twilio_open = True
        self._inbound = Inbound(settings.audio, settings.barge_in, deps.metrics, deps.clock)
        self._ai_to_caller = AiToCaller()
        self._outbound: Outbound | None = None  # needs the streamSid: made at 'start'
        self.protocol_errors = 0
        self._dtmf = DtmfLog(settings.twilio, deps.metrics)
        self._ended = asyncio.Event()  # set by ``end``: the bridge (its drain) ends the call

    @property
    def outbound(self) -> Outbound:
        assert self._outbound is not None, "the outbound side exists from 'start' on"
        return self._outbound

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        start = await self._wait_for_start()
        if start is None:
            await self._close_twilio(CloseCode.NORMAL)
            return
        self.call_sid, self.stream_sid = start.call_sid, start.stream_sid
        self._started_at = self._clock.monotonic()
        self._outbound = Outbound(self._deps.settings.audio, self._clock, self.stream_sid, self._send_twilio)
        with oplog.call_context(call_sid=self.call_sid, stream_sid=self.stream_sid):
            lease = await self._admit(start)
            if lease is None:
                return
            self.device_id = lease.device_id
            oplog.bind(device_id=lease.device_id)
            self._deps.registry.add(self.call_sid, self)
            self._deps.admission.stream_started(self.call_sid)
            self._metrics.calls_active.inc()
            log.info("call bridged")
            try:
                await self._bridge(lease)
            finally:
                await self._finish(lease)

    async def _admit(self, start: tw.Start) -> Lease | None:
        """Check the stream token, then claim the webhook's reservation; ``None`` (stream closed) if refused."""
        admission = self._deps.admission
        try:
            if not await admission.stream_token_ok(self.call_sid, start.custom_parameters.get("token")):
                self._metrics.stream_token_refused.inc()
                log.warning("closing stream: its start carries no valid stream token (missing, foreign or replayed)")
                await self._close_twilio(CloseCode.POLICY_VIOLATION, "invalid stream token")
                return None
            return await admission.lease_for_stream(self.call_sid, start.custom_parameters.get("from"))
        except (AdmissionError, StoreUnavailable) as exc:
            self._metrics.admission_refused.labels(where="stream").inc()
            if isinstance(exc, AccountingUnavailable | StoreUnavailable):
                self._metrics.accounting_errors.inc()
            log.warning("closing stream: no device can take the call: %s", exc)
            await self._record_outcome("no_capacity")
            await self._close_twilio(CloseCode.TRY_AGAIN_LATER, "no capacity")
            return None

    async def _bridge(self, lease: Lease) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._caller_pump(), name="caller-pump")
                tg.create_task(self._ai_side(lease), name="ai-side")
                tg.create_task(self.outbound.run(), name="outbound")
                tg.create_task(self._heartbeat(lease), name="lease-heartbeat")
                tg.create_task(self._until_ended(), name="until-ended")
        except* _CallEnded as group:
            self._end(_first(group, _CallEnded).reason)
        except* _TwilioGone:
            self._end("twilio disconnected")
        except* SavantsError as group:
            exc = _first(group, SavantsError)
            self.outcome = "ai_unavailable"
            self._end(f"AI unavailable: {exc}")
            log.warning("ending call, the AI side failed (%s): %s", getattr(exc, "code", "ERROR"), exc)
        except* Exception as group:  # a bug of ours: end this call cleanly, keep every other call going
            self.outcome = "error"
            self._end("internal error")
            log.error("call failed on an internal error", exc_info=group.exceptions[0])

    def _end(self, reason: str) -> None:
        if not self.end_reason:
            self.end_reason = reason

    def end(self, outcome: str, reason: str) -> None:
        """End the call from outside (the drain deadline): closed normally, so ``<Connect action>`` runs."""
        if not self._ended.is_set():
            self.outcome = outcome
            self._end(reason)
            self._ended.set()

    async def _until_ended(self) -> None:
        await self._ended.wait()
        raise _CallEnded(self.end_reason)

    async def _heartbeat(self, lease: Lease) -> None:
        """Keep the lease alive in shared accounting; a replica that dies stops this and its slots lapse."""
        interval_s = self._deps.settings.accounting.lease_ttl_s / 3
        held = True
        while True:
            await self._clock.sleep_until(self._clock.monotonic() + interval_s)
            still_held = await self._deps.admission.accounting.heartbeat(lease)
            if held and not still_held:
                log.warning("lost the device lease (it lapsed and the device is full); the call goes on")
            held = still_held

    async def _record_outcome(self, outcome: str) -> None:
        """Kept for the ``<Connect action>`` request, which decides what the caller hears next."""
        try:
            await self._deps.admission.record_outcome(self.call_sid, outcome)
        except StoreUnavailable as exc:
            log.warning("could not record the call's outcome: %s", exc)

    async def _finish(self, lease: Lease) -> None:
        if self._savants is not None:
            await self._savants.close()
        # Recorded before the close: Twilio requests the <Connect action> as soon as the socket closes.
        await self._record_outcome(self.outcome)
        await self._close_twilio(CloseCode.NORMAL)
        await self._deps.admission.accounting.release(lease)
        self._deps.registry.remove(self.call_sid)
        duration_s = self._clock.monotonic() - self._started_at
        metrics = self._metrics
        metrics.calls_active.dec()
        metrics.calls.labels(outcome=self.outcome).inc()
        metrics.call_duration.observe(duration_s)
        metrics.audio_seconds.labels(direction="caller_to_ai").inc(self._inbound.frames_to_ai * FRAME_S)
        metrics.audio_seconds.labels(direction="ai_to_caller").inc(self.outbound.playback.sent_ms / 1000)
        if self.outbound.first_audio_at is not None:
            metrics.first_audio_latency.observe(self.outbound.first_audio_at - self._started_at)
        log.info("call ended", extra=self._figures(duration_s))

    def _figures(self, duration_s: float) -> dict[str, Any]:
        """The canonical 'call ended' line's fields."""
        inbound, outbound = self._inbound, self.outbound
        return {
            "reason": self.end_reason,
            "outcome": self.outcome,
            "duration_s": round(duration_s, 3),
            "ai_connect_s": _since(self._ai_connected_at, self._started_at),
            "first_ai_audio_s": _since(outbound.first_audio_at, self._started_at),
            "caller_frames": inbound.frames_in,
            "frames_to_ai": inbound.frames_to_ai,
            "ai_audio_sent_ms": outbound.playback.sent_ms,
            "ai_audio_played_ms": outbound.playback.played_ms,
            "ai_audio_discarded_ms": outbound.discarded_ms,
            "clears": outbound.clears,
            "barge_ins": inbound.detector.barge_ins if inbound.detector else 0,
            "late_frames_dropped": inbound.late_frames_dropped,
            "gap_filled_ms": inbound.gap_filled_ms,
            "overflow_frames_dropped": inbound.dropped_overflow,
            "protocol_errors": self.protocol_errors,
            "dtmf_digits": self._dtmf.count,  # a count only: the digits may be a PIN
        }

    def status(self) -> dict[str, Any]:
        now = self._clock.monotonic()
        return {
            "call_sid": self.call_sid,
            "stream_sid": self.stream_sid,
            "device_id": self.device_id,
            "age_s": round(now - self._started_at, 1),
            "ai_connected": self._ai_connected_at is not None,
            "ai_audio_sent_ms": self.outbound.playback.sent_ms,
            "ai_audio_played_ms": self.outbound.playback.played_ms,
            "lead_ms": round(self.outbound.lead(now) * 1000),
        }

    # --- Twilio side -------------------------------------------------------------------------------------

    async def _receive_twilio(self) -> str | bytes | None:
        """The next frame from Twilio, or ``None`` once it has disconnected."""
        if not self._twilio_open:
            return None
        message = await self._ws.receive()
        if message["type"] == "websocket.disconnect":
            self._twilio_open = False
            return None
        text = message.get("text")
        return text if text is not None else message.get("bytes") or b""

    async def _wait_for_start(self) -> tw.Start | None:
        timeout_s = self._deps.settings.twilio.start_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    frame = await self._receive_twilio()
                    if frame is None:
                        log.info("twilio stream closed before 'start'")
                        return None
                    event = tw.parse_message(frame)
                    if isinstance(event, tw.Start):
                        return event
                    if isinstance(event, tw.Stop):
                        return None
                    if not isinstance(event, tw.Connected):
                        self._protocol_error(f"expected 'connected' or 'start', got {_describe(event)}")
        except TimeoutError:
            log.warning("twilio stream sent no 'start' within %s s; closing it", timeout_s)
            return None

    async def _caller_pump(self) -> None:
        while True:
            frame = await self._receive_twilio()
            if frame is None:
                raise _CallEnded("twilio disconnected")
            event = tw.parse_message(frame)
            if isinstance(event, tw.Media):
                self._caller_audio(event)
            elif isinstance(event, tw.Mark):
                self.outbound.mark_echoed(event.name)
            elif isinstance(event, tw.Stop):
                raise _CallEnded("caller hung up")
            elif isinstance(event, tw.Dtmf):
                self._dtmf.record(event.digit)
            elif isinstance(event, tw.Malformed):
                self._protocol_error(event.reason)
            elif isinstance(event, tw.Unknown):
                log.debug("ignoring unknown twilio event %r", event.name)
            else:
                self._protocol_error(f"unexpected {_describe(event)} after 'start'")

    def _caller_audio(self, media: tw.Media) -> None:
        now = self._clock.monotonic()
        ai_since = self.outbound.audible_since(now)
        for event in self._inbound.push(media.timestamp_ms, media.payload, now, ai_since):
            if isinstance(event, BargeIn):
                self.outbound.interrupt()
                self._metrics.barge_ins.inc()
                into_ms = round(1000 * (event.onset_s - ai_since)) if ai_since is not None else 0
                log.info("barge-in: the caller spoke %d ms into the AI's turn; AI audio cleared and held", into_ms)
            else:
                self.outbound.resume()
                log.debug("the caller stopped; AI audio flows again")

    def _protocol_error(self, reason: str) -> None:
        self.protocol_errors += 1
        self._metrics.protocol_errors.labels(peer="twilio").inc()
        if self.protocol_errors <= MAX_LOGGED_PROTOCOL_ERRORS:
            log.warning("bad message from twilio: %s", reason)

    async def _send_twilio(self, text: str) -> None:
        if not self._twilio_open:
            raise _TwilioGone
        try:
            await self._ws.send_text(text)
        except Exception as exc:  # starlette raises several types once the peer is gone
            self._twilio_open = False
            raise _TwilioGone from exc

    async def _close_twilio(self, code: CloseCode, reason: str = "") -> None:
        if not self._twilio_open:
            return
        self._twilio_open = False
        try:
            await self._ws.close(code=int(code), reason=reason or None)
        except Exception:  # already closed underneath us: nothing left to release
            log.debug("twilio socket was already closed")

    # --- AI side -----------------------------------------------------------------------------------------

    async def _ai_side(self, lease: Lease) -> None:
        self._savants = await self._deps.admission.session_for(lease)
        self._ai_connected_at = self._clock.monotonic()
        self._metrics.ai_connect_latency.observe(self._ai_connected_at - self._started_at)
        log.info("AI session connected", extra={"session_id": self._savants.session_id})
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._inbound.run(self._savants), name="to-ai")
            tg.create_task(self._ai_receiver(self._savants), name="from-ai")

    async def _ai_receiver(self, conn: SavantsConnection) -> None:
        while True:
            try:
                event = await conn.receive()
            except SessionError as exc:
                if exc.code == "PROTOCOL":
                    self._metrics.protocol_errors.labels(peer="savants").inc()
                raise
            if event is None:
                # The AI hung up: let the caller hear its last words before the stream closes (G8).
                now = self._clock.monotonic()
                if not await self.outbound.finish(self.outbound.pending_s(now) + GOODBYE_MARGIN_S):
                    log.warning("the AI's last words were not confirmed heard (no mark echo) before hanging up")
                raise _CallEnded("AI closed the session")
            if isinstance(event, Audio):
                self.outbound.push(self._ai_to_caller.push(event.pcm))


async def handle_media_stream(ws: TwilioSocket, deps: CallDeps) -> None:
    await Call(ws, deps).run()


E = TypeVar("E", bound=BaseException)


def _first(group: BaseExceptionGroup[E], kind: type[E]) -> E:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, kind)
    return leaf


def _since(at: float | None, origin: float) -> float | None:
    return None if at is None else round(at - origin, 3)


def _describe(event: object) -> str:
    if isinstance(event, tw.Malformed):
        return f"a malformed message ({event.reason})"
    if isinstance(event, tw.Unknown):
        return f"unknown event {event.name!r}"
    return f"'{type(event).__name__.lower()}'"
