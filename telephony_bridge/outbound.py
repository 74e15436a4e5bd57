"""AI audio on its way to the caller: queued, paced from the clock, marked, and cut on barge-in.

The one task that writes to the caller's leg during a call runs here (``run``), and the only other send (see
below) happens while it sleeps, so audio, marks and clears never interleave mid-message. The leg
(``leg.AudioSink``) serialises them for its ingress. Twilio plays what it has buffered until told to
``clear`` (spec §4, G6), so audio goes out at most ``outbound_lead_ms`` ahead of real time, in whole 20 ms
frames.

Mid-spurt, a frame that is due the moment it arrives (the common case for a real-time AI) is sent there and
then (``_send_inline``), from the AI leg's read callback, when the leg can take it without waiting: the pacer
task is not woken for it. Everything else (a spurt's start, holds, marks, clears, fill, backpressure) is
the pacer's.

Comfort fill (while the AI is away) goes out on its own path, paced the same way but never queued with the AI's
audio: it is no AI audio, so it sets no first-audio time, counts in none of the AI audio figures (``fill_ms``
instead) and carries no marks.
"""

from __future__ import annotations

from collections.abc import Callable

from telephony_bridge.audio import kernels, pacing
from telephony_bridge.audio.codec import FRAME_MS, FRAME_S, TWILIO_BYTES_PER_MS, TWILIO_FRAME_BYTES, ulaw_to_pcm16
from telephony_bridge.audio.comfort import ComfortFill
from telephony_bridge.audio.kernels import DownsamplerToUlaw
from telephony_bridge.audio.pacing import AdaptivePrebuffer, OutboundPacer
from telephony_bridge.audio.pipeline import AiToCaller, FrameBuffer
from telephony_bridge.audio.playback import PlaybackTracker
from telephony_bridge.clock import Clock, Flag, Timer, monotonic_of
from telephony_bridge.errors import CallerGone
from telephony_bridge.leg import AudioSink
from telephony_bridge.settings import AudioSettings

try:  # built with the audio kernels (setup.py), and only usable with them
    from telephony_bridge._ai_path import AiAudioPath
except ImportError:
    AiAudioPath = None

AUDIBLE_PEAK = 200  # about -44 dBFS: quieter AI frames are silence to the caller, not speech
SPURT_GAP_S = 0.3  # AI silence longer than this ends a talk spurt
# Twilio's buffer is never let fall below this to make a batch: a held frame goes when only this much is left
# (more when the prebuffer leaves room for it: see ``_low_water_s``).
LOW_WATER_S = FRAME_S
# The pause timer may run this much late (one event-loop timer serves every call's: ``TimerQueue``): the
# spurt's trailing partial frame and closing mark go that much later, well inside the lead.
PAUSE_SLACK_S = 0.005
UNDERRUN_GAP_S = 0.25  # a hole in playback shorter than this, with audio after it, is an underrun (not a pause)
_EPS = 1e-6
# μ-law code -> 1 if it decodes to |sample| >= AUDIBLE_PEAK: audibility read straight off the bytes we send.
_AUDIBLE_CODES = bytes(int(abs(int(v)) >= AUDIBLE_PEAK) for v in ulaw_to_pcm16(bytes(range(256))))


class Outbound:
    # The compiled frame path reads and writes these at their fixed offsets (_pyattrs.h); the rest live in
    # the instance dict.
    __slots__ = (
        "__dict__",
        "__weakref__",
        "_audible_since",
        "_audible_until",
        "_batch_frames",
        "_buffer",
        "_clear_pending",
        "_fill",
        "_finishing",
        "_held_part",
        "_holds_pay",
        "_last_push_at",
        "_mark_every_ms",
        "_max_queued_bytes",
        "_pacer",
        "_parked",
        "_parked_until",
        "_progress",
        "_queued_since",
        "_ready",
        "_sink",
        "_spurt_live",
        "_unmarked_ms",
        "first_audio_at",
        "holding",
        "playback",
        "prebuffer",
    )

    def __init__(self, settings: AudioSettings, clock: Clock, sink: AudioSink) -> None:
        self._clock = clock
        self._sink = sink
        self._compiled = kernels.use_compiled(settings.kernels)
        self._buffer = FrameBuffer(compiled=self._compiled)
        self._ready = Flag()
        self._parked = False  # ``run`` sleeps in ``_wait`` or ``_wait_for_pause`` (not mid-send)
        self._parked_until: float | None = None  # ...until this deadline (None: until woken; the pause as last armed)
        self._pause_timer: Timer | None = None  # ``_wait_for_pause``'s
        self._pacer = OutboundPacer(settings.outbound_lead_ms / 1000, FRAME_S)
        base_s = settings.playout_prebuffer_ms / 1000
        self.prebuffer = AdaptivePrebuffer(
            base_s, settings.outbound_lead_ms / 1000 if settings.adaptive_prebuffer else base_s
        )
        # Up to a batch a message, and never more than the lead less a frame: a batch waits for room under the
        # lead, so a longer one would let Twilio's buffer run dry (or to nothing) before every message.
        max_batch_ms = max(FRAME_MS, settings.outbound_lead_ms - FRAME_MS)
        self._batch_frames = max(1, min(settings.outbound_batch_ms, max_batch_ms) // FRAME_MS)
        self._spurt_live = False  # audio has gone out since the last clear: a hole in it would be an underrun
        self._holds_pay = True  # holding a part batch for company made whole batches in this talk spurt
        self._held_part = False  # the pacer is holding a part batch, or its hold just ended
        self.underruns_ai_late = 0  # Twilio ran dry waiting for the AI's next frame
        self.underruns_scheduling = 0  # Twilio ran dry while audio waited here: we sent it late
        self._mark_every_ms = settings.mark_interval_ms
        self._queued_since = 0.0
        self._last_push_at = float("-inf")
        self._unmarked_ms = 0
        self._clear_pending = False
        self._audible_since: float | None = None
        self._audible_until = float("-inf")
        self.holding = False
        self.playback = PlaybackTracker()
        self.first_audio_at: float | None = None
        self._held_bytes = 0
        self._cut_bytes = 0
        self._finishing = False
        self._progress = Flag()  # audio or a mark went out, or a mark came back
        self.clears = 0
        self._fill: ComfortFill | None = None
        self._fill_bytes = 0
        self._fill_spans: list[tuple[float, float]] = []  # when the fill sent lately plays at the caller
        self._max_queued_bytes = round(settings.max_ai_ahead_s * 1000) * TWILIO_BYTES_PER_MS
        self._overflow_bytes = 0

    # --- fed by the AI side --------------------------------------------------------------------------------

    def push(self, ulaw: bytes) -> None:
        """Queue AI audio; while the caller holds the floor after a barge-in it is dropped instead.

        At most ``audio.max_ai_ahead_s`` waits here: an AI that sends faster than real time for longer loses
        its oldest queued audio (counted in ``overflow_ms``), so a call's memory stays bounded.
        """
        if not ulaw or self._finishing:  # the call is ending: what is queued is heard out, nothing new starts
            return
        if self.holding:
            self._held_bytes += len(ulaw)
            return
        self._append(ulaw, self._buffer.append)

    def push_pcm(self, pcm: bytes) -> None:
        """Like ``push``, for the AI's own 16 kHz PCM: converted to μ-law only when it goes out (in batches)."""
        if not pcm or self._finishing:
            return
        if self.holding:
            self._held_bytes += self._buffer.drop_pcm(pcm)
            return
        self._append(pcm, self._buffer.append_pcm)

    def audio_handler(self, *, compiled: bool | None = None) -> Callable[[bytes], None]:
        """What the AI's audio goes to as it is read (``AiSide``): ``push_pcm``, or with the compiled kernels its
        common case in one C call (``_ai_path.c``: a real-time AI's frame, from its arrival to the caller's leg,
        without ~25 Python calls), which hands every other case to ``push_pcm``. ``compiled``: None as
        ``audio.kernels`` says, True or False to choose (tests, benches; True raises if it cannot be had)."""
        if compiled is False or (compiled is None and not self._compiled):
            return self.push_pcm
        path = _compiled_path(self)
        if path is None and compiled:
            raise ValueError(
                "the compiled AI audio path is not built, or this Outbound is not the one it was written for"
            )
        return path or self.push_pcm

    def _append(self, audio: bytes, append: Callable[[bytes], None]) -> None:
        now = self._clock.monotonic()
        buffer = self._buffer
        was_empty = not buffer.size
        if was_empty:
            self._queued_since = now
        self._last_push_at = now
        before = buffer.size // TWILIO_FRAME_BYTES
        append(audio)
        excess = buffer.size - self._max_queued_bytes
        if excess > 0:
            self._overflow_bytes += len(buffer.take(-(-excess // TWILIO_FRAME_BYTES)))
        # The pacer sleeps until its own next deadline; it is woken only when this audio changes what it would
        # do there: the first audio after none, a first whole frame, or enough frames for a batch or the
        # prebuffer. An AI sending 20 ms frames into 60 ms batches wakes it twice a batch, not three times.
        after = buffer.size // TWILIO_FRAME_BYTES
        if (
            was_empty
            or before == 0 < after
            or before < self._batch_frames <= after
            or before < self.prebuffer.frames <= after
        ) and not self._send_inline(now):
            self._ready.set()

    def _send_inline(self, now: float) -> bool:
        """Do what the pacer would do now, if it is only this: send the frames due, mid-spurt, to a leg that
        takes them without waiting, with no mark owed. True if done (the pacer sleeps on: its deadline still
        comes, and it looks again then); False if the pacer must look (nothing was done)."""
        if (
            not self._parked  # busy: a send may be in flight
            or self._clear_pending
            or self._finishing
            or self._fill is not None
            or not self._pacer.lead(now)  # a spurt's start: the prebuffer is the pacer's
            or not self._sink.can_send_now()
        ):
            return False
        frames = self._buffer.frames
        if not frames or self._unmarked_ms + frames * FRAME_MS >= self._mark_every_ms:
            return False
        taken = self._take_due(now, frames, self._batch_frames)
        if taken is None:
            return False  # held for a batch: the pacer sets the hold's deadline
        ulaw, play_at = taken
        self._sink.send_audio_nowait(ulaw)
        self._audio_sent(ulaw, play_at)
        if self._buffer.frames or self._parked_until is None:
            self._ready.set()  # more is queued, or the pacer has no deadline for the spurt's closing mark
        return True

    def fill(self, source: ComfortFill | None) -> None:
        """While the AI is away (reconnecting), keep the caller's line alive: whenever nothing is queued, a
        frame from ``source`` goes out in real time, never a gap. ``None`` stops it; so does ``finish``."""
        self._fill = None if self._finishing else source
        self._ready.set()

    @property
    def fill_ms(self) -> int:
        """Comfort fill sent to the caller (not AI audio)."""
        return self._fill_bytes // TWILIO_BYTES_PER_MS

    @property
    def overflow_ms(self) -> int:
        """AI audio dropped because more than ``audio.max_ai_ahead_s`` was queued."""
        return self._overflow_bytes // TWILIO_BYTES_PER_MS

    @property
    def held_ms(self) -> int:
        """AI audio dropped unheard because the caller held the floor."""
        return self._held_bytes // TWILIO_BYTES_PER_MS

    @property
    def discarded_ms(self) -> int:
        """AI audio the caller never heard because of barge-ins: flushed at Twilio, cut here, or held."""
        return self.playback.discarded_ms + (self._cut_bytes + self._held_bytes) // TWILIO_BYTES_PER_MS

    async def finish(self, timeout_s: float) -> bool:
        """The AI has said its last: send what is queued and wait until the caller has heard it (the last
        mark echoed), so a goodbye is not cut off when the stream closes (G8). False if ``timeout_s`` passed.
        A comfort fill stops: nothing the AI said is left to wait for behind it."""
        self._finishing = True
        self._fill = None
        self._ready.set()
        deadline = self._clock.monotonic() + timeout_s
        while len(self._buffer) or self._unmarked_ms or self.playback.pending_marks:
            if self._clock.monotonic() >= deadline:
                return False
            self._progress.clear()
            await self._clock.wait_until(self._progress, deadline)
        return True

    # --- told by the caller side --------------------------------------------------------------------------

    def interrupt(self) -> None:
        """Barge-in: drop what is queued here, have Twilio drop what it buffered, hold further AI audio."""
        self._cut_bytes += self._buffer.clear()
        self._clear_pending = True
        self.holding = True
        self._ready.set()

    def resume(self) -> None:
        """The caller stopped talking: the AI's audio goes through again."""
        self.holding = False

    def mark_echoed(self, name: str) -> None:
        self.playback.mark_echoed(name)
        self._progress.set()

    def audible_since(self, now: float) -> float | None:
        """When the AI's current talk spurt became audible to the caller; None while it is silent (including
        while its first audible frame is still queued at Twilio)."""
        if self._audible_since is None or self._audible_since > now or now > self._audible_until + SPURT_GAP_S:
            return None
        return self._audible_since

    def lead(self, now: float) -> float:
        return self._pacer.lead(now)

    def pending_s(self, now: float) -> float:
        """AI audio not yet heard: queued here plus buffered at Twilio."""
        return len(self._buffer) / TWILIO_BYTES_PER_MS / 1000 + self._pacer.lead(now)

    # --- the pacer task -----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Hand audio to Twilio from the clock, at most the lead ahead of real time.

        When Twilio's buffer is empty a new talk spurt begins; its first frames wait up to
        ``playout_prebuffer_ms`` for company, so that network jitter opens no gap after the first frame. Once
        the AI has paused that long, a trailing partial frame is padded with silence and sent, and a mark
        closes the spurt.
        """
        while True:
            now = self._clock.monotonic()
            if self._clear_pending:
                await self._clear(now)
                continue
            frames = self._buffer.frames
            # The AI has paused (or finished): a trailing partial frame and the closing mark can go.
            paused_at = self._paused_at()
            if frames == 0:
                if now >= paused_at and len(self._buffer):
                    self._buffer.pad_to_frame()
                elif now >= paused_at and self._unmarked_ms:
                    self._holds_pay = True  # the spurt ends here: the next may come in bursts
                    await self._send_mark()
                elif self._fill is not None and not len(self._buffer) and not self.holding:
                    await self._send_fill(now, self._fill)
                elif now < paused_at:  # the AI is talking: the pause will want a pad or a mark
                    await self._wait_for_pause()
                else:
                    await self._wait(None)
                continue
            prebuffer_s = self.prebuffer.value_s
            gathering_until = self._queued_since + prebuffer_s
            gathering = not self._finishing and now < gathering_until
            if self._pacer.lead(now) == 0 and frames < self.prebuffer.frames and gathering:
                await self._wait(gathering_until)
                continue
            batch = 1 if self._finishing else self._batch_frames
            play_end = self._pacer.play_end
            if play_end is None or play_end <= now:
                self._holds_pay = True  # Twilio's buffer is empty: a new talk spurt, whose AI may send in bursts
            taken = self._take_due(now, frames, batch)
            if taken is not None:
                await self._send_audio(*taken)
            left = self._buffer.frames
            if left and not self._clear_pending:
                at = self._clock.monotonic()
                if left >= batch:
                    await self._wait(self._pacer.room_for(at, batch))
                else:  # a part batch: it goes when more audio makes it whole, or when Twilio runs low
                    self._held_part = True
                    await self._wait(self._pacer.hold_until(at, self._low_water_s()))

    def _take_due(self, now: float, frames: int, batch: int) -> tuple[bytes, float] | None:
        """The frames due now (recorded as sent, with when the first plays at the caller), or None while a part
        batch is held; the one decision ``run`` and ``_send_inline`` share."""
        dry_at = self._pacer.play_end
        due = self._pacer.batch_due(now, frames, batch, self._hold_low_water_s())
        if not due:
            return None
        if self._held_part and due < batch:
            self._holds_pay = False  # the hold ended with no company: see ``_hold_low_water_s``
        self._held_part = False
        self._note_playout(now, dry_at)
        play_at = now + self._pacer.lead(now) - due * FRAME_S
        return self._buffer.take(due), play_at

    def _hold_low_water_s(self) -> float:
        """``_low_water_s`` while holding part batches pays; once a hold has ended with its frames going out
        alone, the lead itself (no hold: a lone frame goes at once) for the rest of the talk spurt.

        A real-time AI's frame that would complete a batch arrives just as the hold for it ends (the prebuffer
        sets that: see ``_low_water_s``), so holding mostly delayed each frame by a frame's length and cost
        the pacer a wake-up for the hold's end, for no batch; an AI that sends faster than real time fills
        its batches without any hold. Sending a lone frame at once keeps Twilio's buffer a frame fuller
        than the hold did, and the caller hears it when it would have anyway (playback is continuous)."""
        return self._low_water_s() if self._holds_pay else self._pacer.lead_s

    def _low_water_s(self) -> float:
        """How low Twilio's buffer may run while a part batch waits for company: the playout delay the prebuffer
        keeps, less the batch being gathered, and never under a frame. What is left is the margin for a late
        wake-up (a busy event loop, a busy machine), so it grows with the prebuffer after an underrun. Never
        above the lead less a frame either: above that no frame fits when the hold ends, and the pacer would
        spin on a deadline already passed (a prebuffer longer than the lead allows that)."""
        low_water_s = max(LOW_WATER_S, self.prebuffer.value_s - self._batch_frames * FRAME_S)
        return min(low_water_s, self._pacer.lead_s - FRAME_S)

    def _note_playout(self, now: float, dry_at: float | None) -> None:
        """Audio is about to go out: if Twilio's buffer ran dry before it (a hole the caller hears), say whose
        fault it was, and let the prebuffer grow to absorb the next one."""
        if dry_at is not None and self._spurt_live and _EPS < now - dry_at <= UNDERRUN_GAP_S:
            if self._queued_since <= dry_at:
                self.underruns_scheduling += 1
            else:
                self.underruns_ai_late += 1
            self.prebuffer.ran_dry(now)
        else:
            self.prebuffer.steady(now)
        self._spurt_live = True

    async def _send_fill(self, now: float, fill: ComfortFill) -> None:
        """A batch of comfort fill when the lead has room for it (the AI's audio, if any comes, goes next)."""
        due = self._pacer.batch_due(now, self._batch_frames, self._batch_frames, self._low_water_s())
        if not due:
            await self._wait(self._pacer.room_for(now, self._batch_frames))
            return
        play_at = now + self._pacer.lead(now) - due * FRAME_S
        self._fill_spans = [span for span in self._fill_spans if span[1] > now]
        self._fill_spans.append((play_at, play_at + due * FRAME_S))
        frames = b"".join(fill.frame() for _ in range(due))
        self._fill_bytes += len(frames)
        await self._sink.send_audio(frames)

    def _unplayed_fill_s(self, now: float) -> float:
        return sum(end - max(start, now) for start, end in self._fill_spans if end > now)

    async def _clear(self, now: float) -> None:
        self._clear_pending = False
        self.clears += 1
        await self._sink.clear()
        unplayed_ai_s = self._pacer.lead(now) - self._unplayed_fill_s(now)  # fill is no AI audio discarded
        self._fill_spans = []
        self.playback.cleared(unplayed_ms=max(0, round(unplayed_ai_s * 1000)))
        self._pacer.cleared(now)
        self._spurt_live = False
        self._holds_pay, self._held_part = True, False
        self._audible_since, self._audible_until = None, float("-inf")
        self._unmarked_ms = 0
        self._progress.set()

    async def _send_audio(self, ulaw: bytes, play_at: float) -> None:
        await self._sink.send_audio(ulaw)
        self._audio_sent(ulaw, play_at)
        if self._unmarked_ms >= self._mark_every_ms:
            await self._send_mark()

    def _audio_sent(self, ulaw: bytes, play_at: float) -> None:
        self._progress.set()
        ms = len(ulaw) // TWILIO_FRAME_BYTES * FRAME_MS
        self.playback.audio_sent(ms)
        if self.first_audio_at is None:
            self.first_audio_at = self._clock.monotonic()
        self._track_audibility(ulaw, play_at)
        self._unmarked_ms += ms

    async def _send_mark(self) -> None:
        """A mark behind everything sent so far; its echo says the caller has heard it (spec §4)."""
        self._unmarked_ms = 0
        await self._sink.send_mark(self.playback.mark_sent())
        self._progress.set()

    def _track_audibility(self, ulaw: bytes, play_at: float) -> None:
        """Note when audible AI speech plays at the caller: frame k of this batch plays at play_at + k·20 ms."""
        marked = ulaw.translate(_AUDIBLE_CODES)  # 1 where a sample is audible: no decoding needed
        for k in range(len(ulaw) // TWILIO_FRAME_BYTES):
            if 1 not in marked[k * TWILIO_FRAME_BYTES : (k + 1) * TWILIO_FRAME_BYTES]:
                continue
            starts = play_at + k * FRAME_S
            if self._audible_since is None or starts > self._audible_until + SPURT_GAP_S:
                self._audible_since = starts
            self._audible_until = starts + FRAME_S

    def _paused_at(self) -> float:
        """When the AI will have paused, if it sends nothing more: each push moves it later."""
        if self._finishing:
            return float("-inf")
        return self._last_push_at + max(self.prebuffer.value_s, FRAME_S)

    async def _wait_for_pause(self) -> None:
        """``_wait`` until ``_paused_at``, which the AI's pushes keep moving later while it talks: the timer
        sets itself again from its own callback until the pause has come, rather than waking this task each
        time to find it has not (for a real-time AI, whose frames go out from ``_send_inline``, that was
        most of the pacer's ~20 wake-ups a call-second)."""
        self._ready.clear()
        self._parked, self._parked_until = True, self._paused_at()
        self._pause_timer = self._clock.call_at(self._parked_until, self._check_pause, slack_s=PAUSE_SLACK_S)
        try:
            await self._ready.wait()
        finally:
            if self._pause_timer is not None:
                self._pause_timer.cancel()
                self._pause_timer = None
            self._parked, self._parked_until = False, None

    def _check_pause(self) -> None:
        """The pause timer's callback: wake the pacer if the AI has paused, else re-arm for the pause as it is now."""
        paused_at = self._paused_at()
        if self._clock.monotonic() >= paused_at:
            self._ready.set()
        else:
            self._parked_until = paused_at
            self._pause_timer = self._clock.call_at(paused_at, self._check_pause, slack_s=PAUSE_SLACK_S)

    async def _wait(self, deadline: float | None) -> None:
        """Until more audio or a barge-in arrives, or the clock reaches ``deadline``."""
        self._ready.clear()
        self._parked, self._parked_until = True, deadline
        try:
            if deadline is None:
                await self._ready.wait()
            else:
                await self._clock.wait_until(self._ready, deadline)
        finally:
            self._parked, self._parked_until = False, None


def _compiled_path(outbound: Outbound) -> Callable[[bytes], None] | None:
    """``_ai_path.AiAudioPath`` for ``outbound``, or None where it does not apply: not built, or an object in the
    chain is not exactly the class the C code transliterates (a subclass may do otherwise), or the downsampler
    is numpy's. The C code reads the numbers from here, so there is one source of truth."""
    buffer = outbound._buffer
    to_caller = buffer._to_caller
    downsampler = to_caller._downsampler
    exact = (
        (outbound, Outbound),
        (buffer, FrameBuffer),
        (to_caller, AiToCaller),
        (downsampler, DownsamplerToUlaw),
        (outbound._pacer, OutboundPacer),
        (outbound.prebuffer, AdaptivePrebuffer),
        (outbound.playback, PlaybackTracker),
        (outbound._ready, Flag),
        (outbound._progress, Flag),
    )
    if AiAudioPath is None or downsampler._compiled is None or any(type(o) is not t for o, t in exact):
        return None
    # A leg whose class says its sends are Twilio media messages on a stream socket has them built in C.
    sink_type = type(outbound._sink)
    media_leg = sink_type if getattr(sink_type, "compiled_media_messages", False) else None
    path: Callable[[bytes], None] = AiAudioPath(
        outbound,
        audible_codes=_AUDIBLE_CODES,
        frame_s=FRAME_S,
        frame_ms=FRAME_MS,
        frame_bytes=TWILIO_FRAME_BYTES,
        low_water_s=LOW_WATER_S,
        underrun_gap_s=UNDERRUN_GAP_S,
        spurt_gap_s=SPURT_GAP_S,
        eps=_EPS,
        pacing_eps=pacing._EPS,
        twilio_leg=media_leg,
        caller_gone=CallerGone,
        monotonic=monotonic_of(outbound._clock),
    )
    return path
