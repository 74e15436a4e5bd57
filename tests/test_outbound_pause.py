"""The pacer and a real-time AI: its frames go out from the push (``Outbound._send_inline``) while the pacer
sleeps until the AI pauses, a deadline every push moves later; the pause is still marked on time."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest

from telephony_bridge.clock import FakeClock
from telephony_bridge.outbound import Outbound
from telephony_bridge.settings import AudioSettings
from telephony_bridge.twilio.outbound_messages import OutMark
from tests.test_outbound import EPS, FRAME_S, STEP_S, TIMEOUT_S, TwilioJson, advance, running, tone

PREBUFFER_S = 0.040
# one frame a message (so each frame can go at once) and no mark due within the second of audio below
REAL_TIME = AudioSettings(
    outbound_batch_ms=20,
    adaptive_prebuffer=False,
    mark_interval_ms=2000,
    playout_prebuffer_ms=round(1000 * PREBUFFER_S),
)


def counting(wait: Callable[..., Awaitable[None]], count: list[int]) -> Callable[..., Awaitable[None]]:
    async def counted(*args: object) -> None:
        count[0] += 1
        await wait(*args)

    return counted


async def test_a_real_time_ais_frames_do_not_wake_the_pacer_and_its_pause_is_marked_on_time() -> None:
    async with asyncio.timeout(TIMEOUT_S), running(REAL_TIME) as line:
        outbound, sleeps = line.outbound, [0]
        outbound._wait = counting(outbound._wait, sleeps)  # type: ignore[method-assign]
        outbound._wait_for_pause = counting(outbound._wait_for_pause, sleeps)  # type: ignore[method-assign]
        audio = tone(20)
        for _ in range(50):  # a second of a real-time AI
            outbound.push(audio)
            await advance(line.clock, FRAME_S)
        last_push_at = line.clock.monotonic() - FRAME_S
        assert sum(len(payload) for _, payload in line.media()) == 50 * len(audio)  # every frame out
        # the pacer slept through the second: once for the spurt's start, then until the pause (was: 50 times,
        # woken at each pause deadline to find that the AI had pushed since)
        assert sleeps[0] <= 3
        await advance(line.clock, 0.100)
        [mark_at] = [at for at, event in line.events() if isinstance(event, OutMark)]
        assert last_push_at + PREBUFFER_S - EPS <= mark_at <= last_push_at + PREBUFFER_S + 2 * STEP_S + EPS


@pytest.mark.parametrize("how", ["cancelled", "barge-in"])
async def test_the_pause_timer_does_not_outlive_the_wait_for_the_pause(how: str) -> None:
    """The timer re-arms itself from its callback while the AI talks. Cancelled at the call's end, the pacer
    calls off the timer armed last; after a barge-in it waits out the pause once more and then sleeps with
    no timer (nothing is owed: the clear dropped the queue and the unmarked audio)."""
    clock, sent = FakeClock(), []
    outbound = Outbound(REAL_TIME, clock, TwilioJson(clock, sent, yield_in_send=False))
    task = asyncio.create_task(outbound.run())
    try:
        async with asyncio.timeout(TIMEOUT_S):
            for _ in range(10):  # past the first pause deadline: the timer has re-armed itself
                outbound.push(tone(20))
                await advance(clock, FRAME_S)
            assert outbound._pause_timer is not None
            if how == "cancelled":
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                assert outbound._pause_timer is None
            else:
                outbound.interrupt()
            sent_before = len(sent)
            outbound._ready.clear()
            await advance(clock, 1.0)  # far past the pause
            assert outbound._pause_timer is None and not outbound._ready.is_set()  # a stray timer would set it
            assert len(sent) == sent_before + (how == "barge-in")  # the clear, and nothing after it
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
