"""Streaming 2× resamplers between Twilio's 8 kHz and Savants' 16 kHz: one object per direction per call.

Why not the obvious tools (figures: ``python bench/audio_quality.py``):

- ``audioop.ratecv`` interpolates linearly with no anti-alias filter: 5 kHz from the AI folds to 3 kHz at
  full level, and 3.4 kHz from the caller leaves an image at 4.6 kHz only 4 dB down.
- ``soxr`` filters well but holds back 12–115 ms and releases it in bursts when fed 20 ms chunks, which
  breaks real-time pacing.

So: a linear-phase half-band FIR (Kaiser-windowed sinc, cutoff 4 kHz at 16 kHz), run polyphase. Every
other tap of a half-band filter is zero except the centre tap (exactly 1/2), so one output phase of the
upsampler is a delayed copy of the input and the other is one dot product; the downsampler likewise needs
one dot product per output sample. State (the last few input samples) is kept for the whole call: never
reset it mid-call, a reset clicks.

Taps are rounded to multiples of 2**-32, so every product of a tap and an int16 sample, and every partial
sum of those, is an exactly representable float64. The arithmetic is therefore exact whatever order numpy
adds in, and feeding a signal in chunks of any size gives bit-for-bit the output of feeding it whole.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from telephony_bridge.audio.codec import SAVANTS_RATE_HZ

HALF_BAND_TAPS = 75  # 4k + 3, so the outermost taps are non-zero; 87 dB down from 4.6 kHz (see below)
KAISER_BETA = 8.7  # best stopband for 75 taps, found by sweeping beta in 0.05 steps
_TAP_QUANTUM = 2.0**-32  # see the module docstring: keeps every sum exact in float64

# Designed and measured at 16 kHz (tests/test_resample.py checks the chosen row against 80 dB and 0.01 dB):
#   taps  beta  stopband from 4.6 kHz  passband 0-3.4 kHz  delay
#   67    7.80  78.1 dB                ±0.0011 dB          2.06 ms
#   71    8.25  82.7 dB                ±0.0006 dB          2.19 ms
#   75    8.70  87.4 dB                ±0.0004 dB          2.31 ms   <- chosen: 7 dB margin over 80 dB
#   79    9.15  91.4 dB                ±0.0002 dB          2.44 ms
# Cost per 20 ms frame hardly depends on the tap count: numpy call overhead dominates (bench/audio_quality.py).

_CENTRE = (HALF_BAND_TAPS - 1) // 2  # 37, odd

UPSAMPLER_DELAY_S = _CENTRE / SAVANTS_RATE_HZ  # 2.3125 ms: output n ≈ input at (n - 37) / 16 kHz
DOWNSAMPLER_DELAY_S = _CENTRE / SAVANTS_RATE_HZ  # 2.3125 ms: output m ≈ input at (2m - 37) / 16 kHz
# Up then down is therefore a delay of exactly 37 samples at 8 kHz (4.625 ms): an echo comes back aligned.


def half_band_taps(num_taps: int = HALF_BAND_TAPS, beta: float = KAISER_BETA) -> npt.NDArray[np.float64]:
    """A Kaiser-windowed-sinc half-band low-pass (cutoff fs/4), unity gain at DC in each polyphase branch.

    ``num_taps`` must be 4k + 3. The centre tap is exactly 1/2, the other even-offset taps exactly 0, and the
    odd-offset taps are scaled to sum to exactly 1/2 (after rounding to 2**-32), so a constant passes both
    resamplers unchanged and the upsampler puts no image at 8 kHz.
    """
    if num_taps % 4 != 3:
        raise ValueError(f"expected num_taps = 4k + 3, got {num_taps}")
    centre = (num_taps - 1) // 2
    offsets = np.arange(num_taps) - centre
    taps = 0.5 * np.sinc(offsets / 2) * np.kaiser(num_taps, beta)
    odd = offsets % 2 == 1
    taps[~odd] = 0.0
    taps[centre] = 0.5
    taps[odd] *= 0.5 / taps[odd].sum()
    taps = 0.5 * (taps + taps[::-1])  # exactly symmetric (linear phase) before rounding
    taps[odd] = np.round(taps[odd] / _TAP_QUANTUM) * _TAP_QUANTUM
    residue = 0.5 - taps[odd].sum()  # an even number of quanta: the taps come in equal pairs
    taps[centre - 1] += residue / 2
    taps[centre + 1] += residue / 2
    return taps


_TAPS = half_band_taps()
# The odd-offset taps: 38 of them, symmetric, so correlate == convolve. Also the compiled kernels' (``kernels``).
SINC_TAPS = _TAPS[0::2].copy()
_EMPTY = np.zeros(0, dtype=np.int16)
_EMPTY.flags.writeable = False
_INT16_MIN = np.float64(-32768)
_INT16_MAX = np.float64(32767)
_COPY_FROM = len(SINC_TAPS) - 1 - (_CENTRE - 1) // 2  # upsampler buffer index holding input m - 18 for m = 0


def _saturate(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Round half to even and clip in place: filtering a loud signal can overshoot int16 (Gibbs ringing).

    ``np.minimum``/``np.maximum`` rather than ``np.clip``: same result, ~0.7 µs less per call.
    """
    np.rint(values, out=values)
    np.minimum(values, _INT16_MAX, out=values)
    return np.maximum(values, _INT16_MIN, out=values)


class Upsampler2x:
    """8 kHz -> 16 kHz. ``process`` returns exactly 2N samples for N in, every call: no hold-back, no bursts.

    Output sample 2m is the filtered value between inputs; output 2m+1 is input m - 18 unchanged (the
    half-band centre tap). Delay: ``UPSAMPLER_DELAY_S``.
    """

    def __init__(self) -> None:
        self._history = np.zeros(len(SINC_TAPS) - 1, dtype=np.float64)  # last 37 inputs
        self._taps = 2.0 * SINC_TAPS  # zero-stuffing halves the level; the factor 2 restores it, exactly

    def process(self, samples: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
        """Feed N int16 samples at 8 kHz, get 2N int16 samples at 16 kHz."""
        n = len(samples)
        if n == 0:
            return _EMPTY
        buffer = np.concatenate((self._history, samples))
        out = np.empty(2 * n, dtype=np.int16)
        out[0::2] = _saturate(np.correlate(buffer, self._taps, mode="valid"))
        out[1::2] = buffer[_COPY_FROM : _COPY_FROM + n]  # exact int16 values: nothing to round
        self._history = buffer[-len(self._history) :]
        return out

    def flush(self) -> npt.NDArray[np.int16]:
        """Return the samples still owed: none, ``process`` never holds any back.

        The last ``UPSAMPLER_DELAY_S`` of input stays in the delay line; at the end of a call that is inaudible
        and draining it would break the exact 2N-out-per-N-in contract.
        """
        return _EMPTY


class Downsampler2x:
    """16 kHz -> 8 kHz, low-pass filtered first so nothing above 4 kHz folds back into the call.

    ``process`` returns exactly the samples due: after T samples in, floor(T / 2) out in total. Output m is
    the filtered value at input 2m, released with input 2m + 1 (62.5 µs later, usually in the same chunk);
    so an odd chunk's last sample waits for the next call, any chunk sizes work, and the delay equals the
    upsampler's. Delay: ``DOWNSAMPLER_DELAY_S``.
    """

    def __init__(self) -> None:
        self._history = np.zeros(HALF_BAND_TAPS, dtype=np.float64)  # last 75 inputs
        self._odd_next = False  # True when the next input sample has an odd index in the call's stream

    def process(self, samples: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
        """Feed int16 samples at 16 kHz, get the 8 kHz int16 samples they complete."""
        n = len(samples)
        if n == 0:
            return _EMPTY
        buffer = np.concatenate((self._history, samples))
        first = 0 if self._odd_next else 1  # position in ``samples`` of the first odd-index sample
        count = (n - first + 1) // 2  # outputs released by this chunk: one per odd-index sample in it
        self._history = buffer[-HALF_BAND_TAPS:]
        self._odd_next ^= n % 2 == 1
        if count == 0:
            return _EMPTY
        # For the odd-index sample at buffer[p]: even-index inputs buffer[p - 75 : p : 2] meet the sinc taps
        # and the odd-index input buffer[p - 38] the centre tap 1/2; the first p is HALF_BAND_TAPS + first.
        out = np.correlate(buffer[first : first + 2 * (count + _CENTRE) : 2], SINC_TAPS, mode="valid")
        out += buffer[_CENTRE + first :: 2][:count] * 0.5
        return _saturate(out).astype(np.int16)

    def flush(self) -> npt.NDArray[np.int16]:
        """Return the samples still owed: none. After an odd total, the output for the last input is not
        released (keeping the total at floor(total in / 2)); the last ``DOWNSAMPLER_DELAY_S`` stays in the
        delay line (inaudible at the end of a call).
        """
        return _EMPTY
