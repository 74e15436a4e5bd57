"""Reading the ``file`` voice's recording, once at start-up, so a wrong file fails before any call."""

from __future__ import annotations

import wave

from telephony_bridge.errors import ConfigError
from telephony_bridge.tools.emulator.protocol import SAMPLE_BYTES, SAMPLE_RATE_HZ


def read_wav_pcm16(path: str) -> bytes:
    """The raw s16le frames of a 16 kHz mono 16-bit WAV file (spec §7's format, so nothing is converted)."""
    try:
        with wave.open(path, "rb") as wav:
            shape = (wav.getframerate(), wav.getnchannels(), wav.getsampwidth())
            if shape != (SAMPLE_RATE_HZ, 1, SAMPLE_BYTES):
                raise ConfigError(
                    f"emulator wav_path {path!r} is {shape[0]} Hz, {shape[1]} channel(s), "
                    f"{8 * shape[2]}-bit; allowed: 16000 Hz, 1 channel, 16-bit"
                )
            return wav.readframes(wav.getnframes())
    except (OSError, EOFError, wave.Error) as exc:
        raise ConfigError(f"emulator wav_path {path!r} cannot be read as a WAV file: {exc}") from exc
