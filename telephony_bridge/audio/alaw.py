"""G.711 A-law (PCMA) for SIP peers that prefer it, as byte-to-byte tables to and from μ-law, the call core's
caller-side format. Each table goes through PCM16, so a PCMA call costs one ``bytes.translate`` per frame
each way."""

from __future__ import annotations

import numpy as np

from telephony_bridge.audio.codec import pcm16_to_ulaw, ulaw_to_pcm16

ALAW_SILENCE = 0xD5  # encodes PCM 0 (spec §11.1)


def _alaw_decode(byte: int) -> int:
    """ITU-T G.711 A-law expansion to the 16-bit scale."""
    a = byte ^ 0x55
    segment = (a & 0x70) >> 4
    mantissa = a & 0x0F
    value = (mantissa << 4) + 8 if segment == 0 else ((mantissa << 4) + 0x108) << (segment - 1)
    return value if a & 0x80 else -value


def _alaw_encode(sample: int) -> int:
    """ITU-T G.711 A-law compression of one 16-bit sample."""
    sign = 0x80 if sample >= 0 else 0x00
    magnitude = min(abs(sample) if sample >= 0 else -sample - 1, 32767) >> 3
    if magnitude < 32:
        code = magnitude >> 1
    else:
        segment = magnitude.bit_length() - 5
        code = (segment << 4) | ((magnitude >> segment) & 0x0F)
    return (code | sign) ^ 0x55


_ALAW_PCM = np.array([_alaw_decode(b) for b in range(256)], dtype=np.int16)
ALAW_TO_ULAW = pcm16_to_ulaw(_ALAW_PCM)
ULAW_TO_ALAW = bytes(_alaw_encode(int(s)) for s in ulaw_to_pcm16(bytes(range(256))))


def alaw_to_ulaw(data: bytes) -> bytes:
    return data.translate(ALAW_TO_ULAW)


def ulaw_to_alaw(data: bytes) -> bytes:
    return data.translate(ULAW_TO_ALAW)


def alaw_to_pcm16(data: bytes) -> np.ndarray:
    return _ALAW_PCM.take(np.frombuffer(data, dtype=np.uint8))
