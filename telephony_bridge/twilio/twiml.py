"""The TwiML documents we serve, built with twilio's own builder (spec §2, §7).

Pure: URLs, parameters and texts in, XML text out. ``<Stream url>`` never carries a query string (G9); data
rides in ``<Parameter>``s, which arrive in ``start.customParameters``. No document leaves a caller on a
silent line: every one that does not connect ends in ``<Hangup/>`` or ``<Reject>`` (G8).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from twilio.twiml.voice_response import VoiceResponse

MAX_PARAMETER_CHARS = 500  # name + value must total under 500 characters (§2.2)


@dataclass(frozen=True)
class Voice:
    """How ``<Say>`` speaks; empty values leave Twilio's defaults."""

    voice: str = ""
    language: str = ""

    def say(self, response: VoiceResponse, text: str) -> None:
        response.say(text, voice=self.voice or None, language=self.language or None)


def connect_document(
    stream_url: str,
    parameters: Mapping[str, str] | None = None,
    *,
    status_callback: str | None = None,
    action: str | None = None,
) -> str:
    """``<Connect><Stream>``: bidirectional audio.

    With ``action``, Twilio asks that URL what to do once the stream ends (§2.3), so the bridge can apologise
    only when the AI failed; without it, the call hangs up when the stream closes.
    """
    if "?" in stream_url:
        raise ValueError(f"a <Stream url> must not carry a query string, got {stream_url!r}")
    response = VoiceResponse()
    stream = response.connect(action=action, method="POST" if action else None).stream(
        url=stream_url,
        status_callback=status_callback,
        status_callback_method="POST" if status_callback else None,
    )
    for name, value in (parameters or {}).items():
        if len(name) + len(value) >= MAX_PARAMETER_CHARS:
            value = value[: MAX_PARAMETER_CHARS - len(name) - 1]
        stream.parameter(name=name, value=value)
    return str(response)


def busy_document(message: str, voice: Voice, *, reject: bool = False) -> str:
    """No device can take the call: a busy signal (``<Reject reason="busy">``) or a short message."""
    response = VoiceResponse()
    if reject:
        response.reject(reason="busy")
        return str(response)
    if message:
        voice.say(response, message)
    response.hangup()
    return str(response)


def message_document(message: str, voice: Voice) -> str:
    """Say ``message`` (if any) and hang up: the unavailable answer and the after-stream apology."""
    response = VoiceResponse()
    if message:
        voice.say(response, message)
    response.hangup()
    return str(response)


def hangup_document() -> str:
    response = VoiceResponse()
    response.hangup()
    return str(response)
