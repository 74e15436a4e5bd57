"""Outbound: AI audio paced to Twilio from a fake clock, marked, padded, and cut on barge-in.

Each test runs ``Outbound.run()`` as a task against a ``FakeClock`` and a fake ``send`` that records what
Twilio would receive, and reads it back with the strict ``parse_outbound``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
import pytest

from telephony_bridge.audio.codec import TWILIO_BYTES_PER_MS, TWILIO_FRAME_BYTES, ULAW_SILENCE, pcm16_to_ulaw
from telephony_bridge.audio.comfort import ComfortFill
from telephony_bridge.audio.pipeline import AiToCaller
from telephony_bridge.clock import FakeClock
from telephony_bridge.outbound import Outbound
from telephony_bridge.settings import AudioSettings
from telephony_bridge.twilio.outbound_messages import (
    OutboundEvent,
    OutClear,
    OutMark,
    OutMedia,
    clear_message,
    mark_message,
    media_message,
    parse_outbound,
)
from telephony_bridge.twilio.protocol import Malformed

STREAM_SID = "MZ00000000000000000000000000000001"
FRAME = TWILIO_FRAME_BYTES
FRAME_S = 0.020
LEAD_S = 0.100  # the default lead; the prebuffer and mark interval below are UNBATCHED's, not the defaults
PREBUFFER_S = 0.040
MARK_EVERY_MS = 100
STEP_S = 0.001
EPS = 1e-6
TIMEOUT_S = 5
# One message per frame and a fixed prebuffer: the pacing these tests pin down frame by frame. Batching and
# the adaptive prebuffer build on it and have their own tests below.
UNBATCHED = AudioSettings(outbound_batch_ms=20, adaptive_prebuffer=False, mark_interval_ms=100, playout_prebuffer_ms=40)
# Three frames a message from a 40 ms prebuffer: the batching tests below pin down this shape.
BATCHED = AudioSettings(outbound_batch_ms=60, playout_prebuffer_ms=40)


def tone(ms: int, *, dbfs: float = -20.0, freq_hz: float = 1000.0) -> bytes:
    """A μ-law sine tone, ``ms`` long."""
    n = np.arange(ms * TWILIO_BYTES_PER_MS)
    amplitude = 32767 * 10 ** (dbfs / 20)
    return pcm16_to_ulaw(np.round(amplitude * np.sin(2 * np.pi * freq_hz * n / 8000)).astype(np.int16))


def silence(ms: int) -> bytes:
    return bytes([ULAW_SILENCE]) * (ms * TWILIO_BYTES_PER_MS)


async def settle() -> None:
    """Let the pacer go as far as it can at the current time: waking from a clock sleeper takes a few loop turns."""
    for _ in range(10):
        await asyncio.sleep(0)


async def advance(clock: FakeClock, seconds: float, step: float = STEP_S) -> None:
    """Move the clock forward ``step`` at a time, letting the pacer run after each step.

    Step targets are absolute, so float error does not build up over thousands of steps.
    """
    await settle()  # whatever was pushed at the current time goes first
    start = clock.monotonic()
    for i in range(1, round(seconds / step) + 1):
        clock.advance(start + i * step - clock.monotonic())
        await settle()


@dataclass
class Line:
    """What one test drives and observes: the clock, the ``Outbound`` and every message it sent."""

    clock: FakeClock
    outbound: Outbound
    sent: list[tuple[float, str]]
    t0: float
    _parsed: list[tuple[float, OutboundEvent]] = field(default_factory=list)

    def events(self) -> list[tuple[float, OutboundEvent]]:
        """Every message as Twilio reads it, with the time it was sent; none may be malformed."""
        for at, text in self.sent[len(self._parsed) :]:
            event = parse_outbound(text, STREAM_SID)
            assert not isinstance(event, Malformed), event.reason
            self._parsed.append((at, event))
        return list(self._parsed)

    def media(self) -> list[tuple[float, bytes]]:
        return [(at, e.payload) for at, e in self.events() if isinstance(e, OutMedia)]

    def sent_s(self) -> float:
        """Seconds of audio handed to Twilio so far."""
        return sum(len(payload) for _, payload in self.media()) / 8000

    def elapsed(self) -> float:
        return self.clock.monotonic() - self.t0


@dataclass
class TwilioJson:
    """A leg's sending half that records what Twilio would receive, serialised as the Twilio leg does."""

    clock: FakeClock
    sent: list[tuple[float, str]]
    yield_in_send: bool

    async def _send(self, text: str) -> None:
        self.sent.append((self.clock.monotonic(), text))
        if self.yield_in_send:  # a real socket may suspend mid-send
            await asyncio.sleep(0)

    async def send_audio(self, ulaw: bytes) -> None:
        await self._send(media_message(STREAM_SID, ulaw))

    def can_send_now(self) -> bool:
        return not self.yield_in_send  # a socket that may suspend mid-send takes nothing synchronously

    def send_audio_nowait(self, ulaw: bytes) -> None:
        self.sent.append((self.clock.monotonic(), media_message(STREAM_SID, ulaw)))

    async def send_mark(self, name: str) -> None:
        await self._send(mark_message(STREAM_SID, name))

    async def clear(self) -> None:
        await self._send(clear_message(STREAM_SID))


@contextlib.asynccontextmanager
async def running(
    settings: AudioSettings | None = None, *, yield_in_send: bool = False, clock: FakeClock | None = None
) -> AsyncIterator[Line]:
    """Start ``Outbound.run()`` on a fake clock; cancel and await it on the way out (a crash in it surfaces)."""
    clock = clock or FakeClock()
    sent: list[tuple[float, str]] = []

    outbound = Outbound(settings or UNBATCHED, clock, TwilioJson(clock, sent, yield_in_send))
    task = asyncio.create_task(outbound.run())
    await settle()
    try:
        yield Line(clock, outbound, sent, clock.monotonic())
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await settle()  # let the waiters run() cancelled finish


def assert_whole_frames(line: Line) -> None:
    sizes = [len(payload) for _, payload in line.media()]
    assert [s for s in sizes if s == 0 or s % FRAME] == []


# --- the first frame of a talk spurt ------------------------------------------------------------------------


async def test_outbound_single_frame_waits_for_the_prebuffer() -> None:
    async with asyncio.timeout(TIMEOUT_S), running() as line:
        audio = tone(20)
        line.outbound.push(audio)
        await advance(line.clock, PREBUFFER_S - 0.002)
        assert line.sent == []
        await advance(line.clock, 0.004)
        [(at, payload)] = line.media()
        assert payload == audio
        assert line.t0 + PREBUFFER_S - EPS <= at <= line.t0 + PREBUFFER_S + STEP_S + EPS


async def test_outbound_second_frame_within_the_prebuffer_releases_both() -> None:
    async with asyncio.timeout(TIMEOUT_S), running() as line:
        audio = tone(40)
        line.outbound.push(audio[:FRAME])
        await advance(line.clock, 0.020)
        assert line.sent == []
        line.outbound.push(audio[FRAME:])
        await settle()
        assert [(round(at - line.t0, 6), payload) for at, payload in line.media()] == [(0.020, audio)]


async def test_outbound_two_queued_frames_go_at_once() -> None:
    async with asyncio.timeout(TIMEOUT_S), running() as line:
        audio = tone(40)
        line.outbound.push(audio)
        await settle()
        assert line.media() == [(line.t0, audio)]
        assert line.outbound.first_audio_at == line.t0


async def test_outbound_without_a_prebuffer_a_single_frame_goes_at_once() -> None:
    async with asyncio.timeout(TIMEOUT_S), running(AudioSettings(playout_prebuffer_ms=0)) as line:
        audio = tone(20)
        line.outbound.push(audio)
        await settle()
        assert line.media() == [(line.t0, audio)]


async def test_outbound_prebuffer_shorter_than_two_frames_still_waits() -> None:
    async with asyncio.timeout(TIMEOUT_S), running(AudioSettings(playout_prebuffer_ms=30)) as line:
        line.outbound.push(tone(20))
        await advance(line.clock, 0.020)
        assert line.sent == []
        await advance(line.clock, 0.012)
        assert len(line.media()) == 1


# --- pacing -------------------------------------------------------------------------------------------------


async def test_outbound_real_time_pushes_go_out_one_frame_per_20_ms() -> None:
    async with asyncio.timeout(TIMEOUT_S), running() as line:
        audio = tone(1000)
        leads: list[float] = []
        for k in range(50):
            line.outbound.push(audio[k * FRAME : (k + 1) * FRAME])
            await settle()
            media = line.media()
            if media:
                leads.append(line.sent_s() - (line.clock.monotonic() - media[0][0]))
            await advance(line.clock, FRAME_S)
        media = line.media()
        # The first frame waits for the second (prebuffer); after that, one frame per push, on time.
        assert [(round(at - line.t0, 6), len(p)) for at, p in media[:2]] == [(0.020, 2 * FRAME), (0.040, FRAME)]
        gaps = [round(b[0] - a[0], 6) for a, b in itertools.pairwise(media[1:])]
        assert gaps == [FRAME_S] * 47
        assert {len(p) for _, p in media[1:]} == {FRAME}
        assert b"".join(p for _, p in media) == audio
        assert max(leads) <= LEAD_S + EPS


async def bulk_push_within_the_lead(settings: AudioSettings, batch_frames: int) -> tuple[list[int], float]:
    """Push 2 s at once and step the clock 1 ms at a time until it is all sent, checking the lead at each
    step: never above it, and while a batch is queued never below it less a batch (plus a step of clock
    granularity); a last part batch at least a frame. Returns the sizes of the media messages and the time the
    last one went."""
    async with asyncio.timeout(TIMEOUT_S), running(settings) as line:
        audio = tone(2000)
        line.outbound.push(audio)
        await settle()
        while line.sent_s() < 2.0 - EPS:
            t, sent = line.elapsed(), line.sent_s()
            assert sent <= t + LEAD_S + EPS
            whole_batch = 2.0 - sent >= batch_frames * FRAME_S - EPS
            floor_s = LEAD_S - batch_frames * FRAME_S if whole_batch else FRAME_S
            assert sent >= t + floor_s - STEP_S - EPS
            await advance(line.clock, STEP_S)
        assert b"".join(p for _, p in line.media()) == audio
        assert line.outbound.playback.sent_ms == 2000
        return [len(p) for _, p in line.media()], line.elapsed()


async def test_outbound_bulk_push_goes_out_at_real_time_within_the_lead() -> None:
    # Unbatched, queued audio keeps Twilio's buffer full to within a frame.
    sizes, done_s = await bulk_push_within_the_lead(UNBATCHED, batch_frames=1)
    assert 1.9 - EPS <= done_s <= 1.9 + STEP_S + EPS
    assert sizes == [5 * FRAME] + [FRAME] * 95


async def test_outbound_late_tick_refills_to_the_lead_without_a_burst() -> None:
    async with asyncio.timeout(TIMEOUT_S), running() as line:
        line.outbound.push(tone(2000))
        await settle()
        line.clock.advance(0.300)  # the pacer oversleeps: Twilio's buffer ran dry 200 ms ago
        await settle()
        media = line.media()
        assert [(round(at - line.t0, 6), len(p)) for at, p in media] == [(0.0, 5 * FRAME), (0.3, 5 * FRAME)]
        assert abs(line.outbound.lead(line.clock.monotonic()) - LEAD_S) < EPS
        before = len(media)
        await advance(line.clock, 0.100)
        later = line.media()[before:]
        assert len(later) == 5
        assert {len(p) for _, p in later} == {FRAME}
        assert line.sent_s() <= line.elapsed() + LEAD_S + EPS


# --- whole frames and padding -------------------------------------------------------------------------------


async def test_outbound_trailing_partial_frame_is_padded_with_silence() -> None:
    async with asyncio.timeout(TIMEOUT_S), running() as line:
        audio = tone(20) + tone(20)[:100]
        line.outbound.push(audio)
        await advance(line.clock, 0.200)
        media = line.media()
        assert [p for _, p in media] == [audio[:FRAME], audio[FRAME:] + bytes([ULAW_SILENCE]) * 60]
        # The one frame waits out the prebuffer; the tail goes with it, since nothing more came meanwhile.
        assert [round(at - line.t0, 3) for at, _ in media] == [0.040, 0.040]


async def test_outbound_chunked_pushes_come_out_whole_and_in_order() -> None:
    rng = random.Random(20240115)
    async with asyncio.timeout(TIMEOUT_S), running() as line:
        pushed = bytearray()
        audio = tone(1000)
        while len(pushed) < len(audio):  # about 5x real time, in ragged chunks
            chunk = audio[len(pushed) : len(pushed) + rng.randint(1, 400)]
            line.outbound.push(chunk)
            pushed += chunk
            await advance(line.clock, 0.005)
        await advance(line.clock, 1.2)
        assert_whole_frames(line)
        out = b"".join(p for _, p in line.media())
        assert out == audio  # 8000 bytes: 50 whole frames, no padding anywhere
        line.outbound.push(audio[:1234])
        await advance(line.clock, 0.5)
        assert_whole_frames(line)
        assert b"".join(p for _, p in line.media()) == audio + audio[:1234] + bytes([ULAW_SILENCE]) * (1280 - 1234)


# --- marks ----------------------------------------------------------------------------------------------------


async def test_outbound_marks_every_100_ms_of_audio_and_when_the_queue_empties() -> None:
    async with asyncio.timeout(TIMEOUT_S), running() as line:
        line.outbound.push(tone(1000))
        await advance(line.clock, 1.0)
        shape: list[int | str] = []
        for _, event in line.events():
            if isinstance(event, OutMedia):
                shape.append(len(event.payload) // FRAME * 20)
            else:
                assert isinstance(event, OutMark)
                shape.append("mark")
        assert shape == [100, "mark"] + [20, 20, 20, 20, 20, "mark"] * 9
        names = [e.name for _, e in line.events() if isinstance(e, OutMark)]
        assert len(set(names)) == len(names) == 10
        assert line.outbound.playback.pending_marks == 10


async def test_outbound_by_default_sends_40_ms_a_message_and_a_mark_every_500_ms() -> None:
    """The defaults keep the sends to Twilio few: a message per 40 ms batch, a mark per 500 ms of audio and
    one when the queue empties."""
    async with asyncio.timeout(TIMEOUT_S), running(AudioSettings()) as line:
        line.outbound.push(tone(1200))
        await advance(line.clock, 2.0)
        media = [e for _, e in line.events() if isinstance(e, OutMedia)]
        marks = [e for _, e in line.events() if isinstance(e, OutMark)]
        assert b"".join(m.payload for m in media) == tone(1200)
        assert len(media) <= 1200 // 40 + 1  # the first message carries the prebuffer, then whole batches
        assert len(marks) == 3  # after 500 and 1000 ms of audio, and when the queue emptied


async def test_outbound_marks_a_queue_that_empties_mid_interval() -> None:
    async with asyncio.timeout(TIMEOUT_S), running() as line:
        line.outbound.push(tone(60))
        await advance(line.clock, 0.2)
        line.outbound.push(tone(40))
        await advance(line.clock, 0.2)
        kinds = [type(e).__name__ for _, e in line.events()]
        assert kinds == ["OutMedia", "OutMark", "OutMedia", "OutMark"]  # 60 ms and 40 ms, each marked at its end
        names = [e.name for _, e in line.events() if isinstance(e, OutMark)]
        assert len(set(names)) == 2


async def test_outbound_mark_echoes_feed_playback() -> None:
    async with asyncio.timeout(TIMEOUT_S), running() as line:
        line.outbound.push(tone(300))
        await advance(line.clock, 0.4)
        names = [e.name for _, e in line.events() if isinstance(e, OutMark)]
        line.outbound.mark_echoed(names[0])
        assert (line.outbound.playback.sent_ms, line.outbound.playback.played_ms) == (300, 100)
        for name in names[1:]:
            line.outbound.mark_echoed(name)
        line.outbound.mark_echoed("not-ours")
        playback = line.outbound.playback
        assert (playback.played_ms, playback.pending_marks, playback.unknown_marks) == (300, 0, 1)


# --- barge-in -------------------------------------------------------------------------------------------------


async def test_outbound_interrupt_clears_drops_holds_and_resumes() -> None:
    async with asyncio.timeout(TIMEOUT_S), running() as line:
        line.outbound.push(tone(2000))
        await advance(line.clock, 0.200)
        line.outbound.interrupt()
        await advance(line.clock, STEP_S)
        events = line.events()
        clear_at = [i for i, (_, e) in enumerate(events) if isinstance(e, OutClear)]
        assert clear_at == [len(events) - 1]
        assert events[-1][0] - line.t0 <= 0.200 + STEP_S + EPS
        sent_before = line.sent_s()

        line.outbound.push(tone(500))  # the caller holds the floor: dropped, counted
        await advance(line.clock, 0.300)
        assert line.events()[clear_at[0] :] == [events[-1]]
        assert line.outbound.held_ms == 500
        assert line.outbound.clears == 1
        assert abs(sent_before - 0.200 - LEAD_S) < EPS  # 1.7 s of queued audio never went out

        line.outbound.resume()
        fresh = silence(20) + tone(20)
        line.outbound.push(fresh)
        await settle()
        after = line.events()[clear_at[0] + 1 :]
        assert [e for _, e in after if isinstance(e, OutMedia)] == [OutMedia(fresh)]
        assert line.outbound.clears == 1
        assert line.outbound.held_ms == 500


async def test_outbound_held_ms_counts_ragged_pushes_exactly() -> None:
    async with asyncio.timeout(TIMEOUT_S), running() as line:
        line.outbound.interrupt()
        for _ in range(10):
            line.outbound.push(tone(20)[:100])
        assert line.outbound.held_ms == 125


async def test_outbound_interrupt_during_a_send_sends_no_audio_after_the_clear() -> None:
    async with asyncio.timeout(TIMEOUT_S), running(yield_in_send=True) as line:
        line.outbound.push(tone(2000))
        await advance(line.clock, 0.100)
        before = len(line.sent)
        line.clock.advance(0.020)
        for _ in range(10):  # until run() is suspended inside send(media)
            await asyncio.sleep(0)
            if len(line.sent) > before:
                break
        assert isinstance(line.events()[-1][1], OutMedia)
        line.outbound.interrupt()
        await advance(line.clock, 0.100)
        kinds = [type(e).__name__ for _, e in line.events()[before:]]
        assert kinds == ["OutMedia", "OutClear"]  # cut before the next mark was due
        assert line.outbound.clears == 1


async def test_outbound_clear_moves_unplayed_audio_to_discarded() -> None:
    async with asyncio.timeout(TIMEOUT_S), running() as line:
        line.outbound.push(tone(1000))
        await advance(line.clock, 0.100)
        first_mark = next(e.name for _, e in line.events() if isinstance(e, OutMark))
        line.outbound.mark_echoed(first_mark)
        line.outbound.interrupt()
        await settle()
        playback = line.outbound.playback
        assert (playback.sent_ms, playback.played_ms, playback.discarded_ms) == (200, 100, 100)
        assert line.outbound.lead(line.clock.monotonic()) == 0


# --- audibility -----------------------------------------------------------------------------------------------


async def test_outbound_audible_since_marks_the_start_of_a_tone_and_expires_after_the_gap() -> None:
    async with asyncio.timeout(TIMEOUT_S), running() as line:
        assert line.outbound.audible_since(line.clock.monotonic()) is None
        line.outbound.push(tone(200))
        await settle()
        assert line.outbound.audible_since(line.clock.monotonic()) == line.t0
        await advance(line.clock, 0.490)  # the tone plays until t0 + 0.2; the spurt lasts 0.3 s beyond
        assert line.outbound.audible_since(line.clock.monotonic()) == line.t0
        await advance(line.clock, 0.020)
        assert line.outbound.audible_since(line.clock.monotonic()) is None


async def test_outbound_audible_since_is_when_the_tone_plays_not_when_it_was_sent() -> None:
    async with asyncio.timeout(TIMEOUT_S), running() as line:
        line.outbound.push(silence(100) + tone(200))
        await advance(line.clock, 0.100)
        since = line.outbound.audible_since(line.clock.monotonic())
        assert since is not None
        assert abs(since - (line.t0 + 0.100)) < EPS


async def test_outbound_audible_since_is_none_while_the_first_audible_frame_is_still_queued_at_twilio() -> None:
    """Sent is not heard: the spurt starts when its first audible frame plays at the caller."""
    async with asyncio.timeout(TIMEOUT_S), running() as line:
        line.outbound.push(silence(60) + tone(100))
        await settle()
        assert line.outbound.audible_since(line.clock.monotonic()) is None
        await advance(line.clock, 0.070)
        assert line.outbound.audible_since(line.clock.monotonic()) == pytest.approx(line.t0 + 0.060, abs=EPS)


async def test_outbound_silence_starts_no_spurt() -> None:
    async with asyncio.timeout(TIMEOUT_S), running() as line:
        line.outbound.push(silence(500) + tone(200, dbfs=-60))  # -60 dBFS: below the audible floor
        for _ in range(35):
            await advance(line.clock, 0.020)
            assert line.outbound.audible_since(line.clock.monotonic()) is None
        assert line.sent_s() == 0.7


async def test_outbound_short_pause_continues_a_spurt_and_a_long_one_starts_another() -> None:
    async with asyncio.timeout(TIMEOUT_S), running() as line:
        line.outbound.push(tone(100) + silence(200) + tone(100) + silence(400) + tone(100))
        await advance(line.clock, 0.380)
        assert line.outbound.audible_since(line.clock.monotonic()) == line.t0
        await advance(line.clock, 0.500)
        since = line.outbound.audible_since(line.clock.monotonic())
        assert since is not None
        assert abs(since - (line.t0 + 0.800)) < EPS


async def test_outbound_interrupt_makes_the_ai_inaudible() -> None:
    async with asyncio.timeout(TIMEOUT_S), running() as line:
        line.outbound.push(tone(1000))
        await advance(line.clock, 0.100)
        assert line.outbound.audible_since(line.clock.monotonic()) == line.t0
        line.outbound.interrupt()
        await settle()
        assert line.outbound.audible_since(line.clock.monotonic()) is None


# --- batching and the adaptive prebuffer (the defaults) -----------------------------------------------------


async def test_outbound_batches_queued_audio_three_frames_a_message_within_the_lead() -> None:
    # Twilio's buffer is refilled a batch (60 ms) at a time, so while a batch is queued it holds at least the
    # lead less a batch; a last part batch goes once Twilio is down to 20 ms, never later.
    sizes, done_s = await bulk_push_within_the_lead(BATCHED, batch_frames=3)
    assert 1.94 - EPS <= done_s <= 1.94 + STEP_S + EPS  # the last part batch went with 20 ms left to play
    assert sizes == [5 * FRAME] + [3 * FRAME] * 31 + [2 * FRAME]


async def test_outbound_real_time_ai_with_a_100_ms_prebuffer_goes_three_frames_a_message_without_a_gap() -> None:
    # A real-time AI keeps the lead the prebuffer gave it; a frame is held only while Twilio has more than
    # 20 ms left, so whole 60 ms batches need a lead of 60 ms above that.
    settings = AudioSettings(playout_prebuffer_ms=100, outbound_batch_ms=60)
    async with asyncio.timeout(TIMEOUT_S), running(settings) as line:
        for _ in range(100):  # the AI speaks in real time: a frame every 20 ms
            line.outbound.push(tone(20))
            await advance(line.clock, FRAME_S)
            if line.sent_s():
                assert line.outbound.lead(line.clock.monotonic()) > 0  # Twilio never ran dry
        sizes = [len(p) for _, p in line.media()]
        assert sizes[0] == 5 * FRAME and set(sizes[1:-1]) == {3 * FRAME}
        out = line.outbound
        assert (out.underruns_ai_late, out.underruns_scheduling, out.prebuffer.grows) == (0, 0, 0)


async def test_outbound_counts_an_ai_late_underrun_grows_the_prebuffer_and_shrinks_it_when_calm() -> None:
    async with asyncio.timeout(TIMEOUT_S), running(BATCHED) as line:
        for i in range(60):
            if i == 30:
                await advance(line.clock, 0.120)  # the AI's next frame is 120 ms late: playback runs dry
            line.outbound.push(tone(20))
            await advance(line.clock, FRAME_S)
        out = line.outbound
        assert (out.underruns_ai_late, out.underruns_scheduling) == (1, 0)
        assert (out.prebuffer.grows, round(out.prebuffer.value_s, 3)) == (1, 0.06)
        for _ in range(550):  # 11 s of on-time frames: one frame of prebuffer is given back
            line.outbound.push(tone(20))
            await advance(line.clock, FRAME_S, step=0.005)
        assert (out.prebuffer.shrinks, round(out.prebuffer.value_s, 3)) == (1, 0.04)
        assert out.underruns_ai_late == 1


async def test_outbound_counts_a_stall_of_ours_as_a_scheduling_underrun_and_grows_the_prebuffer() -> None:
    async with asyncio.timeout(TIMEOUT_S), running(AudioSettings()) as line:
        line.outbound.push(tone(1000))
        await advance(line.clock, 0.2)
        line.clock.advance(0.3)  # the event loop stalls for 300 ms with audio queued here: Twilio runs dry
        await advance(line.clock, 0.2)
        out = line.outbound
        assert (out.underruns_scheduling, out.underruns_ai_late, out.prebuffer.grows) == (1, 0, 1)


async def test_outbound_a_batch_longer_than_the_lead_never_lets_twilio_run_dry() -> None:
    """``outbound_batch_ms`` may be set above ``outbound_lead_ms``; such a batch never fits under the lead, so
    waiting for room for it let Twilio's buffer run dry for the difference before every message."""
    settings = AudioSettings(outbound_lead_ms=100, outbound_batch_ms=140)
    async with asyncio.timeout(TIMEOUT_S), running(settings) as line:
        line.outbound.push(tone(1000))
        await settle()
        while line.sent_s() < 1.0 - EPS:
            if line.sent_s():
                assert line.outbound.lead(line.clock.monotonic()) > 0  # Twilio never ran dry
            await advance(line.clock, STEP_S)
        assert line.outbound.underruns_scheduling == 0


async def test_outbound_the_ais_pcm_in_real_time_is_never_dry_and_a_hold_drops_it_in_step() -> None:
    """The production path with the defaults: the AI's 16 kHz PCM (``push_pcm``, converted lazily) a 20 ms chunk
    every 20 ms goes out with Twilio never dry, at most a batch a message; held after a barge-in it is dropped
    and counted, and what follows the hold is the converter's output in step, as if nothing had been skipped.
    (Whether a batch's second frame beats the hold's end is a tie for a real-time AI: both fall when Twilio is
    down to the prebuffer less the batch; here the clock decides it, so message sizes are not pinned.)"""
    rng = np.random.default_rng(5)
    pcm = (8000 * np.sin(np.arange(32000) * 2 * np.pi * 300 / 16000) + rng.normal(0, 500, 32000)).astype("<i2")
    chunks = [pcm[i : i + 320].tobytes() for i in range(0, len(pcm), 320)]  # 100 chunks of 20 ms
    reference = AiToCaller().push(pcm.tobytes())
    async with asyncio.timeout(TIMEOUT_S), running(AudioSettings()) as line:
        out = line.outbound
        for chunk in chunks[:50]:
            out.push_pcm(chunk)
            await advance(line.clock, FRAME_S)
            if line.sent_s():
                assert out.lead(line.clock.monotonic()) > 0  # Twilio never ran dry
        sizes = [len(p) for _, p in line.media()]
        assert sizes[0] == 3 * FRAME and set(sizes[1:]) <= {FRAME, 2 * FRAME}
        assert b"".join(p for _, p in line.media()) == reference[: sum(sizes)]
        out.interrupt()
        for chunk in chunks[50:60]:  # the caller holds the floor: 200 ms dropped unheard
            out.push_pcm(chunk)
            await advance(line.clock, FRAME_S)
        sent_before = len(line.media())
        out.resume()
        for chunk in chunks[60:]:
            out.push_pcm(chunk)
            await advance(line.clock, FRAME_S)
        await advance(line.clock, 0.5)
        after = b"".join(p for _, p in line.media()[sent_before:])
        assert after == reference[60 * FRAME :]  # in step: the held audio went through the converter
        assert out.held_ms == 200
        assert (out.underruns_ai_late, out.underruns_scheduling) == (0, 0)


@pytest.mark.parametrize("takes_now", [True, False], ids=["inline", "via-the-pacer"])
async def test_outbound_a_real_time_frame_due_on_arrival_goes_out_as_it_is_pushed(takes_now: bool) -> None:
    """A real-time AI's frame that would complete a batch arrives just as the hold for it ends, so once a hold
    has ended with no company, lone frames are not held for the rest of the spurt: each is due the moment it
    arrives. A leg that takes it without waiting gets it inside ``push`` (no task switch: from the AI leg's
    read callback); otherwise the pacer task sends it when it next runs. Either way the same messages, and
    Twilio never runs dry."""
    async with asyncio.timeout(TIMEOUT_S), running(AudioSettings(), yield_in_send=not takes_now) as line:
        for i in range(50):
            before, marks = len(line.media()), len(line.events()) - len(line.media())
            line.outbound.push(tone(20))
            on_the_wire_at_once = len(line.media()) > before
            await advance(line.clock, FRAME_S)
            marked = len(line.events()) - len(line.media()) > marks  # a mark is the pacer's to send
            if i >= 4 and not marked:  # past the prebuffer and the first hold
                assert on_the_wire_at_once == takes_now, i
            if i >= 3:
                assert line.outbound.lead(line.clock.monotonic()) > 0  # Twilio never ran dry
        sizes = [len(p) for _, p in line.media()]
        assert sizes[0] == 3 * FRAME and set(sizes[1:]) == {FRAME}
        assert (line.outbound.underruns_ai_late, line.outbound.underruns_scheduling) == (0, 0)
        await advance(line.clock, 0.2)  # the AI paused: the pacer still closes the spurt with a mark
        assert isinstance(line.events()[-1][1], OutMark) and line.outbound._unmarked_ms == 0


async def test_outbound_sends_nothing_from_push_while_the_pacer_is_mid_send() -> None:
    """The pacer's mark is in flight (the leg suspended it) while the next frame arrives, due, and the leg
    would take it at once: it waits for the mark, so messages never interleave or overtake."""
    release = asyncio.Event()
    async with asyncio.timeout(TIMEOUT_S), running(AudioSettings(mark_interval_ms=100)) as line:
        sink = line.outbound._sink
        real_send_mark = sink.send_mark
        in_flight: list[str] = []

        async def slow_mark(name: str) -> None:
            in_flight.append(name)
            await release.wait()
            await real_send_mark(name)

        sink.send_mark = slow_mark  # type: ignore[method-assign]
        while not in_flight:
            line.outbound.push(tone(20))
            await advance(line.clock, FRAME_S)
        sent = len(line.events())
        line.outbound.push(tone(20))  # due (Twilio is low), but the pacer is inside send_mark
        assert len(line.events()) == sent
        release.set()
        await advance(line.clock, FRAME_S)
        names = [type(e).__name__ for _, e in line.events()[sent:]]
        assert names[0] == "OutMark" and "OutMedia" in names[1:]  # the mark first, then the frame


async def test_outbound_stops_holding_for_the_spurt_once_a_hold_ends_alone_and_holds_again_in_the_next() -> None:
    """With a 100 ms prebuffer a real-time AI's batches fill while held (three frames a message); a hold that
    ends with its frame alone (the AI paused 60 ms) stops holding for the rest of that spurt, and the next
    spurt, after Twilio's buffer has run out, holds again."""
    settings = AudioSettings(playout_prebuffer_ms=100, outbound_batch_ms=60)
    async with asyncio.timeout(TIMEOUT_S), running(settings) as line:

        async def speak(frames: int) -> list[int]:
            sent_before = len(line.media())
            for _ in range(frames):
                line.outbound.push(tone(20))
                await advance(line.clock, FRAME_S)
            return [len(p) // FRAME for _, p in line.media()[sent_before:]]

        assert set((await speak(20))[1:]) == {3}  # after the prebuffer's message: whole batches
        await advance(line.clock, 0.060)  # the AI pauses: the held part batch goes out alone
        assert set((await speak(20))[1:]) == {1}  # no more holds this spurt: each frame as it comes
        await advance(line.clock, 1.0)  # the spurt ends; Twilio's buffer runs out
        assert set((await speak(20))[1:]) == {3}  # a new spurt holds again
        out = line.outbound
        assert (out.underruns_ai_late, out.underruns_scheduling) == (0, 0)


class IdleWaitCountingClock(FakeClock):
    """Counts waits whose deadline had already passed: a pacer asking to wait for nothing is spinning (on the
    real clock such a wait returns without yielding, and the spin holds the event loop and every call on it)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits_for_nothing = 0

    async def wait_until(self, event: asyncio.Event, deadline: float) -> None:
        self.waits_for_nothing += not event.is_set() and deadline <= self.monotonic()
        await super().wait_until(event, deadline)


async def test_outbound_a_prebuffer_above_the_lead_holds_a_last_odd_frame_without_spinning() -> None:
    """A prebuffer longer than the lead (allowed; a user curing underruns may set one) once made the part-batch
    low water higher than the level at which a frame fits, so the pacer held a lone frame by waiting for a
    deadline already passed, over and over, until a frame's room opened."""
    clock = IdleWaitCountingClock()
    settings = AudioSettings(outbound_lead_ms=100, playout_prebuffer_ms=200, outbound_batch_ms=40)
    async with asyncio.timeout(TIMEOUT_S), running(settings, clock=clock) as line:
        line.outbound.push(tone(520))  # 26 frames: 5 fill the lead, 2-frame batches leave a lone last one
        await advance(line.clock, 1.0)
        assert line.sent_s() == pytest.approx(0.52)
        assert clock.waits_for_nothing <= 5


# --- comfort fill while the AI is away -----------------------------------------------------------------------


def echo_marks(line: Line, echoed: int) -> int:
    """Echo every mark sent since the first ``echoed`` (as Twilio would once it played them); how many now."""
    marks = [e.name for _, e in line.events() if isinstance(e, OutMark)]
    for name in marks[echoed:]:
        line.outbound.mark_echoed(name)
    return len(marks)


async def test_outbound_comfort_fill_keeps_the_line_alive_but_is_no_ai_audio() -> None:
    async with asyncio.timeout(TIMEOUT_S), running(AudioSettings()) as line:
        out = line.outbound
        out.fill(ComfortFill(noise=True))
        await advance(line.clock, 1.0, step=0.005)
        # a second of fill went out in real time (never dry, never more than the lead ahead), unmarked...
        assert 1.0 - FRAME_S <= line.sent_s() <= 1.0 + LEAD_S + EPS
        assert [e for _, e in line.events() if not isinstance(e, OutMedia)] == []
        # ...and counted apart: no first audio, no AI audio sent
        assert (out.first_audio_at, out.playback.sent_ms, out.fill_ms) == (None, 0, round(line.sent_s() * 1000))
        out.fill(None)  # the AI is back
        out.push(tone(200))
        await advance(line.clock, 0.5, step=0.005)
        assert out.first_audio_at is not None and out.first_audio_at >= line.t0 + 1.0
        assert (out.playback.sent_ms, out.fill_ms) == (200, round(line.sent_s() * 1000) - 200)


async def test_outbound_finish_stops_a_comfort_fill_and_waits_only_for_the_ai_audio() -> None:
    async with asyncio.timeout(TIMEOUT_S), running(AudioSettings()) as line:
        out = line.outbound
        out.push(tone(200))
        await advance(line.clock, 0.1)
        out.fill(ComfortFill(noise=True))  # e.g. the time limit comes while the AI reconnects
        finish = asyncio.create_task(out.finish(out.pending_s(line.clock.monotonic()) + 2.0))
        echoed = 0
        while not finish.done() and line.elapsed() < 3.0:
            await advance(line.clock, FRAME_S, step=0.005)
            echoed = echo_marks(line, echoed)
        assert finish.done() and finish.result() is True
        assert line.elapsed() < 0.6  # the AI's 200 ms heard out, not the whole timeout played as noise
        sent_s = line.sent_s()
        out.fill(ComfortFill(noise=True))  # a drop while the call ends starts no fill
        await advance(line.clock, 0.5)
        assert line.sent_s() == sent_s


async def test_outbound_barge_in_during_a_fill_discards_no_fill_as_ai_audio() -> None:
    async with asyncio.timeout(TIMEOUT_S), running(AudioSettings()) as line:
        out = line.outbound
        out.fill(ComfortFill(noise=True))
        await advance(line.clock, 0.5)
        out.interrupt()  # Twilio drops up to the lead of fill: none of it was the AI's
        await advance(line.clock, 0.1)
        assert (out.playback.discarded_ms, out.discarded_ms, out.clears) == (0, 0, 1)
