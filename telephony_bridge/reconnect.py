"""Mid-call reconnect to the AI: one call's attempts to get a new Savants session after its session dropped.

The caller keeps the line meanwhile (``bridge.Call`` plays comfort noise and buffers the caller's audio).
Each attempt is ``Admission.reconnect``: a fresh token counted against the device's budget (the call's slot
moves to another device when this one has none or is out of the pool), then a new session;
``retry.backoff_s`` passes before each attempt, all within ``savants.reconnect_deadline_s`` of the drop (none
starts with less than ``admission.MIN_ATTEMPT_S`` left, and none is given longer than what is left). What
is worth an attempt is ``retry.classify``'s call; a device Savants refuses outright is suspended. A new
session is a new conversation for the AI: nothing is resumed. A call that ends while it reconnects (the caller
hung up, the drain or the time limit) cancels it: ``abandoned``, counted once, at whichever await the end finds
it (closing the dropped session, suspending a refused device, waiting between attempts, an attempt).

A call whose AI keeps dropping is not reconnected for ever: past ``max_per_minute`` drops retried within a
minute the call ends (result ``limited``). Every reconnect takes a token from the device's budget (60 a
minute, shared by its 10 calls), so one flapping session must not spend what the device's other callers need.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from dataclasses import dataclass

from telephony_bridge.admission import MIN_ATTEMPT_S, Admission, CallSlot
from telephony_bridge.clock import Clock
from telephony_bridge.errors import SavantsError, SessionError
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.savants.client import SavantsConnection
from telephony_bridge.savants.retry import Verdict, backoff_s, classify

log = logging.getLogger(__name__)

LIMIT_WINDOW_S = 60.0  # ``max_per_minute`` counts the drops retried within this long


@dataclass
class ReconnectFigures:
    """For the "call ended" line: how often the AI dropped, what it took, how it ended."""

    drops: int = 0  # sessions that ended on a failure mid-call, or could not be opened at its start
    attempts: int = 0  # reconnect attempts made
    outcome: str = "none"  # none | resumed | failed | not_retried | limited | abandoned (the last drop's)
    gap_s: float = 0.0  # time without an AI session, summed over the drops that were retried


class Reconnector:
    def __init__(
        self,
        admission: Admission,
        clock: Clock,
        metrics: Metrics,
        *,
        deadline_s: float,
        rng: random.Random,
        max_per_minute: int = 3,
    ) -> None:
        self._admission = admission
        self._clock = clock
        self._metrics = metrics
        self._deadline_s = deadline_s
        self._rng = rng
        self._max_per_minute = max_per_minute
        self._retried_at: deque[float] = deque()  # when the drops retried within the last minute came
        self.figures = ReconnectFigures()

    async def recover(
        self,
        failure: SavantsError,
        slot: CallSlot,
        *,
        opening: bool = False,
        dropped: SavantsConnection | None = None,
    ) -> SavantsConnection:
        """A new session for the call (``slot.lease`` says on which device it now is); raises a
        ``SavantsError`` (the call then ends with the fallback message) if the drop is not worth a retry or the
        deadline passed. ``opening``: the call's first session could not be opened (counted as a drop).
        ``dropped``: the session that failed, closed here first. However far this got when the call ended, it
        counts ``abandoned`` once."""
        self.figures.drops += 1
        dropped_at = self._clock.monotonic()
        try:
            if dropped is not None:
                await dropped.close()
            return await self._recover(failure, slot, opening)
        except asyncio.CancelledError:  # the call ended first: its cleanup closes what an attempt held
            self.figures.outcome = "abandoned"
            self._metrics.ai_reconnects.labels(result="abandoned").inc()
            log.info("reconnect abandoned: the call ended %.2f s after the drop", self._clock.monotonic() - dropped_at)
            raise

    async def _recover(self, failure: SavantsError, slot: CallSlot, opening: bool) -> SavantsConnection:
        lost = "AI session could not be opened" if opening else "AI session dropped"
        figures = self.figures
        verdict = await self._judge(failure, slot)
        if not _worth_it(verdict, opening) or self._deadline_s == 0:
            figures.outcome = "not_retried"
            self._metrics.ai_reconnects.labels(result="not_retried").inc()
            raise failure
        if self._over_limit():
            figures.outcome = "limited"
            self._metrics.ai_reconnects.labels(result="limited").inc()
            log.warning(
                "%s (%s), its %s retried drop within a minute: not reconnecting again "
                "(savants.max_reconnects_per_minute); the call ends",
                lost,
                str(failure),
                _ordinal(self._max_per_minute + 1),
            )
            raise failure
        started = self._clock.monotonic()
        deadline = started + self._deadline_s
        # Failures go into log lines as text: a handler that keeps its records (pytest's; a breadcrumb buffer) would
        # keep the exception, its traceback, and through its frames the call's AI side.
        log.warning(
            "%s (%s): the caller keeps the line; reconnecting for up to %s s", lost, str(failure), self._deadline_s
        )
        try:
            session = await self._attempts(failure, slot, started, deadline, opening=opening)
        except SavantsError:
            figures.outcome = "failed"
            self._metrics.ai_reconnects.labels(result="failed").inc()
            raise
        finally:
            figures.gap_s += self._clock.monotonic() - started
        figures.outcome = "resumed"
        self._metrics.ai_reconnects.labels(result="resumed").inc()
        log.info(
            "AI session opened after %.2f s of attempts"
            if opening
            else "AI session reconnected after %.2f s; a new conversation for the AI",
            self._clock.monotonic() - started,
            extra={"session_id": session.session_id, "to_device": slot.lease.device_id},
        )
        return session

    async def _attempts(
        self, failure: SavantsError, slot: CallSlot, started: float, deadline: float, *, opening: bool
    ) -> SavantsConnection:
        attempt = 0
        while True:
            attempt += 1
            at = self._clock.monotonic() + backoff_s(attempt, self._rng)
            if at + MIN_ATTEMPT_S > deadline:  # too late to start one that could finish by the deadline
                away_s = self._clock.monotonic() - started
                raise SessionError(
                    f"AI unreachable for {away_s:.1f} s after the drop ({attempt - 1} attempts); last: {failure}",
                    code=getattr(failure, "code", "RECONNECT_FAILED"),
                )
            await self._clock.sleep_until(at)
            self.figures.attempts += 1
            self._metrics.ai_reconnect_attempts.inc()
            try:
                return await self._admission.reconnect(slot, deadline=deadline)
            except SavantsError as exc:
                log.info("reconnect attempt %d failed: %s", attempt, str(exc))
                if not _worth_it(await self._judge(exc, slot), opening):
                    raise
                failure = exc.with_traceback(None)  # kept for the message: its traceback reaches this frame

    def _over_limit(self) -> bool:
        """Whether this drop is one more than ``max_per_minute`` within a minute; if not, it is counted."""
        now = self._clock.monotonic()
        while self._retried_at and self._retried_at[0] <= now - LIMIT_WINDOW_S:
            self._retried_at.popleft()
        if len(self._retried_at) >= self._max_per_minute:
            return True
        self._retried_at.append(now)
        return False

    async def _judge(self, failure: SavantsError, slot: CallSlot) -> Verdict:
        verdict = classify(failure)
        if verdict is Verdict.QUARANTINE:  # (admission has already suspended a device its token endpoint refused)
            await self._admission.suspend_device(slot.lease.device_id, getattr(failure, "code", "refused"))
        return verdict


def _worth_it(verdict: Verdict, opening: bool) -> bool:
    """Whether to try (again). When the first session opens, a refused device is the device's fault, not the
    call's: the next attempt moves the call off it, as the webhook's admission does (mid-call the table's "no
    retry" stands)."""
    return verdict is Verdict.RETRY or (opening and verdict is Verdict.QUARANTINE)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
