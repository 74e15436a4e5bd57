"""What the lean callers (bench/lean_callers.py) send Twilio-style and how they read what the bridge sends, as
bytes and without I/O: ``tools.caller`` builds ``Media`` and ``Mark`` dataclasses and reads with
``parse_outbound``; these do the same with a ``bytes %`` template per stream and one typed msgspec pass, which the
tests hold equal to those (the same JSON out, the same verdict on what comes in).
"""

from __future__ import annotations

import binascii

import msgspec
import numpy as np
import numpy.typing as npt
import orjson

from telephony_bridge.audio.codec import TWILIO_FRAME_BYTES, ULAW_SILENCE, pcm16_to_ulaw, ulaw_to_pcm16
from telephony_bridge.tools.caller import AUDIBLE_PEAK
from telephony_bridge.twilio.outbound_messages import OutClear, OutMark, OutMedia
from telephony_bridge.twilio.protocol import Malformed, preview

# μ-law bytes that decode within ±AUDIBLE_PEAK: a frame is audible when anything is left once they are deleted,
# the test ``caller._audible`` makes on the decoded samples, without decoding.
QUIET_ULAW = bytes(b for b in range(256) if abs(int(ulaw_to_pcm16(bytes([b]))[0])) <= AUDIBLE_PEAK)


def audible(ulaw: bytes) -> bool:
    return bool(ulaw.translate(None, QUIET_ULAW))


# --- messages as bytes ---------------------------------------------------------------------------------------


def _sid_json(stream_sid: str) -> bytes:
    """The streamSid as a JSON string, safe inside a ``%`` template."""
    return orjson.dumps(stream_sid).replace(b"%", b"%%")


def media_template(stream_sid: str) -> bytes:
    """``Media.to_json()`` as a ``bytes %`` template: ``% (sequence_number, chunk, timestamp_ms, base64)``."""
    return (
        b'{"event":"media","sequenceNumber":"%d","media":{"track":"inbound","chunk":"%d","timestamp":"%d",'
        b'"payload":"%b"},"streamSid":' + _sid_json(stream_sid) + b"}"
    )


def mark_template(stream_sid: str) -> bytes:
    """``Mark.to_json()`` as a template: ``% (sequence_number, JSON name)``."""
    return b'{"event":"mark","sequenceNumber":"%d","streamSid":' + _sid_json(stream_sid) + b',"mark":{"name":%b}}'


def encode_frames(audio: npt.NDArray[np.int16] | None) -> list[bytes]:
    """The caller's speech as the base64 payload of each 20 ms frame, the last one padded with silence; after
    it, every frame is ``SILENCE_B64``."""
    ulaw = pcm16_to_ulaw(audio) if audio is not None else b""
    padded = ulaw + bytes([ULAW_SILENCE]) * (-len(ulaw) % TWILIO_FRAME_BYTES)
    return [
        binascii.b2a_base64(padded[i : i + TWILIO_FRAME_BYTES], newline=False)
        for i in range(0, len(padded), TWILIO_FRAME_BYTES)
    ]


SILENCE_B64 = binascii.b2a_base64(bytes([ULAW_SILENCE]) * TWILIO_FRAME_BYTES, newline=False)


# --- what the bridge sends, read once --------------------------------------------------------------------------


class _Exact(msgspec.Struct, forbid_unknown_fields=True):
    """A field missing or one too many is a violation, as ``parse_outbound`` has it (G3; 31951 for Twilio)."""


class _Payload(_Exact):
    payload: bytes  # msgspec decodes base64 strictly: a bad payload is a ValidationError


class _Name(_Exact):
    name: str


class _Event(_Exact, tag_field="event", rename={"stream_sid": "streamSid"}):
    stream_sid: str


class _Media(_Event, tag="media"):
    media: _Payload


class _Mark(_Event, tag="mark"):
    mark: _Name


class _Clear(_Event, tag="clear"):
    pass


_decode = msgspec.json.Decoder(_Media | _Mark | _Clear).decode


def read_outbound(data: bytes, stream_sid: str) -> OutMedia | OutMark | OutClear | Malformed:
    """One text message from the bridge: what Twilio would act on, or why it is a violation (31951), as
    ``parse_outbound`` has it. The reason names the event when there is one."""
    try:
        message = _decode(data)
    except msgspec.DecodeError as exc:
        try:
            event = orjson.loads(data).get("event")
        except (orjson.JSONDecodeError, AttributeError):
            return Malformed(f"not a JSON object (31951): {preview(data)}")
        return Malformed(f"event {event!r} unreadable (31951/31924): {exc}")
    if message.stream_sid != stream_sid:
        return Malformed(f"streamSid {message.stream_sid!r:.40} is not this stream's (31951)")
    if type(message) is _Media:
        return OutMedia(message.media.payload)
    if type(message) is _Mark:
        return OutMark(message.mark.name)
    return OutClear()
