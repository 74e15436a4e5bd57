"""The caller's audio on its way to the AI: placed on the timeline, resampled, queued, and listened to.

Caller audio that arrives before the AI is connected waits here (bounded: the oldest goes first) and is
delivered once it is, so the caller's first words are not lost; that backlog goes out at no more than twice
real time, since Savants asks for about real-time pacing (spec §6.3), and is caught up within its own length.
The same audio feeds the barge-in detector.
"""

from __future__ import annotations

import asyncio
from collections import deque

from telephony_bridge.audio.barge_in import BargeInDetector, Event
from telephony_bridge.audio.codec import FRAME_MS, FRAME_S, TWILIO_BYTES_PER_MS, TWILIO_RATE_HZ
from telephony_bridge.audio.pipeline import CallerToAi
from telephony_bridge.audio.vad import VoiceActivityDetector
from telephony_bridge.clock import Clock
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.savants.client import SavantsConnection
from telephony_bridge.settings import AudioSettings, BargeInSettings

CATCH_UP_RATE = 2.0  # a backlog goes to the AI at most this many times faster than real time


class Inbound:
    def __init__(self, audio: AudioSettings, barge_in: BargeInSettings, metrics: Metrics, clock: Clock) -> None:
        self._metrics = metrics
        self._clock = clock
        self._pipeline = CallerToAi()
        self._queue: deque[bytes] = deque()
        self._max_frames = max(1, audio.pre_connect_buffer_ms // FRAME_MS)
        self._ready = asyncio.Event()
        self.detector = _detector(barge_in)
        self.frames_in = 0
        self.frames_to_ai = 0
        self.dropped_overflow = 0

    def limit_backlog(self, max_ms: int) -> None:
        """How much caller audio may wait for the AI from now on (the reconnect buffer once it has connected)."""
        self._max_frames = max(1, max_ms // FRAME_MS)

    @property
    def late_frames_dropped(self) -> int:
        return self._pipeline.timeline.dropped_frames

    @property
    def gap_filled_ms(self) -> int:
        return self._pipeline.timeline.filled_bytes // TWILIO_BYTES_PER_MS

    def push(self, timestamp_ms: int, ulaw: bytes, now: float, ai_audible_since: float | None) -> list[Event]:
        """One Twilio media payload: queue its audio for the AI; what the barge-in detector made of it."""
        self.frames_in += 1
        timeline = self._pipeline.timeline
        dropped_before, filled_before = timeline.dropped_frames, timeline.filled_bytes
        pcm_8k, frames = self._pipeline.push(timestamp_ms, ulaw)
        for frame in frames:
            if len(self._queue) >= self._max_frames:
                self._queue.popleft()  # the AI is not taking audio: keep the newest, count the loss
                self.dropped_overflow += 1
                self._metrics.inbound_dropped.labels(reason="overflow").inc()
            self._queue.append(frame)
        if frames:
            self._ready.set()
        if timeline.dropped_frames != dropped_before:
            self._metrics.inbound_dropped.labels(reason="late").inc()
        if timeline.filled_bytes != filled_before:
            self._metrics.inbound_gap.inc((timeline.filled_bytes - filled_before) / TWILIO_RATE_HZ)
        if self.detector is None or not len(pcm_8k):
            return []
        return self.detector.caller_audio(pcm_8k, now, ai_audible_since)

    async def run(self, conn: SavantsConnection) -> None:
        """Send the queued frames to the AI (640 bytes, 20 ms each): as they come, or, for a backlog, at most
        ``CATCH_UP_RATE`` times real time."""
        next_at = self._clock.monotonic()
        while True:
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
                next_at = max(next_at, self._clock.monotonic())
                continue
            if next_at > self._clock.monotonic():
                await self._clock.sleep_until(next_at)
            if await conn.send_audio(self._queue.popleft()):
                self.frames_to_ai += 1
            next_at += FRAME_S / CATCH_UP_RATE


def _detector(settings: BargeInSettings) -> BargeInDetector | None:
    if not settings.enabled:
        return None
    return BargeInDetector(
        min_speech_ms=settings.min_speech_ms,
        utterance_end_ms=settings.utterance_end_ms,
        min_ai_audible_ms=settings.min_ai_audible_ms,
        vad=VoiceActivityDetector(settings.sensitivity, settings.min_level_dbfs),
    )
