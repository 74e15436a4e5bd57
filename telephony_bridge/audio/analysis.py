"""Measuring tools for audio quality, shared by the tests, the bench and tools: tones, levels, delay.

Levels are in dB relative to a full-scale int16 sine (dBFS). Spectra use a 4-term Blackman-Harris window
(sidelobes 92 dB down), so a tone's leakage stays below the -75 dB figures we test against.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FULL_SCALE = 32767
_FULL_SCALE_SINE_POWER = FULL_SCALE**2 / 2
_LOBE_BINS = 5  # Blackman-Harris main lobe is ±4 bins wide; one more for a tone between bins
_BH4 = (0.35875, 0.48829, 0.14128, 0.01168)


def tone(freq_hz: float, rate_hz: int, duration_s: float, level_dbfs: float = -6.0) -> npt.NDArray[np.int16]:
    """A sine at ``level_dbfs`` (peak relative to full scale), rounded to int16."""
    t = np.arange(round(duration_s * rate_hz)) / rate_hz
    amplitude = FULL_SCALE * 10 ** (level_dbfs / 20)
    return np.rint(amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.int16)


def multitone(
    rate_hz: int,
    duration_s: float,
    *,
    low_hz: float = 300.0,
    high_hz: float = 3400.0,
    count: int = 64,
    level_dbfs: float = -12.0,
    seed: int = 0,
) -> npt.NDArray[np.int16]:
    """Speech-band test signal: ``count`` sines at random frequencies and phases, aperiodic, peak at
    ``level_dbfs``. The same ``seed`` gives the same continuous signal at any rate, so the output of a
    resampler can be compared with the signal generated directly at the output rate (see ``delay_s``).
    """
    rng = np.random.default_rng(seed)
    freqs = rng.uniform(low_hz, high_hz, count)
    phases = rng.uniform(0, 2 * np.pi, count)
    t = np.arange(round(duration_s * rate_hz)) / rate_hz
    signal = np.zeros(len(t))
    for freq, phase in zip(freqs, phases, strict=True):
        signal += np.sin(2 * np.pi * freq * t + phase)
    # A fixed nominal peak (not the measured one), so every rate scales identically; at 5.7 standard deviations
    # of the sum it is practically never exceeded, so the clip below does not add harmonics above the band.
    peak = count / 2
    return np.rint(np.clip(signal / peak, -1, 1) * FULL_SCALE * 10 ** (level_dbfs / 20)).astype(np.int16)


def power_spectrum(
    samples: npt.NDArray[np.integer] | npt.NDArray[np.floating], rate_hz: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(frequencies in Hz, power per bin) of a windowed one-sided spectrum; the bins of a tone sum to its
    mean square, so sums over bands are powers."""
    n = len(samples)
    k = np.arange(n) / n
    window = sum(((-1) ** i) * a * np.cos(2 * np.pi * i * k) for i, a in enumerate(_BH4))
    spectrum = np.fft.rfft(np.asarray(samples, dtype=np.float64) * window)
    power = np.abs(spectrum) ** 2 * 2 / (n * np.sum(window**2))
    power[0] /= 2
    if n % 2 == 0:
        power[-1] /= 2
    return np.fft.rfftfreq(n, 1 / rate_hz), power


def _db(power: float) -> float:
    return float(10 * np.log10(max(power, 1e-30) / _FULL_SCALE_SINE_POWER))


def tone_level_db(samples: npt.NDArray[np.integer] | npt.NDArray[np.floating], rate_hz: int, freq_hz: float) -> float:
    """Level in dBFS of the tone at ``freq_hz`` (the power in its window main lobe)."""
    freqs, power = power_spectrum(samples, rate_hz)
    centre = int(np.argmin(np.abs(freqs - freq_hz)))
    return _db(float(power[max(centre - _LOBE_BINS, 0) : centre + _LOBE_BINS + 1].sum()))


def band_level_db(
    samples: npt.NDArray[np.integer] | npt.NDArray[np.floating], rate_hz: int, low_hz: float, high_hz: float
) -> float:
    """Level in dBFS of everything between ``low_hz`` and ``high_hz`` inclusive."""
    freqs, power = power_spectrum(samples, rate_hz)
    return _db(float(power[(freqs >= low_hz) & (freqs <= high_hz)].sum()))


def delay_s(
    output: npt.NDArray[np.integer] | npt.NDArray[np.floating],
    reference: npt.NDArray[np.integer] | npt.NDArray[np.floating],
    rate_hz: int,
    max_delay_s: float = 0.2,
) -> float:
    """How late ``output`` is relative to ``reference`` (same rate), in seconds, to a fraction of a sample:
    the peak of their cross-correlation over lags 0 to ``max_delay_s``, refined by a parabola."""
    out = np.asarray(output, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    n = min(len(out), len(ref))
    size = 1 << int(np.ceil(np.log2(2 * n)))
    corr = np.fft.irfft(np.fft.rfft(out[:n], size) * np.conj(np.fft.rfft(ref[:n], size)), size)
    lags = corr[: int(max_delay_s * rate_hz) + 2]
    peak = int(np.argmax(lags[:-1]))
    if peak > 0:
        before, at, after = lags[peak - 1], lags[peak], lags[peak + 1]
        return (peak + 0.5 * (before - after) / (before - 2 * at + after)) / rate_hz
    return peak / rate_hz
