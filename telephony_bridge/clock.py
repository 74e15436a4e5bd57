"""Time as a dependency: everything that waits or measures takes a ``Clock``.

Tests pass a ``FakeClock`` and advance it instead of sleeping.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


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

    async def wait_until(self, event: asyncio.Event, deadline: float) -> None:
        """Return once ``event`` is set or ``monotonic()`` has reached ``deadline``, whichever comes first."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def wait_until(self, event: asyncio.Event, deadline: float) -> None:
        # asyncio.timeout schedules one timer handle: no task per wait, which matters 50 times a second a call.
        delay = deadline - time.monotonic()
        if event.is_set() or delay <= 0:
            return
        try:
            async with asyncio.timeout(delay):
                await event.wait()
        except TimeoutError:
            pass


class FakeClock:
    """A clock that moves only when told to; sleepers wake in deadline order as it passes them."""

    def __init__(self, start: float = 1000.0, wall_offset: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_offset
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
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
        heapq.heappush(self._sleepers, (deadline, next(self._seq), fut))
        await fut

    async def wait_until(self, event: asyncio.Event, deadline: float) -> None:
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

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has passed."""
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)
