"""The retry table: which AI failures are worth a reconnect, and the backoff between attempts."""

from __future__ import annotations

import random

import pytest

from telephony_bridge.errors import SavantsError, SessionError, TokenError
from telephony_bridge.savants.retry import BACKOFF_CAP_S, Verdict, backoff_s, classify

RETRY, QUARANTINE, GIVE_UP = Verdict.RETRY, Verdict.QUARANTINE, Verdict.GIVE_UP


def dropped(close_code: int | None) -> SessionError:
    return SessionError("dropped", code="DROPPED", close_code=close_code)


def failed(code: str) -> SessionError:
    return SessionError("an error message", code=code)


def token(code: str, status: int | None) -> TokenError:
    return TokenError("token refused", code=code, status=status)


@pytest.mark.parametrize(
    ("error", "verdict"),
    [
        # the session ended with a close code
        (dropped(1001), RETRY),  # going away: a Savants restart, not a goodbye
        (dropped(1011), RETRY),
        (dropped(1012), RETRY),
        (dropped(1013), RETRY),
        (dropped(None), RETRY),  # TCP reset: no close frame
        (SessionError("stalled", code="STALLED"), RETRY),
        (dropped(1002), GIVE_UP),
        (dropped(1008), GIVE_UP),
        (dropped(4500), RETRY),
        (dropped(4401), RETRY),  # token expired: a new token cures it
        (dropped(4429), RETRY),
        (dropped(4403), GIVE_UP),
        (dropped(4415), GIVE_UP),
        # an error message from Savants
        (failed("SERVER_ERROR"), RETRY),
        (failed("TOKEN_EXPIRED"), RETRY),
        (failed("UNKNOWN"), RETRY),
        (failed("AUTHENTICATION_FAILED"), QUARANTINE),
        (failed("DEVICE_INACTIVE"), QUARANTINE),
        (failed("PROTOCOL"), GIVE_UP),
        (failed("INVALID_AUDIO"), GIVE_UP),
        (failed("TOKEN_REUSED"), GIVE_UP),
        # a reconnect attempt that failed before the session was up
        (SessionError("x", code="CONNECT_TIMEOUT"), RETRY),
        (SessionError("x", code="CONNECT_FAILED"), RETRY),
        (SessionError("x", code="AUTH_TIMEOUT"), RETRY),
        (SessionError("x", code="HTTP_503"), RETRY),
        (SessionError("x", code="HTTP_429"), RETRY),
        (SessionError("x", code="HTTP_403"), GIVE_UP),
        (token("SERVICE_UNAVAILABLE", 503), RETRY),
        (token("HTTP_502", 502), RETRY),
        (token("TIMEOUT", None), RETRY),
        (token("UNREACHABLE", None), RETRY),
        (token("BAD_RESPONSE", 200), RETRY),  # a 200 without a JWT: retried at the webhook, and so mid-call
        (token("RATE_LIMITED", 429), RETRY),
        (token("NO_BUDGET", None), RETRY),
        (token("ACCOUNTING_UNAVAILABLE", None), RETRY),
        (token("AUTHENTICATION_FAILED", 401), QUARANTINE),
        (token("DEVICE_INACTIVE", 401), QUARANTINE),
        (token("INVALID_REQUEST", 400), GIVE_UP),
    ],
)
def test_classify_follows_the_retry_table(error: SavantsError, verdict: Verdict) -> None:
    assert classify(error) is verdict


def test_backoff_doubles_up_to_the_cap_with_jitter_within_half() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(BACKOFF_CAP_S, 0.2 * 2 ** (attempt - 1))
        waits = [backoff_s(attempt, rng) for _ in range(200)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert max(waits) - min(waits) > ceiling / 4  # jittered, not lockstep
