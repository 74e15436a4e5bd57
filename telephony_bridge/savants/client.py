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

    async def send_audio(self, pcm: bytes) -> None:
        try:
            await self._ws.send(pcm)
        except ConnectionClosed as exc:
            raise SessionError(f"voice stream closed while sending (close code {_code(exc)})", code="CLOSED") from None

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


async def open_voice_session(url: str, token: str, timeout_s: float) -> SavantsConnection:
    """Connect, send the JWT as the first text frame, and wait for the confirmation (§6.2)."""
    session = VoiceSession()
    try:
        ws = await asyncio.wait_for(
            connect(url, open_timeout=None, ping_interval=None, compression=None, max_size=2**20, proxy=None),
            timeout_s,
        )
    except TimeoutError:
        raise SessionError(f"voice stream did not open within {timeout_s} s", code="CONNECT_TIMEOUT") from None
    except InvalidStatus as exc:
        status = exc.response.status_code
        raise SessionError(f"voice stream upgrade refused with HTTP {status}", code=f"HTTP_{status}") from None
    except (OSError, InvalidHandshake, InvalidURI) as exc:
        raise SessionError(f"voice stream unreachable: {type(exc).__name__}: {exc}", code="CONNECT_FAILED") from None
    connection = SavantsConnection(ws, session)
    try:
        await ws.send(session.authenticate(token))
        async with asyncio.timeout(timeout_s):
            while True:
                frame = await ws.recv()
                event = session.receive_binary(frame) if isinstance(frame, bytes) else session.receive_text(frame)
                if isinstance(event, Confirmed):
                    return connection
                if isinstance(event, Failed):
                    raise SessionError(f"voice stream refused: {event.code} {event.message}".rstrip(), code=event.code)
    except TimeoutError:
        await connection.close()
        raise SessionError(f"no confirmation within {timeout_s} s of sending the token", code="AUTH_TIMEOUT") from None
    except ConnectionClosed as exc:
        await connection.close()
        message = f"voice stream closed during the handshake (close code {_code(exc)})"
        raise SessionError(message, code="CLOSED") from None
    except BaseException:
        await connection.close()
        raise


def _code(exc: ConnectionClosed) -> int | None:
    return exc.rcvd.code if exc.rcvd else None
