"""The 20 ms RTP clock that every SIP call on an event loop sends to (spec §11.2).

Each call must put exactly one packet onto the wire every 20 ms. A task per call sleeping to its own tick cost
each call 50 timer wake-ups and task switches a second; here one task ticks for all of them, and each tick
hands every call joined to it its next packet (``Ticked.tick``) in one pass. A call keeps its own timestamp
(ticks since it joined), so calls share the wire clock's phase, never their RTP timelines, and each tick runs in
the context the call joined from (its log lines name that call).

A stall of the event loop shorter than ``MAX_LATE_TICKS`` is caught up tick by tick (the peer's jitter buffer
absorbs a short burst, and no audio moves in time); a longer one skips the missed ticks, each call's timestamp
still telling the true time. Catching up, the clock still yields to the loop between passes: a pass over many
calls on a busy loop can take longer than a tick, and a clock that never yielded then would freeze everything
else (the calls' reads, signalling, probes) for good.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Protocol

from telephony_bridge.clock import Clock
from telephony_bridge.sip.rtp import CLOCK_HZ, FRAME_SAMPLES

log = logging.getLogger(__name__)

TICK_S = FRAME_SAMPLES / CLOCK_HZ  # 20 ms
MAX_LATE_TICKS = 25


class Ticked(Protocol):
    """A call on the wire clock (``sip.leg.SipLeg``)."""

    def tick(self, ticks: int, now: float) -> None:
        """Send this tick's packet: ``ticks`` since the call joined (its timestamp), at ``now``."""
        ...

    def tick_failed(self, error: Exception) -> None:
        """``tick`` raised: the call's media ends with ``error``; the clock goes on for every other call."""
        ...


class ClockStopped(Exception):
    """The wire clock's task ended (the server stopping) with the call still joined: no more ticks will come."""


class WireClock:
    """One tick every 20 ms for every joined call; the task runs while any call is joined (``aclose`` ends it)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        # call -> the wire tick it joined at and the context it joined from (insertion order: send order)
        self._joined: dict[Ticked, tuple[int, contextvars.Context]] = {}
        self._next = 0  # the tick the clock sends next
        self._task: asyncio.Task[None] | None = None

    def join(self, call: Ticked) -> None:
        """``call`` sends its first packet at the next tick (at most 20 ms away), then one every tick."""
        if self._task is None:
            self._next = 0
            # in a context of its own: the joining call's would name that call in every other call's lines
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="sip-wire-clock", context=contextvars.Context()
            )
        self._joined[call] = (self._next, contextvars.copy_context())

    def leave(self, call: Ticked) -> None:
        """No more ticks for ``call`` (the task ends at its next tick if no call is left)."""
        self._joined.pop(call, None)

    def __len__(self) -> int:
        return len(self._joined)

    async def aclose(self) -> None:
        """Stop the task (the server's stop): a call still joined is told (``tick_failed``, ``ClockStopped``)."""
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        clock = self._clock
        start = clock.monotonic()
        try:
            while self._joined:
                due = start + self._next * TICK_S
                now = clock.monotonic()
                if now - due > MAX_LATE_TICKS * TICK_S:  # stalled: skip the missed ticks, keep timestamps true
                    log.debug("RTP wire clock stalled for %.0f ms; skipping ahead", 1000 * (now - due))
                    self._next = int((now - start) / TICK_S)
                    due = start + self._next * TICK_S
                if due > now:
                    await clock.sleep_until(due)
                else:  # behind: catch up, but let the loop run between passes (see the module's docstring)
                    await asyncio.sleep(0)
                tick, now = self._next, clock.monotonic()
                self._next += 1
                for call, (joined_at, context) in tuple(self._joined.items()):
                    try:
                        context.run(call.tick, tick - joined_at, now)
                    except Exception as error:  # one call's fault ends that call's media, not everyone's
                        self._joined.pop(call, None)
                        _tell(call, context, error)
        finally:
            self._task = None
            left, self._joined = self._joined, {}
            for call, (_, context) in left.items():
                _tell(call, context, ClockStopped("the RTP wire clock stopped"))


def _tell(call: Ticked, context: contextvars.Context, error: Exception) -> None:
    """``call.tick_failed(error)``; what that raises in turn is logged, never let out into the clock."""
    try:
        context.run(call.tick_failed, error)
    except Exception:
        log.exception("ending a call's RTP after %r failed", error)
