"""The /voice-stream driver: a thin asyncio shell around ``VoiceSession`` (spec §6).

All protocol decisions are the session's; this module only moves frames and translates the websockets
library's exceptions into ``SessionError`` at the boundary.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidHandshake, InvalidStatus, InvalidURI

from telephony_bridge.errors import SessionError
from telephony_bridge.savants.protocol import Audio, Confirmed, Failed, Notice, VoiceSession


class SavantsConnection:
    """An authenticated voice session. ``receive()`` yields audio and notices; ``None`` once Savants closed it
    normally (1000/1001); an abnormal close is a ``SessionError``."""

    def __init__(self, ws: ClientConnection, session: VoiceSession) -> None:
        self._ws = ws
        self.session = session

    @property
    def session_id(self) -> str | None:
        return self.session.session_id

    async def send_audio(self, pcm: bytes) -> bool:
        """Send caller audio; False once Savants has closed normally (``receive`` reports the end)."""
        try:
            await self._ws.send(pcm)
        except ConnectionClosedOK:
            return False
        except ConnectionClosed as exc:
            message = f"voice stream dropped while sending (close code {_code(exc)})"
            raise SessionError(message, code="DROPPED") from None
        return True

    async def receive(self) -> Audio | Notice | None:
        while True:
            try:
                frame = await self._ws.recv()
            except ConnectionClosedOK:
                self.session.closed()
                return None
            except ConnectionClosed as exc:
                self.session.closed()
                raise SessionError(f"voice stream dropped (close code {_code(exc)})", code="DROPPED") from None
            event = self.session.receive_binary(frame) if isinstance(frame, bytes) else self.session.receive_text(frame)
            if isinstance(event, Failed):
                await self.close()
                raise SessionError(f"voice stream failed: {event.code} {event.message}".rstrip(), code=event.code)
            if isinstance(event, Audio | Notice):
                return event

    async def close(self) -> None:
        self.session.closed()
        await self._ws.close()


Connector = Callable[[str, str, float], Awaitable[SavantsConnection]]


# Savants documents no keepalive (spec §6.6); a WebSocket ping is answered by any RFC 6455 server and finds a
# half-open connection in seconds rather than minutes of dead air.
PING_INTERVAL_S = 10.0
PING_TIMEOUT_S = 10.0


async def open_voice_session(url: str, token: str, timeout_s: float) -> SavantsConnection:
    """Connect, send the JWT as the first text frame, and wait for the confirmation (§6.2), all within
    ``timeout_s``."""
    session = VoiceSession()
    connection: SavantsConnection | None = None
    try:
        async with asyncio.timeout(timeout_s):
            ws = await connect(
                url,
                open_timeout=None,
                ping_interval=PING_INTERVAL_S,
                ping_timeout=PING_TIMEOUT_S,
                compression=None,
                max_size=2**20,
                # Unbounded: a session opened at the webhook waits unread until its stream starts, and a
                # bounded queue would stop reading the socket, pongs included, and let the keepalive kill it.
                max_queue=None,
                proxy=None,
            )
            connection = SavantsConnection(ws, session)
            await ws.send(session.authenticate(token))
            while True:
                frame = await ws.recv()
                event = session.receive_binary(frame) if isinstance(frame, bytes) else session.receive_text(frame)
                if isinstance(event, Confirmed):
                    return connection
                if isinstance(event, Failed):
                    raise SessionError(f"voice stream refused: {event.code} {event.message}".rstrip(), code=event.code)
    except BaseException as exc:
        if connection is not None:
            await connection.close()
        translated = _translate(exc, timeout_s, handshake=connection is not None)
        if translated is exc:
            raise
        raise translated from None


def _translate(exc: BaseException, timeout_s: float, *, handshake: bool) -> BaseException:
    """The websockets library's failures as our ``SessionError``; anything else unchanged."""
    if isinstance(exc, TimeoutError):
        if handshake:
            return SessionError(f"no confirmation within {timeout_s} s of connecting", code="AUTH_TIMEOUT")
        return SessionError(f"voice stream did not open within {timeout_s} s", code="CONNECT_TIMEOUT")
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        return SessionError(f"voice stream upgrade refused with HTTP {status}", code=f"HTTP_{status}")
    if isinstance(exc, ConnectionClosed):
        return SessionError(f"voice stream closed during the handshake (close code {_code(exc)})", code="CLOSED")
    if isinstance(exc, OSError | InvalidHandshake | InvalidURI):
        return SessionError(f"voice stream unreachable: {type(exc).__name__}: {exc}", code="CONNECT_FAILED")
    return exc


def _code(exc: ConnectionClosed) -> int | None:
    return exc.rcvd.code if exc.rcvd else None
