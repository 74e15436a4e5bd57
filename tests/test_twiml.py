"""TwiML documents: valid XML, attribute names Twilio accepts, and the reviewed copies in twiml/ match."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from telephony_bridge.settings import TwilioSettings
from telephony_bridge.twilio import twiml

TWIML_DIR = Path(__file__).parent.parent / "twiml"
DEFAULTS = TwilioSettings()
VOICE = twiml.Voice()


def documents() -> dict[str, str]:
    """What the bridge serves, with example values; twiml/*.xml hold the same, for review."""
    return {
        "connect.xml": twiml.connect_document(
            "wss://bridge.example.com/media-stream",
            {"token": "<random, single use>", "from": "+15551230000", "to": "+15559870000"},
            status_callback="https://bridge.example.com/stream-status",
            action="https://bridge.example.com/stream-ended",
        ),
        "busy.xml": twiml.busy_document(DEFAULTS.busy_message, VOICE),
        "busy-reject.xml": twiml.busy_document(DEFAULTS.busy_message, VOICE, reject=True),
        "unavailable.xml": twiml.message_document(DEFAULTS.unavailable_message, VOICE),
        "fallback.xml": twiml.message_document(DEFAULTS.fallback_message, VOICE),
        "hangup.xml": twiml.hangup_document(),
    }


@pytest.mark.parametrize("name", sorted(documents()))
def test_twiml_reviewed_copy_matches_what_is_served(name: str) -> None:
    assert (TWIML_DIR / name).read_text().strip() == documents()[name]


def test_twiml_connect_document_shape() -> None:
    root = ET.fromstring(documents()["connect.xml"])
    assert root.tag == "Response"
    [connect] = list(root)
    assert connect.tag == "Connect"
    assert connect.attrib == {"action": "https://bridge.example.com/stream-ended", "method": "POST"}
    [stream] = list(connect)
    assert stream.attrib == {
        "url": "wss://bridge.example.com/media-stream",
        "statusCallback": "https://bridge.example.com/stream-status",
        "statusCallbackMethod": "POST",
    }
    assert {p.get("name"): p.get("value") for p in stream} == {
        "token": "<random, single use>",
        "from": "+15551230000",
        "to": "+15559870000",
    }


def test_twiml_stream_url_never_carries_a_query_string() -> None:
    with pytest.raises(ValueError, match="query string"):
        twiml.connect_document("wss://bridge.example.com/media-stream?token=x")


def test_twiml_parameters_stay_under_twilios_500_character_limit() -> None:
    root = ET.fromstring(twiml.connect_document("wss://b/media-stream", {"from": "x" * 900}))
    [param] = root.iter("Parameter")
    assert len(param.get("name", "")) + len(param.get("value", "")) < 500


@pytest.mark.parametrize("name", ["busy.xml", "busy-reject.xml", "unavailable.xml", "fallback.xml", "hangup.xml"])
def test_twiml_every_terminal_document_ends_the_call(name: str) -> None:
    last = list(ET.fromstring(documents()[name]))[-1]
    assert last.tag in {"Hangup", "Reject"}


def test_twiml_say_uses_the_configured_voice() -> None:
    root = ET.fromstring(twiml.message_document("hello", twiml.Voice("Polly.Joanna", "en-US")))
    say = root.find("Say")
    assert say is not None and say.attrib == {"voice": "Polly.Joanna", "language": "en-US"} and say.text == "hello"
