"""The token endpoint (spec §3): device API key + device id -> a 60 s, single-use JWT.

Tokens are never cached, stored or logged (§4): each connection attempt fetches its own.
"""

from __future__ import annotations

import asyncio

from telephony_bridge.errors import TokenError
from telephony_bridge.savants.health import EndpointHealth
from telephony_bridge.savants.http_post import REQUEST_TIMEOUT, HttpFailure, JsonPoster, Reply

TOKEN_PATH = "/api/websocket-voice/token"
# Failures of the endpoint itself (worth a retry, and what /readyz watches); other refusals concern one device.
ENDPOINT_FAILURES = frozenset({"TIMEOUT", "UNREACHABLE", "BAD_RESPONSE"})


def endpoint_failed(exc: TokenError) -> bool:
    """The endpoint failed (5xx, timeout, no connection, nonsense, or 408: it did not take the request in time), as
    opposed to refusing one device's request."""
    status = exc.status
    return exc.code in ENDPOINT_FAILURES or (status is not None and (status >= 500 or status == REQUEST_TIMEOUT))


class TokenClient:
    """Fetches tokens over an injected ``JsonPoster`` for the Savants REST base (tests pass one pointed at the
    emulator), and tells ``health`` how each request went."""

    def __init__(
        self,
        http: JsonPoster,
        api_key: str,
        timeout_s: float = 5.0,
        *,
        health: EndpointHealth | None = None,
    ) -> None:
        self._http = http
        self._api_key = api_key
        self._timeout_s = timeout_s
        self.health = health
        if health is not None:
            health.attach_probe(self.probe)

    async def fetch(self, device_id: str, timeout_s: float | None = None) -> str:
        """One token request; ``timeout_s`` (at most the configured one) bounds the whole of it."""
        try:
            token = _read_token(await self._post({"apiKey": self._api_key, "deviceId": device_id}, timeout_s))
        except TokenError as exc:
            if self.health is not None:
                if endpoint_failed(exc):
                    self.health.record_failure(f"{exc.code}: {exc}")
                else:
                    self.health.record_success()  # it answered; the refusal is about this device
            raise
        if self.health is not None:
            self.health.record_success()
        return token

    async def probe(self) -> str | None:
        """Whether the endpoint answers, without a token request: an empty body (400 from a working endpoint,
        counted against no device). None if it refused it (a 4xx but 408), else what went wrong: a 5xx or a 408
        (as ``endpoint_failed`` judges a token request), or a 2xx/3xx, which no Savants endpoint answers to an
        empty body (a wrong URL reaching a server that takes any POST fails every token request with
        BAD_RESPONSE, and must not look healthy to the probe)."""
        try:
            response = await self._post({}, None)
        except TokenError as exc:
            return f"{exc.code}: {exc}"
        refused = 400 <= response.status < 500 and response.status != REQUEST_TIMEOUT
        return None if refused else f"HTTP {response.status} to a probe"

    async def _post(self, body: dict[str, str], timeout_s: float | None) -> Reply:
        timeout_s = self._timeout_s if timeout_s is None else min(timeout_s, self._timeout_s)
        try:
            async with asyncio.timeout(timeout_s):  # the whole request: the caller is waiting on the total
                return await self._http.post(TOKEN_PATH, body)
        except TimeoutError:
            raise TokenError(f"token endpoint did not answer within {timeout_s:g} s", code="TIMEOUT") from None
        except OSError as exc:  # refused, reset, TLS, name resolution, a broken response (HttpFailure)
            raise TokenError(f"token endpoint unreachable: {_describe(exc)}", code="UNREACHABLE") from None


def _describe(exc: OSError) -> str:
    """What went wrong, without the request: the type, and its reason when it has one."""
    reason = str(exc) if isinstance(exc, HttpFailure) else exc.strerror
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


def _read_token(response: Reply) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status == 200:
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or token.count(".") != 2:
            raise TokenError("token endpoint answered 200 without a JWT in 'token'", code="BAD_RESPONSE", status=200)
        return token
    # The envelope nests code and message under 'error' (§3.3, §11.17); tolerate anything missing.
    error = body.get("error") if isinstance(body, dict) and isinstance(body.get("error"), dict) else {}
    code = error.get("code") if isinstance(error.get("code"), str) else _bare_code(response.status)
    message = error.get("message") if isinstance(error.get("message"), str) else ""
    details = error.get("details") if isinstance(error.get("details"), dict) else {}
    retry_after = _retry_after_s(details.get("retryAfter"), response.headers.get("retry-after"))
    raise TokenError(
        f"token endpoint refused: HTTP {response.status} {code} {message}".rstrip(),
        code=code,
        status=response.status,
        retry_after_s=retry_after,
    )


def _bare_code(status: int) -> str:
    """The code of a refusal without Savants' envelope (a gateway's page, an empty body). A 401 says the API key
    was not accepted, whatever wrote it: ``AUTHENTICATION_FAILED``, so the device leaves the pool (logged once)
    and ``/readyz`` says so once none is left, rather than every call asking again and hearing "unavailable"."""
    return "AUTHENTICATION_FAILED" if status == 401 else f"HTTP_{status}"


def _retry_after_s(*candidates: object) -> float | None:
    """``details.retryAfter`` is presumed seconds (§5, §11.9); a Retry-After header may also appear."""
    for value in candidates:
        try:
            seconds = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if seconds >= 0:
            return seconds
    return None
