"""The voice stream's part in ``/readyz``: every connection attempt tells an ``EndpointHealth`` whether the voice
stream answered, and while it is failing a probe opens a bare TCP (and TLS) connection to its host.

A failure is the service not answering as a service: no connection, no upgrade in time or a 5xx to it, no
confirmation in time, or one of Savants' own server errors. A refusal of the session itself (a bad or spent
token, a device over its socket limit, any 4xx) is an answer: the service works, and that call's trouble is
its own.
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

from telephony_bridge.errors import SessionError
from telephony_bridge.savants.client import Connector, SavantsConnection
from telephony_bridge.savants.health import EndpointHealth, Probe

SERVICE_FAILURES = frozenset(
    {"CONNECT_FAILED", "CONNECT_TIMEOUT", "AUTH_TIMEOUT", "SERVER_ERROR", "INTERNAL_ERROR", "SERVICE_UNAVAILABLE"}
)


def service_failed(exc: SessionError) -> bool:
    """The voice service did not answer as a service (see above), as opposed to refusing this session."""
    return exc.code in SERVICE_FAILURES or exc.code.startswith("HTTP_5")


def watched(connect: Connector, health: EndpointHealth) -> Connector:
    """``connect``, telling ``health`` how each attempt went."""

    async def connect_watched(url: str, token: str, timeout_s: float) -> SavantsConnection:
        try:
            connection = await connect(url, token, timeout_s)
        except SessionError as exc:
            if service_failed(exc):
                health.record_failure(f"{exc.code}: {exc}")
            else:
                health.record_success()  # it answered; the refusal is about this session
            raise
        health.record_success()
        return connection

    return connect_watched


def voice_probe(url: str, ssl_context: ssl.SSLContext | None, timeout_s: float) -> Probe:
    """A probe that connects to the voice stream's host (TLS too, for ``wss://``) and hangs up: no token spent."""
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    context = (ssl_context or ssl.create_default_context()) if secure else None

    async def probe() -> str | None:
        try:
            async with asyncio.timeout(timeout_s):
                _, writer = await asyncio.open_connection(
                    host, port, ssl=context, server_hostname=host if secure else None
                )
        except TimeoutError:
            return f"CONNECT_TIMEOUT: no connection to the voice stream's host within {timeout_s} s"
        except OSError as exc:
            return f"CONNECT_FAILED: {type(exc).__name__}: {exc}"
        writer.close()
        return None

    return probe
