"""Quality and cost of three ways to bridge 8 kHz μ-law and 16 kHz PCM16, streamed in 20 ms frames.

    .venv/bin/python bench/audio_quality.py

Columns: ours (numpy μ-law tables + polyphase half-band FIR), the naive stdlib bridge (``audioop``
``ulaw2lin``/``lin2ulaw`` + ``ratecv``, state carried between frames) and ``soxr.ResampleStream`` at HQ (with our
μ-law tables). Quality rows feed int16 straight to the resamplers, 20 ms per call, because μ-law's own noise
(~37 dB SNR) would hide the filters; the cost rows include the μ-law step.

Rows are the entries of ``ROWS``, printed in order: a label and a function from a ``Method`` to the text of
its cell. A new row (PESQ, say) is one more entry there.
"""

from __future__ import annotations

import sys
import timeit
import warnings
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from telephony_bridge.audio.analysis import band_level_db, delay_s, multitone, tone, tone_level_db
from telephony_bridge.audio.codec import (
    SAVANTS_RATE_HZ,
    TWILIO_RATE_HZ,
    array_to_pcm16_bytes,
    pcm16_bytes_to_array,
    pcm16_to_ulaw,
    ulaw_to_pcm16,
)
from telephony_bridge.audio.resample import Downsampler2x, Upsampler2x

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

Samples = npt.NDArray[np.int16]
Transform = Callable[[Samples], Samples]  # one direction of one call: int16 in, int16 out, state kept
FrameTransform = Callable[[bytes], bytes]  # the same with the codec: μ-law <-> PCM16 bytes

FRAME_S = 0.02
SIGNAL_S = 1.0
SETTLE_S = 0.2  # left out of every measurement: filter warm-up, and soxr's initial hold-back
TONE_DBFS = -1.0
PASSBAND_HZ = range(300, 3401, 100)
TIMED_FRAMES = 500


@dataclass(frozen=True)
class Method:
    """One bridge: factories for a fresh per-call transform in each direction, bare and with the codec."""

    name: str
    new_up: Callable[[], Transform]
    new_down: Callable[[], Transform]
    new_up_frames: Callable[[], FrameTransform]
    new_down_frames: Callable[[], FrameTransform]


def _ours_up() -> Transform:
    return Upsampler2x().process


def _ours_down() -> Transform:
    return Downsampler2x().process


def _ratecv(in_rate: int, out_rate: int) -> Transform:
    state: Any = None

    def process(samples: Samples) -> Samples:
        nonlocal state
        out, state = audioop.ratecv(samples.astype("<i2").tobytes(), 2, 1, in_rate, out_rate, state)
        return np.frombuffer(out, dtype="<i2").astype(np.int16)

    return process


def _ratecv_up_frames() -> FrameTransform:
    state: Any = None

    def process(ulaw: bytes) -> bytes:
        nonlocal state
        out, state = audioop.ratecv(audioop.ulaw2lin(ulaw, 2), 2, 1, TWILIO_RATE_HZ, SAVANTS_RATE_HZ, state)
        return out

    return process


def _ratecv_down_frames() -> FrameTransform:
    state: Any = None

    def process(pcm: bytes) -> bytes:
        nonlocal state
        out, state = audioop.ratecv(pcm, 2, 1, SAVANTS_RATE_HZ, TWILIO_RATE_HZ, state)
        return audioop.lin2ulaw(out, 2)

    return process


def _soxr(in_rate: int, out_rate: int) -> Transform:
    stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16", quality="HQ")
    return lambda samples: stream.resample_chunk(samples)


def _with_codec_up(new: Callable[[], Transform]) -> Callable[[], FrameTransform]:
    def make() -> FrameTransform:
        process = new()
        return lambda ulaw: array_to_pcm16_bytes(process(ulaw_to_pcm16(ulaw)))

    return make


def _with_codec_down(new: Callable[[], Transform]) -> Callable[[], FrameTransform]:
    def make() -> FrameTransform:
        process = new()
        return lambda pcm: pcm16_to_ulaw(process(pcm16_bytes_to_array(pcm)))

    return make


def _soxr_up() -> Transform:
    return _soxr(TWILIO_RATE_HZ, SAVANTS_RATE_HZ)


def _soxr_down() -> Transform:
    return _soxr(SAVANTS_RATE_HZ, TWILIO_RATE_HZ)


METHODS = [
    Method("ours", _ours_up, _ours_down, _with_codec_up(_ours_up), _with_codec_down(_ours_down)),
    Method(
        "audioop.ratecv",
        lambda: _ratecv(TWILIO_RATE_HZ, SAVANTS_RATE_HZ),
        lambda: _ratecv(SAVANTS_RATE_HZ, TWILIO_RATE_HZ),
        _ratecv_up_frames,
        _ratecv_down_frames,
    ),
    Method("soxr HQ", _soxr_up, _soxr_down, _with_codec_up(_soxr_up), _with_codec_down(_soxr_down)),
]


@dataclass(frozen=True)
class Direction:
    """Caller -> AI ("up", 8 -> 16 kHz) or AI -> caller ("down", 16 -> 8 kHz)."""

    name: str
    in_rate: int
    out_rate: int

    def new(self, method: Method) -> Transform:
        return method.new_up() if self.in_rate < self.out_rate else method.new_down()

    def new_frames(self, method: Method) -> FrameTransform:
        return method.new_up_frames() if self.in_rate < self.out_rate else method.new_down_frames()


UP = Direction("up", TWILIO_RATE_HZ, SAVANTS_RATE_HZ)
DOWN = Direction("down", SAVANTS_RATE_HZ, TWILIO_RATE_HZ)


def _stream(method: Method, direction: Direction, samples: Samples) -> tuple[Samples, list[int]]:
    """Feed ``samples`` 20 ms at a time through a fresh transform: (all output, output length per call)."""
    process = direction.new(method)
    chunk = round(FRAME_S * direction.in_rate)
    outputs = [process(samples[i : i + chunk]) for i in range(0, len(samples), chunk)]
    return np.concatenate(outputs), [len(out) for out in outputs]


def _settled(method: Method, direction: Direction, samples: Samples) -> Samples:
    return _stream(method, direction, samples)[0][round(SETTLE_S * direction.out_rate) :]


def _db(value: float) -> str:
    return "silent" if value < -150 else f"{value:.1f} dB"


def image_rejection(freq_hz: float) -> Callable[[Method], str]:
    """Up: energy in 4-8 kHz relative to the tone."""

    def measure(method: Method) -> str:
        out = _settled(method, UP, tone(freq_hz, UP.in_rate, SIGNAL_S, TONE_DBFS))
        return _db(band_level_db(out, UP.out_rate, 4000, 8000) - tone_level_db(out, UP.out_rate, freq_hz))

    return measure


def alias_rejection(freq_hz: float) -> Callable[[Method], str]:
    """Down: everything arriving in 0-4 kHz from a tone above 4 kHz, relative to a 1 kHz control tone."""

    def measure(method: Method) -> str:
        control = _settled(method, DOWN, tone(1000, DOWN.in_rate, SIGNAL_S, TONE_DBFS))
        out = _settled(method, DOWN, tone(freq_hz, DOWN.in_rate, SIGNAL_S, TONE_DBFS))
        return _db(band_level_db(out, DOWN.out_rate, 0, 4000) - tone_level_db(control, DOWN.out_rate, 1000))

    return measure


def passband_deviation(direction: Direction) -> Callable[[Method], str]:
    """Largest |gain| of a tone between 300 and 3400 Hz (100 Hz steps)."""

    def measure(method: Method) -> str:
        gains = [
            tone_level_db(
                _settled(method, direction, tone(f, direction.in_rate, 0.5, TONE_DBFS)), direction.out_rate, f
            )
            - TONE_DBFS
            for f in PASSBAND_HZ
        ]
        return f"{max(abs(g) for g in gains):.4f} dB"

    return measure


def delay(direction: Direction) -> Callable[[Method], str]:
    """Where the output stream puts the input, by cross-correlation with a speech-band multitone."""

    def measure(method: Method) -> str:
        out, _ = _stream(method, direction, multitone(direction.in_rate, SIGNAL_S))
        return f"{1000 * delay_s(out, multitone(direction.out_rate, SIGNAL_S), direction.out_rate):.2f} ms"

    return measure


def held_back(direction: Direction) -> Callable[[Method], str]:
    """Most audio owed but not yet returned after any call (adds to the delay in real time)."""

    def measure(method: Method) -> str:
        _, lengths = _stream(method, direction, multitone(direction.in_rate, SIGNAL_S))
        chunk_out = FRAME_S * direction.out_rate
        owed = np.arange(1, len(lengths) + 1) * chunk_out - np.cumsum(lengths)
        return f"{1000 * owed.max() / direction.out_rate:.1f} ms"

    return measure


def samples_per_call(direction: Direction) -> Callable[[Method], str]:
    """Output samples per 20 ms call, min-max (a steady stream gives one number)."""

    def measure(method: Method) -> str:
        _, lengths = _stream(method, direction, multitone(direction.in_rate, SIGNAL_S))
        return f"{min(lengths)}-{max(lengths)}"

    return measure


def cost(direction: Direction) -> Callable[[Method], str]:
    """µs per 20 ms frame including the μ-law step: best of 5 runs over 500 frames (timeit)."""

    def measure(method: Method) -> str:
        signal = multitone(direction.in_rate, TIMED_FRAMES * FRAME_S)
        if direction is UP:
            frames = [pcm16_to_ulaw(part) for part in np.split(signal, TIMED_FRAMES)]
        else:
            frames = [array_to_pcm16_bytes(part) for part in np.split(signal, TIMED_FRAMES)]
        process = direction.new_frames(method)
        best = min(timeit.repeat(lambda: [process(frame) for frame in frames], number=1, repeat=5))
        return f"{1e6 * best / TIMED_FRAMES:.1f} µs"

    return measure


SPEECH_WAV = Path(__file__).resolve().parent.parent / "tests" / "data" / "speech_8k.wav"


def _speech() -> Samples:
    with wave.open(str(SPEECH_WAV)) as wav:
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.int16)


def _ulaw_floor(speech: Samples) -> Samples:
    """The network's own floor: a bare μ-law encode/decode, as every phone call has."""
    return ulaw_to_pcm16(pcm16_to_ulaw(speech))


def round_trip(method: Method, speech: Samples) -> Samples:
    """Caller -> bridge -> echo AI -> bridge -> caller: μ-law in 20 ms frames, up, then down, then decoded."""
    up, down = method.new_up_frames(), method.new_down_frames()
    heard = b"".join(down(up(pcm16_to_ulaw(frame))) for frame in np.split(speech, len(speech) // 160))
    out = ulaw_to_pcm16(heard)
    return np.concatenate([out, np.zeros(max(0, len(speech) - len(out)), dtype=np.int16)])


def pesq_nb(reference: Samples, degraded: Samples) -> float:
    from pesq import pesq  # ITU-T P.862, narrow-band

    return float(pesq(TWILIO_RATE_HZ, reference.astype(float), degraded[: len(reference)].astype(float), "nb"))


def pesq_round_trip(method: Method) -> str:
    speech = _speech()[: len(_speech()) // 160 * 160]
    return f"{pesq_nb(speech, round_trip(method, speech)):.2f} MOS"


ROWS: list[tuple[str, Callable[[Method], str]]] = [
    ("alias 5 kHz (down, vs 1 kHz)", alias_rejection(5000)),
    ("alias 6.5 kHz (down, vs 1 kHz)", alias_rejection(6500)),
    ("image of 1 kHz in 4-8 kHz (up)", image_rejection(1000)),
    ("image of 3.4 kHz in 4-8 kHz (up)", image_rejection(3400)),
    ("passband dev. 300-3400 Hz, up", passband_deviation(UP)),
    ("passband dev. 300-3400 Hz, down", passband_deviation(DOWN)),
    ("delay, up", delay(UP)),
    ("delay, down", delay(DOWN)),
    ("held back at worst, up", held_back(UP)),
    ("held back at worst, down", held_back(DOWN)),
    ("samples out per 20 ms call, up", samples_per_call(UP)),
    ("samples out per 20 ms call, down", samples_per_call(DOWN)),
    ("µs per 20 ms frame, up (μ-law in)", cost(UP)),
    ("µs per 20 ms frame, down (μ-law out)", cost(DOWN)),
    ("PESQ NB, speech round trip", pesq_round_trip),
]


def main() -> int:
    label_width = max(len(label) for label, _ in ROWS)
    widths = [max(len(method.name), 12) for method in METHODS]
    print(f"{'':{label_width}}  " + "  ".join(f"{m.name:>{w}}" for m, w in zip(METHODS, widths, strict=True)))
    for label, measure in ROWS:
        cells = [f"{measure(method):>{w}}" for method, w in zip(METHODS, widths, strict=True)]
        print(f"{label:{label_width}}  " + "  ".join(cells), flush=True)
    speech = _speech()
    print(
        f"Tones at {TONE_DBFS:g} dBFS, {SIGNAL_S:g} s, first {SETTLE_S:g} s of output skipped. "
        "'silent': every output sample rounds to 0 (the alias is under half an LSB).\n"
        f"PESQ of {SPEECH_WAV.name} ({len(speech) / TWILIO_RATE_HZ:.1f} s) through a bare μ-law encode/decode "
        f"(the network's floor): {pesq_nb(speech, _ulaw_floor(speech)):.2f} MOS."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
