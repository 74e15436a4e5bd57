"""Which voice-stream failures make ``/readyz`` say the voice stream is failing: the service not answering as a
service, not a refusal of one session (``savants/voice_health.py``; over real sockets in test_readiness.py)."""

from __future__ import annotations

import pytest

from telephony_bridge.errors import SessionError
from telephony_bridge.savants.voice_health import service_failed

SERVICE = ["CONNECT_FAILED", "CONNECT_TIMEOUT", "AUTH_TIMEOUT", "HTTP_502", "HTTP_503", "SERVER_ERROR"]
SESSION = ["TOKEN_EXPIRED", "INVALID_TOKEN", "TOKEN_REUSED", "CONCURRENCY_LIMIT", "HTTP_401", "HTTP_429", "CLOSED"]


@pytest.mark.parametrize("code", SERVICE)
def test_the_service_not_answering_counts_against_the_voice_stream(code: str) -> None:
    assert service_failed(SessionError("x", code=code))


@pytest.mark.parametrize("code", SESSION)
def test_a_refusal_of_one_session_is_an_answer(code: str) -> None:
    assert not service_failed(SessionError("x", code=code))
