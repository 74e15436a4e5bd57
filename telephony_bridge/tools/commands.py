"""``telephony-bridge call``: one simulated call from the command line, and the WAV files it reads and writes.

By default the call follows Twilio's real flow (``twilio_flow``): the signed ``/voice`` webhook, then the
stream its TwiML names, then ``<Connect action>``. ``webhook=False`` opens the stream directly instead.
"""

from __future__ import annotations

import os
import sys
import wave

import httpx
import numpy as np
import numpy.typing as npt
from websockets.exceptions import WebSocketException

from telephony_bridge.audio.codec import TWILIO_RATE_HZ
from telephony_bridge.audio.resample import Downsampler2x
from telephony_bridge.tools.caller import CallConfig, CallResult, run_call
from telephony_bridge.tools.twilio_flow import http_base, run_flow

AUTH_TOKEN_ENV = "TWILIO_AUTH_TOKEN"
HTTP_TIMEOUT_S = 10.0


def read_wav(path: str) -> npt.NDArray[np.int16]:
    """Read what the caller says: a mono 16-bit WAV at 8 kHz, or at 16 kHz (filtered down to 8 kHz).

    Raises ``ValueError`` naming the file's format when it is anything else.
    """
    with wave.open(path, "rb") as wav:
        channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
        if channels != 1 or width != 2 or rate not in (TWILIO_RATE_HZ, 2 * TWILIO_RATE_HZ):
            raise ValueError(
                f"expected a mono 16-bit WAV at 8000 or 16000 Hz, got {channels} channels, {8 * width}-bit, {rate} Hz"
            )
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.int16)
    if rate == TWILIO_RATE_HZ:
        return samples
    down = Downsampler2x()
    return np.concatenate((down.process(samples), down.flush()))


def write_wav(path: str, samples: npt.NDArray[np.int16]) -> None:
    """Write what the caller heard: mono 16-bit at 8 kHz."""
    with wave.open(path, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(TWILIO_RATE_HZ)
        wav.writeframes(samples.astype("<i2").tobytes())


def load_caller_audio(wav: str | None) -> npt.NDArray[np.int16] | None:
    """The caller's audio from ``wav`` (None: silence); raises ``ValueError`` with one sentence on any fault."""
    if not wav:
        return None
    try:
        return read_wav(wav)
    except (OSError, EOFError, wave.Error, ValueError) as exc:
        raise ValueError(f"cannot use {wav!r} as the caller's audio: {exc}") from exc


def auth_token_or_env(auth_token: str | None) -> str | None:
    """The token to sign with: the one given, else ``TWILIO_AUTH_TOKEN``, else none (requests go unsigned)."""
    return auth_token if auth_token is not None else os.environ.get(AUTH_TOKEN_ENV) or None


async def call_command(
    url: str,
    wav: str | None,
    out: str | None,
    seconds: float,
    *,
    auth_token: str | None = None,
    public_url: str | None = None,
    webhook: bool = True,
) -> int:
    """One call, the summary on stdout. Exit codes: 0 served cleanly; 1 the bridge broke the Media Streams
    protocol; 2 the call could not be placed or failed; 3 the bridge turned it away (busy). Each failure is
    explained in one sentence on stderr.

    ``url`` is the media-stream URL (``ws://HOST:PORT/media-stream``). With ``webhook`` the call starts at
    ``http://HOST:PORT/voice`` and the stream URL comes from the TwiML, signed with ``auth_token`` (default
    ``TWILIO_AUTH_TOKEN``) over ``public_url`` when the bridge sits behind one.
    """
    try:
        audio = load_caller_audio(wav)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if not webhook:
        try:
            result = await run_call(CallConfig(url, audio_in=audio, seconds=seconds))
        except (OSError, TimeoutError, WebSocketException) as exc:
            print(f"could not connect to {url}: {exc or type(exc).__name__}", file=sys.stderr)
            return 2
        print(result.summary())
        return _finish(result, out)

    async with httpx.AsyncClient(trust_env=False, timeout=HTTP_TIMEOUT_S) as http:
        flow = await run_flow(
            http_base(url),
            http=http,
            audio_in=audio,
            seconds=seconds,
            auth_token=auth_token_or_env(auth_token),
            public_url=public_url,
        )
    if flow.call is None and flow.outcome == "failed":
        print(f"could not connect to {url}: {flow.reason}", file=sys.stderr)
        return 2
    print(flow.summary())
    if flow.outcome == "busy":
        print(f"the bridge turned the call away: {flow.reason}", file=sys.stderr)
        return 3
    code = _finish(flow.call, out) if flow.call is not None else 0
    if flow.outcome == "failed":
        print(f"the call was not served: {flow.reason}", file=sys.stderr)
        return max(code, 2)
    return code


def _finish(result: CallResult, out: str | None) -> int:
    if out:
        try:
            write_wav(out, result.heard)
        except OSError as exc:
            print(f"could not write what the caller heard to {out!r}: {exc}", file=sys.stderr)
            return 2
    if result.violations:
        print(
            f"the bridge broke the Media Streams protocol {len(result.violations)} times; "
            f"first: {result.violations[0]}",
            file=sys.stderr,
        )
        return 1
    return 0
