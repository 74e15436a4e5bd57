"""The two audio directions of one call, each a chain of stateful stages that lives as long as the call.

Caller → AI: μ-law 8 kHz placed on the stream timeline → PCM16 → 16 kHz → 640-byte (20 ms) frames.
AI → caller: PCM16 16 kHz (any even or odd byte count) → 8 kHz → μ-law 160-byte (20 ms) frames.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from telephony_bridge.audio.codec import SAVANTS_FRAME_BYTES, TWILIO_FRAME_BYTES, ULAW_SILENCE
from telephony_bridge.audio.kernels import DownsamplerToUlaw, UlawUpsampler
from telephony_bridge.audio.timeline import InboundTimeline


class CallerToAi:
    """``compiled``: None for the configured kernels (see ``kernels``), True or False to choose (benches, tests)."""

    # The compiled frame path reads and writes these at their fixed offsets (_pyattrs.h); the rest live in
    # the instance dict.
    __slots__ = ("__dict__", "__weakref__", "_pending", "_upsampler", "timeline")

    def __init__(self, *, compiled: bool | None = None) -> None:
        self.timeline = InboundTimeline()
        self._upsampler = UlawUpsampler(compiled=compiled)
        self._pending = bytearray()

    def push(self, timestamp_ms: int | None, ulaw: bytes) -> tuple[npt.NDArray[np.int16], list[bytes]]:
        """One media payload in (``timestamp_ms`` None: unstamped): the caller's audio as placed on the timeline
        (8 kHz PCM, for the voice activity detector) and the whole 640-byte frames now due to the AI."""
        placed, pcm_16k = self._upsampler.process(self.timeline.place(timestamp_ms, ulaw))
        if len(pcm_16k) == SAVANTS_FRAME_BYTES and not self._pending:
            return placed, [pcm_16k]  # Twilio's 20 ms with nothing carried over: the frame as it came
        self._pending += pcm_16k
        return placed, _take_frames(self._pending, SAVANTS_FRAME_BYTES)


class AiToCaller:
    """``compiled``: as for ``CallerToAi``."""

    # The compiled frame path reads and writes these at their fixed offsets (_pyattrs.h); the rest live in
    # the instance dict.
    __slots__ = ("__dict__", "__weakref__", "_downsampler", "_odd_byte", "_pending")

    def __init__(self, *, compiled: bool | None = None) -> None:
        self._downsampler = DownsamplerToUlaw(compiled=compiled)
        self._odd_byte = b""
        self._pending = bytearray()

    def push(self, pcm: bytes) -> bytes:
        """AI PCM in (any length; a split sample is carried over); the μ-law bytes now due out."""
        if not self._odd_byte and not len(pcm) & 1:  # whole samples, none carried: the AI's usual frame
            return self._downsampler.process(pcm) if pcm else b""
        data = self._odd_byte + pcm
        whole = len(data) & ~1
        self._odd_byte = data[whole:]
        if not whole:
            return b""
        return self._downsampler.process(data[:whole] if whole < len(data) else data)


class FrameBuffer:
    """μ-law waiting to be paced out to Twilio, handed out in whole 20 ms frames.

    The AI's 16 kHz PCM may be queued as it came (``append_pcm``): it is converted only when audio is taken, in
    one go, so a batch costs one resampler call rather than one per frame (numpy's per-call overhead, not the
    arithmetic, is the cost). Lengths count the μ-law it will become: the resampler gives exactly one sample
    out per two in, so that is known without converting. The PCM is kept as the chunks that came, and a take of
    everything queued (a real-time AI's frame, due as it arrives) hands the converter's output straight out:
    the AI's bytes are not copied on the way.
    """

    # The compiled frame path reads and writes these at their fixed offsets (_pyattrs.h); the rest live in
    # the instance dict.
    __slots__ = ("__dict__", "__weakref__", "_data", "_pcm", "_pcm_bytes_in", "_to_caller", "_ulaw_out", "size")

    def __init__(self, *, compiled: bool | None = None) -> None:
        self._data = bytearray()
        self._to_caller = AiToCaller(compiled=compiled)
        self._pcm: list[bytes] = []  # AI audio not yet converted, as it came
        self._pcm_bytes_in = 0  # AI audio ever queued (a sample split across chunks counts once whole)
        self._ulaw_out = 0  # μ-law the converter has made of it: one byte per two samples in
        # μ-law bytes queued, counting unconverted PCM as what it will become: ``len()``, kept as a plain
        # attribute because the pacer reads it several times a frame.
        self.size = 0

    def append(self, ulaw: bytes) -> None:
        self._convert()  # anything the AI sent earlier goes first
        self._data += ulaw
        self._resize()

    def append_pcm(self, pcm: bytes) -> None:
        """Queue ``pcm`` as it is: ``bytes`` are kept, not copied; a buffer its owner may reuse (a ``bytearray``,
        a ``memoryview``) is copied, as the queue did before it kept chunks."""
        self._pcm.append(pcm if type(pcm) is bytes else bytes(pcm))
        self._pcm_bytes_in += len(pcm)
        self._resize()

    @property
    def frames(self) -> int:
        return self.size // TWILIO_FRAME_BYTES

    def take(self, frames: int) -> bytes:
        n = frames * TWILIO_FRAME_BYTES
        if self._pcm and not self._data:
            ulaw = self._converted()
            if len(ulaw) == n:  # all that is queued, whole frames: no copy through ``_data``
                self._resize()
                return ulaw
            self._data += ulaw
        else:
            self._convert()
        out = bytes(self._data[:n])
        del self._data[:n]
        self._resize()
        return out

    def pad_to_frame(self) -> None:
        """Complete a trailing partial frame with μ-law silence, so it can be sent."""
        self._convert()
        partial = len(self._data) % TWILIO_FRAME_BYTES
        if partial:
            self._data += bytes([ULAW_SILENCE]) * (TWILIO_FRAME_BYTES - partial)
            self._resize()

    def clear(self) -> int:
        """Drop everything queued; returns the bytes dropped."""
        self._convert()  # through the converter all the same: its state and the byte alignment carry on
        dropped = len(self._data)
        self._data.clear()
        self._resize()
        return dropped

    def drop_pcm(self, pcm: bytes) -> int:
        """AI audio nobody will hear (the caller holds the floor): through the converter all the same, so its
        state and the byte alignment carry on; returns the μ-law bytes it made."""
        self.append_pcm(pcm)
        self._convert()
        dropped = len(self._data)
        self._data.clear()
        self._resize()
        return dropped

    def _convert(self) -> None:
        if self._pcm:
            self._data += self._converted()

    def _converted(self) -> bytes:
        """The queued PCM as μ-law, in one resampler call (a lone chunk is not copied first)."""
        ulaw = self._to_caller.push(b"".join(self._pcm))
        self._pcm.clear()
        self._ulaw_out += len(ulaw)
        return ulaw

    def _resize(self) -> None:
        self.size = len(self._data) + self._pcm_bytes_in // 2 // 2 - self._ulaw_out

    def __len__(self) -> int:
        return self.size


def _take_frames(buf: bytearray, size: int) -> list[bytes]:
    n = len(buf) // size
    frames = [bytes(buf[i * size : (i + 1) * size]) for i in range(n)]
    del buf[: n * size]
    return frames
