"""What the bridge sends Twilio (§4, G3: exactly the documented fields) and its strict reader, apart from inbound."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import orjson

from telephony_bridge.twilio.protocol import Malformed, json_text, preview


def media_message(stream_sid: str, ulaw: bytes) -> str:
    return MediaMessages(stream_sid).encode(ulaw).decode()


class MediaMessages:
    """One stream's outbound ``media`` messages as UTF-8 bytes, ready for the socket: the JSON around the
    payload is serialised once (orjson escapes the streamSid), so a message costs one base64 encoding and one
    concatenation, 50 times a second a call."""

    def __init__(self, stream_sid: str) -> None:
        self.stream_sid = stream_sid
        empty = orjson.dumps({"event": "media", "streamSid": stream_sid, "media": {"payload": ""}})
        self._head, self._tail = empty[:-3], empty[-3:]  # ... "payload":"  |  "}}

    def encode(self, ulaw: bytes) -> bytes:
        return self._head + binascii.b2a_base64(ulaw, newline=False) + self._tail


def mark_message(stream_sid: str, name: str) -> str:
    return json_text({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}})


def clear_message(stream_sid: str) -> str:
    return json_text({"event": "clear", "streamSid": stream_sid})


@dataclass(frozen=True, slots=True)
class OutMedia:
    payload: bytes


@dataclass(frozen=True, slots=True)
class OutMark:
    name: str


@dataclass(frozen=True, slots=True)
class OutClear:
    pass


OutboundEvent = OutMedia | OutMark | OutClear

_OUTBOUND_SHAPES: dict[str, dict[str, frozenset[str] | None]] = {
    "media": {"event": None, "streamSid": None, "media": frozenset({"payload"})},
    "mark": {"event": None, "streamSid": None, "mark": frozenset({"name"})},
    "clear": {"event": None, "streamSid": None},
}


def parse_outbound(text: str | bytes, stream_sid: str) -> OutboundEvent | Malformed:
    """Read a bridge's message as Twilio would: any missing or extra field or wrong streamSid is 31951."""
    if isinstance(text, bytes):
        return Malformed("binary frame (Twilio error 31950)")
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError:
        return Malformed(f"not JSON (31951): {preview(text)}")
    if not isinstance(msg, dict) or not isinstance(msg.get("event"), str):
        return Malformed("no 'event' (31951)")
    shape = _OUTBOUND_SHAPES.get(msg["event"])
    if shape is None:
        return Malformed(f"unknown event {msg['event']!r} (31951)")
    if set(msg) != set(shape):
        return Malformed(f"{msg['event']}: fields {sorted(msg)}, expected {sorted(shape)} (31951)")
    for key, inner in shape.items():
        if inner is not None and (not isinstance(msg[key], dict) or set(msg[key]) != inner):
            return Malformed(f"{msg['event']}.{key}: expected exactly {sorted(inner)} (31951)")
    if msg["streamSid"] != stream_sid:
        return Malformed(f"{msg['event']}: streamSid {msg['streamSid']!r:.40} is not this stream's (31951)")
    if msg["event"] == "media":
        try:
            return OutMedia(base64.b64decode(msg["media"]["payload"], validate=True))
        except (binascii.Error, ValueError, TypeError):
            return Malformed("media: payload is not valid base64 (31951)")
    if msg["event"] == "mark":
        name = msg["mark"]["name"]
        return OutMark(name) if isinstance(name, str) else Malformed("mark.name is not a string (31951)")
    return OutClear()
