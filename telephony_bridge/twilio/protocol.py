"""Twilio Media Streams messages from Twilio, without I/O (spec: twilio-media-streams.md §3).

``parse_message`` turns one text frame from Twilio into a frozen event; it never raises for anything a peer
can send: garbage becomes ``Malformed(reason)``, an unknown event becomes ``Unknown(name)``. Numeric fields
arrive as strings (§3) and are accepted as strings or numbers.

The simulated caller plays Twilio, so the inbound events also serialise themselves the way Twilio writes
them. What the bridge sends Twilio (§4), and the strict reader of it, is ``outbound_messages``.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec
import orjson


@dataclass(frozen=True, slots=True)
class Connected:
    protocol: str = "Call"
    version: str = "1.0.0"

    def to_json(self) -> str:
        return json_text({"event": "connected", "protocol": self.protocol, "version": self.version})


@dataclass(frozen=True, slots=True)
class Start:
    stream_sid: str
    call_sid: str
    account_sid: str
    sequence_number: int = 1
    tracks: tuple[str, ...] = ("inbound",)
    custom_parameters: dict[str, str] = field(default_factory=dict)
    encoding: str = "audio/x-mulaw"
    sample_rate_hz: int = 8000
    channels: int = 1

    def to_json(self) -> str:
        return json_text(
            {
                "event": "start",
                "sequenceNumber": str(self.sequence_number),
                "start": {
                    "accountSid": self.account_sid,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": list(self.tracks),
                    "customParameters": dict(self.custom_parameters),
                    "mediaFormat": {
                        "encoding": self.encoding,
                        "sampleRate": self.sample_rate_hz,
                        "channels": self.channels,
                    },
                },
                "streamSid": self.stream_sid,
            }
        )


@dataclass(frozen=True, slots=True)
class Media:
    """Caller audio: ``payload`` is raw μ-law, already base64-decoded, of any length (Twilio's is 160 bytes).

    ``timestamp_ms`` is None when the sender left it out (Twilio never does; simulators may).
    """

    stream_sid: str
    payload: bytes
    timestamp_ms: int | None
    chunk: int
    sequence_number: int
    track: str = "inbound"

    def to_json(self) -> str:
        media = {"track": self.track, "chunk": str(self.chunk), "timestamp": str(self.timestamp_ms)}
        if self.timestamp_ms is None:
            del media["timestamp"]
        media["payload"] = base64.b64encode(self.payload).decode("ascii")
        message = {"event": "media", "sequenceNumber": str(self.sequence_number), "media": media}
        message["streamSid"] = self.stream_sid
        return json_text(message)


@dataclass(frozen=True, slots=True)
class Dtmf:
    stream_sid: str
    digit: str
    sequence_number: int
    track: str = "inbound_track"

    def to_json(self) -> str:
        return json_text(
            {
                "event": "dtmf",
                "streamSid": self.stream_sid,
                "sequenceNumber": str(self.sequence_number),
                "dtmf": {"track": self.track, "digit": self.digit},
            }
        )


@dataclass(frozen=True, slots=True)
class Mark:
    """A mark echoed by Twilio: the audio before it has played, or was flushed by ``clear``."""

    stream_sid: str
    name: str
    sequence_number: int

    def to_json(self) -> str:
        return json_text(
            {
                "event": "mark",
                "sequenceNumber": str(self.sequence_number),
                "streamSid": self.stream_sid,
                "mark": {"name": self.name},
            }
        )


@dataclass(frozen=True, slots=True)
class Stop:
    stream_sid: str
    call_sid: str
    account_sid: str
    sequence_number: int

    def to_json(self) -> str:
        return json_text(
            {
                "event": "stop",
                "sequenceNumber": str(self.sequence_number),
                "streamSid": self.stream_sid,
                "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
            }
        )


@dataclass(frozen=True, slots=True)
class Unknown:
    """An event name we do not know; ignored and counted, never fatal."""

    name: str


@dataclass(frozen=True, slots=True)
class Malformed:
    """A frame that is not a valid message; ``reason`` says what was expected and what arrived."""

    reason: str


InboundEvent = Connected | Start | Media | Dtmf | Mark | Stop | Unknown | Malformed

CARRIED_FORMAT = ("audio/x-mulaw", 8000, 1)  # the one media format Twilio sends (§3), and all the bridge carries
MAX_NUMBER_DIGITS = 18  # timestamps, chunks and sequence numbers fit in 18 digits for centuries of audio


def media_format_problem(start: Start) -> str | None:
    """Why the bridge cannot carry this stream's audio (a sentence), or None. An absent ``mediaFormat`` parses
    as μ-law 8 kHz mono; anything else (e.g. ``audio/l16``) is refused rather than heard as noise."""
    got = (start.encoding.lower(), start.sample_rate_hz, start.channels)
    if got == CARRIED_FORMAT:
        return None
    return (
        f"unsupported mediaFormat {start.encoding!r:.40} at {start.sample_rate_hz} Hz, {start.channels} channel(s): "
        "the bridge carries audio/x-mulaw at 8000 Hz, mono"
    )


def parse_message(text: str | bytes) -> InboundEvent:
    """Parse one frame from Twilio. Never raises for peer input."""
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError:
        return Malformed(f"expected a JSON object, got {preview(text)}")
    if not isinstance(msg, dict):
        return Malformed(f"expected a JSON object, got {type(msg).__name__}")
    event = msg.get("event")
    if not isinstance(event, str):
        return Malformed("expected a string 'event' field")
    parser = _PARSERS.get(event)
    if parser is None:
        return Unknown(event)
    try:
        return parser(msg)
    except _Invalid as exc:
        return Malformed(f"{event}: {exc}")


class _Invalid(Exception):
    pass


def _obj(msg: dict[str, Any], key: str) -> dict[str, Any]:
    value = msg.get(key)
    if not isinstance(value, dict):
        raise _Invalid(f"expected an object '{key}'")
    return value


def _str(msg: dict[str, Any], key: str, default: str | None = None) -> str:
    value = msg.get(key, default)
    if not isinstance(value, str):
        raise _Invalid(f"expected a string '{key}', got {value!r:.40}")
    return value


def _non_empty(msg: dict[str, Any], key: str) -> str:
    value = _str(msg, key)
    if not value:
        raise _Invalid(f"expected a non-empty '{key}'")
    return value


def _int(msg: dict[str, Any], key: str, default: int | None = None) -> int:
    """Twilio sends numbers as strings (§3); accept either, reject anything else."""
    value = msg.get(key, default)
    if isinstance(value, bool):
        raise _Invalid(f"expected an integer '{key}', got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise _Invalid(f"expected an integer '{key}', got {value!r:.40}")


def _parse_connected(msg: dict[str, Any]) -> Connected:
    return Connected(protocol=_str(msg, "protocol", "Call"), version=_str(msg, "version", ""))


def _parse_start(msg: dict[str, Any]) -> Start:
    start = _obj(msg, "start")
    params = start.get("customParameters") or {}
    if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
        raise _Invalid("expected 'customParameters' to map strings to strings")
    fmt = start.get("mediaFormat") or {}
    if not isinstance(fmt, dict):
        raise _Invalid("expected an object 'mediaFormat'")
    tracks = start.get("tracks") or ["inbound"]
    if not isinstance(tracks, list):
        raise _Invalid("expected a list 'tracks'")
    return Start(
        stream_sid=_str(start, "streamSid", msg.get("streamSid")),
        call_sid=_non_empty(start, "callSid"),
        account_sid=_str(start, "accountSid", ""),
        sequence_number=_int(msg, "sequenceNumber", 1),
        tracks=tuple(str(t) for t in tracks),
        custom_parameters=dict(params),
        encoding=_str(fmt, "encoding", "audio/x-mulaw"),
        sample_rate_hz=_int(fmt, "sampleRate", 8000),
        channels=_int(fmt, "channels", 1),
    )


def _parse_media(msg: dict[str, Any]) -> Media:
    """Fast path for what Twilio sends 50 times a second (every field a string, numbers as digits); anything
    else takes the checked path below, which reports exactly what is wrong."""
    fields = _media_fields(msg)
    if fields is None:
        return _parse_media_checked(msg)
    return Media(*fields)


def media_audio(text: str | bytes) -> tuple[bytes, int] | None:
    """The caller's audio and its timestamp (ms) from a ``media`` message in exactly Twilio's shape, without
    building a ``Media`` (the leg's direct path, 50 times a second a call). None for anything else, which
    ``parse_message`` then reads, and reports if it is wrong.

    One typed msgspec pass reads Twilio's shape (a quarter of the cost of orjson's dict and ``_media_fields``);
    what msgspec refuses goes the general way, so every input gets the answer the orjson path gave."""
    try:
        msg = _read_twilio_media(text)
    except (msgspec.MsgspecError, UnicodeEncodeError):  # UnicodeEncodeError: a str holding a lone surrogate
        return _media_audio_general(text)
    media = msg.media
    numbers = media.timestamp + media.chunk + msg.sequence_number  # each 1 to MAX_NUMBER_DIGITS characters
    if not (numbers.isascii() and numbers.isdigit()):  # as ``_is_number``, for the three at once
        return None
    return media.payload, int(media.timestamp)


_Number = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NUMBER_DIGITS)]  # and ASCII digits: see above


class _TwilioAudio(msgspec.Struct, forbid_unknown_fields=True):
    """A ``media`` message's ``media`` as Twilio writes it (§3). msgspec decodes ``payload`` as strictly as
    ``a2b_base64(strict_mode=True)``: padding required, no whitespace or other characters (G5)."""

    payload: bytes
    timestamp: _Number
    chunk: _Number = "0"
    track: str = "inbound"


class _TwilioMedia(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    """Twilio's ``media`` message (§3), key for key. An unknown key is refused so that all msgspec accepts went
    through a typed decoder (no skipped JSON to judge unlike orjson); a repeated key whose earlier value is wrong
    is refused too (orjson keeps the last). Both then go the general way."""

    event: Literal["media"]
    stream_sid: str
    media: _TwilioAudio
    sequence_number: _Number = "0"


_read_twilio_media = msgspec.json.Decoder(_TwilioMedia).decode


def _media_audio_general(text: str | bytes) -> tuple[bytes, int] | None:
    """``media_audio`` for what msgspec refused: orjson (the last of repeated keys wins) and ``_media_fields``."""
    try:
        msg = orjson.loads(text)
        if msg["event"] != "media":
            return None
        fields = _media_fields(msg)
    except (orjson.JSONDecodeError, _Invalid, KeyError, TypeError):
        return None
    return None if fields is None else (fields[1], fields[2])


def _media_fields(msg: dict[str, Any]) -> tuple[str, bytes, int, int, int, str] | None:
    """``Media``'s fields if the message has Twilio's own shape, None if not; ``_Invalid`` for a payload that
    is not base64."""
    media = msg.get("media")
    if type(media) is not dict:
        return None
    sid, encoded, seq = msg.get("streamSid"), media.get("payload"), msg.get("sequenceNumber", "0")
    timestamp, chunk, track = media.get("timestamp"), media.get("chunk", "0"), media.get("track", "inbound")
    if not (
        type(sid) is str
        and type(encoded) is str
        and type(track) is str
        and type(timestamp) is str
        and type(chunk) is str
        and type(seq) is str
        and _is_number(timestamp)
        and _is_number(chunk)
        and _is_number(seq)
    ):
        return None
    try:
        payload = binascii.a2b_base64(encoded, strict_mode=True)  # strict (G5): garbage is not audio
    except (binascii.Error, ValueError):  # ValueError: a str with non-ASCII characters
        raise _Invalid(f"payload is not valid base64 ({len(encoded)} characters)") from None
    return sid, payload, int(timestamp), int(chunk), int(seq), track


def _is_number(text: str) -> bool:
    """ASCII digits only, and short: ``str.isdigit`` also accepts '²', and ``int`` refuses over 4300 digits."""
    return len(text) <= MAX_NUMBER_DIGITS and text.isascii() and text.isdigit()


def _parse_media_checked(msg: dict[str, Any]) -> Media:
    media = _obj(msg, "media")
    encoded = _str(media, "payload")
    try:
        # Strict decoding (G5): a lenient decoder turns garbage into audio.
        payload = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise _Invalid(f"payload is not valid base64 ({len(encoded)} characters)") from None
    return Media(
        stream_sid=_str(msg, "streamSid"),
        payload=payload,
        timestamp_ms=_int(media, "timestamp") if "timestamp" in media else None,
        chunk=_int(media, "chunk", 0),
        sequence_number=_int(msg, "sequenceNumber", 0),
        track=_str(media, "track", "inbound"),
    )


def _parse_dtmf(msg: dict[str, Any]) -> Dtmf:
    dtmf = _obj(msg, "dtmf")
    digit = dtmf.get("digit")
    if not isinstance(digit, str):  # the value is a keypad digit: never echoed into a log line
        raise _Invalid(f"expected a string 'digit', got {type(digit).__name__}")
    return Dtmf(
        stream_sid=_str(msg, "streamSid"),
        digit=digit,
        sequence_number=_int(msg, "sequenceNumber", 0),
        track=_str(dtmf, "track", "inbound_track"),
    )


def _parse_mark(msg: dict[str, Any]) -> Mark:
    return Mark(
        stream_sid=_str(msg, "streamSid"),
        name=_str(_obj(msg, "mark"), "name"),
        sequence_number=_int(msg, "sequenceNumber", 0),
    )


def _parse_stop(msg: dict[str, Any]) -> Stop:
    stop = msg.get("stop") or {}
    if not isinstance(stop, dict):
        raise _Invalid("expected an object 'stop'")
    return Stop(
        stream_sid=_str(msg, "streamSid"),
        call_sid=_str(stop, "callSid", ""),
        account_sid=_str(stop, "accountSid", ""),
        sequence_number=_int(msg, "sequenceNumber", 0),
    )


_PARSERS = {
    "connected": _parse_connected,
    "start": _parse_start,
    "media": _parse_media,
    "dtmf": _parse_dtmf,
    "mark": _parse_mark,
    "stop": _parse_stop,
}


def json_text(obj: dict[str, Any]) -> str:
    """``obj`` as compact JSON text, the way Twilio writes it and the way we send it."""
    return orjson.dumps(obj).decode("utf-8")


def preview(text: str | bytes) -> str:
    """The start of a frame that is not JSON, quoted, for a ``Malformed`` reason; not quoted if it names a
    ``digit``: a broken ``dtmf`` message may carry the caller's key press early in it, and digits reach a log
    only with ``twilio.log_digits``."""
    s = text if isinstance(text, str) else repr(text)
    if "digit" in s.lower():
        return f"{len(s)} characters naming a 'digit' (not shown)"
    return repr(s[:40]) + ("…" if len(s) > 40 else "")
