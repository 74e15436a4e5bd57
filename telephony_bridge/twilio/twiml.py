"""The TwiML documents we serve, built with twilio's own builder (spec §2, §7).

Pure: URLs and parameters in, XML text out. ``<Stream url>`` never carries a query string (G9); data rides
in ``<Parameter>``s, which arrive in ``start.customParameters``.
"""

from __future__ import annotations

from collections.abc import Mapping

from twilio.twiml.voice_response import VoiceResponse

MAX_PARAMETER_CHARS = 500  # name + value must total under 500 characters (§2.2)


def connect_document(stream_url: str, parameters: Mapping[str, str] | None = None) -> str:
    """``<Connect><Stream>``: bidirectional audio; when the bridge closes the stream the call hangs up."""
    if "?" in stream_url:
        raise ValueError(f"a <Stream url> must not carry a query string, got {stream_url!r}")
    response = VoiceResponse()
    stream = response.connect().stream(url=stream_url)
    for name, value in (parameters or {}).items():
        if len(name) + len(value) >= MAX_PARAMETER_CHARS:
            value = value[: MAX_PARAMETER_CHARS - len(name) - 1]
        stream.parameter(name=name, value=value)
    return str(response)
