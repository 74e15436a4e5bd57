"""X-Twilio-Signature checks against URLs rebuilt from PUBLIC_URL (spec §5): pure, no server."""

from __future__ import annotations

import pytest
from twilio.request_validator import RequestValidator

from telephony_bridge.twilio.signatures import SignatureChecker

TOKEN = "12345"
PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+14158675310",
    "Digits": "1234",
    "From": "+14158675310",
    "To": "+18005551212",
}


def sign(url: str, params: dict[str, str], token: str = TOKEN) -> str:
    return RequestValidator(token).compute_signature(url, params)


def test_signature_published_check_value_reproduces() -> None:
    assert sign("https://example.com/myapp.php?foo=1&bar=2", PARAMS) == "L/OH5YylLD5NRKLltdqwSvS0BnU="
    checker = SignatureChecker(TOKEN, "https://example.com")
    assert checker.check_http("/myapp.php", "foo=1&bar=2", PARAMS, "L/OH5YylLD5NRKLltdqwSvS0BnU=")


def test_signature_public_url_wins_over_what_the_app_sees_behind_a_proxy() -> None:
    # Twilio signed https://public/voice; the app behind the proxy sees http://internal:8080/voice.
    signature = sign("https://public.example/voice", PARAMS)
    checker = SignatureChecker(TOKEN, "https://public.example")
    assert checker.http_url("/voice") == "https://public.example/voice"
    assert checker.check_http("/voice", "", PARAMS, signature)


def test_signature_public_url_with_a_path_prefix() -> None:
    signature = sign("https://public.example/bridge/voice", PARAMS)
    assert SignatureChecker(TOKEN, "https://public.example/bridge/").check_http("/voice", "", PARAMS, signature)


def test_signature_port_dropped_by_twilio_still_validates() -> None:
    signature = sign("https://public.example/voice", PARAMS)
    assert SignatureChecker(TOKEN, "https://public.example:443").check_http("/voice", "", PARAMS, signature)


@pytest.mark.parametrize(
    ("signature", "params"),
    [
        (sign("https://public.example/voice", PARAMS, token="other-token"), PARAMS),
        (sign("https://public.example/voice", PARAMS), {**PARAMS, "To": "+18005550000"}),
        (sign("https://public.example/voice", PARAMS), {**PARAMS, "Extra": "1"}),
        (None, PARAMS),
        ("", PARAMS),
    ],
    ids=["wrong-token", "changed-parameter", "added-parameter", "missing", "empty"],
)
def test_signature_refused(signature: str | None, params: dict[str, str]) -> None:
    assert not SignatureChecker(TOKEN, "https://public.example").check_http("/voice", "", params, signature)


def test_signature_upgrade_signed_over_wss_is_accepted_with_or_without_trailing_slash() -> None:
    checker = SignatureChecker(TOKEN, "https://public.example")
    assert checker.check_upgrade("/media-stream", sign("wss://public.example/media-stream", {}))
    assert checker.check_upgrade("/media-stream", sign("wss://public.example/media-stream/", {}))
    assert checker.check_upgrade("/media-stream/", sign("wss://public.example/media-stream", {}))


@pytest.mark.parametrize(
    "url",
    ["https://public.example/media-stream", "http://public.example/media-stream", "wss://other.example/media-stream"],
)
def test_signature_upgrade_signed_over_anything_else_is_refused(url: str) -> None:
    assert not SignatureChecker(TOKEN, "https://public.example").check_upgrade("/media-stream", sign(url, {}))


def test_signature_upgrade_without_header_is_refused() -> None:
    assert not SignatureChecker(TOKEN, "https://public.example").check_upgrade("/media-stream", None)
