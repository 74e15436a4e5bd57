"""The caller's audio on its way to the AI: placed on the timeline, resampled, queued, and listened to.

Caller audio that arrives before the AI is connected waits here (bounded: the oldest goes first) and is
delivered once it is, so the caller's first words are not lost; that backlog goes out at no more than twice
real time, since Savants asks for about real-time pacing (spec §6.3), and is caught up within its own length.
The same audio feeds the barge-in detector; ``watch_idle`` tells it when the caller sends nothing at all.

What a sender does differently from Twilio (no timestamps, frames that are not 160 bytes) is handled here and
logged once per call, at the first frame that shows it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from telephony_bridge.audio import kernels
from telephony_bridge.audio.barge_in import EPS_S, BargeIn, BargeInDetector, CallerStopped, Event
from telephony_bridge.audio.codec import (
    FRAME_MS,
    FRAME_S,
    SAVANTS_FRAME_BYTES,
    TWILIO_BYTES_PER_MS,
    TWILIO_FRAME_BYTES,
    TWILIO_RATE_HZ,
)
from telephony_bridge.audio.pipeline import CallerToAi
from telephony_bridge.audio.timeline import NO_TIMESTAMP
from telephony_bridge.audio.vad import VAD_FRAME_S, VoiceActivityDetector
from telephony_bridge.clock import Clock, Flag, Timer, monotonic_of
from telephony_bridge.errors import ConfigError
from telephony_bridge.leg import AudioHandler
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.savants.client import SavantsConnection
from telephony_bridge.settings import AudioSettings, BargeInSettings

try:  # built with the audio kernels (setup.py), and only usable with them
    from telephony_bridge._caller_path import CallerPath
except ImportError:
    CallerPath = None

log = logging.getLogger(__name__)

CATCH_UP_RATE = 2.0  # a backlog goes to the AI at most this many times faster than real time
# A joined message's first frame waits for the rest until they are due, plus this much for arrival jitter.
MESSAGE_WAIT_MARGIN_S = 0.005
# ...and its timer may run this much later still: one event-loop timer then serves every call's (``TimerQueue``).
LONE_TIMER_SLACK_S = 0.002
CALLER_IDLE_S = 0.1  # no caller frame for this long (Twilio sends one every 20 ms): the caller counts as silent


class Inbound:
    # The compiled frame path reads and writes these at their fixed offsets (_pyattrs.h); the rest live in
    # the instance dict.
    __slots__ = (
        "__dict__",
        "__weakref__",
        "_conn",
        "_frame_bytes",
        "_frames_per_message",
        "_last_frame_at",
        "_listening",
        "_lone_timer",
        "_max_frames",
        "_next_at",
        "_oldest_at",
        "_parked",
        "_pipeline",
        "_queue",
        "_ready",
        "detector",
        "frames_in",
        "frames_to_ai",
    )

    def __init__(
        self,
        audio: AudioSettings,
        barge_in: BargeInSettings,
        metrics: Metrics,
        clock: Clock,
        *,
        frame_bytes: int | None = TWILIO_FRAME_BYTES,
    ) -> None:
        """``frame_bytes``: the payload size the caller's leg promises (``CallerLeg.frame_bytes``), another being
        a quirk to log; None: any size is as expected. The call core always passes the leg's; the default is
        for tests that build an ``Inbound`` alone."""
        self._metrics = metrics
        self._clock = clock
        self._frame_bytes = frame_bytes
        compiled = kernels.use_compiled(audio.kernels)
        self._compiled = compiled
        self._pipeline = CallerToAi(compiled=compiled)
        self._queue: deque[bytes] = deque()
        self._frames_per_message = max(1, audio.upstream_message_ms // FRAME_MS)
        self._max_frames = self._backlog_frames(audio.pre_connect_buffer_ms)
        self._oldest_at = 0.0  # when the frame at the head of the queue was queued
        self._ready = Flag()  # set when ``run`` has something to do
        self._conn: SavantsConnection | None = None  # the session ``run`` sends to, while it runs
        self._parked = False  # ``run`` waits on ``_ready`` (not mid-send, not pacing a backlog)
        self._next_at = 0.0  # a backlog's pacing: the next message may go no earlier
        self._lone_timer: Timer | None = None  # wakes ``run`` for a message's first frame that waits alone
        self.detector = _detector(barge_in, compiled)
        self.frames_in = 0
        self.frames_to_ai = 0
        self.dropped_overflow = 0
        self.quirks: set[str] = set()  # how this sender differs from Twilio, each logged once
        self._last_frame_at = clock.monotonic()
        self._listening = asyncio.Event()  # set while the detector waits to hear whether the caller is silent

    def limit_backlog(self, max_ms: int) -> None:
        """How much caller audio may wait for the AI from now on (the reconnect buffer once it has connected)."""
        self._max_frames = self._backlog_frames(max_ms)

    def _backlog_frames(self, max_ms: int) -> int:
        """Never under one message: its first frame waits for the rest, and must not be dropped for them."""
        return max(self._frames_per_message, max_ms // FRAME_MS)

    @property
    def late_frames_dropped(self) -> int:
        return self._pipeline.timeline.dropped_frames

    @property
    def gap_filled_ms(self) -> int:
        return self._pipeline.timeline.filled_bytes // TWILIO_BYTES_PER_MS

    def push(self, timestamp_ms: int | None, ulaw: bytes, now: float, ai_audible_since: float | None) -> list[Event]:
        """One media payload (any length; ``timestamp_ms`` None if the sender stamps none): queue its audio for
        the AI; what the barge-in detector made of it."""
        self.frames_in += 1
        self._last_frame_at = now
        if self._frame_bytes is not None and len(ulaw) != self._frame_bytes and ulaw:
            self._quirk(
                "frame_size", "the client sends %d-byte media payloads, not %d; re-framed", len(ulaw), self._frame_bytes
            )
        timeline = self._pipeline.timeline
        dropped_before, filled_before = timeline.dropped_frames, timeline.filled_bytes
        pcm_8k, frames = self._pipeline.push(timestamp_ms, ulaw)
        if frames and not self._queue:
            self._oldest_at = now
        for frame in frames:
            if len(self._queue) >= self._max_frames:
                self._drop_oldest()
            self._queue.append(frame)
        if frames and self._parked:
            self._send_or_wake(now)
        if timeline.dropped_frames != dropped_before:
            self._metrics.inbound_dropped.labels(reason="late").inc()
        if timeline.filled_bytes != filled_before:
            self._metrics.inbound_gap.inc((timeline.filled_bytes - filled_before) / TWILIO_RATE_HZ)
        if timeline.untimed_reason:
            quirk = "no_timestamps" if timeline.untimed_reason == NO_TIMESTAMP else "stale_timestamps"
            self._quirk(quirk, "%s: its audio is taken in arrival order (no gap fill)", timeline.untimed_reason)
        if self.detector is None or not len(pcm_8k):
            return []
        return self._heard(self.detector.caller_audio(pcm_8k, now, ai_audible_since))

    def audio_handler(
        self,
        fallback: AudioHandler,
        clock: Clock,
        audible_since: Callable[[float], float | None],
        on_events: Callable[[list[Event]], None],
        *,
        compiled: bool | None = None,
    ) -> AudioHandler:
        """The call core's handler for the caller's audio: ``fallback`` (``Call._caller_audio``: ``push``, then
        ``on_events`` for what it returns), or, with the compiled kernels, its compiled twin, which takes the
        usual frame itself in one C call and hands any other to ``fallback`` (``_caller_path.c`` says which).
        ``compiled``: None to follow ``audio.kernels``; False for ``fallback`` alone (tests compare the two).

        The twin works on this object's own state, read and written by attribute name: ``_pipeline`` (its
        ``timeline``, ``_pending`` and ``_upsampler._state``), ``_queue``, ``detector`` (its ``_vad`` and the
        state ``_frame`` keeps), ``_listening``, ``_frame_bytes``, ``_frames_per_message``, ``_max_frames``,
        ``_parked``, ``_conn``, ``_next_at``, ``_oldest_at``, ``_lone_timer``, ``_ready``, ``frames_in``,
        ``frames_to_ai``, ``_last_frame_at``; renaming one fails ``tests/test_caller_path.py``."""
        if compiled is None:
            compiled = self._compiled and CallerPath is not None
        if not compiled:
            return fallback
        if CallerPath is None or not self._compiled:
            kernels.use_compiled("compiled")  # raises, saying why the extension is missing
            raise ConfigError("the compiled caller path needs the compiled kernels (audio.kernels)")
        return CallerPath(  # type: ignore[no-any-return]
            self,
            fallback,
            monotonic_of(clock),
            audible_since,
            on_events,
            catch_up_rate=CATCH_UP_RATE,
            frame_s=FRAME_S,
            barge_in=BargeIn,
            caller_stopped=CallerStopped,
            eps_s=EPS_S,
            vad_frame_s=VAD_FRAME_S,
        )

    def _drop_oldest(self) -> None:
        self._queue.popleft()  # the AI is not taking audio: keep the newest, count the loss
        self.dropped_overflow += 1
        self._metrics.inbound_dropped.labels(reason="overflow").inc()

    def _heard(self, events: list[Event]) -> list[Event]:
        assert self.detector is not None
        if self.detector.listening:
            self._listening.set()
        for event in events:
            if isinstance(event, CallerStopped) and event.hold_limit:
                log.info("barge-in hold reached its limit while the caller goes on talking; AI audio flows again")
        return events

    def _quirk(self, name: str, message: str, *args: object) -> None:
        """One line and one count per call for each way this sender differs from Twilio."""
        if name in self.quirks:
            return
        self.quirks.add(name)
        self._metrics.client_quirks.labels(quirk=name).inc()
        log.warning(message, *args)

    async def watch_idle(
        self, on_events: Callable[[list[Event]], None], ai_audible_since: Callable[[float], float | None]
    ) -> None:
        """While the barge-in detector listens and the caller sends nothing (a client that sends media only when
        there is speech), count the time as silence, so a hold always ends. Sleeps while nobody speaks."""
        detector = self.detector
        if detector is None:
            return
        while True:
            if not detector.listening:
                self._listening.clear()
                await self._listening.wait()
            now = self._clock.monotonic()
            due = self._last_frame_at + CALLER_IDLE_S
            if now < due:
                await self._clock.sleep_until(due)
                continue
            events = self._heard(detector.caller_silent(now, ai_audible_since(now)))
            if events:
                on_events(events)
            await self._clock.sleep_until(now + CALLER_IDLE_S)

    def _send_or_wake(self, now: float) -> None:
        """While ``run`` is parked, do what it would do now: send a whole message that pacing allows, from the
        socket callback that brought its last frame, when the session takes it without waiting (no task to
        wake, 25 times a second a call); otherwise wake ``run``. A first frame waiting alone gets a timer
        instead, which its partner's arrival calls off: it goes alone only if no partner comes in time."""
        per = self._frames_per_message
        self._call_off_lone_timer()
        conn = self._conn
        if len(self._queue) >= per and conn is not None and self._next_at <= now and conn.can_send_now():
            conn.send_audio_nowait(self._take(per))
            self.frames_to_ai += per
            self._oldest_at = now
            self._next_at = now + per * FRAME_S / CATCH_UP_RATE
        if len(self._queue) >= per:
            self._ready.set()  # a backlog to pace, or a send buffer to wait for: ``run``'s work
        elif self._queue:
            self._arm_lone_timer()

    def _take(self, n: int) -> bytes:
        """The next ``n`` queued frames, as one message (two, by default: one concatenation, no generator)."""
        popleft = self._queue.popleft
        if n == 1:
            return popleft()
        if n == 2:
            first = popleft()
            return first + popleft()
        return b"".join([popleft() for _ in range(n)])

    def _put_back(self, pcm: bytes) -> None:
        """A message ``_take`` made that was not sent goes back to the head of the queue as its frames, for the
        next ``run`` to send first; past the queue's bound the oldest go, as in ``push``."""
        assert len(pcm) % SAVANTS_FRAME_BYTES == 0, "queued frames are whole 20 ms frames"
        self._queue.extendleft(pcm[i - SAVANTS_FRAME_BYTES : i] for i in range(len(pcm), 0, -SAVANTS_FRAME_BYTES))
        while len(self._queue) > self._max_frames:
            self._drop_oldest()

    def _arm_lone_timer(self) -> None:
        """Wake ``run`` when the frame waiting alone has waited long enough (``_complete_by``). Its partner nearly
        always comes in the same read (Twilio's frames are read in pairs: ``twilio.paired_reads``) and calls the
        timer off, so the deadline itself is armed only once the event loop has run the rest of that read, and
        only if the frame still waits alone: one ``call_soon`` instead of a deadline set and dropped."""
        self._lone_timer = self._clock.call_soon(self._arm_lone_deadline)

    def _arm_lone_deadline(self) -> None:
        """``_arm_lone_timer``'s second half: the read is over and the frame still waits alone."""
        self._lone_timer = self._clock.call_at(self._complete_by(), self._ready.set, slack_s=LONE_TIMER_SLACK_S)

    def _call_off_lone_timer(self) -> None:
        if self._lone_timer is not None:
            self._lone_timer.cancel()
            self._lone_timer = None

    def _complete_by(self) -> float:
        """When the first frame of a message stops waiting for the rest and goes as it is."""
        return self._oldest_at + (self._frames_per_message - 1) * FRAME_S + MESSAGE_WAIT_MARGIN_S

    async def run(self, conn: SavantsConnection) -> None:
        """Send the queued frames to the AI (640 bytes, 20 ms each; ``audio.upstream_message_ms`` joins that
        many ms per message, the first frame waiting for the rest): as they come, or, for a backlog, at most
        ``CATCH_UP_RATE`` times real time. While frames come in real time it is parked and ``push`` sends them
        (``_send_or_wake``); it sends a backlog, a lone frame whose wait is over, and whatever must wait for the
        session's send buffer. It returns when the session says it is closing (the receiving side reports why);
        a message it took but did not send waits at the head of the queue for the next session."""
        per = self._frames_per_message
        self._conn = conn
        self._next_at = self._clock.monotonic()
        try:
            while True:
                now = self._clock.monotonic()
                if not self._queue or (len(self._queue) < per and now < self._complete_by()):
                    self._ready.clear()
                    if self._queue:  # a first frame waits for the rest, until its time is up
                        self._arm_lone_timer()
                    self._parked = True
                    try:
                        await self._ready.wait()
                    finally:
                        self._parked = False
                        self._call_off_lone_timer()
                    # Less than a message was waiting: pacing starts afresh, or the time spent parked (while
                    # ``push`` sent, or the caller was quiet) would be credit a later burst spends at once.
                    self._next_at = max(self._next_at, self._clock.monotonic())
                    continue
                if self._next_at > now:
                    await self._clock.sleep_until(self._next_at)
                n = min(per, len(self._queue))
                pcm = self._take(n)
                self._oldest_at = self._clock.monotonic()  # what is left is backlog: it goes when pacing allows
                # Cancelled while it waits for the send buffer, False or raising, ``send_audio`` has sent nothing
                # (its send follows the wait, synchronously): the message waits for the next session, first.
                sent = False
                try:
                    sent = await conn.send_audio(pcm)
                finally:
                    if not sent:
                        self._put_back(pcm)
                if not sent:
                    return  # the session is closing: the call's receiving side reports why, and reconnects
                self.frames_to_ai += n
                self._next_at += n * FRAME_S / CATCH_UP_RATE
        finally:
            self._conn = None  # no session: frames queue up, and the next ``run`` finds them at once


def _detector(settings: BargeInSettings, compiled: bool) -> BargeInDetector | None:
    if not settings.enabled:
        return None
    return BargeInDetector(
        min_speech_ms=settings.min_speech_ms,
        utterance_end_ms=settings.utterance_end_ms,
        min_ai_audible_ms=settings.min_ai_audible_ms,
        max_hold_ms=round(settings.max_hold_s * 1000),
        vad=VoiceActivityDetector(settings.sensitivity, settings.min_level_dbfs, compiled=compiled),
    )
