"""Many short deadlines, often re-armed or called off, on one event-loop timer.

Each call arms two timers many times a second: ``Inbound``'s for a frame waiting for its partner (set only when
the partner did not come in the same read: ``Inbound._arm_lone_timer``) and ``Outbound``'s for the AI's pause
(re-armed a dozen times a call-second while it talks). On uvloop every ``call_later`` makes a handle and a libuv
timer, and its ``cancel`` a second loop operation (~2.5 µs the pair in a tight loop). Here a deadline is a heap
entry, a cancel drops its callback, and one loop timer (one per slack: two in all, shared by every call) fires for
whatever is due: 12.6 % less of the bridge's CPU at 100 calls and 6.6 % at 150, more than the timers' own cost
(docs/performance.md, "Later on the morning of 7 Dec"). A deadline never fires early, and late by up to
``slack_s`` plus the loop timer's millisecond and any loop lag; after a firing the next comes no sooner than
``slack_s`` later unless a deadline earlier than that is armed. A deadline armed during a firing runs at the next
one, however due, as ``call_later`` would run it on the loop's next turn.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable


class QueuedTimer:
    """One deadline's handle (``clock.Timer``): ``cancel``, and ``fire`` for the queue that holds it (also
    ``FakeClock``'s)."""

    __slots__ = ("callback",)

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback: Callable[[], None] | None = callback

    def cancel(self) -> None:
        self.callback = None  # also lets go of what the callback holds (a call's objects) at once

    def fire(self) -> None:
        """Run the callback, once, unless called off."""
        if self.callback is not None:
            callback, self.callback = self.callback, None
            callback()


class TimerQueue:
    """Deadlines on ``time.monotonic()`` for one event loop, each run up to ``slack_s`` after it passes (plus the
    loop timer's millisecond and any loop lag; after a callback raised, the other due ones wait a slack more).

    ``delay_for(loop, now, delay)`` turns a delay from ``now`` into the loop timer's own (``clock._loop_delay``:
    uvloop's timers count whole milliseconds on libuv's clock), so the loop timer never fires early either."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        slack_s: float,
        delay_for: Callable[[asyncio.AbstractEventLoop, float, float], float],
    ) -> None:
        self.loop = loop
        self._slack_s = slack_s
        self._delay_for = delay_for
        self._heap: list[tuple[float, int, QueuedTimer]] = []
        self._seq = itertools.count()  # ties in deadline go in arming order, never comparing handles
        self._armed_for = float("inf")  # the deadline the loop timer is set for
        self._handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        """Deadlines held, including called-off ones not yet dropped."""
        return len(self._heap)

    def call_at(self, deadline: float, callback: Callable[[], None]) -> QueuedTimer:
        timer = QueuedTimer(callback)
        heapq.heappush(self._heap, (deadline, next(self._seq), timer))
        if deadline + self._slack_s < self._armed_for:  # the loop timer, as set, would run this too late
            self._arm(deadline, time.monotonic())
        return timer

    def _arm(self, deadline: float, now: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_for = deadline
        delay = deadline - now if deadline > now else 0.0
        self._handle = self.loop.call_later(self._delay_for(self.loop, now, delay), self._fire)

    def _fire(self) -> None:
        self._handle = None
        # While it runs, a callback that arms a deadline (the pause timer re-arms itself) sets no loop timer of its
        # own: the one armed at the end covers it.
        self._armed_for = float("-inf")
        now = time.monotonic()
        last = next(self._seq)  # armed from here on (by a callback below): the next firing's, however due
        heap = self._heap
        later: list[tuple[float, int, QueuedTimer]] = []
        try:
            while heap:
                deadline, seq, timer = heap[0]
                callback = timer.callback
                if callback is not None and deadline > now:
                    break
                entry = heapq.heappop(heap)  # due, or called off (dropped wherever it is in the heap's order)
                if callback is None:
                    continue
                if seq > last:
                    later.append(entry)
                    continue
                timer.fire()  # one that raises is the loop's to report; the rest run at the next firing
        finally:
            for entry in later:
                heapq.heappush(heap, entry)
            if heap:  # the earliest live deadline, but no sooner than ``slack_s`` from now: due ones go together
                deadline = heap[0][0]
                self._arm(deadline if deadline > now + self._slack_s else now + self._slack_s, now)
            else:
                self._armed_for = float("inf")
