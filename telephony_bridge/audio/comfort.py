"""What the caller hears while the AI is away (a reconnect): quiet noise or digital silence, 20 ms at a time.

Dead silence on a phone line sounds like a dropped call; a faint hiss says the line is still up. The noise sits
far below what ``Outbound`` counts as audible AI speech (``AUDIBLE_PEAK``, about -44 dBFS), so it never opens a
barge-in window. Pure and deterministic: one generator per call, seeded, no clock.
"""

from __future__ import annotations

import numpy as np

from telephony_bridge.audio.codec import TWILIO_FRAME_BYTES, TWILIO_RATE_HZ, ULAW_SILENCE, pcm16_to_ulaw

COMFORT_NOISE_DBFS = -66.0  # RMS: peaks near -54 dBFS, well under the -44 dBFS audibility threshold
_TABLE_S = 1.0  # a second of noise, cycled: no repetition the ear can catch at this level


class ComfortFill:
    """Endless 20 ms μ-law frames of comfort noise (``noise=True``) or digital silence."""

    def __init__(self, *, noise: bool, seed: int = 0) -> None:
        if noise:
            rng = np.random.default_rng(seed)
            rms = 32767 * 10 ** (COMFORT_NOISE_DBFS / 20)
            samples = np.clip(np.round(rng.normal(0, rms, int(TWILIO_RATE_HZ * _TABLE_S))), -4 * rms, 4 * rms)
            self._table = pcm16_to_ulaw(samples.astype(np.int16))
        else:
            self._table = bytes([ULAW_SILENCE]) * TWILIO_FRAME_BYTES
        self._at = 0

    def frame(self) -> bytes:
        out = self._table[self._at : self._at + TWILIO_FRAME_BYTES]
        self._at = (self._at + TWILIO_FRAME_BYTES) % len(self._table)
        return out
