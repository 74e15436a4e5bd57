"""X-Twilio-Signature checks against URLs rebuilt from PUBLIC_URL (spec §5).

Behind a proxy the app sees ``http://internal:8080/voice`` while Twilio signed ``https://public/voice``
(§5.4, G10), so the URL is never taken from the request: it is the configured public base plus the path and
the raw query string. The media-stream upgrade is signed over the ``wss://`` URL with no parameters, and
Twilio's notes say to accept the trailing-slash form too (§5.2). twilio's own ``RequestValidator`` does the
HMAC and tries the URL with and without the port.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from twilio.request_validator import RequestValidator


class SignatureChecker:
    def __init__(self, auth_token: str, public_url: str) -> None:
        if not auth_token or not public_url:
            raise ValueError("signature checks need both the auth token and the public URL")
        self._validator = RequestValidator(auth_token)
        parts = urlsplit(public_url)
        self._host = parts.netloc
        self._prefix = parts.path.rstrip("/")
        self._http_scheme = parts.scheme

    def http_url(self, path: str, raw_query: str = "") -> str:
        url = f"{self._http_scheme}://{self._host}{self._prefix}{path}"
        return f"{url}?{raw_query}" if raw_query else url

    def upgrade_url(self, path: str) -> str:
        scheme = "wss" if self._http_scheme == "https" else "ws"
        return f"{scheme}://{self._host}{self._prefix}{path}"

    def check_http(self, path: str, raw_query: str, params: Mapping[str, Any] | str, signature: str | None) -> bool:
        """A webhook: form parameters (a multidict) or, for a JSON body, the raw body text (§5.1)."""
        if not signature:
            return False
        return bool(self._validator.validate(self.http_url(path, raw_query), params, signature))

    def check_upgrade(self, path: str, signature: str | None) -> bool:
        """The WebSocket upgrade: signed over the wss:// URL with no parameters; trailing slash accepted."""
        if not signature:
            return False
        url = self.upgrade_url(path.rstrip("/"))
        return any(self._validator.validate(candidate, {}, signature) for candidate in (url, url + "/"))
