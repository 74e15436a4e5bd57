"""Caller audio to the AI: delivered as it comes; a backlog from before the AI connected at most 2x real time."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator

import numpy as np
import pytest

from telephony_bridge.audio.barge_in import BargeIn, CallerStopped, Event
from telephony_bridge.audio.codec import TWILIO_FRAME_BYTES, pcm16_to_ulaw, ulaw_to_pcm16
from telephony_bridge.clock import FakeClock, Flag
from telephony_bridge.inbound import Inbound
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.settings import AudioSettings, BargeInSettings
from tests.test_vad import speech_8k

SILENCE = bytes([0xFF]) * TWILIO_FRAME_BYTES


class FakeSavants:
    """Records when each frame was sent (a fake peer, shaped like ``SavantsConnection``'s sends). ``takes_now``:
    whether a send can go without waiting (``can_send_now``); ``inline``: how many went that way."""

    def __init__(self, clock: FakeClock, *, takes_now: bool = True) -> None:
        self.clock = clock
        self.sent_at: list[float] = []
        self.takes_now = takes_now
        self.inline = 0

    async def send_audio(self, pcm: bytes) -> bool:
        self.record(pcm)
        return True

    def can_send_now(self) -> bool:
        return self.takes_now

    def send_audio_nowait(self, pcm: bytes) -> None:
        assert self.takes_now
        self.inline += 1
        self.record(pcm)

    def record(self, pcm: bytes) -> None:
        assert len(pcm) == 640
        self.sent_at.append(round(self.clock.monotonic() - 1000.0, 3))


@contextlib.asynccontextmanager
async def sending(inbound: Inbound, savants: FakeSavants) -> AsyncIterator[None]:
    """``inbound.run`` to ``savants`` for the block's length."""
    async with asyncio.timeout(5):
        task = asyncio.create_task(inbound.run(savants))  # type: ignore[arg-type]
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def talk(inbound: Inbound, clock: FakeClock, *, frames: int, quiet_ms: int, first_ts: int = 0) -> int:
    """A caller frame every 20 ms, ``frames`` of them, then ``quiet_ms`` of nothing, the clock moved 5 ms a step;
    returns the next frame's timestamp."""
    for step in range(frames * 4 + quiet_ms // 5):
        await settle()
        if step % 4 == 0 and step < frames * 4:
            inbound.push(first_ts + step // 4 * 20, SILENCE, clock.monotonic(), None)
        await settle()
        clock.advance(0.005)
    return first_ts + frames * 20


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_inbound_backlog_is_caught_up_at_twice_real_time_then_frames_flow_as_they_come() -> None:
    clock = FakeClock(start=1000.0)
    inbound = Inbound(AudioSettings(upstream_message_ms=20), BargeInSettings(enabled=False), Metrics(), clock)
    for i in range(5):  # 100 ms said before the AI was connected
        inbound.push(i * 20, SILENCE, clock.monotonic(), None)
    savants = FakeSavants(clock)
    async with asyncio.timeout(5):
        task = asyncio.create_task(inbound.run(savants))  # type: ignore[arg-type]
        try:
            for step in range(1, 31):  # 150 ms in 5 ms steps, a new caller frame every 20 ms
                await settle()
                clock.advance(0.005)
                if step % 4 == 0:
                    inbound.push(100 + (step // 4 - 1) * 20, SILENCE, clock.monotonic(), None)
                await settle()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    gaps = [round(b - a, 3) for a, b in zip(savants.sent_at, savants.sent_at[1:], strict=False)]
    assert savants.sent_at[0] == 0.0
    assert min(gaps) >= 0.01  # never faster than twice real time
    assert inbound.frames_to_ai == len(savants.sent_at) == 12  # the 5 of the backlog and the 7 that came
    assert savants.sent_at[-1] <= 0.145  # caught up: the last frame went within 5 ms of its arrival


async def test_inbound_counts_a_sender_that_stops_sending_as_silent_so_the_hold_ends() -> None:
    """A client that sends media only while its caller talks: ``watch_idle`` turns the quiet into silence."""
    clock = FakeClock(start=1000.0)
    inbound = Inbound(AudioSettings(), BargeInSettings(), Metrics(), clock)
    ai_since = 999.0  # the AI has been audible for a second
    events: list[Event] = []
    speech = pcm16_to_ulaw(speech_8k())
    for i in range(40):  # 0.8 s of the caller talking over the AI, then nothing at all
        clock.advance(0.02)
        events += inbound.push(None, speech[i * 160 : (i + 1) * 160], clock.monotonic(), ai_since)
    assert [type(e) for e in events] == [BargeIn]
    last_frame_at = clock.monotonic()
    async with asyncio.timeout(5):
        task = asyncio.create_task(inbound.watch_idle(events.extend, lambda now: ai_since))
        try:
            while len(events) < 2 and clock.monotonic() < last_frame_at + 2.0:
                await settle()
                clock.advance(0.01)
        finally:
            task.cancel()
    assert [type(e) for e in events] == [BargeIn, CallerStopped]
    assert last_frame_at < events[1].at_s <= last_frame_at + 0.5 + 0.1 + 0.02  # type: ignore[union-attr]
    assert inbound.quirks == {"no_timestamps"}


class SizedSavants(FakeSavants):
    """Also accepts joined messages, recording their sizes."""

    def __init__(self, clock: FakeClock, *, takes_now: bool = True) -> None:
        super().__init__(clock, takes_now=takes_now)
        self.sizes: list[int] = []

    def record(self, pcm: bytes) -> None:
        self.sizes.append(len(pcm))
        self.sent_at.append(round(self.clock.monotonic() - 1000.0, 3))


@pytest.mark.parametrize("takes_now", [True, False])
async def test_inbound_joins_two_frames_a_message_when_asked_and_sends_a_lone_one_after_its_wait(
    takes_now: bool,
) -> None:
    clock = FakeClock(start=1000.0)
    inbound = Inbound(AudioSettings(upstream_message_ms=40), BargeInSettings(enabled=False), Metrics(), clock)
    savants = SizedSavants(clock, takes_now=takes_now)
    async with sending(inbound, savants):
        await talk(inbound, clock, frames=5, quiet_ms=100)
    # Frames at 0, 20, 40, 60, 80 ms: two joined messages as each second frame arrives, then the fifth alone
    # once it has waited a frame and the margin for company that never came. The same whether the joined ones
    # go from the frame's arrival (a session that takes them at once) or from ``run``.
    assert savants.sizes == [1280, 1280, 640]
    assert savants.sent_at == [0.02, 0.06, 0.105]
    assert inbound.frames_to_ai == 5
    assert savants.inline == (2 if takes_now else 0)  # the lone one is ``run``'s: its timer woke it


async def test_inbound_sets_no_deadline_for_a_frame_whose_partner_comes_in_the_same_read() -> None:
    """Twilio's frames are read in pairs: the first of a pair waits for the second within one socket callback, so
    its lone-frame deadline is never set (the partner calls off the ``call_soon`` that would set it). A frame
    still alone once the read is over gets its deadline, and goes alone when that comes."""
    clock = FakeClock(start=1000.0)
    inbound = Inbound(AudioSettings(upstream_message_ms=40), BargeInSettings(enabled=False), Metrics(), clock)
    savants = SizedSavants(clock)
    async with sending(inbound, savants):
        await settle()
        for pair in range(3):  # one read each, as picows hands a read's frames over in one callback
            inbound.push(pair * 40, SILENCE, clock.monotonic(), None)
            inbound.push(pair * 40 + 20, SILENCE, clock.monotonic(), None)
            await settle()
            assert not clock._timers  # no deadline set, none left to drop
            clock.advance(0.04)
        assert savants.sizes == [1280] * 3 and savants.inline == 3
        inbound.push(120, SILENCE, clock.monotonic(), None)  # alone in its read
        await settle()
        assert len(clock._timers) == 1
        clock.advance(0.024)  # its wait: a frame for the partner and a margin (``_complete_by``)
        await settle()
        assert savants.sizes == [1280] * 3
        clock.advance(0.001)
        await settle()
    assert savants.sizes == [1280] * 3 + [640]


async def test_inbound_steady_talk_goes_from_the_frames_arrival_with_run_asleep() -> None:
    """A caller talking in real time: every message is sent by ``push`` as its second frame arrives, and
    ``run`` is not woken once after its first wait (no task switch per message)."""
    clock = FakeClock(start=1000.0)
    inbound = Inbound(AudioSettings(upstream_message_ms=40), BargeInSettings(enabled=False), Metrics(), clock)
    savants = SizedSavants(clock)
    inbound._ready = ready = CountedFlag()
    async with sending(inbound, savants):
        await talk(inbound, clock, frames=50, quiet_ms=0)
    assert savants.sizes == [1280] * 25 and savants.inline == 25
    # Parked once and never woken: each message's first frame armed a timer that its partner called off.
    assert ready.waits == 1


class CountedFlag(Flag):
    """Counts the waits on it: each is a park of ``run``, and a wake-up when it ends."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    async def wait(self) -> bool:
        self.waits += 1
        return await super().wait()


async def test_inbound_a_burst_after_steady_talk_still_goes_at_most_twice_real_time() -> None:
    """Twilio sends a frame every 20 ms for the whole call, so ``run`` never idles: a burst late in the call (the
    caller's network stalled, then delivered 400 ms at once) must still be paced, not sent on credit saved up
    while messages went every 40 ms."""
    clock = FakeClock(start=1000.0)
    inbound = Inbound(AudioSettings(upstream_message_ms=40), BargeInSettings(enabled=False), Metrics(), clock)
    savants = SizedSavants(clock)
    async with sending(inbound, savants):
        ts = await talk(inbound, clock, frames=100, quiet_ms=0)  # 2 s of steady talk
        burst_at = round(clock.monotonic() - 1000.0, 3)
        for i in range(20):  # 400 ms at once
            inbound.push(ts + i * 20, SILENCE, clock.monotonic(), None)
        await talk(inbound, clock, frames=0, quiet_ms=400)
    burst = [at for at in savants.sent_at if at >= burst_at]
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(burst)]
    assert sum(n for n, at in zip(savants.sizes, savants.sent_at, strict=True) if at >= burst_at) == 20 * 640
    assert min(gaps) >= 0.02  # 40 ms messages, never faster than twice real time
    assert inbound.frames_to_ai == 100 + 20


async def test_inbound_with_no_reconnect_buffer_still_sends_every_frame_in_40_ms_messages() -> None:
    """``audio.reconnect_buffer_ms: 0`` keeps no audio for a reconnect, but a message is two frames: the first
    must wait for the second rather than be dropped as overflow when it comes."""
    clock = FakeClock(start=1000.0)
    audio = AudioSettings(upstream_message_ms=40, reconnect_buffer_ms=0)
    inbound = Inbound(audio, BargeInSettings(enabled=False), Metrics(), clock)
    inbound.limit_backlog(audio.reconnect_buffer_ms)  # as ``AiSide`` does once connected
    savants = SizedSavants(clock)
    async with sending(inbound, savants):
        await talk(inbound, clock, frames=10, quiet_ms=200)
    assert inbound.dropped_overflow == 0
    assert inbound.frames_to_ai == 10 and savants.sizes == [1280] * 5


class RecordingSavants(SizedSavants):
    """Also keeps what was sent, to read the frames back in order."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.audio = bytearray()

    def record(self, pcm: bytes) -> None:
        super().record(pcm)
        self.audio += pcm


def frame_marks(audio: bytes) -> list[int]:
    """Each 20 ms frame's value mid-frame: frames of one repeated μ-law code come back as that code's level
    there (the filter passes a constant exactly, and its reach, 37 samples, stays inside the frame)."""
    samples = np.frombuffer(bytes(audio), dtype="<i2")
    return [int(samples[i + 200]) for i in range(0, len(samples) - 319, 320)]


class NumberedCaller:
    """Pushes numbered frames, a distinct μ-law code each, 20 ms of timestamp apart; ``marks`` is what
    ``frame_marks`` should read back from them."""

    CODES = tuple(c for c in range(1, 120) if c != 0x7F)  # 0x7F and 0xFF both decode to 0

    def __init__(self, inbound: Inbound, clock: FakeClock) -> None:
        self.inbound = inbound
        self.clock = clock
        self.pushed = 0

    def push(self, count: int) -> None:
        for _ in range(count):
            code = self.CODES[self.pushed]
            self.inbound.push(self.pushed * 20, bytes([code]) * TWILIO_FRAME_BYTES, self.clock.monotonic(), None)
            self.pushed += 1

    def marks(self, first: int = 0) -> list[int]:
        """Of the frames pushed, from number ``first`` on."""
        return [int(ulaw_to_pcm16(bytes([code]))[0]) for code in self.CODES[first : self.pushed]]


async def test_inbound_keeps_frame_order_through_bursts_stalls_quiet_and_a_restart() -> None:
    """Numbered frames (a distinct μ-law code each) through every path: before the session (a backlog), steady
    talk sent from ``push``, a send buffer that will not take more (``run`` waits), a burst, a quiet spell and
    ``run`` restarted with a lone frame waiting (a reconnect): every frame arrives once, in order, and no burst
    ever goes faster than twice real time."""
    clock = FakeClock(start=1000.0)
    inbound = Inbound(AudioSettings(upstream_message_ms=40), BargeInSettings(enabled=False), Metrics(), clock)
    savants = RecordingSavants(clock)
    caller = NumberedCaller(inbound, clock)
    push = caller.push

    async def steady(frames: int, quiet_ms: int = 0) -> None:
        for step in range(frames * 4 + quiet_ms // 5):
            await settle()
            if step % 4 == 0 and step < frames * 4:
                push(1)
            await settle()
            clock.advance(0.005)

    push(5)  # before the AI connected: an odd backlog, so ``run`` parks with a first frame waiting alone
    async with sending(inbound, savants):
        await steady(10)
        savants.takes_now = False  # Savants reads slowly: ``run`` must send, waiting its turn
        await steady(6)
        savants.takes_now = True
        await steady(0, quiet_ms=3000)  # the caller sends nothing for 3 s
        savants.takes_now = False
        burst_at = round(clock.monotonic() - 1000.0, 3)
        push(20)  # then 400 ms at once, to a send buffer that is full
        await steady(0, quiet_ms=20)
        savants.takes_now = True
        await steady(0, quiet_ms=600)
        push(1)  # a first frame, then the session drops before its partner comes
    async with sending(inbound, savants):  # a reconnect: the waiting frame goes first
        await steady(7, quiet_ms=200)
    assert frame_marks(savants.audio) == caller.marks()
    assert inbound.frames_to_ai == caller.pushed == 49
    burst = [at for at in savants.sent_at if at >= burst_at]
    assert len(burst) >= 10 and min(round(b - a, 3) for a, b in itertools.pairwise(burst)) >= 0.02
