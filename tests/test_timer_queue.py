"""``TimerQueue``: many deadlines, each run not before it passes and at most its slack later, on one loop timer."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from typing import Any

import uvloop

from telephony_bridge.clock import SystemClock, _loop_delay
from telephony_bridge.timer_queue import TimerQueue


class CountingLoop(asyncio.SelectorEventLoop):
    """Counts the loop timers the queue sets (its ``_fire``; asyncio's own, as ``wait_for``'s, are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.timers_set = 0

    def call_later(self, delay: float, callback: Any, *args: Any, context: Any = None) -> asyncio.TimerHandle:
        self.timers_set += getattr(callback, "__name__", "") == "_fire"
        return super().call_later(delay, callback, *args, context=context)


def test_deadlines_run_in_order_never_early_and_the_called_off_never() -> None:
    async def run() -> tuple[list[tuple[int, float]], list[int]]:
        queue = TimerQueue(asyncio.get_running_loop(), 0.005, _loop_delay)
        ran: list[tuple[int, float]] = []
        called_off: list[int] = []
        start = time.monotonic()
        for i in range(200):
            deadline = start + 0.001 * (i % 50) + 0.01
            if i % 3 == 0:
                queue.call_at(deadline, lambda i=i: called_off.append(i)).cancel()
            else:
                queue.call_at(deadline, lambda i=i, d=deadline: ran.append((i, time.monotonic() - d)))
        await asyncio.sleep(0.2)
        return ran, called_off

    ran, called_off = uvloop.run(run())
    assert called_off == []
    assert len(ran) == 200 - 67
    assert min(late for _, late in ran) >= 0  # never early: how late is the machine's business, not asserted
    deadlines = [0.001 * (i % 50) for i, _ in ran]
    assert deadlines == sorted(deadlines)  # in deadline order


def test_a_thousand_deadlines_share_few_loop_timers_and_a_cancel_lets_go_of_the_callback() -> None:
    class Holder:
        def fire(self) -> None:
            pass

    loop = CountingLoop()
    try:

        async def run() -> tuple[int, int, weakref.ref[Holder]]:
            queue = TimerQueue(loop, 0.005, _loop_delay)
            fired: list[int] = []
            start = time.monotonic()
            for i in range(1000):  # as many calls' short deadlines over 100 ms, half called off
                timer = queue.call_at(start + 0.02 + i * 0.0001, lambda i=i: fired.append(i))
                if i % 2:
                    timer.cancel()
            holder = Holder()
            queue.call_at(start + 10.0, holder.fire).cancel()
            held = weakref.ref(holder)
            del holder
            gc.collect()
            assert held() is None and len(queue) == 1001  # let go at the cancel, its entry still in the heap
            await asyncio.sleep(0.25)
            return len(fired), len(queue), held

        fired, left, held = loop.run_until_complete(run())
        assert fired == 500
        assert left == 0  # the called-off deadline 10 s away was dropped when it reached the heap's top
        assert held() is None
        # Each firing sets the next no sooner than the slack from then: 100 ms of deadlines at 5 ms slack.
        assert loop.timers_set <= 100 / 5 + 5
    finally:
        loop.close()


def test_a_callback_that_arms_again_from_its_firing_costs_one_loop_timer_a_firing() -> None:
    """``Outbound``'s pause timer re-arms itself from its own callback a dozen times a call-second: inside the
    firing that sets no loop timer of its own (which the firing's own re-arm would then cancel and replace)."""
    loop = CountingLoop()
    try:

        async def run() -> int:
            queue = TimerQueue(loop, 0.002, _loop_delay)
            done = loop.create_future()
            left = [20]

            def again() -> None:
                left[0] -= 1
                if left[0]:
                    queue.call_at(time.monotonic() + 0.005, again)
                else:
                    done.set_result(None)

            queue.call_at(time.monotonic() + 0.005, again)
            await asyncio.wait_for(done, 10.0)
            return loop.timers_set

        assert loop.run_until_complete(run()) <= 20  # the first arm and one a firing: not two a firing
    finally:
        loop.close()


def test_a_callback_that_arms_a_deadline_already_due_runs_it_at_the_next_firing_not_this_one() -> None:
    """As ``call_later`` would put it on the loop's next turn: a callback that re-arms itself for a deadline
    already passed must not keep one firing going for ever."""

    async def run() -> int:
        queue = TimerQueue(asyncio.get_running_loop(), 0.002, _loop_delay)
        runs = [0]

        def again() -> None:
            runs[0] += 1
            if runs[0] < 10_000:  # a bound, so that without the rule the test fails rather than hangs
                queue.call_at(time.monotonic() - 1.0, again)  # already due

        queue.call_at(time.monotonic(), again)
        await asyncio.sleep(0.05)  # without the rule, the first firing runs all 10,000 before this wakes
        return runs[0]

    assert 1 <= uvloop.run(run()) < 1000


def test_a_failing_callback_is_reported_and_the_rest_still_run() -> None:
    async def run() -> tuple[list[str], list[dict[str, Any]]]:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        queue = TimerQueue(loop, 0.002, _loop_delay)
        seen: list[str] = []
        deadline = time.monotonic() + 0.005

        def fail() -> None:
            raise RuntimeError("a bug in one call")

        queue.call_at(deadline, fail)
        queue.call_at(deadline, lambda: seen.append("after"))
        queue.call_at(deadline + 0.02, lambda: seen.append("later"))
        await asyncio.sleep(0.1)
        return seen, reported

    seen, reported = uvloop.run(run())
    assert seen == ["after", "later"]
    assert [type(c["exception"]) for c in reported] == [RuntimeError]


def test_an_earlier_deadline_than_the_loop_timer_is_set_for_moves_it_earlier() -> None:
    async def run() -> None:
        queue = TimerQueue(asyncio.get_running_loop(), 0.002, _loop_delay)
        soon = asyncio.get_running_loop().create_future()
        queue.call_at(time.monotonic() + 30.0, lambda: None)
        queue.call_at(time.monotonic() + 0.01, lambda: soon.set_result(None))
        await asyncio.wait_for(soon, 10.0)  # not 30 s

    uvloop.run(run())


def test_the_system_clock_queues_deadlines_with_slack_per_loop() -> None:
    """Each event loop gets its own queue: a clock shared by two loops in turn (tests do so) serves both."""
    clock = SystemClock()

    async def one() -> float:
        fired = asyncio.get_running_loop().create_future()
        deadline = time.monotonic() + 0.01
        clock.call_at(deadline, lambda: fired.set_result(time.monotonic() - deadline), slack_s=0.002)
        return await fired

    assert uvloop.run(one()) >= 0
    assert uvloop.run(one()) >= 0
