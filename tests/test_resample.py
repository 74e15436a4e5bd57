"""2× resamplers: exact lengths every call, chunking-invariant, and the filter figures our issues require."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from telephony_bridge.audio.analysis import band_level_db, delay_s, multitone, tone, tone_level_db
from telephony_bridge.audio.resample import (
    DOWNSAMPLER_DELAY_S,
    HALF_BAND_TAPS,
    UPSAMPLER_DELAY_S,
    Downsampler2x,
    Upsampler2x,
    half_band_taps,
)

RATE_8K = 8000
RATE_16K = 16000
SKIP_S = 0.02  # filter warm-up (the delay line is 75 samples = 4.7 ms at 16 kHz) left out of measurements
PASSBAND_HZ = list(range(300, 3401, 100))


def _upsample(samples: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
    return Upsampler2x().process(samples)[round(SKIP_S * RATE_16K) :]


def _downsample(samples: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
    return Downsampler2x().process(samples)[round(SKIP_S * RATE_8K) :]


def _response_db(taps: npt.NDArray[np.float64], freqs_hz: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Magnitude response of ``taps`` at 16 kHz, in dB."""
    phase = np.exp(-2j * np.pi * np.outer(freqs_hz / RATE_16K, np.arange(len(taps))))
    return 20 * np.log10(np.abs(phase @ taps))


def _chunks(draw: st.DrawFn, total: int) -> list[int]:
    sizes: list[int] = []
    while sum(sizes) < total:
        sizes.append(min(draw(st.integers(0, 700)), total - sum(sizes)))
    return sizes


@st.composite
def signals_and_chunks(draw: st.DrawFn) -> tuple[npt.NDArray[np.int16], list[int]]:
    """Full-scale random int16 (so saturation is exercised too) and a random split, odd sizes and 0 included."""
    seed = draw(st.integers(0, 2**32 - 1))
    total = draw(st.integers(0, 3000))
    samples = np.random.default_rng(seed).integers(-32768, 32768, total).astype(np.int16)
    return samples, _chunks(draw, total)


def _split(samples: npt.NDArray[np.int16], sizes: list[int]) -> list[npt.NDArray[np.int16]]:
    return np.split(samples, np.cumsum(sizes)[:-1]) if sizes else []


def test_half_band_taps_are_symmetric_and_half_band() -> None:
    taps = half_band_taps()
    centre = HALF_BAND_TAPS // 2
    assert len(taps) == HALF_BAND_TAPS
    np.testing.assert_array_equal(taps, taps[::-1])
    assert taps[centre] == 0.5
    assert np.all(taps[centre + 2 :: 2] == 0) and np.all(taps[1::2][: centre // 2] == 0)
    assert taps[0::2].sum() == 0.5 and taps.sum() == 1.0


def test_half_band_taps_reject_from_4600_hz_by_80_db_and_stay_flat_to_3400_hz() -> None:
    taps = half_band_taps()
    assert _response_db(taps, np.linspace(4600, 8000, 3401)).max() <= -80
    assert np.abs(_response_db(taps, np.linspace(0, 3400, 3401))).max() <= 0.01


def test_half_band_taps_reject_lengths_other_than_4k_plus_3() -> None:
    with pytest.raises(ValueError, match="expected num_taps = 4k \\+ 3, got 73"):
        half_band_taps(73)


@settings(max_examples=60, deadline=None)
@given(signals_and_chunks())
def test_upsampler_returns_exactly_twice_the_input_every_call(case: tuple[npt.NDArray[np.int16], list[int]]) -> None:
    samples, sizes = case
    upsampler = Upsampler2x()
    for chunk in _split(samples, sizes):
        out = upsampler.process(chunk)
        assert (out.dtype, len(out)) == (np.int16, 2 * len(chunk))


@settings(max_examples=60, deadline=None)
@given(signals_and_chunks())
def test_downsampler_total_output_is_half_the_total_input_rounded_down(
    case: tuple[npt.NDArray[np.int16], list[int]],
) -> None:
    samples, sizes = case
    downsampler = Downsampler2x()
    total_in = total_out = 0
    for chunk in _split(samples, sizes):
        out = downsampler.process(chunk)
        total_in += len(chunk)
        total_out += len(out)
        assert out.dtype == np.int16
        assert total_out == total_in // 2


@settings(max_examples=60, deadline=None)
@given(signals_and_chunks())
def test_upsampler_streamed_equals_whole(case: tuple[npt.NDArray[np.int16], list[int]]) -> None:
    samples, sizes = case
    upsampler = Upsampler2x()
    streamed = [upsampler.process(chunk) for chunk in _split(samples, sizes)]
    np.testing.assert_array_equal(np.concatenate([np.zeros(0, np.int16), *streamed]), Upsampler2x().process(samples))


@settings(max_examples=60, deadline=None)
@given(signals_and_chunks())
def test_downsampler_streamed_equals_whole(case: tuple[npt.NDArray[np.int16], list[int]]) -> None:
    samples, sizes = case
    downsampler = Downsampler2x()
    streamed = [downsampler.process(chunk) for chunk in _split(samples, sizes)]
    np.testing.assert_array_equal(np.concatenate([np.zeros(0, np.int16), *streamed]), Downsampler2x().process(samples))


@settings(max_examples=30, deadline=None)
@given(signals_and_chunks())
def test_upsampler_equals_direct_form_filter_on_zero_stuffed_input(
    case: tuple[npt.NDArray[np.int16], list[int]],
) -> None:
    samples, _ = case
    assume(len(samples) > 0)  # np.convolve refuses empty input
    stuffed = np.zeros(2 * len(samples))
    stuffed[0::2] = samples
    direct = np.convolve(stuffed, 2 * half_band_taps())[: len(stuffed)]
    expected = np.clip(np.rint(direct), -32768, 32767).astype(np.int16)
    np.testing.assert_array_equal(Upsampler2x().process(samples), expected)


@settings(max_examples=30, deadline=None)
@given(signals_and_chunks())
def test_downsampler_equals_direct_form_filter_then_every_even_sample(
    case: tuple[npt.NDArray[np.int16], list[int]],
) -> None:
    samples, _ = case
    assume(len(samples) > 0)  # np.convolve refuses empty input
    direct = np.convolve(samples.astype(np.float64), half_band_taps())[0::2][: len(samples) // 2]
    expected = np.clip(np.rint(direct), -32768, 32767).astype(np.int16)
    np.testing.assert_array_equal(Downsampler2x().process(samples), expected)


def test_resamplers_flush_nothing_because_they_hold_nothing_back() -> None:
    upsampler, downsampler = Upsampler2x(), Downsampler2x()
    upsampler.process(tone(1000, RATE_8K, 0.02))
    downsampler.process(tone(1000, RATE_16K, 0.02)[:-1])
    assert (len(upsampler.flush()), len(downsampler.flush())) == (0, 0)


@pytest.mark.parametrize("level_dbfs", [-6.0, -30.0])
def test_1khz_tone_survives_each_direction_and_the_round_trip_within_0_1_db(level_dbfs: float) -> None:
    at_8k = tone(1000, RATE_8K, 0.3, level_dbfs)
    at_16k = tone(1000, RATE_16K, 0.3, level_dbfs)
    assert tone_level_db(_upsample(at_8k), RATE_16K, 1000) == pytest.approx(level_dbfs, abs=0.1)
    assert tone_level_db(_downsample(at_16k), RATE_8K, 1000) == pytest.approx(level_dbfs, abs=0.1)
    round_trip = Downsampler2x().process(Upsampler2x().process(at_8k))[round(SKIP_S * RATE_8K) :]
    assert tone_level_db(round_trip, RATE_8K, 1000) == pytest.approx(level_dbfs, abs=0.1)


def test_upsampler_passband_300_to_3400_hz_is_flat_within_0_5_db() -> None:
    gains = [tone_level_db(_upsample(tone(f, RATE_8K, 0.15)), RATE_16K, f) + 6.0 for f in PASSBAND_HZ]
    assert max(abs(g) for g in gains) <= 0.5


def test_downsampler_passband_300_to_3400_hz_is_flat_within_0_5_db() -> None:
    gains = [tone_level_db(_downsample(tone(f, RATE_16K, 0.15)), RATE_8K, f) + 6.0 for f in PASSBAND_HZ]
    assert max(abs(g) for g in gains) <= 0.5


@pytest.mark.parametrize("freq_hz", [1000, 3400])
def test_upsampler_puts_no_more_than_minus_75_db_into_4_to_8_khz(freq_hz: int) -> None:
    out = _upsample(tone(freq_hz, RATE_8K, 0.3, -1.0))
    assert band_level_db(out, RATE_16K, 4000, 8000) - tone_level_db(out, RATE_16K, freq_hz) <= -75


@pytest.mark.parametrize(("freq_hz", "rejection_db"), [(5000, 75), (6500, 75), (6000, 60), (4600, 75)])
def test_downsampler_keeps_tones_above_4_khz_out_of_the_call(freq_hz: int, rejection_db: float) -> None:
    control_db = tone_level_db(_downsample(tone(1000, RATE_16K, 0.3, -1.0)), RATE_8K, 1000)
    aliased_db = band_level_db(_downsample(tone(freq_hz, RATE_16K, 0.3, -1.0)), RATE_8K, 0, 4000)
    assert aliased_db <= control_db - rejection_db


def test_delays_are_as_stated_and_at_most_3_ms() -> None:
    up = Upsampler2x().process(multitone(RATE_8K, 0.5))
    down = Downsampler2x().process(multitone(RATE_16K, 0.5))
    assert delay_s(up, multitone(RATE_16K, 0.5), RATE_16K) == pytest.approx(UPSAMPLER_DELAY_S, abs=2e-6)
    assert delay_s(down, multitone(RATE_8K, 0.5), RATE_8K) == pytest.approx(DOWNSAMPLER_DELAY_S, abs=2e-6)
    assert UPSAMPLER_DELAY_S == DOWNSAMPLER_DELAY_S == 37 / RATE_16K
    assert max(UPSAMPLER_DELAY_S, DOWNSAMPLER_DELAY_S) <= 0.003


def test_upsampler_odd_outputs_are_the_input_delayed() -> None:
    samples = np.random.default_rng(7).integers(-32768, 32768, 400).astype(np.int16)
    lag = round(UPSAMPLER_DELAY_S * RATE_16K) // 2  # in 8 kHz samples
    np.testing.assert_array_equal(Upsampler2x().process(samples)[1::2][lag:], samples[:-lag])


def test_round_trip_returns_speech_band_audio_delayed_by_a_whole_number_of_8khz_samples() -> None:
    said = multitone(RATE_8K, 0.5)
    heard = Downsampler2x().process(Upsampler2x().process(said))
    lag = round((UPSAMPLER_DELAY_S + DOWNSAMPLER_DELAY_S) * RATE_8K)
    assert lag == pytest.approx((UPSAMPLER_DELAY_S + DOWNSAMPLER_DELAY_S) * RATE_8K, abs=1e-9)
    settled = round(SKIP_S * RATE_8K)  # the filters smooth the signal's abrupt start
    error = heard[lag + settled :].astype(np.int32) - said[settled:-lag]
    assert np.abs(error).max() <= 1
