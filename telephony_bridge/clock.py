"""Time as a dependency: everything that waits or measures takes a ``Clock``.

Tests pass a ``FakeClock`` and advance it instead of sleeping.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from functools import partial
from typing import Protocol

from telephony_bridge.timer_queue import QueuedTimer, TimerQueue


class Signal(Protocol):
    """What ``Clock.wait_until`` waits on: an ``asyncio.Event`` or a ``Flag``."""

    def is_set(self) -> bool: ...
    async def wait(self) -> bool: ...


class Flag:
    """``asyncio.Event``'s interface, for the per-call loops that wait on one with a deadline many times a
    second: ``SystemClock.wait_until`` waits on a Flag with one future and one timer handle, where
    ``asyncio.timeout`` (pure Python) costs several times as much per wait."""

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if not self._value:
            self._value = True
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if not self._value:
            await self._wait(None)
        return True

    async def wait_for(self, delay: float) -> None:
        """Return once set, or after ``delay`` seconds, whichever comes first."""
        if not self._value:
            await self._wait(delay)

    async def _wait(self, delay: float | None) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(delay, _resolve, waiter) if delay is not None else None
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._waiters.remove(waiter)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds from an arbitrary origin; never goes backwards."""
        ...

    def wall(self) -> float:
        """Unix seconds, for values other systems read (JWT claims, log timestamps)."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once ``monotonic()`` has reached ``deadline``."""
        ...

    async def wait_until(self, event: Signal, deadline: float) -> None:
        """Return once ``event`` is set or ``monotonic()`` has reached ``deadline``, whichever comes first."""
        ...

    def call_at(self, deadline: float, callback: Callable[[], None], *, slack_s: float = 0.0) -> Timer:
        """Run ``callback`` from the event loop once ``monotonic()`` has reached ``deadline``, unless cancelled
        first: a deadline that is usually called off costs no task switch either way. ``slack_s``: it may run
        up to that much later (plus the loop timer's millisecond and any loop lag), which lets many such deadlines
        share one event-loop timer (``TimerQueue``)."""
        ...

    def call_soon(self, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` from the event loop once it has run what is ready now (the rest of the read that is
        being handled, included), unless cancelled first."""
        ...


class Timer(Protocol):
    def cancel(self) -> None: ...


# uvloop's timers count whole milliseconds on libuv's clock (see ``timer_delay``).
TIMER_GRANULARITY_S = 0.001
# A loop whose clock is not CLOCK_MONOTONIC (a test's virtual time) must not stretch every wait without bound.
MAX_LOOP_CLOCK_LAG_S = 0.05


class SystemClock:
    """The real clock. A wait returns no earlier than its deadline by ``time.monotonic()``."""

    def __init__(self) -> None:
        self._queues: dict[float, TimerQueue] = {}  # ``call_at``'s with slack, by slack

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - time.monotonic()
        if delay > 0:
            await asyncio.sleep(timer_delay(delay))

    async def wait_until(self, event: Signal, deadline: float) -> None:
        # No task per wait, which matters 50 times a second a call: a Flag's own timer, else asyncio.timeout.
        delay = deadline - time.monotonic()
        if event.is_set() or delay <= 0:
            return
        if isinstance(event, Flag):
            await event.wait_for(timer_delay(delay))
            return
        try:
            async with asyncio.timeout(timer_delay(delay)):
                await event.wait()
        except TimeoutError:
            pass

    def call_at(self, deadline: float, callback: Callable[[], None], *, slack_s: float = 0.0) -> Timer:
        loop = asyncio.get_running_loop()
        if slack_s > 0.0:
            # A dozen times a call-second (``Outbound``'s pause timer; ``Inbound``'s lone-frame one when a frame is
            # left alone): one queue per slack, for the loop that used it last. Another loop (a test's next one)
            # gets a new queue; one that is replaced keeps its own loop timer and entries, so two loops at once
            # stay correct, if unshared.
            queue = self._queues.get(slack_s)
            if queue is None or queue.loop is not loop:
                queue = self._queues[slack_s] = TimerQueue(loop, slack_s, _loop_delay)
            return queue.call_at(deadline, callback)
        now = time.monotonic()
        delay = deadline - now if deadline > now else 0.0
        return loop.call_later(_loop_delay(loop, now, delay), callback)

    def call_soon(self, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_soon(callback)


def monotonic_of(clock: Clock) -> Callable[[], float]:
    """``clock.monotonic``, or for the system clock ``time.monotonic`` itself: the compiled frame path calls it
    once a frame, and from C the built-in skips a Python frame."""
    return time.monotonic if type(clock) is SystemClock else clock.monotonic


def timer_delay(delay: float) -> float:
    """The delay to give the event loop for a timer that must not fire before ``delay`` seconds from now.

    uvloop runs timers on libuv's clock, in whole milliseconds and read once per loop iteration: a timer set
    late in a busy iteration, or for under a millisecond, fired before its deadline (``tests/test_clock.py``),
    and the pacer, waking early, waited again for what was left, a loop turn or more each time. So the delay
    is counted from the loop's own clock and rounded up by a timer tick. On asyncio's own loop, whose clock
    is ``time.monotonic()``, every wait is thus about a millisecond late."""
    return _loop_delay(asyncio.get_running_loop(), time.monotonic(), delay)


def _loop_delay(loop: asyncio.AbstractEventLoop, now: float, delay: float) -> float:
    """``timer_delay`` for ``delay`` counted from ``now``, a ``time.monotonic()`` read before the loop's clock:
    then delay plus lag is the deadline on the loop's clock, and no time read in between can move it earlier.
    Conditions rather than ``min``/``max``: this runs for every timer."""
    lag = now - loop.time()
    if lag < 0.0:
        lag = 0.0
    elif lag > MAX_LOOP_CLOCK_LAG_S:
        lag = MAX_LOOP_CLOCK_LAG_S
    return delay + lag + TIMER_GRANULARITY_S


class FakeClock:
    """A clock that moves only when told to; sleepers wake in deadline order as it passes them."""

    def __init__(self, start: float = 1000.0, wall_offset: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_offset
        self._timers: list[tuple[float, int, QueuedTimer]] = []  # sleepers are timers that resolve their future
        self._soon: list[QueuedTimer] = []  # ``call_soon``'s while no event loop runs
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._now:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.call_at(deadline, partial(_resolve, fut))
        await fut

    async def wait_until(self, event: Signal, deadline: float) -> None:
        if event.is_set() or deadline <= self._now:
            await asyncio.sleep(0)
            return
        waiter = asyncio.ensure_future(event.wait())
        sleeper = asyncio.ensure_future(self.sleep_until(deadline))
        try:
            await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            sleeper.cancel()

    def call_at(self, deadline: float, callback: Callable[[], None], *, slack_s: float = 0.0) -> Timer:
        # Exactly at the deadline whatever the slack: a test advancing the clock sees each timer at its time.
        if deadline <= self._now:  # as the real clock: on the loop's next turn, not at the next ``advance``
            return asyncio.get_running_loop().call_soon(callback)
        timer = QueuedTimer(callback)
        heapq.heappush(self._timers, (deadline, next(self._seq), timer))
        return timer

    def call_soon(self, callback: Callable[[], None]) -> Timer:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # driven with no event loop (bench/frame_path.py): at the next ``advance``
            timer = QueuedTimer(callback)
            self._soon.append(timer)
            return timer
        return loop.call_soon(callback)

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper (and run every timer) whose deadline has passed, in order."""
        soon, self._soon = self._soon, []
        for timer in soon:
            timer.fire()
        self._now += seconds
        while self._timers and self._timers[0][0] <= self._now:
            heapq.heappop(self._timers)[2].fire()
