"""A barge-in probe: a scripted caller who asks something, then talks over the AI's answer.

Shared by ``bench/barge_in.py`` (which reports the figures) and the tests (which assert the behaviour). The
caller's script and what they heard share one timeline (seconds after ``start``), so how quickly the AI fell
silent at the caller is read straight off the two signals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from telephony_bridge.audio.codec import TWILIO_RATE_HZ

FRAME = 160  # 20 ms at 8 kHz
AUDIBLE_PEAK = 200  # about -44 dBFS, as the bridge judges AI audio
SPEECH_RMS_DBFS = -40.0  # a 5 ms stretch this loud is speech (the line noise is 15 dB or more below)
_ONSET_WINDOW = 40  # 5 ms at 8 kHz


def script(
    question: npt.NDArray[np.int16],
    interruption: npt.NDArray[np.int16],
    interrupt_at_s: float,
    seconds: float,
    noise_dbfs: float = -60.0,
    seed: int = 1,
) -> npt.NDArray[np.int16]:
    """Line noise throughout; the question at 0.2 s; the interruption at ``interrupt_at_s``."""
    rng = np.random.default_rng(seed)
    audio = rng.normal(0.0, 32767 * 10 ** (noise_dbfs / 20), int(seconds * TWILIO_RATE_HZ))
    for at_s, part in ((0.2, question), (interrupt_at_s, interruption)):
        if part.size:
            start = int(at_s * TWILIO_RATE_HZ)
            audio[start : start + part.size] += part[: audio.size - start]
    return np.clip(audio, -32768, 32767).astype(np.int16)


def speech_onset_s(audio: npt.NDArray[np.int16], after_s: float) -> float:
    """When speech begins at or after ``after_s``: the first 5 ms window above ``SPEECH_RMS_DBFS``."""
    start = int(after_s * TWILIO_RATE_HZ)
    tail = audio[start : start + (audio.size - start) // _ONSET_WINDOW * _ONSET_WINDOW].astype(np.float64)
    rms = np.sqrt(np.mean(tail.reshape(-1, _ONSET_WINDOW) ** 2, axis=1))
    loud = np.flatnonzero(rms >= 32767 * 10 ** (SPEECH_RMS_DBFS / 20))
    return (start + int(loud[0]) * _ONSET_WINDOW) / TWILIO_RATE_HZ if loud.size else float("nan")


def audible_spans(heard: npt.NDArray[np.int16], min_gap_s: float = 0.1) -> list[tuple[float, float]]:
    """Stretches of audible AI audio at the caller, joining gaps shorter than ``min_gap_s`` (syllable breaks)."""
    frames = heard[: heard.size // FRAME * FRAME].astype(np.int32).reshape(-1, FRAME)
    audible = np.abs(frames).max(axis=1) >= AUDIBLE_PEAK
    spans: list[tuple[float, float]] = []
    for i in np.flatnonzero(audible):
        start, end = i * FRAME / TWILIO_RATE_HZ, (i + 1) * FRAME / TWILIO_RATE_HZ
        if spans and start - spans[-1][1] < min_gap_s:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return spans


@dataclass(frozen=True)
class Interruption:
    ai_started_s: float  # the AI's answer became audible at the caller
    onset_s: float  # the caller began talking over it
    ai_stopped_s: float  # the AI fell silent at the caller

    @property
    def into_answer_s(self) -> float:
        return self.onset_s - self.ai_started_s

    @property
    def stop_after_s(self) -> float:
        """From the caller's speech onset to the AI's silence: what the caller experiences."""
        return self.ai_stopped_s - self.onset_s


def measure(heard: npt.NDArray[np.int16], said: npt.NDArray[np.int16], interrupt_at_s: float) -> Interruption:
    """Read one interruption off a call: the AI span that the caller's speech onset fell into, and its end."""
    onset = speech_onset_s(said, interrupt_at_s)
    spans = audible_spans(heard)
    started, stopped = next(((a, b) for a, b in spans if a <= onset < b), (float("nan"), float("nan")))
    return Interruption(started, onset, stopped)
