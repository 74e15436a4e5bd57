"""What the emulated AI says: pure signal objects, fed with what the caller sent and asked for 20 ms frames.

A voice knows nothing of sockets or clocks. The session driver calls ``hear(pcm, at_s)`` for every client
frame and ``speak(at_s)`` once per 20 ms tick, ``at_s`` being the injected clock's monotonic time of the
tick; ``speak`` returns one 640-byte frame (16 kHz s16le mono, spec §7) or None to send nothing. Because
the driver asks for exactly one frame per tick, no voice can burst.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Protocol

import numpy as np
import numpy.typing as npt

from telephony_bridge.tools.emulator.config import EmulatorConfig
from telephony_bridge.tools.emulator.protocol import FRAME_BYTES, FRAME_SAMPLES, SAMPLE_RATE_HZ

FULL_SCALE = 32768.0
INT16_MAX = 32767
TWO_PI = 2.0 * math.pi


class Voice(Protocol):
    def hear(self, pcm: bytes, at_s: float) -> None:
        """Take one client frame that arrived at ``at_s``."""
        ...

    def speak(self, at_s: float) -> bytes | None:
        """The frame for the tick at ``at_s``, or None to stay silent (send nothing)."""
        ...


def dbfs_to_amplitude(dbfs: float) -> float:
    return FULL_SCALE * 10.0 ** (dbfs / 20.0)


def to_pcm16(samples: npt.NDArray[np.float64]) -> bytes:
    return np.clip(np.rint(samples), -FULL_SCALE, INT16_MAX).astype("<i2").tobytes()


def pad_frame(pcm: bytes) -> bytes:
    return pcm + bytes(FRAME_BYTES - len(pcm))


class EchoVoice:
    """Says back what it heard, each client frame ``delay_s`` after it arrived, re-cut into 640-byte frames.

    A trailing part-frame is padded with silence once nothing more is queued, so every frame is 640 bytes.
    """

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self._queued: deque[tuple[float, bytes]] = deque()
        self._due = bytearray()

    def hear(self, pcm: bytes, at_s: float) -> None:
        self._queued.append((at_s + self.delay_s, pcm))

    def speak(self, at_s: float) -> bytes | None:
        while self._queued and self._queued[0][0] <= at_s:
            self._due += self._queued.popleft()[1]
        if len(self._due) >= FRAME_BYTES:
            frame = bytes(self._due[:FRAME_BYTES])
            del self._due[:FRAME_BYTES]
            return frame
        if self._due and not self._queued:
            frame = pad_frame(bytes(self._due))
            self._due.clear()
            return frame
        return None


class ToneVoice:
    """A steady sine; the phase carries over between frames so there is no click at frame edges."""

    def __init__(self, hz: float, dbfs: float) -> None:
        self._amplitude = dbfs_to_amplitude(dbfs)
        self._step = TWO_PI * hz / SAMPLE_RATE_HZ
        self._phase = 0.0

    def hear(self, pcm: bytes, at_s: float) -> None:
        """The tone ignores the caller."""

    def speak(self, at_s: float) -> bytes:
        phases = self._phase + self._step * np.arange(FRAME_SAMPLES)
        self._phase = (self._phase + self._step * FRAME_SAMPLES) % TWO_PI
        return to_pcm16(self._amplitude * np.sin(phases))


class FileVoice:
    """Plays a recording once from the start of the session, then stays silent."""

    def __init__(self, pcm: bytes) -> None:
        self._pcm = pcm
        self._offset = 0

    def hear(self, pcm: bytes, at_s: float) -> None:
        """The recording ignores the caller."""

    def speak(self, at_s: float) -> bytes | None:
        if self._offset >= len(self._pcm):
            return None
        frame = self._pcm[self._offset : self._offset + FRAME_BYTES]
        self._offset += FRAME_BYTES
        return pad_frame(frame)


class UtteranceDetector:
    """Energy end-of-utterance detection: ``min_speech_s`` above the threshold, then ``min_silence_s`` below.

    Works on 10 ms blocks of the audio itself (not arrival times), so chunking does not change the result.
    """

    BLOCK_SAMPLES = 160  # 10 ms

    def __init__(self, *, threshold_dbfs: float = -40.0, min_speech_s: float = 0.2, min_silence_s: float = 0.4) -> None:
        self.threshold_dbfs = threshold_dbfs
        self.min_speech_s = min_speech_s
        self.min_silence_s = min_silence_s
        self.in_utterance = False
        block_s = self.BLOCK_SAMPLES / SAMPLE_RATE_HZ
        # whole blocks, counted as integers so 20 x 10 ms is exactly 200 ms
        self._speech_blocks_needed = max(1, round(min_speech_s / block_s))
        self._silence_blocks_needed = max(1, round(min_silence_s / block_s))
        self._threshold_rms = dbfs_to_amplitude(threshold_dbfs)
        self._carry = b""
        self._speech_blocks = 0
        self._silence_blocks = 0

    def process(self, pcm: bytes) -> int:
        """Feed audio; return how many utterances ended within it."""
        data = self._carry + pcm
        usable = len(data) - len(data) % (self.BLOCK_SAMPLES * 2)
        self._carry = data[usable:]
        samples = np.frombuffer(data[:usable], dtype="<i2").astype(np.float64)
        ended = 0
        for block in samples.reshape(-1, self.BLOCK_SAMPLES):
            ended += self._block(math.sqrt(float(np.mean(block * block))) >= self._threshold_rms)
        return ended

    def end(self) -> bool:
        """End an utterance in progress because the audio itself stopped; True if there was one."""
        was_speaking = self.in_utterance
        self.in_utterance = False
        self._speech_blocks = self._silence_blocks = 0
        return was_speaking

    def _block(self, loud: bool) -> int:
        if loud:
            self._silence_blocks = 0
            self._speech_blocks += 1
            if self._speech_blocks >= self._speech_blocks_needed:
                self.in_utterance = True
            return 0
        self._speech_blocks = 0
        if not self.in_utterance:
            return 0
        self._silence_blocks += 1
        if self._silence_blocks >= self._silence_blocks_needed:
            self.end()
            return 1
        return 0


class SpeechSynth:
    """A speech-like signal: a harmonic series on a gliding 110-190 Hz fundamental, four syllables a second.

    ``level_dbfs`` is the RMS at a syllable's peak. Starting a new reply restarts the envelope at zero, so
    replies start without a click.
    """

    SYLLABLE_HZ = 4.0
    HARMONICS = 16  # 16 x 190 Hz stays inside the telephone band and far below Nyquist

    def __init__(self, level_dbfs: float = -20.0) -> None:
        ks = np.arange(1, self.HARMONICS + 1, dtype=np.float64)
        self._ks = ks[:, np.newaxis]
        self._weights = (1.0 / ks)[:, np.newaxis]  # -6 dB/octave, roughly a glottal source
        series_rms = math.sqrt(float(np.sum(1.0 / ks**2)) / 2.0)
        self._gain = dbfs_to_amplitude(level_dbfs) / series_rms
        self._n = 0
        self._phase = 0.0

    def restart(self) -> None:
        self._n = 0

    def frame(self) -> bytes:
        t = (self._n + np.arange(FRAME_SAMPLES)) / SAMPLE_RATE_HZ
        self._n += FRAME_SAMPLES
        f0 = 150.0 + 25.0 * np.sin(TWO_PI * 0.9 * t) + 15.0 * np.sin(TWO_PI * 3.1 * t)
        phases = self._phase + np.cumsum(TWO_PI * f0 / SAMPLE_RATE_HZ)
        self._phase = float(phases[-1]) % TWO_PI
        voiced = np.sum(self._weights * np.sin(self._ks * phases), axis=0)
        envelope = np.sin(math.pi * self.SYLLABLE_HZ * t) ** 2  # smooth rise and fall, silent between
        return to_pcm16(self._gain * envelope * voiced)


class TalkerVoice:
    """Speaks for ``reply_s`` after each caller utterance and does not stop if the caller talks over it.

    Cutting the AI off for the caller (barge-in) is the bridge's job, which this voice exists to test.
    Replies earned while speaking are queued behind the current one.
    """

    def __init__(
        self, reply_s: float, *, detector: UtteranceDetector | None = None, synth: SpeechSynth | None = None
    ) -> None:
        self._reply_frames = max(1, round(reply_s * SAMPLE_RATE_HZ / FRAME_SAMPLES))
        self.detector = detector or UtteranceDetector()
        self._synth = synth or SpeechSynth()
        self._owed_replies = 0
        self._frames_left = 0
        self._last_heard_s: float | None = None

    @property
    def speaking(self) -> bool:
        return self._frames_left > 0

    def hear(self, pcm: bytes, at_s: float) -> None:
        self._last_heard_s = at_s
        self._owed_replies += self.detector.process(pcm)

    def speak(self, at_s: float) -> bytes | None:
        caller_went_quiet = self._last_heard_s is not None and at_s - self._last_heard_s >= self.detector.min_silence_s
        if caller_went_quiet and self.detector.end():
            self._owed_replies += 1
        if not self._frames_left and self._owed_replies:
            self._owed_replies -= 1
            self._frames_left = self._reply_frames
            self._synth.restart()
        if not self._frames_left:
            return None
        self._frames_left -= 1
        return self._synth.frame()


def voice_for(config: EmulatorConfig, wav_pcm: bytes = b"") -> Voice:
    """A fresh voice for one session (voices hold per-session state)."""
    match config.voice:
        case "echo":
            return EchoVoice(config.echo_delay_s)
        case "tone":
            return ToneVoice(config.tone_hz, config.tone_dbfs)
        case "file":
            return FileVoice(wav_pcm)
        case "talker":
            return TalkerVoice(config.talker_reply_s)
