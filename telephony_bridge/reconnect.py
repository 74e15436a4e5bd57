"""Mid-call reconnect to the AI: one call's attempts to get a new Savants session after its session dropped.

The caller keeps the line meanwhile (``bridge.Call`` plays comfort noise and buffers the caller's audio). Each
attempt takes a fresh token through admission (counted against the device's budget; the call's slot moves to
another device when this one has none), waiting ``retry.backoff_s`` before it, all within
``savants.reconnect_deadline_s`` of the drop. What is worth an attempt is ``retry.classify``'s call; a device
Savants refuses outright is quarantined. A new session is a new conversation for the AI: nothing is resumed.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from telephony_bridge.accounting.base import Lease
from telephony_bridge.admission import Admission
from telephony_bridge.clock import Clock
from telephony_bridge.errors import AdmissionError, SavantsError, SessionError
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.savants.client import SavantsConnection
from telephony_bridge.savants.retry import Verdict, backoff_s, classify

log = logging.getLogger(__name__)


@dataclass
class ReconnectFigures:
    """For the "call ended" line: how often the AI dropped, what it took, how it ended."""

    drops: int = 0  # sessions that ended on a failure mid-call
    attempts: int = 0  # reconnect attempts made
    outcome: str = "none"  # none | resumed | failed | not_retried (the last drop's)
    gap_s: float = 0.0  # time without an AI session, summed over the drops that were retried


class Reconnector:
    def __init__(
        self, admission: Admission, clock: Clock, metrics: Metrics, *, deadline_s: float, rng: random.Random
    ) -> None:
        self._admission = admission
        self._clock = clock
        self._metrics = metrics
        self._deadline_s = deadline_s
        self._rng = rng
        self.figures = ReconnectFigures()

    async def recover(self, failure: SavantsError, lease: Lease) -> tuple[Lease, SavantsConnection]:
        """A new session for the call, and the lease it now holds; raises a ``SavantsError`` (the call then ends
        with the fallback message) if the drop is not worth a retry or the deadline passed."""
        figures = self.figures
        figures.drops += 1
        verdict = await self._judge(failure, lease)
        if verdict is not Verdict.RETRY or self._deadline_s == 0:
            figures.outcome = "not_retried"
            self._metrics.ai_reconnects.labels(result="not_retried").inc()
            raise failure
        started = self._clock.monotonic()
        deadline = started + self._deadline_s
        log.warning(
            "AI session dropped (%s): the caller keeps the line; reconnecting for up to %s s", failure, self._deadline_s
        )
        try:
            lease, session = await self._attempts(failure, lease, started, deadline)
        except SavantsError:
            figures.outcome = "failed"
            self._metrics.ai_reconnects.labels(result="failed").inc()
            raise
        finally:
            figures.gap_s += self._clock.monotonic() - started
        figures.outcome = "resumed"
        self._metrics.ai_reconnects.labels(result="resumed").inc()
        log.info(
            "AI session reconnected after %.2f s; a new conversation for the AI",
            self._clock.monotonic() - started,
            extra={"session_id": session.session_id, "to_device": lease.device_id},
        )
        return lease, session

    async def _attempts(
        self, failure: SavantsError, lease: Lease, started: float, deadline: float
    ) -> tuple[Lease, SavantsConnection]:
        attempt = 0
        while True:
            attempt += 1
            at = self._clock.monotonic() + backoff_s(attempt, self._rng)
            if at >= deadline:
                away_s = self._clock.monotonic() - started
                raise SessionError(
                    f"AI unreachable for {away_s:.1f} s after the drop ({attempt - 1} attempts); last: {failure}",
                    code=getattr(failure, "code", "RECONNECT_FAILED"),
                )
            await self._clock.sleep_until(at)
            self.figures.attempts += 1
            self._metrics.ai_reconnect_attempts.inc()
            try:
                lease, result = await self._admission.reconnect_session(lease)
            except AdmissionError as exc:  # the slot moved away and no device had room: nothing left to hold
                raise SessionError(f"no device can take the reconnect: {exc}", code="NO_CAPACITY") from exc
            if isinstance(result, SavantsConnection):
                return lease, result
            log.info("reconnect attempt %d failed: %s", attempt, result)
            if await self._judge(result, lease) is not Verdict.RETRY:
                raise result
            failure = result

    async def _judge(self, failure: SavantsError, lease: Lease) -> Verdict:
        verdict = classify(failure)
        if verdict is Verdict.QUARANTINE:
            await self._admission.quarantine(lease.device_id, getattr(failure, "code", "refused"))
        return verdict
