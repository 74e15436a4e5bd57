"""A call's per-frame audio conversions, one call each way: compiled when the optional C extension is built.

Converting a 20 ms frame with numpy is a dozen numpy calls on 160–320 samples, and their per-call overhead,
not the arithmetic, is what it costs (7–9 µs a frame each way). ``_kernels.c`` does the same sums in one C
call (2–3 µs, the call included; ``bench/frame_path.py``'s "conversion alone" rows), with the tables and taps
handed over from ``codec`` and ``resample`` at import, so both paths give the same bytes:
``tests/test_kernels.py`` checks that bit for bit. The numpy path stays as the reference and as the fallback
where no compiler was at hand when the package was installed.

The setting ``audio.kernels`` chooses per bridge: ``auto`` (the default: compiled if built), ``numpy`` (the
reference path), ``compiled`` (refuse to start without the extension).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import numpy as np
import numpy.typing as npt

from telephony_bridge.audio import codec, resample
from telephony_bridge.errors import ConfigError

CHOICES = ("auto", "compiled", "numpy")


def _import_extension() -> tuple[ModuleType | None, str]:
    """The extension, configured; or None and why not (not built, or built for other tables or taps: then the
    numpy path runs, rather than the bridge failing to start)."""
    try:
        from telephony_bridge.audio import _kernels  # type: ignore[attr-defined]
    except ImportError:
        return None, "is not built"
    try:
        _kernels.configure(
            (2.0 * resample.SINC_TAPS).tobytes(),  # the upsampler's gain of 2 (see resample.Upsampler2x)
            resample.SINC_TAPS.tobytes(),
            codec.ULAW_DECODE.tobytes(),
            codec.ULAW_ENCODE.tobytes(),
        )
    except (ValueError, RuntimeError) as exc:
        return None, f"refused this package's tables or taps ({exc})"
    return _kernels, ""


EXTENSION, _UNAVAILABLE = _import_extension()


def use_compiled(choice: str) -> bool:
    """Whether ``audio.kernels`` = ``choice`` runs the compiled kernels. Raises ``ConfigError`` if it asks for
    them and they are not built: ``serve`` asks first, so that is one sentence at start-up."""
    if choice not in CHOICES:
        raise ConfigError(f"audio.kernels={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "compiled" and EXTENSION is None:
        raise ConfigError(
            f"audio.kernels is 'compiled', but the C extension telephony_bridge.audio._kernels {_UNAVAILABLE}: "
            "reinstall the package where a C compiler and Python's headers are installed (Debian: gcc python3-dev), "
            "or set audio.kernels to auto"
        )
    return EXTENSION is not None and choice != "numpy"


def _pick(compiled: bool | None) -> ModuleType | None:
    """None: the extension if built; True: the extension (it must be built); False: numpy."""
    if compiled and EXTENSION is None:
        use_compiled("compiled")  # raises, saying why
    return None if compiled is False else EXTENSION


class UlawUpsampler:
    """Caller → AI: μ-law at 8 kHz in; the same audio as int16 samples (for the VAD) and as little-endian PCM16 at
    16 kHz, two samples per sample in. One per call: the filter's state lives as long as the call."""

    # The compiled frame path reads and writes these at their fixed offsets (_pyattrs.h); the rest live in
    # the instance dict.
    __slots__ = ("__dict__", "__weakref__", "_state", "_upsampler")

    def __init__(self, *, compiled: bool | None = None) -> None:
        self._compiled = _pick(compiled)
        if self._compiled is not None:
            self._state = bytearray(self._compiled.UP_STATE_BYTES)
        else:
            self._upsampler = resample.Upsampler2x()

    def process(self, ulaw: bytes) -> tuple[npt.NDArray[np.int16], bytes]:
        if self._compiled is not None:
            pcm_8k, pcm_16k = self._compiled.ulaw_up(self._state, ulaw)
            return np.frombuffer(pcm_8k, dtype=np.int16), pcm_16k
        samples = codec.ulaw_to_pcm16(ulaw)
        if not len(samples):
            return samples, b""
        return samples, self._upsampler.process(samples).astype("<i2", copy=False).tobytes()


class DownsamplerToUlaw:
    """AI → caller: little-endian PCM16 at 16 kHz in (an even byte count), μ-law at 8 kHz out, one byte per two
    samples as ``resample.Downsampler2x`` releases them. One per call."""

    # The compiled frame path reads and writes these at their fixed offsets (_pyattrs.h); the rest live in
    # the instance dict.
    __slots__ = ("__dict__", "__weakref__", "_downsampler", "_state")

    def __init__(self, *, compiled: bool | None = None) -> None:
        self._compiled = _pick(compiled)
        if self._compiled is not None:
            self._state = bytearray(self._compiled.DOWN_STATE_BYTES)
        else:
            self._downsampler = resample.Downsampler2x()

    def process(self, pcm: bytes) -> bytes:
        if self._compiled is not None:
            return self._compiled.down_ulaw(self._state, pcm)
        return codec.pcm16_to_ulaw(self._downsampler.process(codec.pcm16_bytes_to_array(pcm)))


def mean_square_function(*, compiled: bool | None = None) -> Callable[[npt.NDArray[np.int16]], float]:
    """The mean of the squared samples of a contiguous int16 frame (0.0 for none), for the VAD's level gate:
    exact either way (the compiled one sums in integers, numpy in exact floats). ``compiled`` as for the
    resamplers."""
    extension = _pick(compiled)
    return extension.mean_square if extension is not None else _numpy_mean_square


def _numpy_mean_square(samples: npt.NDArray[np.int16]) -> float:
    wide = samples.astype(np.float64)
    return float(np.dot(wide, wide)) / len(samples) if len(samples) else 0.0
