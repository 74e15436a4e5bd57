"""The RTP wire clock every SIP call shares (``sip/wire_clock.py``): one tick every 20 ms sends each joined
call's packet, each call on its own timeline, a failing call leaves without stopping the others, the task ends
with the last call (and starts afresh with the next), and a clock behind its ticks still lets the loop run.
Mostly on a ``FakeClock``; the real-socket side is tests/test_sip_calls.py and tests/test_sip_leg.py."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time

import pytest

from telephony_bridge.clock import FakeClock, SystemClock
from telephony_bridge.sip.wire_clock import MAX_LATE_TICKS, TICK_S, ClockStopped, WireClock

NAME: contextvars.ContextVar[str] = contextvars.ContextVar("NAME", default="none")


class Call:
    def __init__(self, fail_at: int | None = None, busy_s: float = 0.0) -> None:
        self.ticks: list[tuple[int, float, str]] = []  # (ticks since joined, when, the context's NAME)
        self.failed: Exception | None = None
        self._fail_at = fail_at
        self._busy_s = busy_s

    def tick(self, ticks: int, now: float) -> None:
        if ticks == self._fail_at:
            raise OSError("sendto failed")
        self.ticks.append((ticks, now, NAME.get()))
        time.sleep(self._busy_s)  # a pass over many calls on a busy loop

    def tick_failed(self, error: Exception) -> None:
        self.failed = error


async def _turns(clock: FakeClock, seconds: float, steps: int = 1) -> None:
    """Let the loop run, moving the clock ``seconds`` in ``steps`` (each sleeper wakes as its deadline passes)."""
    for _ in range(steps):
        clock.advance(seconds / steps + 1e-6)  # a hair past each tick: sums of floats fall short of products
        for _ in range(200):  # enough turns for every overdue tick to be caught up
            await asyncio.sleep(0)


async def test_calls_share_the_ticks_each_on_its_own_timeline_in_its_own_context() -> None:
    clock = FakeClock()
    wire = WireClock(clock)
    first, second = Call(), Call()
    NAME.set("first")
    wire.join(first)
    await _turns(clock, 0)
    await _turns(clock, 3 * TICK_S, steps=3)
    NAME.set("second")
    wire.join(second)
    await _turns(clock, 2 * TICK_S, steps=2)
    assert [t for t, _, _ in first.ticks] == [0, 1, 2, 3, 4, 5]
    assert [t for t, _, _ in second.ticks] == [0, 1]  # its own timestamps from 0: the phase is shared, not the count
    assert [when for _, when, _ in second.ticks] == [when for _, when, _ in first.ticks[4:]]  # the same ticks
    assert {name for _, _, name in first.ticks} == {"first"} and {name for _, _, name in second.ticks} == {"second"}
    assert [b - a for (_, a, _), (_, b, _) in zip(first.ticks, first.ticks[1:], strict=False)] == [
        pytest.approx(TICK_S, abs=1e-5)
    ] * 5
    wire.leave(first)
    wire.leave(second)
    await _turns(clock, TICK_S)
    assert wire._task is None and len(wire) == 0  # the last call gone: the task has ended


async def test_a_call_whose_tick_raises_leaves_and_the_others_go_on() -> None:
    clock = FakeClock()
    wire = WireClock(clock)
    failing, healthy = Call(fail_at=2), Call()
    wire.join(failing)
    wire.join(healthy)
    await _turns(clock, 0)
    await _turns(clock, 5 * TICK_S, steps=5)
    assert isinstance(failing.failed, OSError) and [t for t, _, _ in failing.ticks] == [0, 1]
    assert [t for t, _, _ in healthy.ticks] == [0, 1, 2, 3, 4, 5] and len(wire) == 1
    wire.leave(healthy)
    await _turns(clock, TICK_S)
    assert wire._task is None


async def test_the_clock_starts_afresh_for_a_call_that_joins_after_the_last_one_left() -> None:
    clock = FakeClock()
    wire = WireClock(clock)
    first = Call()
    wire.join(first)
    await _turns(clock, 0)
    await _turns(clock, 3 * TICK_S, steps=3)
    wire.leave(first)
    await _turns(clock, TICK_S)
    assert wire._task is None
    await _turns(clock, 0.5)  # nobody on the clock for a while
    second = Call()
    wire.join(second)
    joined_at = clock.monotonic()
    await _turns(clock, 0)
    await _turns(clock, 2 * TICK_S, steps=2)
    assert [t for t, _, _ in second.ticks] == [0, 1, 2]
    assert second.ticks[0][1] == pytest.approx(
        joined_at, abs=1e-5
    )  # at once, not as many ticks late as the old clock had counted


async def test_a_call_joining_while_the_clock_sleeps_with_no_one_left_keeps_its_task() -> None:
    clock = FakeClock()
    wire = WireClock(clock)
    first, second = Call(), Call()
    wire.join(first)
    await _turns(clock, 0)
    task = wire._task
    wire.leave(first)  # the task sleeps to its next tick with no call...
    wire.join(second)  # ...and has one again before it wakes
    await _turns(clock, 2 * TICK_S, steps=2)
    assert wire._task is task and [t for t, _, _ in second.ticks] == [0, 1]
    wire.leave(second)
    await _turns(clock, TICK_S)


async def test_a_clock_behind_its_ticks_still_lets_the_loop_run() -> None:
    """A pass over the calls that takes longer than a tick: the clock is behind after every pass, and must still
    yield between them, or nothing else on the loop would ever run again."""
    wire = WireClock(SystemClock())
    slow = Call(busy_s=1.5 * TICK_S)
    others = 0

    async def bystander() -> None:
        nonlocal others
        while True:
            others += 1
            await asyncio.sleep(0)

    running = asyncio.create_task(bystander())
    async with asyncio.timeout(5):
        wire.join(slow)
        await asyncio.sleep(0.5)
        wire.leave(slow)
    running.cancel()
    assert len(slow.ticks) >= 10 and others >= 10  # both went on, taking turns


async def test_aclose_stops_the_clock_and_tells_every_call_still_on_it() -> None:
    clock = FakeClock()
    wire = WireClock(clock)
    first, second = Call(), Call()
    wire.join(first)
    wire.join(second)
    await _turns(clock, 0)
    await wire.aclose()
    assert isinstance(first.failed, ClockStopped) and isinstance(second.failed, ClockStopped)
    assert wire._task is None and len(wire) == 0


async def test_a_short_stall_is_caught_up_tick_by_tick_and_a_long_one_skipped_with_true_timestamps(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    wire = WireClock(clock)
    call = Call()
    NAME.set("the call")  # the context the call joins from: the clock's own lines must not be in it
    wire.join(call)
    await _turns(clock, 0)
    await _turns(clock, 5 * TICK_S)  # one late wake-up five ticks on: every missed packet goes, in order
    assert [t for t, _, _ in call.ticks] == [0, 1, 2, 3, 4, 5]
    names: list[str] = []  # the context the clock's own line is logged in: its own, no call's

    class Names(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            names.append(NAME.get())

    logger = logging.getLogger("telephony_bridge.sip.wire_clock")
    handler = Names(logging.DEBUG)
    logger.addHandler(handler)
    try:
        with caplog.at_level(logging.DEBUG, logger="telephony_bridge.sip.wire_clock"):
            await _turns(clock, (MAX_LATE_TICKS + 10) * TICK_S)  # too long: skip to now, the timestamp says so
    finally:
        logger.removeHandler(handler)
    ticks = [t for t, _, _ in call.ticks]
    # tick 6 was due as the stall began (its wake-up had been set); then the clock skips to the present, 40 ticks
    # on: each timestamp still the time since the call joined
    assert ticks[6:] == [6, 40]
    assert [r.getMessage() for r in caplog.records] == ["RTP wire clock stalled for 660 ms; skipping ahead"]
    assert names == ["none"]
    wire.leave(call)
    await _turns(clock, TICK_S)
