"""The two audio directions of one call, each a chain of stateful stages that lives as long as the call.

Caller → AI: μ-law 8 kHz placed on the stream timeline → PCM16 → 16 kHz → 640-byte (20 ms) frames.
AI → caller: PCM16 16 kHz (any even or odd byte count) → 8 kHz → μ-law 160-byte (20 ms) frames.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from telephony_bridge.audio.codec import (
    SAVANTS_FRAME_BYTES,
    TWILIO_FRAME_BYTES,
    ULAW_SILENCE,
    pcm16_to_ulaw,
    ulaw_to_pcm16,
)
from telephony_bridge.audio.resample import Downsampler2x, Upsampler2x
from telephony_bridge.audio.timeline import InboundTimeline


class CallerToAi:
    def __init__(self) -> None:
        self.timeline = InboundTimeline()
        self._upsampler = Upsampler2x()
        self._pending = bytearray()

    def push(self, timestamp_ms: int | None, ulaw: bytes) -> tuple[npt.NDArray[np.int16], list[bytes]]:
        """One media payload in (``timestamp_ms`` None: unstamped): the caller's audio as placed on the timeline
        (8 kHz PCM, for the voice activity detector) and the whole 640-byte frames now due to the AI."""
        placed = ulaw_to_pcm16(self.timeline.place(timestamp_ms, ulaw))
        if len(placed):
            self._pending += self._upsampler.process(placed).astype("<i2", copy=False).tobytes()
        return placed, _take_frames(self._pending, SAVANTS_FRAME_BYTES)


class AiToCaller:
    def __init__(self) -> None:
        self._downsampler = Downsampler2x()
        self._odd_byte = b""
        self._pending = bytearray()

    def push(self, pcm: bytes) -> bytes:
        """AI PCM in (any length; a split sample is carried over); the μ-law bytes now due out."""
        data = self._odd_byte + pcm
        whole = len(data) & ~1
        self._odd_byte = data[whole:]
        if not whole:
            return b""
        samples = np.frombuffer(data[:whole], dtype="<i2")
        return pcm16_to_ulaw(self._downsampler.process(samples))


class FrameBuffer:
    """μ-law waiting to be paced out to Twilio, handed out in whole 20 ms frames."""

    def __init__(self) -> None:
        self._data = bytearray()

    def append(self, ulaw: bytes) -> None:
        self._data += ulaw

    @property
    def frames(self) -> int:
        return len(self._data) // TWILIO_FRAME_BYTES

    def take(self, frames: int) -> bytes:
        n = frames * TWILIO_FRAME_BYTES
        out = bytes(self._data[:n])
        del self._data[:n]
        return out

    def pad_to_frame(self) -> None:
        """Complete a trailing partial frame with μ-law silence, so it can be sent."""
        partial = len(self._data) % TWILIO_FRAME_BYTES
        if partial:
            self._data += bytes([ULAW_SILENCE]) * (TWILIO_FRAME_BYTES - partial)

    def clear(self) -> int:
        """Drop everything queued; returns the bytes dropped."""
        dropped = len(self._data)
        self._data.clear()
        return dropped

    def __len__(self) -> int:
        return len(self._data)


def _take_frames(buf: bytearray, size: int) -> list[bytes]:
    n = len(buf) // size
    frames = [bytes(buf[i * size : (i + 1) * size]) for i in range(n)]
    del buf[: n * size]
    return frames
