"""G.711 μ-law at 8 kHz (Twilio) and 16-bit PCM (Savants), through numpy lookup tables.

The tables are built at import from the G.711 algorithm as the stdlib ``audioop`` implements it (Sun's
``g711.c``: 16-bit input truncated to 14 bits, bias 33, magnitude clipped to 8159), so the results are
bit-exact with ``audioop.lin2ulaw``/``ulaw2lin`` without needing ``audioop``, which is gone from 3.13.
A table lookup is one numpy call per frame: ~1 µs for 160 samples.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FRAME_MS = 20  # the frame both sides use (Twilio's observed cadence, Savants' recommended size)
FRAME_S = FRAME_MS / 1000
TWILIO_RATE_HZ = 8000
SAVANTS_RATE_HZ = 16000
TWILIO_FRAME_BYTES = 160  # 20 ms μ-law @8k, one byte per sample
SAVANTS_FRAME_BYTES = 640  # 20 ms PCM16 @16k, little-endian
TWILIO_BYTES_PER_MS = TWILIO_RATE_HZ // 1000  # μ-law: 8 bytes per ms
ULAW_SILENCE = 0xFF  # encodes PCM 0

_BIAS = 0x84  # G.711 bias on the 16-bit scale; 33 on the 14-bit scale the encoder works in
_CLIP_14 = 8159  # largest 14-bit magnitude before the bias (8159 + 33 = 8192 = 0x2000)
_SEGMENT_ENDS_14 = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)


def _build_decode_table() -> npt.NDArray[np.int16]:
    """256 μ-law codes -> int16, G.711 section 3 (the code is stored bit-inverted)."""
    code = ~np.arange(256, dtype=np.int32) & 0xFF
    mantissa = code & 0x0F
    segment = (code & 0x70) >> 4
    magnitude = (((mantissa << 3) + _BIAS) << segment) - _BIAS
    return np.where(code & 0x80, -magnitude, magnitude).astype(np.int16)


def _build_encode_table() -> npt.NDArray[np.uint8]:
    """65,536 entries indexed by the uint16 view of an int16 sample -> μ-law code."""
    value = np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.int32) >> 2  # 14-bit, floor
    negative = value < 0
    mask = np.where(negative, 0x7F, 0xFF)
    magnitude = np.minimum(np.where(negative, -value, value), _CLIP_14) + (_BIAS >> 2)
    segment = np.searchsorted(_SEGMENT_ENDS_14, magnitude, side="left")  # first end >= magnitude
    code = (np.minimum(segment, 7) << 4) | ((magnitude >> (segment + 1)) & 0x0F)
    code = np.where(segment >= 8, 0x7F, code)  # magnitude 8192 is past the last segment: the largest code
    return (code ^ mask).astype(np.uint8)


ULAW_DECODE = _build_decode_table()  # read-only: also what the compiled kernels decode with (``kernels``)
ULAW_ENCODE = _build_encode_table()
ULAW_DECODE.flags.writeable = False
ULAW_ENCODE.flags.writeable = False


def ulaw_to_pcm16(data: bytes) -> npt.NDArray[np.int16]:
    """Decode μ-law bytes to int16 samples (same rate, one sample per byte)."""
    return ULAW_DECODE.take(np.frombuffer(data, dtype=np.uint8))


def pcm16_to_ulaw(samples: npt.NDArray[np.int16]) -> bytes:
    """Encode int16 samples to μ-law bytes. Raises ``TypeError`` for any other dtype (a bug of ours)."""
    if samples.dtype != np.int16:
        raise TypeError(f"expected int16 samples, got {samples.dtype}")
    return ULAW_ENCODE.take(samples.view(np.uint16)).tobytes()


def pcm16_bytes_to_array(data: bytes) -> npt.NDArray[np.int16]:
    """Little-endian 16-bit PCM bytes (Savants' format) -> int16 samples, native byte order."""
    if len(data) % 2:
        raise ValueError(f"expected an even number of PCM16 bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<i2").astype(np.int16, copy=False)


def array_to_pcm16_bytes(samples: npt.NDArray[np.int16]) -> bytes:
    """int16 samples -> little-endian 16-bit PCM bytes. Raises ``TypeError`` for any other dtype."""
    if samples.dtype != np.int16:
        raise TypeError(f"expected int16 samples, got {samples.dtype}")
    return samples.astype("<i2", copy=False).tobytes()
