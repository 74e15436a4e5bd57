"""One call, whatever the ingress: the only code that holds both the caller's leg and the AI session.

The caller's side is a ``leg.CallerLeg`` (Twilio Media Streams or SIP); this module knows nothing of its
protocol. Five tasks run in one ``TaskGroup`` per call: the caller pump (the leg's events: caller audio into
``Inbound``, played-up-to echoes, DTMF, hang-up), the caller watchdog (the leg went silent), the AI side
(``ai_side.AiSide``: the Savants session and its reconnects, ``Inbound`` → Savants and Savants → ``Outbound``;
the AI's goodbye ends the call with ``AiHungUp``), the outbound pump (``Outbound`` → the
leg in real time) and the lease heartbeat. Most audio and mark echoes skip the tasks: the caller's audio reaches
``Inbound``, and its mark echoes ``Outbound``, from the leg's read callback (``CallerLeg.deliver_audio_to``,
``deliver_marks_to``); the AI's audio reaches ``Outbound``, and often the caller, from the Savants socket's
(``SavantsConnection.deliver_audio_to``, ``Outbound._send_inline``). The pump and the pacer handle the rest.
The first to finish ends the call: it raises ``_CallEnded`` and the group cancels the rest. Whatever happens,
the Savants socket is closed, the outcome is recorded, the leg is hung up (Twilio then runs the TwiML after
``<Connect>``) and the device lease is released, exactly once, in ``run``'s ``finally``; its figures and metrics
go out once, through ``call_report.CallReport``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from telephony_bridge.accounting.base import Lease
from telephony_bridge.admission import Admission, CallSlot
from telephony_bridge.ai_side import GOODBYE_MARGIN_S, AiHungUp, AiSide
from telephony_bridge.audio.barge_in import BargeIn, Event
from telephony_bridge.call_report import CallReport
from telephony_bridge.clock import Clock
from telephony_bridge.dtmf import DtmfLog
from telephony_bridge.errors import AdmissionError, CallerGone, CallerStalled, SavantsError, first_of
from telephony_bridge.inbound import Inbound
from telephony_bridge.leg import CallerAudio, CallerLeg, Digit, PlayedUpTo
from telephony_bridge.ops import logging as oplog
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.outbound import Outbound
from telephony_bridge.reconnect import Reconnector
from telephony_bridge.registry import CallRegistry
from telephony_bridge.settings import Settings
from telephony_bridge.store import StoreUnavailable
from telephony_bridge.task_group import TaskGroup

log = logging.getLogger(__name__)


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

    ``authorise`` (optional) is the ingress's last word on whether this leg is the call's (Twilio: the stream
    token, single-use, compared before it is consumed, so only the legitimate stream can pass). It runs before
    the leg claims anything: a refused leg hangs up with outcome ``refused`` having held nothing, so it can
    neither block the call's real leg as a "duplicate" nor give back what the real leg will claim.
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
        self.end_reason = ""
        self.outcome = "completed"
        self._started_at = self._clock.monotonic()
        self._slot = CallSlot(Lease(leg.call_id, ""))  # a reconnect may move the call to another device
        savants = settings.savants
        self._reconnector = Reconnector(
            deps.admission,
            deps.clock,
            deps.metrics,
            deadline_s=savants.reconnect_deadline_s,
            rng=random.Random(leg.call_id),  # jitter differs from call to call
            max_per_minute=savants.max_reconnects_per_minute,
        )
        self._inbound = Inbound(
            settings.audio, settings.barge_in, deps.metrics, deps.clock, frame_bytes=leg.frame_bytes
        )
        self.outbound = Outbound(settings.audio, deps.clock, leg)
        self._ai = AiSide(
            settings,
            deps.admission,
            self._slot,
            self._reconnector,
            self._inbound,
            self.outbound,
            deps.metrics,
            deps.clock,
        )
        self._dtmf = DtmfLog(settings.twilio, deps.metrics)
        self._ended = asyncio.Event()  # set by ``end``: the bridge (its drain) ends the call
        self._owner = secrets.token_hex(8)  # this stream, as the holder of its call ID's live-stream claim
        self._live_ttl_s = settings.accounting.lease_ttl_s

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        with oplog.call_context(call_sid=self._leg.call_id, stream_sid=self._leg.stream_id):
            if not await self._authorised():
                return
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

    async def _authorised(self) -> bool:
        """The ingress's verdict on this leg (True without an ``authorise``); a refused leg is hung up, having
        held nothing of the call's, so it gives nothing back."""
        try:
            if self._authorise is None or await self._authorise():
                return True
        except StoreUnavailable as exc:  # the stream token cannot be checked: no call can start now
            await self._no_capacity(exc)
            return False
        await self._leg.hang_up("refused")
        return False

    async def _admit(self) -> Lease | None:
        """Claim the call's reservation (or a fresh slot); ``None`` (leg hung up) if no device can take it."""
        admission = self._deps.admission
        try:
            return await admission.lease_for_stream(self.call_sid, self._caller)
        except (AdmissionError, StoreUnavailable) as exc:
            await admission.forget(self.call_sid)  # nothing held here may wait for its TTL (or hold a drain)
            await self._no_capacity(exc)
            return None

    async def _no_capacity(self, exc: AdmissionError | StoreUnavailable) -> None:
        self._metrics.admission_refused.labels(where="stream").inc()
        log.warning("closing stream: no device can take the call: %s", exc)
        await self._record_outcome("no_capacity")
        await self._leg.hang_up("no_capacity")

    async def _bridge(self) -> None:
        try:
            async with TaskGroup() as tg:
                tg.create_task(self._caller_pump(), name="caller-pump")
                tg.create_task(self._watch_caller(), name="caller-watchdog")
                tg.create_task(self._ai.run(self._started_at), name="ai-side")
                tg.create_task(self.outbound.run(), name="outbound")
                tg.create_task(self._heartbeat(), name="lease-heartbeat")
                tg.create_task(self._until_ended(), name="until-ended")
                tg.create_task(self._inbound.watch_idle(self._caller_events, self.outbound.audible_since), name="idle")
                if self._deps.settings.twilio.max_call_s:
                    tg.create_task(self._time_limit(self._deps.settings.twilio.max_call_s), name="time-limit")
        except* _CallEnded as group:
            self._end(first_of(group, _CallEnded).reason)
        except* AiHungUp:
            self._end("AI closed the session")
        except* CallerStalled as group:
            self.outcome = "caller_lost"
            self._end(str(first_of(group, CallerStalled)))
        except* CallerGone:
            self._end(f"{self._leg.ingress} disconnected")
        except* SavantsError as group:
            exc = first_of(group, SavantsError)
            self.outcome = "ai_unavailable"
            self._end(f"AI unavailable: {exc}")
            log.warning("ending call, the AI side failed (%s): %s", getattr(exc, "code", "ERROR"), exc)
            # Logged without its traceback, which would only keep a cycle: the reconnector re-raises the failure it
            # was handed, so the frames it passed through hold it (their ``failure``), and hold the AI side, its
            # Outbound and buffers, old objects that only a full collection would free (``task_group``).
            exc.__traceback__ = None
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
            if self.outcome == "completed":  # one already decided (the caller lost, the AI failed) stands
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
            await self._ai.close()
            # Recorded before the close: Twilio requests the <Connect action> as soon as the socket closes.
            await self._record_outcome(self.outcome)
            await self._leg.hang_up(self.outcome)
        finally:  # whatever the goodbye did (raised, cancelled), the slot and the gauge come back
            await self._deps.admission.accounting.release(self._slot.lease)
            self._metrics.calls_active.dec()
        report = CallReport(
            ingress=self._leg.ingress,
            reason=self.end_reason,
            outcome=self.outcome,
            started_at=self._started_at,
            ended_at=self._clock.monotonic(),
            ai_connected_at=self._ai.connected_at,
            inbound=self._inbound,
            outbound=self.outbound,
            reconnects=self._reconnector.figures,
            dtmf_digits=self._dtmf.count,
            leg_figures=self._leg.figures(),
        )
        report.count(self._metrics)
        log.info("call ended", extra=report.figures())

    @property
    def device_id(self) -> str:
        """Where the call holds its slot now ("" before it has one; a reconnect may move it)."""
        return self._slot.lease.device_id

    @property
    def requests_after_end(self) -> bool:
        return self._leg.requests_after_end

    @property
    def ai_connected(self) -> bool:
        return self._ai.connected

    def status(self) -> dict[str, Any]:
        now = self._clock.monotonic()
        return {
            "ingress": self._leg.ingress,
            "call_sid": self.call_sid,
            "stream_sid": self._leg.stream_id,
            "device_id": self.device_id,
            "age_s": round(now - self._started_at, 1),
            "ai_connected": self._ai.connected,
            "ai_reconnects": self._reconnector.figures.drops,
            "ai_audio_sent_ms": self.outbound.playback.sent_ms,
            "ai_audio_played_ms": self.outbound.playback.played_ms,
            "lead_ms": round(self.outbound.lead(now) * 1000),
        }

    # --- caller side -------------------------------------------------------------------------------------

    async def _caller_pump(self) -> None:
        # ``_caller_audio``, or its compiled twin (inbound.py): what the leg hands each frame of the caller's audio.
        # Held by the leg and this frame only, never by the call: it holds the call, and an ended call must go
        # by reference counting alone (``tests/test_task_group.py``).
        on_audio = self._inbound.audio_handler(
            self._caller_audio, self._clock, self.outbound.audible_since, self._caller_events
        )
        self._leg.deliver_audio_to(on_audio)  # most audio then skips ``receive``
        self._leg.deliver_marks_to(self.outbound.mark_echoed)  # ...and most mark echoes
        try:
            while True:
                event = await self._leg.receive()
                if isinstance(event, CallerAudio):
                    on_audio(event.ulaw, event.timestamp_ms)
                elif isinstance(event, PlayedUpTo):
                    self.outbound.mark_echoed(event.name)
                elif isinstance(event, Digit):
                    self._dtmf.record(event.digit)
                else:
                    if event.lost:
                        self.outcome = "caller_lost"
                    raise _CallEnded(event.reason)
        finally:  # the call is over: no more audio or marks into it (and no cycle through the leg's handlers)
            self._leg.deliver_marks_to(None)
            self._leg.deliver_audio_to(None)

    async def _watch_caller(self) -> None:
        """The leg went silent (its peer vanished without a close): end the call and free its slot."""
        reason = await self._leg.inactive()
        self.outcome = "caller_lost"
        log.warning("ending call: %s", reason)
        raise _CallEnded(reason)

    def _caller_audio(self, ulaw: bytes, timestamp_ms: int | None) -> None:
        now = self._clock.monotonic()
        events = self._inbound.push(timestamp_ms, ulaw, now, self.outbound.audible_since(now))
        if events:
            self._caller_events(events)

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
