"""The AI side of one call: its Savants session for the call's life, between ``Inbound`` and ``Outbound``.

Connected once (warm or fresh, ``Admission.session_for``; a first session that cannot be opened is retried as a
drop is), then, after each drop worth it, reconnected while the caller keeps the line
(``reconnect.Reconnector``) and hears comfort fill instead of a dead line. Caller audio goes to the session
(``Inbound.run``) and the AI's audio comes back to ``Outbound`` until the session fails (then the next
reconnect) or the AI says goodbye: its last words are heard out, then ``AiHungUp`` ends the call.
``bridge.Call`` runs ``run`` as one task of its call and closes the session in its cleanup.
"""

from __future__ import annotations

import logging

from telephony_bridge.admission import Admission, CallSlot
from telephony_bridge.audio.comfort import ComfortFill
from telephony_bridge.clock import Clock
from telephony_bridge.errors import SavantsError, SessionError, first_of
from telephony_bridge.inbound import Inbound
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.outbound import Outbound
from telephony_bridge.reconnect import Reconnector
from telephony_bridge.savants.client import SavantsConnection
from telephony_bridge.savants.protocol import Audio
from telephony_bridge.settings import Settings
from telephony_bridge.task_group import TaskGroup

log = logging.getLogger(__name__)

GOODBYE_MARGIN_S = 2.0  # beyond the queued audio, how long the AI's last words may take to be heard


class AiHungUp(Exception):
    """The AI closed its session normally, and what it said last has been played out: the call ends."""


class AiSide:
    def __init__(
        self,
        settings: Settings,
        admission: Admission,
        slot: CallSlot,
        reconnector: Reconnector,
        inbound: Inbound,
        outbound: Outbound,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self._settings = settings
        self._admission = admission
        self._slot = slot
        self._reconnector = reconnector
        self._inbound = inbound
        self._outbound = outbound
        self._metrics = metrics
        self._clock = clock
        self._session: SavantsConnection | None = None
        self._fill: ComfortFill | None = None  # made at the first drop: most calls never need it
        self.connected = False
        self.connected_at: float | None = None

    async def run(self, started_at: float) -> None:
        """The session for the call's life (``started_at``: the call's start, for the connect latency); ends
        only by raising: ``AiHungUp`` (goodbye) or ``SavantsError`` (no session could be had, or kept)."""
        session = await self._first_session()
        self.connected_at = self._clock.monotonic()
        self._metrics.ai_connect_latency.observe(self.connected_at - started_at)
        log.info("AI session connected", extra={"session_id": session.session_id})
        self.connected = True
        self._inbound.limit_backlog(self._settings.audio.reconnect_buffer_ms)
        while True:
            self._session = session
            failure = await self._converse(session)
            self.connected = False
            session = await self._recover(failure, dropped=session)  # closes the dropped one first
            self.connected = True

    async def _first_session(self) -> SavantsConnection:
        """The call's first session. One that cannot be opened (a refused or timed-out upgrade, a token request
        that failed) is retried as a drop is: the same fault a second later would be, and the caller keeps the
        line meanwhile rather than hearing the fallback at once. Not a device out of token budget: its window
        frees up within a minute, not within the reconnect deadline, so the caller hears the apology now."""
        try:
            return await self._admission.session_for(self._slot.lease)
        except SavantsError as failure:
            if getattr(failure, "code", None) == "NO_BUDGET":
                raise
            self._inbound.limit_backlog(self._settings.audio.reconnect_buffer_ms)  # as long a wait as a drop's
            return await self._recover(failure, opening=True)

    async def _recover(
        self, failure: SavantsError, *, opening: bool = False, dropped: SavantsConnection | None = None
    ) -> SavantsConnection:
        if self._fill is None:
            self._fill = ComfortFill(noise=self._settings.savants.reconnect_fill == "comfort_noise")
        self._outbound.fill(self._fill)  # the caller hears comfort noise, never a gap, while we reconnect
        try:
            return await self._reconnector.recover(failure, self._slot, opening=opening, dropped=dropped)
        finally:
            self._outbound.fill(None)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _converse(self, session: SavantsConnection) -> SavantsError:
        """Caller audio to the session and its audio back, until it fails (returned) or says goodbye (raised)."""
        failure: SessionError | None = None
        session.deliver_audio_to(self._outbound.audio_handler())  # the AI's audio, as it is read: no task switch
        try:
            async with TaskGroup() as tg:
                tg.create_task(self._inbound.run(session), name="to-ai")
                tg.create_task(self._receive(session), name="from-ai")
        except* SessionError as group:
            failure = first_of(group, SessionError)
        finally:
            session.deliver_audio_to(None)  # a session that failed, or a call that ended, feeds nothing more
        assert failure is not None, "the receiving task ends only by raising"
        return failure

    async def _receive(self, session: SavantsConnection) -> None:
        while True:
            try:
                event = await session.receive()
            except SessionError as exc:
                if exc.code == "PROTOCOL":
                    self._metrics.protocol_errors.labels(peer="savants").inc()
                raise
            if event is None:
                # The AI hung up: let the caller hear its last words before the stream closes (G8).
                now = self._clock.monotonic()
                if not await self._outbound.finish(self._outbound.pending_s(now) + GOODBYE_MARGIN_S):
                    log.warning("the AI's last words were not confirmed heard (no mark echo) before hanging up")
                raise AiHungUp
            if isinstance(event, Audio):  # one that queued behind a notice
                self._outbound.push_pcm(event.pcm)
