"""The token endpoint (spec §3): device API key + device id -> a 60 s, single-use JWT.

Tokens are never cached, stored or logged (§4): each connection attempt fetches its own.
"""

from __future__ import annotations

import asyncio

import httpx

from telephony_bridge.errors import TokenError

TOKEN_PATH = "/api/websocket-voice/token"


class TokenClient:
    """Fetches tokens over an injected ``httpx.AsyncClient`` (tests pass one pointed at the emulator)."""

    def __init__(self, http: httpx.AsyncClient, base_url: str, api_key: str, timeout_s: float = 5.0) -> None:
        self._http = http
        self._url = base_url.rstrip("/") + TOKEN_PATH
        self._api_key = api_key
        self._timeout_s = timeout_s

    async def fetch(self, device_id: str) -> str:
        try:
            # httpx's timeout is per phase (connect, write, read); the caller is waiting on the total.
            async with asyncio.timeout(self._timeout_s):
                response = await self._http.post(
                    self._url,
                    json={"apiKey": self._api_key, "deviceId": device_id},
                    headers={"Accept": "application/json"},
                    timeout=self._timeout_s,
                )
        except (TimeoutError, httpx.TimeoutException):
            raise TokenError(f"token endpoint did not answer within {self._timeout_s} s", code="TIMEOUT") from None
        except httpx.HTTPError as exc:
            raise TokenError(f"token endpoint unreachable: {type(exc).__name__}", code="UNREACHABLE") from None
        return _read_token(response)


def _read_token(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code == 200:
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or token.count(".") != 2:
            raise TokenError("token endpoint answered 200 without a JWT in 'token'", code="BAD_RESPONSE", status=200)
        return token
    # The envelope nests code and message under 'error' (§3.3, §11.17); tolerate anything missing.
    error = body.get("error") if isinstance(body, dict) and isinstance(body.get("error"), dict) else {}
    code = error.get("code") if isinstance(error.get("code"), str) else f"HTTP_{response.status_code}"
    message = error.get("message") if isinstance(error.get("message"), str) else ""
    details = error.get("details") if isinstance(error.get("details"), dict) else {}
    retry_after = _retry_after_s(details.get("retryAfter"), response.headers.get("retry-after"))
    raise TokenError(
        f"token endpoint refused: HTTP {response.status_code} {code} {message}".rstrip(),
        code=code,
        status=response.status_code,
        retry_after_s=retry_after,
    )


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
