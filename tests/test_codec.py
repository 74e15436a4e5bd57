"""μ-law tables: bit-exact with audioop, round trips within quantisation error, explicit byte order."""

from __future__ import annotations

import warnings
from types import ModuleType

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from telephony_bridge.audio.codec import (
    SAVANTS_FRAME_BYTES,
    SAVANTS_RATE_HZ,
    TWILIO_BYTES_PER_MS,
    TWILIO_FRAME_BYTES,
    TWILIO_RATE_HZ,
    ULAW_SILENCE,
    array_to_pcm16_bytes,
    pcm16_bytes_to_array,
    pcm16_to_ulaw,
    ulaw_to_pcm16,
)

ALL_CODES = bytes(range(256))
ALL_SAMPLES = np.arange(65536, dtype=np.uint16).view(np.int16)


def _audioop() -> ModuleType:
    """The stdlib reference (3.11-3.12; ``audioop-lts`` on 3.13+), imported without its deprecation warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pytest.importorskip("audioop")


def test_constants_describe_20_ms_frames() -> None:
    assert (TWILIO_RATE_HZ, SAVANTS_RATE_HZ) == (8000, 16000)
    assert TWILIO_FRAME_BYTES == TWILIO_RATE_HZ * 20 // 1000 * 1
    assert SAVANTS_FRAME_BYTES == SAVANTS_RATE_HZ * 20 // 1000 * 2
    assert TWILIO_BYTES_PER_MS * 20 == TWILIO_FRAME_BYTES


def test_ulaw_to_pcm16_matches_audioop_on_every_code() -> None:
    audioop = _audioop()
    expected = np.frombuffer(audioop.ulaw2lin(ALL_CODES, 2), dtype="<i2")
    np.testing.assert_array_equal(ulaw_to_pcm16(ALL_CODES), expected)


def test_pcm16_to_ulaw_matches_audioop_on_every_sample() -> None:
    audioop = _audioop()
    expected = audioop.lin2ulaw(ALL_SAMPLES.astype("<i2").tobytes(), 2)
    assert pcm16_to_ulaw(ALL_SAMPLES) == expected


def test_ulaw_silence_is_pcm_zero() -> None:
    assert ulaw_to_pcm16(bytes([ULAW_SILENCE])).tolist() == [0]
    assert pcm16_to_ulaw(np.zeros(3, dtype=np.int16)) == bytes([ULAW_SILENCE]) * 3


def test_ulaw_round_trip_stays_within_quantisation_error() -> None:
    # G.711 keeps 4 mantissa bits: the error is at most half a step of the value's segment (1/32 of the
    # biased magnitude, bias 132), plus the 2 bits dropped on entry, plus the clip at 32124.
    decoded = ulaw_to_pcm16(pcm16_to_ulaw(ALL_SAMPLES)).astype(np.int32)
    original = ALL_SAMPLES.astype(np.int32)
    error = np.abs(decoded - original)
    bound = (np.abs(original) + 132) / 32 + 4 + np.maximum(np.abs(original) - 32124, 0)
    assert np.all(error <= bound), int(np.max(error - bound))


def test_ulaw_decode_encode_decode_is_stable() -> None:
    once = ulaw_to_pcm16(ALL_CODES)
    np.testing.assert_array_equal(ulaw_to_pcm16(pcm16_to_ulaw(once)), once)


def test_ulaw_encoding_is_monotonic() -> None:
    decoded = ulaw_to_pcm16(pcm16_to_ulaw(np.arange(-32768, 32768, dtype=np.int16)))
    assert np.all(np.diff(decoded.astype(np.int32)) >= 0)


@given(st.binary().map(lambda b: b[: len(b) // 2 * 2]))
def test_pcm16_bytes_round_trip(data: bytes) -> None:
    assert array_to_pcm16_bytes(pcm16_bytes_to_array(data)) == data


def test_pcm16_bytes_are_little_endian() -> None:
    assert pcm16_bytes_to_array(b"\x01\x00\x00\x80").tolist() == [1, -32768]
    assert array_to_pcm16_bytes(np.array([1, -32768], dtype=np.int16)) == b"\x01\x00\x00\x80"


def test_pcm16_bytes_to_array_rejects_odd_length() -> None:
    with pytest.raises(ValueError, match="even number of PCM16 bytes, got 3"):
        pcm16_bytes_to_array(b"\x00\x00\x00")


@pytest.mark.parametrize("encode", [pcm16_to_ulaw, array_to_pcm16_bytes])
def test_encoders_reject_other_dtypes(encode: object) -> None:
    with pytest.raises(TypeError, match="expected int16 samples, got float64"):
        encode(np.zeros(4))  # type: ignore[operator]
