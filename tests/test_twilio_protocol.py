"""Twilio Media Streams messages: literal samples in, values out; no event loop."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from telephony_bridge.twilio import protocol as tw

DATA = Path(__file__).parent / "data" / "twilio"
SID = "MZ0123456789abcdef0123456789abcdef"


def sample(name: str) -> str:
    return (DATA / f"{name}.json").read_text().strip()


def test_parse_connected_sample() -> None:
    assert tw.parse_message(sample("connected")) == tw.Connected("Call", "1.0.0")


def test_parse_start_sample() -> None:
    assert tw.parse_message(sample("start")) == tw.Start(
        stream_sid=SID,
        call_sid="CA0123456789abcdef0123456789abcdef",
        account_sid="AC0123456789abcdef0123456789abcdef",
        sequence_number=1,
        tracks=("inbound",),
        custom_parameters={"token": "tok_abc", "from": "+15551230000"},
    )


def test_parse_media_sample_decodes_base64_once() -> None:
    event = tw.parse_message(sample("media"))
    assert event == tw.Media(
        stream_sid=SID, payload=bytes([0xFF] * 80 + [0x00] * 80), timestamp_ms=20, chunk=2, sequence_number=3
    )


def test_parse_dtmf_mark_stop_samples() -> None:
    assert tw.parse_message(sample("dtmf")) == tw.Dtmf(SID, "1", 5)
    assert tw.parse_message(sample("mark")) == tw.Mark(SID, "m1", 4)
    assert tw.parse_message(sample("stop")) == tw.Stop(
        SID, "CA0123456789abcdef0123456789abcdef", "AC0123456789abcdef0123456789abcdef", 6
    )


@pytest.mark.parametrize("name", ["connected", "start", "media", "dtmf", "mark", "stop"])
def test_inbound_messages_serialise_as_twilio_writes_them(name: str) -> None:
    event = tw.parse_message(sample(name))
    assert orjson.loads(event.to_json()) == orjson.loads(sample(name))  # type: ignore[union-attr]


def test_parse_accepts_numbers_where_twilio_sends_strings() -> None:
    msg = orjson.loads(sample("media"))
    msg["sequenceNumber"], msg["media"]["timestamp"], msg["media"]["chunk"] = 3, 20, 2
    assert tw.parse_message(orjson.dumps(msg)) == tw.parse_message(sample("media"))


GARBAGE = [
    ("not json", "expected a JSON object"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"no": "event"}', "string 'event'"),
    ('{"event": "media", "streamSid": "MZ", "media": {"payload": "@@@"}}', "not valid base64"),
    ('{"event": "media", "streamSid": "MZ", "media": {"payload": "\\u0080", "timestamp": "0"}}', "base64"),
    ('{"event": "media", "streamSid": "MZ"}', "expected an object 'media'"),
    ('{"event": "start", "start": {"streamSid": "MZ"}}', "'callSid'"),
    ('{"event": "media", "streamSid": "MZ", "media": {"payload": "", "timestamp": "x"}}', "'timestamp'"),
    ('{"event": "mark", "streamSid": "MZ", "mark": {}}', "'name'"),
    # str.isdigit() accepts these, int() does not: the fast path must not let them through (found in review)
    ('{"event": "media", "streamSid": "MZ", "media": {"payload": "", "timestamp": "\u00b2"}}', "'timestamp'"),
    ('{"event": "media", "streamSid": "MZ", "media": {"payload": "", "chunk": "1\u00b9"}}', "'chunk'"),
    (
        '{"event": "media", "streamSid": "MZ", "sequenceNumber": "' + "9" * 5000 + '", "media": {"payload": ""}}',
        "'sequenceNumber'",
    ),
    ('{"event": "start", "start": {"streamSid": "MZ", "callSid": ""}}', "non-empty 'callSid'"),
]


@pytest.mark.parametrize(("text", "reason_part"), GARBAGE)
def test_parse_garbage_is_a_value_not_an_exception(text: str, reason_part: str) -> None:
    event = tw.parse_message(text)
    assert isinstance(event, tw.Malformed)
    assert reason_part in event.reason


@pytest.mark.parametrize("text", [text for text, _ in GARBAGE])
def test_the_fast_media_path_takes_no_garbage(text: str) -> None:
    """``media_audio`` (the leg's direct path) says None to all of it: ``parse_message`` then reports it."""
    assert tw.media_audio(text) is None


@pytest.mark.parametrize(
    "text",
    [
        sample("media"),
        tw.Media(SID, bytes(range(256)) * 2, 123456789, 6172, 6173).to_json(),
        tw.Media(SID, b"", 0, 0, 0).to_json(),
    ],
)
def test_the_fast_media_path_reads_twilios_media_as_parse_message_does(text: str) -> None:
    event = tw.parse_message(text)
    assert isinstance(event, tw.Media)
    assert tw.media_audio(text) == tw.media_audio(text.encode()) == (event.payload, event.timestamp_ms)


@pytest.mark.parametrize(
    "text",
    [
        tw.Media(SID, b"\x01", None, 1, 2).to_json(),  # no timestamp (simulators)
        orjson.dumps(
            {"event": "media", "streamSid": SID, "sequenceNumber": 3, "media": {"payload": "AQ==", "timestamp": 20}}
        ),
        sample("mark"),
        sample("start"),
    ],
)
def test_the_fast_media_path_leaves_other_shapes_to_parse_message(text: str | bytes) -> None:
    """Media that is not in Twilio's exact shape is still media (``parse_message`` reads it); it only takes
    the general path."""
    assert tw.media_audio(text) is None
    if orjson.loads(text)["event"] == "media":
        assert isinstance(tw.parse_message(text), tw.Media)


def test_parse_dtmf_with_a_non_string_digit_never_echoes_the_digit() -> None:
    event = tw.parse_message('{"event": "dtmf", "streamSid": "MZ", "dtmf": {"digit": 7}}')
    assert event == tw.Malformed("dtmf: expected a string 'digit', got int")


def test_parse_unknown_event_is_a_value() -> None:
    assert tw.parse_message('{"event": "hologram"}') == tw.Unknown("hologram")


def test_parse_media_without_timestamp_leaves_it_unknown() -> None:
    """Simulators and 'Twilio-compatible' senders may leave ``timestamp`` (and chunk, track) out."""
    event = tw.parse_message(sample("media_no_timestamp"))
    assert event == tw.Media(
        stream_sid=SID, payload=bytes([0xFF] * 80 + [0x00] * 80), timestamp_ms=None, chunk=0, sequence_number=0
    )
    assert "timestamp" not in orjson.loads(event.to_json())["media"]  # type: ignore[union-attr]


def test_start_without_media_format_is_mulaw_8k_and_carried() -> None:
    start = tw.parse_message(sample("start_no_media_format"))
    assert isinstance(start, tw.Start)
    assert (start.encoding, start.sample_rate_hz, start.channels, start.account_sid) == ("audio/x-mulaw", 8000, 1, "")
    assert tw.media_format_problem(start) is None


def test_start_with_an_unsupported_media_format_says_why() -> None:
    start = tw.parse_message(sample("start_l16"))
    assert isinstance(start, tw.Start)
    assert tw.media_format_problem(start) == (
        "unsupported mediaFormat 'audio/L16' at 16000 Hz, 1 channel(s): the bridge carries audio/x-mulaw at 8000 Hz, "
        "mono"
    )
    assert tw.media_format_problem(tw.parse_message(sample("start"))) is None  # type: ignore[arg-type]


def test_parse_media_with_a_non_ascii_payload_is_malformed() -> None:
    """Found by tests/test_fuzz.py: the decoder raises ValueError, not binascii.Error, for non-ASCII text."""
    msg = {"event": "media", "streamSid": SID, "media": {"payload": "\u0080", "timestamp": "0"}}
    assert tw.parse_message(orjson.dumps(msg)) == tw.Malformed("media: payload is not valid base64 (1 characters)")
