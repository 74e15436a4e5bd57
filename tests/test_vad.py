"""VoiceActivityDetector: line noise is never speech, speech mostly is, chunking changes nothing.

tests/data/speech_8k.wav and speech_16k.wav (2.8 s, one sentence, no leading silence) were made with
espeak-ng 1.51 and sox 14.4.2 (``-D``: no dither, so the files are reproducible bit for bit):

    espeak-ng -v en-us -s 175 -w speech.wav "Hi, can you check on my order, please?"
    sox -D speech.wav -r 8000 -c 1 -b 16 -e signed-integer tests/data/speech_8k.wav rate -v
    sox -D speech.wav -r 16000 -c 1 -b 16 -e signed-integer tests/data/speech_16k.wav rate -v

espeak-ng's gaps between words are digital zeros, which no phone line delivers, so the tests mix a noise floor
under the speech (see ``test_webrtcvad_alone_flags_noise_the_gate_rejects`` for what digital silence does).
"""

from __future__ import annotations

import wave
from functools import cache
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import webrtcvad
from hypothesis import given, settings
from hypothesis import strategies as st

from telephony_bridge.audio.codec import TWILIO_RATE_HZ
from telephony_bridge.audio.resample import Downsampler2x
from telephony_bridge.audio.vad import VAD_FRAME_SAMPLES, VoiceActivityDetector
from telephony_bridge.tools.emulator.voices import SpeechSynth

DATA = Path(__file__).parent / "data"
FULL_SCALE = 32768.0
MIN_SPEECH_FRAMES = 8  # the barge-in detector's default 160 ms: noise must never flag this many in a row


def read_wav_8k(name: str) -> npt.NDArray[np.int16]:
    with wave.open(str(DATA / name), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, TWILIO_RATE_HZ)
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.int16)


@cache
def speech_8k() -> npt.NDArray[np.int16]:
    """The recorded sentence, 2.8 s; speech starts at sample 0."""
    return read_wav_8k("speech_8k.wav")


@cache
def talker_8k(duration_s: float, level_dbfs: float = -20.0) -> npt.NDArray[np.int16]:
    """The emulator's speech-like talker signal (``level_dbfs`` RMS at syllable peaks), filtered down to 8 kHz."""
    synth = SpeechSynth(level_dbfs)
    frames = round(duration_s / 0.02) + 1  # one extra frame covers the downsampler's delay
    pcm16k = np.frombuffer(b"".join(synth.frame() for _ in range(frames)), dtype="<i2").astype(np.int16)
    return Downsampler2x().process(pcm16k)[: round(duration_s * TWILIO_RATE_HZ)]


def noise(kind: str, duration_s: float, level_dbfs: float, seed: int = 0) -> npt.NDArray[np.float64]:
    """White or pink (-3 dB/octave) Gaussian noise at ``level_dbfs`` RMS, as floats to mix before rounding."""
    n = round(duration_s * TWILIO_RATE_HZ)
    white = np.random.default_rng(seed).normal(size=n)
    if kind == "white":
        shaped = white
    else:
        spectrum = np.fft.rfft(white)
        bins = np.arange(len(spectrum), dtype=np.float64)
        bins[0] = 1.0
        shaped = np.fft.irfft(spectrum / np.sqrt(bins), n)
    return shaped * (FULL_SCALE * 10 ** (level_dbfs / 20) / np.sqrt(np.mean(shaped**2)))


def to_int16(samples: npt.NDArray[np.float64]) -> npt.NDArray[np.int16]:
    return np.clip(np.rint(samples), -32768, 32767).astype(np.int16)


def frame_levels_dbfs(samples: npt.NDArray[np.int16]) -> npt.NDArray[np.float64]:
    frames = samples[: len(samples) // VAD_FRAME_SAMPLES * VAD_FRAME_SAMPLES].astype(np.float64)
    mean_square = np.mean(frames.reshape(-1, VAD_FRAME_SAMPLES) ** 2, axis=1)
    return 10 * np.log10(np.maximum(mean_square, 1e-10) / FULL_SCALE**2)


def longest_run(decisions: list[bool]) -> int:
    best = run = 0
    for speech in decisions:
        run = run + 1 if speech else 0
        best = max(best, run)
    return best


def webrtcvad_alone(samples: npt.NDArray[np.int16], sensitivity: int) -> list[bool]:
    vad = webrtcvad.Vad(sensitivity)
    frames = samples[: len(samples) // VAD_FRAME_SAMPLES * VAD_FRAME_SAMPLES].reshape(-1, VAD_FRAME_SAMPLES)
    return [vad.is_speech(frame.astype("<i2").tobytes(), TWILIO_RATE_HZ) for frame in frames]


def test_vad_digital_silence_is_never_speech() -> None:
    for sensitivity in range(4):
        assert (
            VoiceActivityDetector(sensitivity).process(np.zeros(10 * TWILIO_RATE_HZ, dtype=np.int16)) == [False] * 500
        )


@pytest.mark.parametrize("kind", ["white", "pink"])
@pytest.mark.parametrize(("level_dbfs", "sensitivity"), [(-60, 0), (-60, 2), (-50, 0), (-50, 2), (-45, 2), (-45, 3)])
def test_vad_line_noise_is_never_speech(kind: str, level_dbfs: float, sensitivity: int) -> None:
    decisions = VoiceActivityDetector(sensitivity).process(to_int16(noise(kind, 20.0, level_dbfs)))
    assert sum(decisions) <= 0.005 * len(decisions)  # measured: none below -45, webrtcvad's first 1-4 at -45
    assert longest_run(decisions) < MIN_SPEECH_FRAMES


@pytest.mark.parametrize("kind", ["white", "pink"])
def test_vad_loud_stationary_noise_is_not_speech_at_sensitivity_3(kind: str) -> None:
    """-40 dBFS is above the energy gate: webrtcvad alone has to reject it, and at sensitivity 3 it does."""
    decisions = VoiceActivityDetector(3).process(to_int16(noise(kind, 20.0, -40.0, seed=1)))
    assert sum(decisions) <= 0.005 * len(
        decisions
    )  # measured: webrtcvad's first 3-4 frames only, also at sensitivity 2
    assert longest_run(decisions) < MIN_SPEECH_FRAMES


def test_webrtcvad_alone_flags_noise_the_gate_rejects() -> None:
    """Why the energy gate: webrtcvad flags its first frames whatever they hold, and after digital silence (the
    gaps in the recording) it takes -55 dBFS noise for speech for seconds. The gate rejects all of it."""
    quiet = to_int16(noise("white", 3.0, -55.0))
    assert webrtcvad_alone(quiet, 2)[:4] == [True] * 4
    after_speech = np.concatenate((speech_8k()[: len(speech_8k()) // VAD_FRAME_SAMPLES * VAD_FRAME_SAMPLES], quiet))
    alone = webrtcvad_alone(after_speech, 2)[-150:]
    assert sum(alone) > 100  # measured: 145 of 150
    assert VoiceActivityDetector(2).process(after_speech)[-150:] == [False] * 150


@pytest.mark.parametrize("sensitivity", [0, 1, 2, 3])
@pytest.mark.parametrize("noise_dbfs", [-60.0, -50.0])
def test_vad_recorded_speech_is_mostly_speech(sensitivity: int, noise_dbfs: float) -> None:
    speech = speech_8k()
    active = frame_levels_dbfs(speech) > -35.0  # 92 of 139 frames: the words, not the gaps between them
    mixed = to_int16(speech + noise("white", len(speech) / TWILIO_RATE_HZ, noise_dbfs))
    decisions = np.array(VoiceActivityDetector(sensitivity).process(mixed))
    assert decisions[active].mean() >= 0.9  # measured: 1.0


@pytest.mark.parametrize("sensitivity", [0, 3])
def test_vad_talker_signal_is_mostly_speech(sensitivity: int) -> None:
    talker = talker_8k(3.0)
    active = frame_levels_dbfs(talker) > -35.0
    decisions = np.array(VoiceActivityDetector(sensitivity).process(to_int16(talker + noise("white", 3.0, -60.0))))
    assert decisions[active].mean() >= 0.9  # measured: 1.0


def test_vad_quiet_speech_is_mostly_speech() -> None:
    """A quiet caller: the sentence 12 dB down (-34 dBFS RMS overall) still passes the -45 dBFS gate."""
    speech = speech_8k()
    active = frame_levels_dbfs(speech) > -35.0
    quiet = to_int16(speech * 10 ** (-12 / 20) + noise("white", len(speech) / TWILIO_RATE_HZ, -60.0))
    assert np.array(VoiceActivityDetector(2).process(quiet))[active].mean() >= 0.9  # measured: 0.98


@cache
def chunking_audio() -> npt.NDArray[np.int16]:
    """Noise, speech, noise, the talker: both decisions and webrtcvad's adaptation get exercised."""
    speech = speech_8k()
    floor = noise("pink", 1.0, -50.0)
    return to_int16(np.concatenate((floor, speech + noise("pink", len(speech) / TWILIO_RATE_HZ, -50.0), floor))).copy()


@cache
def decisions_in_frames() -> list[bool]:
    vad = VoiceActivityDetector(2)
    audio = chunking_audio()
    return [vad.is_speech(audio[i : i + VAD_FRAME_SAMPLES]) for i in range(0, len(audio) - 159, VAD_FRAME_SAMPLES)]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=60))
def test_vad_any_chunking_gives_the_same_decisions(sizes: list[int]) -> None:
    audio = chunking_audio()
    vad = VoiceActivityDetector(2)
    decisions: list[bool] = []
    start = 0
    for size in sizes:
        decisions += vad.process(audio[start : start + size])
        start += size
    decisions += vad.process(audio[start:])
    assert decisions == decisions_in_frames()
    assert vad.pending_samples == len(audio) % VAD_FRAME_SAMPLES


def test_vad_is_speech_rejects_anything_but_one_int16_frame() -> None:
    vad = VoiceActivityDetector()
    with pytest.raises(ValueError, match="expected 160 int16 samples"):
        vad.is_speech(np.zeros(159, dtype=np.int16))
    with pytest.raises(ValueError, match="expected 160 int16 samples"):
        vad.is_speech(np.zeros(160, dtype=np.float64))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected int16 samples, got float64"):
        vad.process(np.zeros(320, dtype=np.float64))  # type: ignore[arg-type]


def test_vad_sensitivity_must_be_webrtcvad_aggressiveness() -> None:
    with pytest.raises(ValueError, match="expected sensitivity 0, 1, 2 or 3, got 4"):
        VoiceActivityDetector(sensitivity=4)


@pytest.mark.parametrize("compiled", [None, False])
def test_vad_decides_as_webrtcvads_own_wrapper_gated_by_level(compiled: bool | None) -> None:
    """``process`` calls webrtcvad's C function on the array itself: the same decisions as its ``Vad.is_speech``
    on each frame's bytes, ANDed with the level gate, with either mean-square kernel (None: compiled if built)."""
    audio = chunking_audio()
    whole = len(audio) // VAD_FRAME_SAMPLES * VAD_FRAME_SAMPLES
    gate = (FULL_SCALE * 10 ** (-45.0 / 20)) ** 2
    loud = [float(np.mean(f.astype(np.float64) ** 2)) >= gate for f in audio[:whole].reshape(-1, VAD_FRAME_SAMPLES)]
    want = [voiced and level for voiced, level in zip(webrtcvad_alone(audio, 2), loud, strict=True)]
    assert True in want and False in want
    vad = VoiceActivityDetector(2, -45.0, compiled=compiled)
    assert [vad.process(audio[i : i + VAD_FRAME_SAMPLES])[0] for i in range(0, whole, VAD_FRAME_SAMPLES)] == want


def test_vad_takes_strided_samples_as_their_values() -> None:
    """A strided view (every other sample) decides as a contiguous copy of it, one frame or many at a time."""
    doubled = np.repeat(chunking_audio(), 2)
    strided, copy = doubled[::2], doubled[::2].copy()
    assert not strided.flags.c_contiguous
    for size in (VAD_FRAME_SAMPLES, 1000):
        got, want = VoiceActivityDetector(2), VoiceActivityDetector(2)
        for i in range(0, len(copy), size):
            assert got.process(strided[i : i + size]) == want.process(copy[i : i + size])
        assert got.is_speech(strided[:VAD_FRAME_SAMPLES]) == want.is_speech(copy[:VAD_FRAME_SAMPLES])
