"""The Savants session state machine: messages in, events out; no event loop."""

from __future__ import annotations

import pytest

from telephony_bridge.savants.protocol import Audio, Confirmed, Failed, Notice, State, VoiceSession


def authenticated() -> VoiceSession:
    session = VoiceSession()
    assert session.authenticate("a.b.c") == "a.b.c"
    return session


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"savant_voice_connected","message":"Voice API connection established successfully",'
        '"timestamp":"2024-01-15T10:30:00.123Z","sessionId":"sess_abc123def456"}',
        '{"type":"savant_voice_connected","message":"Connection established"}',
        '{"type":"vapi_connected","message":"Voice API connection established","timestamp":"2024-01-15T10:30:00.000Z"}',
        '{"type": "vapi_connected", "message": "Connected"}',
    ],
)
def test_session_accepts_every_documented_confirmation(text: str) -> None:
    session = authenticated()
    event = session.receive_text(text)
    assert isinstance(event, Confirmed)
    assert session.state is State.CONNECTED


def test_session_keeps_the_session_id_when_present() -> None:
    session = authenticated()
    assert session.receive_text('{"type":"savant_voice_connected","sessionId":"sess_1"}') == Confirmed("sess_1")


@pytest.mark.parametrize(
    ("text", "code", "message"),
    [
        (
            '{"type":"error","error":{"code":"TOKEN_EXPIRED","message":"Token has expired",'
            '"details":{},"timestamp":"2024-01-15T10:30:00Z"}}',
            "TOKEN_EXPIRED",
            "Token has expired",
        ),
        (
            '{"type":"error","error":{"message":"Error description","code":"ERROR_CODE"}}',
            "ERROR_CODE",
            "Error description",
        ),
        ('{"type":"error"}', "UNKNOWN", ""),
    ],
)
def test_session_error_message_is_terminal_with_its_code(text: str, code: str, message: str) -> None:
    session = authenticated()
    assert session.receive_text(text) == Failed(code, message, by_peer_error=True)
    assert session.state is State.CLOSED


def test_session_audio_only_after_confirmation() -> None:
    session = authenticated()
    event = session.receive_binary(b"\x00\x00")
    assert isinstance(event, Failed) and event.code == "PROTOCOL" and not event.by_peer_error


def test_session_passes_audio_and_ignores_status_messages() -> None:
    session = authenticated()
    session.receive_text('{"type":"savant_voice_connected"}')
    assert session.receive_binary(b"\x01\x02" * 320) == Audio(b"\x01\x02" * 320)
    assert session.receive_text('{"type":"status","state":"thinking"}') == Notice("status")
    assert session.state is State.CONNECTED


@pytest.mark.parametrize("text", ["not json", "[]", '{"type": 5}'])
def test_session_garbage_text_is_a_protocol_failure(text: str) -> None:
    session = authenticated()
    event = session.receive_text(text)
    assert isinstance(event, Failed) and event.code == "PROTOCOL"


@pytest.mark.parametrize("size", [0, 8193])
def test_session_rejects_frames_outside_the_documented_size(size: int) -> None:
    session = authenticated()
    session.receive_text('{"type":"savant_voice_connected"}')
    event = session.receive_binary(b"\x00" * size)
    assert isinstance(event, Failed) and event.code == "PROTOCOL"


def test_session_authenticate_twice_is_our_bug() -> None:
    session = authenticated()
    with pytest.raises(RuntimeError):
        session.authenticate("x.y.z")


def test_session_reads_text_given_as_its_utf8_bytes() -> None:
    session = authenticated()
    assert session.receive_text(b'{"type":"vapi_connected","sessionId":"s\xc3\xa9"}') == Confirmed("sé")
    assert session.receive_text(b'{"type":"status"}') == Notice("status")


def test_session_invalid_utf8_text_is_a_protocol_failure() -> None:
    session = authenticated()
    event = session.receive_text(b'{"type":"\xff"}')
    assert isinstance(event, Failed) and event.code == "PROTOCOL" and not event.by_peer_error
    assert session.state is State.CLOSED


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("size", [0, 1, 640, 8192, 8193])
def test_session_is_audio_exactly_when_receive_binary_is_audio_and_leaves_the_state(state: State, size: int) -> None:
    session = VoiceSession()
    session.state = state
    data = b"\x01" * size
    is_audio = session.is_audio(data)
    assert session.state is state
    assert is_audio == (session.receive_binary(data) == Audio(data))
