"""What the bridge sends Twilio: literal messages in, values out; no event loop."""

from __future__ import annotations

import base64

import orjson
import pytest

from telephony_bridge.twilio.outbound_messages import (
    MediaMessages,
    OutClear,
    OutMark,
    OutMedia,
    clear_message,
    mark_message,
    media_message,
    parse_outbound,
)
from telephony_bridge.twilio.protocol import Malformed

SID = "MZ0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("stream_sid", [SID, "", 'MZ"quoted\\back\u2028slash', "MZé中"])
def test_a_streams_media_messages_are_exactly_the_documented_fields(stream_sid: str) -> None:
    """``MediaMessages`` serialises the JSON around the payload once per stream: any streamSid escapes right."""
    messages = MediaMessages(stream_sid)
    for ulaw in (b"", b"\xff" * 160, bytes(range(256))):
        data = messages.encode(ulaw)
        assert orjson.loads(data) == {
            "event": "media",
            "streamSid": stream_sid,
            "media": {"payload": base64.b64encode(ulaw).decode()},
        }
        assert parse_outbound(data.decode(), stream_sid) == OutMedia(ulaw)
        assert media_message(stream_sid, ulaw) == data.decode()  # the same message as text (any streamSid)


def test_outbound_media_has_exactly_the_documented_fields() -> None:
    text = media_message(SID, b"\xff" * 160)
    assert orjson.loads(text) == {
        "event": "media",
        "streamSid": SID,
        "media": {"payload": base64.b64encode(b"\xff" * 160).decode()},
    }


def test_outbound_mark_and_clear_have_exactly_the_documented_fields() -> None:
    assert orjson.loads(mark_message(SID, "m7")) == {"event": "mark", "streamSid": SID, "mark": {"name": "m7"}}
    assert orjson.loads(clear_message(SID)) == {"event": "clear", "streamSid": SID}


def test_parse_outbound_round_trips_what_the_bridge_sends() -> None:
    assert parse_outbound(media_message(SID, b"\x01\x02"), SID) == OutMedia(b"\x01\x02")
    assert parse_outbound(mark_message(SID, "m1"), SID) == OutMark("m1")
    assert parse_outbound(clear_message(SID), SID) == OutClear()


@pytest.mark.parametrize(
    "message",
    [
        {"event": "media", "streamSid": SID, "media": {"payload": "AA==", "track": "outbound"}},
        {"event": "media", "streamSid": SID, "media": {"payload": "AA=="}, "sequenceNumber": "1"},
        {"event": "media", "streamSid": "MZother", "media": {"payload": "AA=="}},
        {"event": "mark", "streamSid": SID},
        {"event": "dtmf", "streamSid": SID},
    ],
)
def test_parse_outbound_flags_what_twilio_rejects_as_31951(message: dict[str, object]) -> None:
    event = parse_outbound(orjson.dumps(message).decode(), SID)
    assert isinstance(event, Malformed)
    assert "31951" in event.reason


def test_parse_outbound_flags_binary_frames_as_31950() -> None:
    event = parse_outbound(b"\x00\x01", SID)
    assert isinstance(event, Malformed)
    assert "31950" in event.reason
