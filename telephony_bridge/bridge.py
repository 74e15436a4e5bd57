"""One call, whatever the ingress: the only code that holds both the caller's leg and the AI session.

The caller's side is a ``leg.CallerLeg`` (Twilio Media Streams or SIP); this module knows nothing of its
protocol. Five tasks run in one ``TaskGroup`` per call: the caller pump (the leg's events: caller audio into
``Inbound``, played-up-to echoes, DTMF, hang-up), the caller watchdog (the leg went silent), the AI side (the
Savants session, then ``Inbound`` → Savants and Savants → ``Outbound``), the outbound pump (``Outbound`` → the
leg in real time) and the lease heartbeat. The first to finish ends the call: it raises ``_CallEnded`` and the
group cancels the rest. Whatever happens, the Savants socket is closed, the outcome is recorded, the leg is
hung up (Twilio then runs the TwiML after ``<Connect>``) and the device lease is released, exactly once, in
``run``'s ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from telephony_bridge.accounting.base import AccountingUnavailable, Lease
from telephony_bridge.admission import Admission, CallSlot
from telephony_bridge.audio.barge_in import BargeIn, Event
from telephony_bridge.audio.codec import FRAME_S
from telephony_bridge.audio.comfort import ComfortFill
from telephony_bridge.audio.pipeline import AiToCaller
from telephony_bridge.clock import Clock
from telephony_bridge.dtmf import DtmfLog
from telephony_bridge.errors import AdmissionError, CallerGone, SavantsError, SessionError
from telephony_bridge.inbound import Inbound
from telephony_bridge.leg import CallerAudio, CallerLeg, Digit, PlayedUpTo
from telephony_bridge.ops import logging as oplog
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.outbound import Outbound
from telephony_bridge.reconnect import Reconnector
from telephony_bridge.registry import CallRegistry
from telephony_bridge.savants.client import SavantsConnection
from telephony_bridge.savants.protocol import Audio
from telephony_bridge.settings import Settings
from telephony_bridge.store import StoreUnavailable

log = logging.getLogger(__name__)

GOODBYE_MARGIN_S = 2.0  # beyond the queued audio, how long the AI's last words may take to be heard


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


class Call:
    """One caller leg bridged to the AI.

    ``authorise`` (optional) is the ingress's last word on whether this call may go on (Twilio: the stream
    token); a refusal hangs the leg up with outcome ``refused`` before any device is claimed.
    """

    def __init__(
        self,
        leg: CallerLeg,
        deps: CallDeps,
        *,
        caller: str | None = None,
        authorise: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self._leg = leg
        self._deps = deps
        self._clock = deps.clock
        self._metrics = deps.metrics
        self._caller = caller
        self._authorise = authorise
        settings = deps.settings
        self.call_sid = leg.call_id
        self.device_id = ""
        self.end_reason = ""
        self.outcome = "completed"
        self._started_at = self._clock.monotonic()
        self._ai_connected_at: float | None = None
        self._savants: SavantsConnection | None = None
        self.ai_connected = False
        self._slot = CallSlot(Lease(leg.call_id, ""))  # a reconnect may move the call to another device
        savants = settings.savants
        self._reconnector = Reconnector(
            deps.admission,
            deps.clock,
            deps.metrics,
            deadline_s=savants.reconnect_deadline_s,
            rng=random.Random(leg.call_id),  # jitter differs from call to call
        )
        self._fill: ComfortFill | None = None  # made at the first drop: most calls never need it
        self._inbound = Inbound(settings.audio, settings.barge_in, deps.metrics, deps.clock)
        self._ai_to_caller = AiToCaller()
        self.outbound = Outbound(settings.audio, deps.clock, leg)
        self._dtmf = DtmfLog(settings.twilio, deps.metrics)
        self._ended = asyncio.Event()  # set by ``end``: the bridge (its drain) ends the call
        self._owner = secrets.token_hex(8)  # this stream, as the holder of its call ID's live-stream claim
        self._live_ttl_s = settings.accounting.lease_ttl_s

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        with oplog.call_context(call_sid=self._leg.call_id, stream_sid=self._leg.stream_id):
            # One live leg per call ID: in this process (registry.py) taken before any await, so two starts
            # cannot both pass; on every replica through the shared store. Given up only after the lease, so a
            # later leg for the call starts afresh.
            if not self._deps.registry.claim(self.call_sid, self):
                await self._refuse_duplicate()
                return
            try:
                if not await self._claim_stream():
                    await self._refuse_duplicate()
                    return
                lease = await self._admit()
                if lease is None:
                    return
                self._slot.lease = lease
                self.device_id = lease.device_id
                oplog.bind(device_id=lease.device_id)
                self._deps.admission.stream_started(self.call_sid)
                self._metrics.calls_active.inc()
                log.info("call bridged", extra={"ingress": self._leg.ingress})
                try:
                    await self._bridge()
                finally:
                    await self._finish()
            finally:
                await self._end_stream()
                self._deps.registry.release(self.call_sid, self)

    async def _refuse_duplicate(self) -> None:
        self._metrics.streams_refused.labels(reason="duplicate_call_sid").inc()
        log.warning("refusing a second %s stream for a call that has a live one", self._leg.ingress)
        await self._leg.hang_up("duplicate")

    async def _claim_stream(self) -> bool:
        """This call's claim on being its call ID's only live stream on every replica. With the store away,
        admission decides (the lease needs the same Redis): True."""
        try:
            return await self._deps.admission.claim_stream(self.call_sid, self._owner, self._live_ttl_s)
        except StoreUnavailable as exc:
            log.warning("could not claim the call's live stream in the shared store: %s", exc)
            return True

    async def _end_stream(self) -> None:
        with contextlib.suppress(StoreUnavailable):  # unreachable: the claim lapses after its ttl
            await self._deps.admission.end_stream(self.call_sid, self._owner)

    async def _admit(self) -> Lease | None:
        """Let the ingress authorise the call, then claim its reservation; ``None`` (leg hung up) if refused."""
        admission = self._deps.admission
        try:
            if self._authorise is not None and not await self._authorise():
                await self._leg.hang_up("refused")
                return None
            return await admission.lease_for_stream(self.call_sid, self._caller)
        except (AdmissionError, StoreUnavailable) as exc:
            self._metrics.admission_refused.labels(where="stream").inc()
            if isinstance(exc, AccountingUnavailable | StoreUnavailable):
                self._metrics.accounting_errors.inc()
            log.warning("closing stream: no device can take the call: %s", exc)
            await admission.forget(self.call_sid)  # nothing held here may wait for its TTL (or hold a drain)
            await self._record_outcome("no_capacity")
            await self._leg.hang_up("no_capacity")
            return None

    async def _bridge(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._caller_pump(), name="caller-pump")
                tg.create_task(self._watch_caller(), name="caller-watchdog")
                tg.create_task(self._ai_side(), name="ai-side")
                tg.create_task(self.outbound.run(), name="outbound")
                tg.create_task(self._heartbeat(), name="lease-heartbeat")
                tg.create_task(self._until_ended(), name="until-ended")
                tg.create_task(self._inbound.watch_idle(self._caller_events, self.outbound.audible_since), name="idle")
                if self._deps.settings.twilio.max_call_s:
                    tg.create_task(self._time_limit(self._deps.settings.twilio.max_call_s), name="time-limit")
        except* _CallEnded as group:
            self._end(_first(group, _CallEnded).reason)
        except* CallerGone:
            self._end(f"{self._leg.ingress} disconnected")
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
        """End the call from outside (the drain deadline): hung up normally, so Twilio's ``<Connect action>`` runs."""
        if not self._ended.is_set():
            self.outcome = outcome
            self._end(reason)
            self._ended.set()

    async def _until_ended(self) -> None:
        await self._ended.wait()
        raise _CallEnded(self.end_reason)

    async def _heartbeat(self) -> None:
        """Keep the lease alive in shared accounting; a replica that dies stops this and its slots lapse."""
        interval_s = self._deps.settings.accounting.lease_ttl_s / 3
        held = True
        while True:
            await self._clock.sleep_until(self._clock.monotonic() + interval_s)
            async with self._slot.lock:  # never across a reconnect's move (see CallSlot)
                still_held = await self._deps.admission.accounting.heartbeat(self._slot.lease)
            with contextlib.suppress(StoreUnavailable):
                await self._deps.admission.keep_stream(self.call_sid, self._owner, self._live_ttl_s)
            if held and not still_held:
                log.warning("lost the device lease (it lapsed and the device is full); the call goes on")
            held = still_held

    async def _record_outcome(self, outcome: str) -> None:
        """Kept for the ``<Connect action>`` request, which decides what the caller hears next."""
        try:
            await self._deps.admission.record_outcome(self.call_sid, outcome)
        except StoreUnavailable as exc:
            log.warning("could not record the call's outcome: %s", exc)

    async def _time_limit(self, max_call_s: float) -> None:
        """``twilio.max_call_s``: end the call politely (what the AI is saying is heard out) once it is up."""
        await self._clock.sleep_until(self._started_at + max_call_s)
        log.info("the call reached its time limit of %s s; ending it", max_call_s)
        await self.outbound.finish(self.outbound.pending_s(self._clock.monotonic()) + GOODBYE_MARGIN_S)
        raise _CallEnded("time limit reached")

    async def _finish(self) -> None:
        try:
            if self._savants is not None:
                await self._savants.close()
            # Recorded before the close: Twilio requests the <Connect action> as soon as the socket closes.
            await self._record_outcome(self.outcome)
            await self._leg.hang_up(self.outcome)
        finally:  # whatever the goodbye did (raised, cancelled), the slot and the gauge come back
            await self._deps.admission.accounting.release(self._slot.lease)
            self._metrics.calls_active.dec()
        duration_s = self._clock.monotonic() - self._started_at
        metrics = self._metrics
        metrics.calls.labels(outcome=self.outcome, ingress=self._leg.ingress).inc()
        metrics.call_duration.observe(duration_s)
        metrics.audio_seconds.labels(direction="caller_to_ai").inc(self._inbound.frames_to_ai * FRAME_S)
        metrics.audio_seconds.labels(direction="ai_to_caller").inc(self.outbound.playback.sent_ms / 1000)
        metrics.ai_audio_overflow.inc(self.outbound.overflow_ms / 1000)
        if self.outbound.first_audio_at is not None:
            metrics.first_audio_latency.observe(self.outbound.first_audio_at - self._started_at)
        _count_playout(metrics, self.outbound)
        log.info("call ended", extra=self._figures(duration_s))

    def _figures(self, duration_s: float) -> dict[str, Any]:
        """The canonical 'call ended' line's fields."""
        inbound, outbound, reconnects = self._inbound, self.outbound, self._reconnector.figures
        figures = {
            "ingress": self._leg.ingress,
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
            "comfort_fill_ms": outbound.fill_ms,  # what the caller heard while the AI was away: no AI audio
            "clears": outbound.clears,
            "underruns_ai_late": outbound.underruns_ai_late,
            "underruns_scheduling": outbound.underruns_scheduling,
            "prebuffer_grows": outbound.prebuffer.grows,
            "prebuffer_shrinks": outbound.prebuffer.shrinks,
            "barge_ins": inbound.detector.barge_ins if inbound.detector else 0,
            "late_frames_dropped": inbound.late_frames_dropped,
            "gap_filled_ms": inbound.gap_filled_ms,
            "overflow_frames_dropped": inbound.dropped_overflow,
            "ai_audio_overflow_ms": outbound.overflow_ms,
            "ai_drops": reconnects.drops,
            "ai_reconnect_attempts": reconnects.attempts,
            "ai_reconnect": reconnects.outcome,
            "ai_gap_s": round(reconnects.gap_s, 3),
            "dtmf_digits": self._dtmf.count,  # a count only: the digits may be a PIN
            "client_quirks": sorted(inbound.quirks),
            **self._leg.figures(),
        }
        return figures

    def status(self) -> dict[str, Any]:
        now = self._clock.monotonic()
        return {
            "ingress": self._leg.ingress,
            "call_sid": self.call_sid,
            "stream_sid": self._leg.stream_id,
            "device_id": self.device_id,
            "age_s": round(now - self._started_at, 1),
            "ai_connected": self.ai_connected,
            "ai_reconnects": self._reconnector.figures.drops,
            "ai_audio_sent_ms": self.outbound.playback.sent_ms,
            "ai_audio_played_ms": self.outbound.playback.played_ms,
            "lead_ms": round(self.outbound.lead(now) * 1000),
        }

    # --- caller side -------------------------------------------------------------------------------------

    async def _caller_pump(self) -> None:
        while True:
            event = await self._leg.receive()
            if isinstance(event, CallerAudio):
                self._caller_audio(event)
            elif isinstance(event, PlayedUpTo):
                self.outbound.mark_echoed(event.name)
            elif isinstance(event, Digit):
                self._dtmf.record(event.digit)
            else:
                raise _CallEnded(event.reason)

    async def _watch_caller(self) -> None:
        """The leg went silent (its peer vanished without a close): end the call and free its slot."""
        reason = await self._leg.inactive()
        self.outcome = "caller_lost"
        log.warning("ending call: %s", reason)
        raise _CallEnded(reason)

    def _caller_audio(self, audio: CallerAudio) -> None:
        now = self._clock.monotonic()
        self._caller_events(self._inbound.push(audio.timestamp_ms, audio.ulaw, now, self.outbound.audible_since(now)))

    def _caller_events(self, events: list[Event]) -> None:
        """What the barge-in detector made of the caller's audio, or of the caller sending none."""
        ai_since = self.outbound.audible_since(self._clock.monotonic())
        for event in events:
            if isinstance(event, BargeIn):
                self.outbound.interrupt()
                self._metrics.barge_ins.inc()
                into_ms = round(1000 * (event.onset_s - ai_since)) if ai_since is not None else 0
                log.info("barge-in: the caller spoke %d ms into the AI's turn; AI audio cleared and held", into_ms)
            else:
                self.outbound.resume()
                log.debug("the caller stopped; AI audio flows again")

    # --- AI side -----------------------------------------------------------------------------------------

    async def _ai_side(self) -> None:
        """The AI session for the call's life: connected once, then reconnected after each drop that is worth
        it while the caller keeps the line (``reconnect.Reconnector``); a goodbye ends the call."""
        session = await self._deps.admission.session_for(self._slot.lease)
        self._ai_connected_at = self._clock.monotonic()
        self._metrics.ai_connect_latency.observe(self._ai_connected_at - self._started_at)
        log.info("AI session connected", extra={"session_id": session.session_id})
        self.ai_connected = True
        self._inbound.limit_backlog(self._deps.settings.audio.reconnect_buffer_ms)
        while True:
            self._savants = session
            failure = await self._converse(session)
            await session.close()
            self.ai_connected = False
            if self._fill is None:
                self._fill = ComfortFill(noise=self._deps.settings.savants.reconnect_fill == "comfort_noise")
            self.outbound.fill(self._fill)  # the caller hears comfort noise, never a gap, while we reconnect
            try:
                session = await self._reconnector.recover(failure, self._slot)
            finally:
                self.outbound.fill(None)
                self.device_id = self._slot.lease.device_id
            self.ai_connected = True

    async def _converse(self, session: SavantsConnection) -> SavantsError:
        """Caller audio to the session and its audio back, until it fails (returned) or says goodbye (raised)."""
        failure: SessionError | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._inbound.run(session), name="to-ai")
                tg.create_task(self._ai_receiver(session), name="from-ai")
        except* SessionError as group:
            failure = _first(group, SessionError)
        assert failure is not None, "the AI tasks end only by raising"
        return failure

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


E = TypeVar("E", bound=BaseException)


def _first(group: BaseExceptionGroup[E], kind: type[E]) -> E:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, kind)
    return leaf


def _since(at: float | None, origin: float) -> float | None:
    return None if at is None else round(at - origin, 3)


def _count_playout(metrics: Metrics, outbound: Outbound) -> None:
    metrics.playout_underruns.labels(cause="ai_late").inc(outbound.underruns_ai_late)
    metrics.playout_underruns.labels(cause="scheduling").inc(outbound.underruns_scheduling)
    metrics.prebuffer_changes.labels(direction="up").inc(outbound.prebuffer.grows)
    metrics.prebuffer_changes.labels(direction="down").inc(outbound.prebuffer.shrinks)
