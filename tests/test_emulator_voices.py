"""The emulator's voices as pure objects: data in, frames out, no sockets, no event loop."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from telephony_bridge.tools.emulator.config import EmulatorConfig
from telephony_bridge.tools.emulator.voices import (
    EchoVoice,
    FileVoice,
    SpeechSynth,
    TalkerVoice,
    ToneVoice,
    UtteranceDetector,
    voice_for,
)

RATE_HZ = 16_000
FRAME_S = 0.02
Samples = np.ndarray[Any, np.dtype[np.float64]]


def samples(pcm: bytes) -> Samples:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64)


def rms_dbfs(pcm: bytes) -> float:
    return 20 * math.log10(math.sqrt(float(np.mean(samples(pcm) ** 2))) / 32768 + 1e-12)


def tone(seconds: float, hz: float = 300.0, dbfs: float = -10.0) -> bytes:
    t = np.arange(round(RATE_HZ * seconds)) / RATE_HZ
    return (32768 * 10 ** (dbfs / 20) * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()


def silence(seconds: float) -> bytes:
    return bytes(2 * round(RATE_HZ * seconds))


def test_tone_phase_is_continuous_across_frames() -> None:
    voice = ToneVoice(440.0, -6.0)
    pcm = b"".join(voice.speak(i * FRAME_S) for i in range(100))
    t = np.arange(100 * 320) / RATE_HZ
    expected = np.rint(32768 * 10 ** (-6 / 20) * np.sin(2 * np.pi * 440.0 * t))
    assert np.max(np.abs(samples(pcm) - expected)) <= 1.0  # rounding only: no jump at frame edges


@pytest.mark.parametrize("hz", [220.0, 1000.0, 3400.0])
def test_tone_spectrum_peaks_at_the_configured_frequency(hz: float) -> None:
    voice = ToneVoice(hz, -12.0)
    pcm = b"".join(voice.speak(i * FRAME_S) for i in range(50))
    peak_hz = float(np.argmax(np.abs(np.fft.rfft(samples(pcm))))) * RATE_HZ / (50 * 320)
    assert abs(peak_hz - hz) <= 2.0
    assert abs(rms_dbfs(pcm) - (-12 - 3.01)) < 0.1  # a sine's RMS is 3 dB under its peak


@pytest.mark.parametrize("chunk", [320, 400, 640, 1000, 8192])
def test_echo_recuts_any_chunking_into_640_byte_frames_after_the_delay(chunk: int) -> None:
    sent = np.random.default_rng(chunk).integers(-3000, 3000, 8000).astype("<i2").tobytes()
    voice = EchoVoice(0.2)
    frames: list[tuple[float, bytes]] = []
    offset, tick = 0, 0
    while tick < 200:  # 4 s of 20 ms ticks; the client sends in real time on its own schedule
        at_s = tick * FRAME_S
        while offset < len(sent) and offset / 32_000 <= at_s:
            voice.hear(sent[offset : offset + chunk], offset / 32_000)
            offset += chunk
        frame = voice.speak(at_s)
        if frame is not None:
            frames.append((at_s, frame))
        tick += 1
    received = b"".join(frame for _, frame in frames)
    assert {len(frame) for _, frame in frames} == {640}
    assert received[: len(sent)] == sent
    assert received[len(sent) :] == bytes(len(received) - len(sent))  # a final part-frame is padded
    assert frames[0][0] >= 0.2


def test_echo_says_nothing_before_anything_is_due() -> None:
    voice = EchoVoice(0.5)
    voice.hear(b"\x01\x00" * 320, 1.0)
    assert [voice.speak(t) for t in (1.0, 1.2, 1.48)] == [None, None, None]
    assert voice.speak(1.5) == b"\x01\x00" * 320
    assert voice.speak(1.52) is None


def test_file_voice_plays_once_padding_the_last_frame() -> None:
    voice = FileVoice(b"\x01\x02" * 500)  # 1000 bytes: one frame and 360 bytes
    frames = [voice.speak(i * FRAME_S) for i in range(4)]
    assert frames == [b"\x01\x02" * 320, b"\x01\x02" * 180 + bytes(280), None, None]


def test_detector_ends_an_utterance_after_200_ms_loud_then_400_ms_quiet() -> None:
    detector = UtteranceDetector()
    assert detector.process(tone(0.2)) == 0
    assert detector.in_utterance
    assert detector.process(silence(0.39)) == 0
    assert detector.process(silence(0.01)) == 1
    assert not detector.in_utterance


def test_detector_ignores_short_blips_and_quiet_sound() -> None:
    detector = UtteranceDetector()
    assert detector.process(tone(0.19) + silence(1.0)) == 0
    assert detector.process(tone(1.0, dbfs=-45.0) + silence(1.0)) == 0


def test_detector_result_does_not_depend_on_chunking() -> None:
    audio = (tone(0.3) + silence(0.5)) * 3
    counts = []
    for chunk in (2, 320, 333, 640, 8192, len(audio)):
        detector = UtteranceDetector()
        counts.append(sum(detector.process(audio[i : i + chunk]) for i in range(0, len(audio), chunk)))
    assert counts == [3] * 6


def run_talker(voice: TalkerVoice, caller: bytes, ticks: int) -> list[bytes | None]:
    """Feed ``caller`` in 20 ms frames (silence after it runs out) and collect what the talker says."""
    said = []
    for tick in range(ticks):
        frame = caller[tick * 640 : (tick + 1) * 640] or silence(FRAME_S)
        voice.hear(frame, tick * FRAME_S)
        said.append(voice.speak(tick * FRAME_S))
    return said


def test_talker_replies_for_reply_s_after_each_utterance_only() -> None:
    said = run_talker(TalkerVoice(0.5), silence(0.5) + tone(0.3) + silence(0.4), ticks=100)
    spoken = [i for i, frame in enumerate(said) if frame is not None]
    assert spoken == list(range(59, 84))  # the utterance ends at 1.2 s (tick 59's frame); 25 frames follow


def test_talker_keeps_speaking_when_the_caller_barges_in() -> None:
    caller = tone(0.3) + silence(0.4) + tone(0.3)  # talks again 0 ms into the reply
    said = run_talker(TalkerVoice(1.0), caller, ticks=100)
    reply = said[34:84]
    assert all(frame is not None for frame in reply)


def test_talker_replies_when_the_caller_stops_sending_audio() -> None:
    voice = TalkerVoice(0.2)
    voice.hear(tone(0.3), 0.0)
    assert voice.speak(0.39) is None
    assert voice.speak(0.4) is not None


def test_speech_synth_sounds_like_a_voice_around_minus_20_dbfs() -> None:
    synth = SpeechSynth(-20.0)
    pcm = b"".join(synth.frame() for _ in range(100))  # 2 s
    frame_levels = [rms_dbfs(pcm[i : i + 640]) for i in range(0, len(pcm), 640)]
    assert -21.5 <= max(frame_levels) <= -19.0  # syllable peaks
    assert min(frame_levels) < -35  # gaps between syllables
    spectrum = np.abs(np.fft.rfft(samples(pcm)))
    freqs = np.fft.rfftfreq(len(pcm) // 2, 1 / RATE_HZ)
    assert 100 <= freqs[np.argmax(spectrum)] <= 200  # the fundamental is the strongest component
    assert spectrum[freqs > 3500].sum() < 0.01 * spectrum.sum()  # stays in the telephone band


def test_speech_synth_restart_begins_at_silence() -> None:
    synth = SpeechSynth()
    synth.frame()
    synth.restart()
    first = samples(synth.frame())
    assert np.max(np.abs(first[:16])) < 20  # the envelope starts at zero: no click


@pytest.mark.parametrize(
    ("voice", "kind"), [("echo", EchoVoice), ("tone", ToneVoice), ("talker", TalkerVoice), ("file", FileVoice)]
)
def test_voice_for_builds_a_fresh_voice_per_session(voice: str, kind: type) -> None:
    config = EmulatorConfig(voice=voice, wav_path="x.wav")  # type: ignore[arg-type]
    first, second = voice_for(config, b"\x00\x00"), voice_for(config, b"\x00\x00")
    assert isinstance(first, kind) and first is not second
