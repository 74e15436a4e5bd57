"""``POST /api/websocket-voice/token``: device credentials in, a one-minute JWT out (spec §3).

Order of checks: an armed fault's delay, body (400; an armed 5xx for every device comes first), the fault's
forced 429, rate limit (429), the fault's forced 401/5xx, credentials (401), then the token. Every well-formed
request counts towards the device's 60 a minute whatever its outcome except a 429 (spec §6.7: "each token
request counts"), so a client that counts its own requests never trips the limit.
"""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from telephony_bridge.tools.emulator.faults import TokenFault
from telephony_bridge.tools.emulator.limits import retry_after_whole_s
from telephony_bridge.tools.emulator.protocol import http_error_body, iso_timestamp
from telephony_bridge.tools.emulator.state import EmulatorState
from telephony_bridge.tools.emulator.tokens import mint_token

logger = logging.getLogger(__name__)

TOKEN_PATH = "/api/websocket-voice/token"
NO_CACHE = {"Cache-Control": "no-cache, no-store, must-revalidate"}  # spec §3.2
REQUIRED_FIELDS = ("apiKey", "deviceId")  # checked in this order, as in the spec's example error
FORCED_FAILURES = {
    500: ("CONFIGURATION_ERROR", "Server configuration error. Please contact support."),
    503: ("SERVICE_UNAVAILABLE", "Service temporarily unavailable. Try again later."),
}
OTHER_FAILURE = ("INTERNAL_ERROR", "Internal server error.")


class TokenEndpoint:
    """The token route, bound to one emulator's state."""

    def __init__(self, state: EmulatorState) -> None:
        self.state = state
        self.config = state.config
        self.clock = state.clock
        # Devices listed as inactive have been so since the emulator started.
        self.deactivated_at = iso_timestamp(self.clock.wall(), millis=False)

    async def handle(self, request: Request) -> JSONResponse:
        if self.config.token_delay_s:
            await self.clock.sleep_until(self.clock.monotonic() + self.config.token_delay_s)
        fields = _parse_body(await request.body())
        # A request naming no device (a malformed one, e.g. a client's health probe) meets only the faults
        # armed for every device: a service in an outage fails those too.
        fault = self.state.faults.token_fault(None if isinstance(fields, JSONResponse) else fields[1])
        if fault is not None and fault.delay_s:
            await self.clock.sleep_until(self.clock.monotonic() + fault.delay_s)
        if isinstance(fields, JSONResponse):
            if fault is not None and fault.status is not None and fault.status >= 500:
                return self._forced_failure(fault, "")
            self.state.record_error("INVALID_REQUEST")
            return fields
        api_key, device_id = fields
        if fault is not None and fault.status == 429:
            logger.info("injecting fault: token request of device %s answered 429", device_id)
            return self._rate_limited(fault.retry_after_s)

        wait_s = self.state.token_window.admit(device_id, self.clock.monotonic())
        if wait_s is not None:
            self.state.record_violation("token_rate", device_id)
            logger.warning("token refused: device %s is over its token rate limit", device_id)
            return self._rate_limited(retry_after_whole_s(wait_s))
        if fault is not None and fault.status is not None:
            logger.info("injecting fault: token request of device %s answered %d", device_id, fault.status)
            return self._forced_failure(fault, device_id)
        if not self._credentials_match(api_key, device_id):
            return self._error(401, "AUTHENTICATION_FAILED", "Invalid API key or device ID")
        if device_id in self.config.inactive_device_ids:
            details = {"deviceId": device_id, "deactivatedAt": self.deactivated_at}
            return self._error(401, "DEVICE_INACTIVE", "Device has been deactivated", details)

        token = mint_token(
            self.config.jwt_secret, device_id, issued_at_s=self.clock.wall(), ttl_s=self.config.token_ttl_s
        )
        self.state.tokens_issued += 1
        return JSONResponse({"token": token}, headers=NO_CACHE)

    def _rate_limited(self, retry_after_s: int) -> JSONResponse:
        details = {"retryAfter": retry_after_s, "limit": self.config.max_token_requests, "window": "1 minute"}
        headers = {"Retry-After": str(retry_after_s)}
        return self._error(429, "RATE_LIMITED", "Too many requests. Try again later.", details, headers=headers)

    def _forced_failure(self, fault: TokenFault, device_id: str) -> JSONResponse:
        status = fault.status or 500
        if status == 401 and fault.error_code == "DEVICE_INACTIVE":
            details = {"deviceId": device_id, "deactivatedAt": iso_timestamp(self.clock.wall(), millis=False)}
            return self._error(401, "DEVICE_INACTIVE", "Device has been deactivated", details)
        if status == 401:
            return self._error(401, "AUTHENTICATION_FAILED", "Invalid API key or device ID")
        code, message = FORCED_FAILURES.get(status, OTHER_FAILURE)
        return self._error(status, code, message)

    def _credentials_match(self, api_key: str, device_id: str) -> bool:
        key_ok = secrets.compare_digest(api_key.encode(), self.config.api_key.encode())
        known = self.config.device_ids is None or device_id in self.config.device_ids
        return key_ok and known

    def _error(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> JSONResponse:
        self.state.record_error(code)
        return JSONResponse(
            http_error_body(code, message, details), status_code=status, headers={**NO_CACHE, **(headers or {})}
        )


def _parse_body(body: bytes) -> tuple[str, str] | JSONResponse:
    """``(apiKey, deviceId)``, or the 400 reply naming the first field that is wrong (spec §3.3)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return _invalid("Request body is not valid JSON", field="body", expected="JSON object")
    if not isinstance(payload, dict):
        return _invalid("Request body must be a JSON object", field="body", expected="JSON object")
    values: list[str] = []
    for name in REQUIRED_FIELDS:
        value = payload.get(name)
        if value is None:
            return _invalid(f"Missing required field: {name}", field=name, expected="string")
        if not isinstance(value, str):
            return _invalid(f"Field must be a string: {name}", field=name, expected="string")
        if not value:
            return _invalid(f"Field must not be empty: {name}", field=name, expected="non-empty string")
        values.append(value)
    return values[0], values[1]


def _invalid(message: str, *, field: str, expected: str) -> JSONResponse:
    body = http_error_body("INVALID_REQUEST", message, {"field": field, "expected": expected})
    return JSONResponse(body, status_code=400, headers=NO_CACHE)
