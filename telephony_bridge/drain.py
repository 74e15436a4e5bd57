"""Graceful drain: what the first SIGTERM starts, and when the process may exit.

From the first moment of a drain the replica is not ready and turns new calls away (``/voice`` answers busy),
but the calls it already took keep going: calls in progress until they end or ``drain_timeout_s`` passes,
then each is ended politely (outcome ``drained``, so ``/stream-ended`` speaks the drain message); calls
admitted before the drain whose stream has not started yet still get it (Twilio is already connecting), but
the drain waits for them at most ``pending_streams_s``, not the reservation's TTL. Once the last call has
ended, the drain waits a moment for Twilio's ``<Connect action>`` requests of the calls it cut (their answer
is the spoken drain message) and then lets the server stop; calls whose ingress asks nothing after the end (SIP:
the leg plays the drain recording itself, before its BYE) are not waited for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from telephony_bridge.clock import Clock
from telephony_bridge.registry import CallRegistry

log = logging.getLogger(__name__)

DRAINED = "drained"  # the outcome of a call ended by the drain deadline
POLL_S = 0.05  # admissions lapse on a clock, not on an event: polling is the honest way to watch them
CUT_GRACE_S = 5.0  # how long calls told to end may take to close their sockets
ACTION_GRACE_S = 0.5  # how long the last calls' <Connect action> requests may take to arrive


class Drain:
    def __init__(
        self,
        registry: CallRegistry,
        awaiting_streams: Callable[[], int],
        clock: Clock,
        *,
        timeout_s: float,
        pending_streams_s: float,
    ) -> None:
        self._registry = registry
        self._awaiting_streams = awaiting_streams
        self._clock = clock
        self._timeout_s = timeout_s
        self._pending_streams_s = min(pending_streams_s, timeout_s)
        self._awaiting_action: set[str] = set()  # calls the drain cut: Twilio asks what they hear next
        self.draining = False

    def action_answered(self, call_sid: str) -> None:
        """Twilio asked ``/stream-ended`` about this call: the drain need not wait for it any more."""
        self._awaiting_action.discard(call_sid)

    async def run(self) -> None:
        """Drain, then return: the caller stops the server. Runs once; a second call returns at once."""
        if self.draining:
            return
        self.draining = True
        registry = self._registry
        started = self._clock.monotonic()
        log.info(
            "draining: not ready any more; waiting up to %s s for %d calls to end (%d streams still to start)",
            self._timeout_s,
            len(registry),
            self._awaiting_streams(),
        )
        cut_at: float | None = None
        while True:
            now = self._clock.monotonic() - started
            current = registry.call_sids()
            pending = self._awaiting_streams()
            if not current and (not pending or now >= self._pending_streams_s):
                if pending:
                    log.warning("drain: %d admitted calls never started their stream; not waiting longer", pending)
                break
            if cut_at is None and now >= self._timeout_s:
                log.warning("drain timeout: ending %d calls still up (outcome %s)", len(current), DRAINED)
                registry.end_all(DRAINED, "drain timeout")
                cut_at = now
            if cut_at is not None:  # a stream that starts after the cut is ended at once, and asks too
                self._awaiting_action.update(registry.requesting_after_end())
            if cut_at is not None and now - cut_at >= CUT_GRACE_S:
                log.error("drain: %d calls did not end within %s s of being told to", len(current), CUT_GRACE_S)
                break
            await asyncio.sleep(POLL_S)
        if self._awaiting_action:
            log.info(
                "drain: waiting up to %s s for %d calls' <Connect action> requests",
                ACTION_GRACE_S,
                len(self._awaiting_action),
            )
        action_deadline = self._clock.monotonic() + ACTION_GRACE_S
        while self._awaiting_action and self._clock.monotonic() < action_deadline:  # noqa: ASYNC110
            await asyncio.sleep(POLL_S / 2)
        log.info("drained: no calls left")
