"""Voice activity on the caller's 8 kHz audio: webrtcvad behind an energy gate, decided per 20 ms frame.

webrtcvad alone flags some noise: its first four frames are "speech" whatever the input (its noise model
starts empty), and once it has heard digital silence (gaps in synthetic speech, a muted phone) it takes faint
noise for speech for seconds; ``tests/test_vad.py`` shows both. So a frame whose RMS is below
``min_level_dbfs`` is never speech, and faint line noise cannot trigger a barge-in. Levels are RMS in dB
relative to full scale (a full-scale square wave is 0 dBFS, a full-scale sine -3 dBFS), as ``sox stats`` and
the emulator's voices measure them.
"""

from __future__ import annotations

import _webrtcvad  # webrtcvad's C module: ``_decide`` calls it without the checks of its ``Vad`` wrapper
import numpy as np
import numpy.typing as npt
import webrtcvad

from telephony_bridge.audio.codec import TWILIO_RATE_HZ
from telephony_bridge.audio.kernels import mean_square_function

VAD_FRAME_SAMPLES = 160  # 20 ms at 8 kHz: webrtcvad takes only 10, 20 or 30 ms frames
VAD_FRAME_S = VAD_FRAME_SAMPLES / TWILIO_RATE_HZ
_FULL_SCALE = 32768.0


class VoiceActivityDetector:
    """Speech or not, per 20 ms frame of 8 kHz int16 audio; one per caller (webrtcvad adapts to the line).

    ``sensitivity`` is webrtcvad's aggressiveness, 0 (flags the most) to 3 (flags the least). Feed a call's
    audio either frame by frame through ``is_speech`` or in chunks of any length through ``process``, not both:
    ``process`` keeps the part-frame left over for the next call, so any chunking gives the same decisions.
    """

    # The compiled frame path reads and writes these at their fixed offsets (_pyattrs.h); the rest live in
    # the instance dict.
    __slots__ = ("__dict__", "__weakref__", "_min_mean_square", "_pending", "_vad", "_vad_handle")

    def __init__(self, sensitivity: int = 2, min_level_dbfs: float = -45.0, *, compiled: bool | None = None) -> None:
        if sensitivity not in (0, 1, 2, 3):
            raise ValueError(f"expected sensitivity 0, 1, 2 or 3, got {sensitivity!r}")
        self.sensitivity = sensitivity
        self.min_level_dbfs = min_level_dbfs
        self._vad = webrtcvad.Vad(sensitivity)
        self._vad_handle = self._vad._vad  # what its C functions take
        self._min_mean_square = (_FULL_SCALE * 10.0 ** (min_level_dbfs / 20.0)) ** 2
        self._mean_square = mean_square_function(compiled=compiled)  # ``compiled``: see ``kernels``
        self._pending = np.zeros(0, dtype=np.int16)

    def is_speech(self, frame: npt.NDArray[np.int16]) -> bool:
        """Decide one frame of exactly ``VAD_FRAME_SAMPLES`` int16 samples; raises ``ValueError`` otherwise.

        webrtcvad sees every frame, gated or not, so its noise model follows the line's real background.
        """
        if frame.dtype != np.int16 or frame.shape != (VAD_FRAME_SAMPLES,):
            raise ValueError(f"expected {VAD_FRAME_SAMPLES} int16 samples, got {frame.shape} {frame.dtype}")
        return self._decide(np.ascontiguousarray(frame))

    def _decide(self, frame: npt.NDArray[np.int16]) -> bool:
        """``is_speech`` for a frame known to be ``VAD_FRAME_SAMPLES`` contiguous int16 samples, 50 times a
        second a call: straight to webrtcvad's C function, which reads the array's buffer (native int16, what
        it takes), skipping the checks made already and the copy to bytes (~0.6 µs a frame by timeit)."""
        voiced: bool = _webrtcvad.process(self._vad_handle, TWILIO_RATE_HZ, frame, VAD_FRAME_SAMPLES)
        return voiced and self._mean_square(frame) >= self._min_mean_square

    def process(self, samples: npt.NDArray[np.int16]) -> list[bool]:
        """Feed int16 samples of any length; get one decision per 20 ms frame they complete, oldest first.

        A trailing part-frame waits for the next call (``pending_samples`` says how much); at the end of a call
        it is simply dropped, since less than 20 ms cannot change a barge-in.
        """
        if samples.dtype != np.int16:
            raise ValueError(f"expected int16 samples, got {samples.dtype}")
        pending = self._pending
        if len(samples) == VAD_FRAME_SAMPLES and not len(pending) and samples.flags.c_contiguous:
            return [self._decide(samples)]  # Twilio's 20 ms: nothing to re-cut
        data = np.concatenate((pending, samples)) if len(pending) else samples
        whole = len(data) - len(data) % VAD_FRAME_SAMPLES
        self._pending = data[whole:].copy()
        frames = np.ascontiguousarray(data[:whole]).reshape(-1, VAD_FRAME_SAMPLES)  # a strided view's rows are not
        return [self._decide(frame) for frame in frames]

    @property
    def pending_samples(self) -> int:
        """Samples held back by ``process`` until the frame they start is complete."""
        return len(self._pending)
