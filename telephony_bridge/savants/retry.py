"""Which AI failures are worth a reconnect, and how long to wait between attempts (no I/O, no clock).

A mid-call drop of the Savants session is retried with a fresh token while the caller keeps the line (see
``bridge.Call``). The table, by what ended the session or refused the attempt:

    RETRY       close 1001 (going away: a Savants restart), 1011, 1012, 1013, 1014; no close frame at all (TCP
                reset, 1006); STALLED (no pong to our ping); private close codes 45xx and the other 4xxx
                not listed below; error codes TOKEN_EXPIRED (the documented action, spec §6.4), SERVER_ERROR,
                INTERNAL_ERROR, SERVICE_UNAVAILABLE, AUTH_TIMEOUT, CONCURRENCY_LIMIT and unknown ones;
                token endpoint 5xx, 429 RATE_LIMITED, a 200 without a JWT (BAD_RESPONSE: a proxy's page, as
                the webhook's token requests retry it too), timeouts, unreachable, no budget on the device now;
                voice stream unreachable, upgrade answered 5xx/429, handshake timeouts
    QUARANTINE  AUTHENTICATION_FAILED, DEVICE_INACTIVE (token endpoint or voice stream): the device itself is
                refused, so it leaves the pool for a while (logged once at ERROR) and the call is not retried
                (at its first session the call moves to another device instead: ``reconnect._worth_it``)
    GIVE_UP     the peer broke the protocol (PROTOCOL), or says we did: close 1002, 1003, 1007-1010, private
                4400/4403/4409/4415, INVALID_TOKEN, TOKEN_REUSED, INVALID_AUDIO, INVALID_MESSAGE,
                INVALID_REQUEST, other 4xx; retrying would fail the same way

A normal close (1000) is the AI's goodbye and no failure at all. Retries are bounded by
``savants.reconnect_deadline_s``, so even a wrong RETRY costs at most that much time and a few tokens.
"""

from __future__ import annotations

import enum
import random

from telephony_bridge.errors import SavantsError, SessionError, TokenError


class Verdict(enum.Enum):
    RETRY = "retry"
    QUARANTINE = "quarantine"
    GIVE_UP = "give_up"


DEVICE_REFUSED = frozenset({"AUTHENTICATION_FAILED", "DEVICE_INACTIVE"})
NOT_RETRIED = frozenset(
    {
        "PROTOCOL",
        "INVALID_TOKEN",
        "TOKEN_REUSED",
        "INVALID_AUDIO",
        "INVALID_MESSAGE",
        "INVALID_REQUEST",
    }
)
# RFC 6455 §7.4.1: the peer says we broke something; a new session would break it again.
NOT_RETRIED_CLOSE_CODES = frozenset({1002, 1003, 1007, 1008, 1009, 1010})
# Private codes read as 4000 + an HTTP status (as the emulator sends them): client errors, except those that
# a new token or a moment's wait cures (401 token expired, 408 auth timeout, 429 too many sockets).
RETRIED_4XX = frozenset({4401, 4408, 4429})

BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 2.0


def classify(exc: SavantsError) -> Verdict:
    """What to do about one failure of the AI side (see the table in the module docstring)."""
    code = getattr(exc, "code", "")
    if code in DEVICE_REFUSED:
        return Verdict.QUARANTINE
    if code in NOT_RETRIED:
        return Verdict.GIVE_UP
    if isinstance(exc, SessionError) and exc.close_code is not None:
        close = exc.close_code
        if close in NOT_RETRIED_CLOSE_CODES or (4400 <= close < 4500 and close not in RETRIED_4XX):
            return Verdict.GIVE_UP
        return Verdict.RETRY
    status = http_status(exc)
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return Verdict.GIVE_UP
    return Verdict.RETRY


def http_status(exc: SavantsError) -> int | None:
    """The HTTP status a failure carries: a token request's, or an upgrade's (``HTTP_<status>``)."""
    if isinstance(exc, TokenError):
        return exc.status
    code = getattr(exc, "code", "")
    if code.startswith("HTTP_") and code[5:].isdigit():
        return int(code[5:])
    return None


def backoff_s(attempt: int, rng: random.Random) -> float:
    """The wait before reconnect attempt ``attempt`` (1, 2, ...): exponential from ``BACKOFF_BASE_S``, capped
    at ``BACKOFF_CAP_S``, with "equal jitter" (between half and all of it) so calls dropped together by one
    Savants restart do not come back in lockstep."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
    return ceiling / 2 + rng.random() * ceiling / 2
