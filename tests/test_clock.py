"""``SystemClock.wait_until`` on a ``Flag`` (its cheap path) keeps ``asyncio.Event``'s meaning, on the real loop."""

from __future__ import annotations

import asyncio
import time

import pytest
import uvloop  # uvicorn[standard]'s loop, which the bridge serves on

from telephony_bridge.clock import Clock, FakeClock, Flag, SystemClock, monotonic_of


@pytest.mark.parametrize("signal", [Flag, asyncio.Event])
async def test_wait_until_returns_when_set_or_at_the_deadline(signal: type) -> None:
    clock, flag = SystemClock(), signal()
    started = time.monotonic()
    await clock.wait_until(flag, started + 0.05)
    assert time.monotonic() - started >= 0.04, "nothing set it: it waited for the deadline"
    asyncio.get_running_loop().call_later(0.02, flag.set)
    started = time.monotonic()
    await clock.wait_until(flag, started + 10)
    assert time.monotonic() - started < 5, "set: it returned long before the deadline"
    await asyncio.wait_for(clock.wait_until(flag, time.monotonic() + 10), 1)  # still set: at once
    flag.clear()
    assert not flag.is_set()


async def test_a_flag_wakes_every_waiter_and_forgets_them() -> None:
    flag, clock = Flag(), SystemClock()
    waiters = [asyncio.create_task(flag.wait()), asyncio.create_task(clock.wait_until(flag, time.monotonic() + 10))]
    await asyncio.sleep(0.01)
    assert len(flag._waiters) == 2
    flag.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [True, None]
    assert flag._waiters == []


async def test_a_cancelled_wait_leaves_no_waiter_behind() -> None:
    flag, clock = Flag(), SystemClock()
    task = asyncio.create_task(clock.wait_until(flag, time.monotonic() + 0.05))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert flag._waiters == []


@pytest.mark.parametrize("signal", [Flag, asyncio.Event, None], ids=["flag", "event", "sleep"])
def test_waits_never_return_before_their_deadline_on_uvloop_after_a_busy_loop_turn(signal: type | None) -> None:
    """uvloop reads its millisecond clock once per loop turn: a timer set late in a busy turn, or for under a
    millisecond, fired early, and a pacer that woke early waited again, a loop turn each time."""

    async def waits() -> int:
        clock, early = SystemClock(), 0
        for i in range(40):
            busy_until = time.monotonic() + 0.003
            while time.monotonic() < busy_until:  # a busy turn of the loop: its cached clock falls behind
                pass
            deadline = time.monotonic() + 0.0005 + (i % 4) * 0.001
            if signal is None:
                await clock.sleep_until(deadline)
            else:
                await clock.wait_until(signal(), deadline)
            early += time.monotonic() < deadline
        return early

    assert uvloop.run(waits()) == 0


def test_a_loop_whose_clock_is_not_monotonic_does_not_stretch_waits() -> None:
    """``timer_delay`` corrects for the loop's clock falling behind ``time.monotonic()``, but never by more than
    ``MAX_LOOP_CLOCK_LAG_S``: a loop on another clock (virtual time) still wakes a 10 ms wait within a second."""

    class BehindLoop(asyncio.SelectorEventLoop):
        def time(self) -> float:
            return super().time() - 5.0  # seconds behind CLOCK_MONOTONIC

    async def wait() -> float:
        started = time.monotonic()
        await SystemClock().wait_until(Flag(), started + 0.01)  # uncapped, it would wait 5 s
        return time.monotonic() - started

    loop = BehindLoop()
    try:
        assert loop.run_until_complete(wait()) < 1.0
    finally:
        loop.close()


@pytest.mark.parametrize("offset_s", [-5.0, 5.0])
def test_a_timer_on_a_loop_on_another_clock_fires_after_its_deadline_and_within_a_second(offset_s: float) -> None:
    """``call_at`` counts the deadline from the loop's clock as ``timer_delay`` does: a loop clock behind
    ``time.monotonic()`` adds at most ``MAX_LOOP_CLOCK_LAG_S``, one ahead of it takes nothing off."""

    class OtherClockLoop(asyncio.SelectorEventLoop):
        def time(self) -> float:
            return super().time() + offset_s

    async def timer() -> float:
        started = time.monotonic()
        fired = asyncio.get_running_loop().create_future()
        SystemClock().call_at(started + 0.01, lambda: fired.set_result(time.monotonic()))
        return await fired - started

    loop = OtherClockLoop()
    try:
        assert 0.01 <= loop.run_until_complete(timer()) < 1.0
    finally:
        loop.close()


def test_a_timer_runs_its_callback_not_before_its_deadline_unless_called_off() -> None:
    """``call_at``: what ``Inbound`` arms for a frame waiting for its partner, and calls off when it comes."""

    async def timers() -> tuple[list[float], list[str]]:
        clock, late_by, fired = SystemClock(), [], []
        for i in range(20):
            busy_until = time.monotonic() + 0.003
            while time.monotonic() < busy_until:
                pass
            deadline = time.monotonic() + 0.0005 + (i % 4) * 0.001
            done = asyncio.get_running_loop().create_future()
            clock.call_at(deadline, lambda d=deadline, f=done: (late_by.append(time.monotonic() - d), f.set_result(0)))
            clock.call_at(deadline, lambda: fired.append("cancelled one")).cancel()
            await done  # had the other not been called off, it would have run before this (same deadline)
        return late_by, fired

    late_by, fired = uvloop.run(timers())
    assert len(late_by) == 20 and min(late_by) >= 0
    assert fired == []


def test_a_fake_clock_runs_timers_as_it_passes_their_deadlines_in_order() -> None:
    clock, seen = FakeClock(start=0.0), []
    clock.call_at(0.03, lambda: seen.append("30 ms"))
    clock.call_at(0.01, lambda: seen.append("called off")).cancel()
    clock.call_at(0.02, lambda: seen.append("20 ms"))
    clock.advance(0.025)
    assert seen == ["20 ms"]
    clock.advance(0.01)
    assert seen == ["20 ms", "30 ms"]


@pytest.mark.parametrize("clock", [SystemClock(), FakeClock()], ids=["system", "fake"])
async def test_call_soon_runs_once_the_loop_has_run_what_is_ready_unless_called_off(clock: Clock) -> None:
    ran: list[str] = []
    clock.call_soon(lambda: ran.append("soon"))
    clock.call_soon(lambda: ran.append("off")).cancel()
    ran.append("now")
    await asyncio.sleep(0)
    assert ran == ["now", "soon"]


def test_a_fake_clock_with_no_event_loop_runs_call_soon_at_its_next_advance() -> None:
    clock = FakeClock()
    ran: list[str] = []
    clock.call_soon(lambda: ran.append("soon"))
    clock.call_soon(lambda: ran.append("off")).cancel()
    clock.call_at(clock.monotonic() + 0.01, lambda: ran.append("timer"))
    assert ran == []
    clock.advance(0.01)
    assert ran == ["soon", "timer"]


def test_monotonic_of_the_system_clock_is_the_builtin_and_of_another_clock_its_own() -> None:
    """What the compiled frame path calls each frame: for the system clock, ``time.monotonic`` itself."""
    assert monotonic_of(SystemClock()) is time.monotonic
    fake = FakeClock()
    read = monotonic_of(fake)
    before = read()
    fake.advance(2.5)
    assert read() == before + 2.5
