"""The /voice-stream driver: a thin asyncio shell around ``VoiceSession`` (spec §6).

All protocol decisions are the session's; this module only moves frames and translates the websockets
library's exceptions into ``SessionError`` at the boundary.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from telephony_bridge.errors import SessionError
from telephony_bridge.savants.protocol import Audio, Confirmed, Failed, Notice, VoiceSession


class SavantsConnection:
    """An authenticated voice session. ``receive()`` yields audio and notices; ``None`` once Savants closed it
    with 1000, the AI's goodbye. Any other end is a ``SessionError`` with the close code: 1001 ("going away",
    a Savants restart) is a drop like 1011, not a goodbye, so the call can reconnect."""

    def __init__(self, ws: ClientConnection, session: VoiceSession) -> None:
        self._ws = ws
        self.session = session

    @property
    def session_id(self) -> str | None:
        return self.session.session_id

    async def send_audio(self, pcm: bytes) -> bool:
        """Send caller audio; False once Savants has closed the socket (``receive`` reports the end and why).

        A close that Savants sent is left for ``receive`` to report: an ``error`` message that came just before
        it is the real cause, and only the receiving side reads it (a send racing the close must not report a
        plain drop instead). A connection that died without a close frame is a drop either way."""
        try:
            await self._ws.send(pcm)
        except ConnectionClosed as exc:
            if _code(exc) == NORMAL_CLOSURE or exc.rcvd is not None:
                return False
            raise _dropped(exc, "while sending") from None
        return True

    async def receive(self) -> Audio | Notice | None:
        while True:
            try:
                frame = await self._ws.recv()
            except ConnectionClosed as exc:
                self.session.closed()
                if _code(exc) == NORMAL_CLOSURE:
                    return None
                raise _dropped(exc) from None
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

NORMAL_CLOSURE = 1000
# Savants documents no keepalive (spec §6.6); a WebSocket ping is answered by any RFC 6455 server and finds a
# half-open or hung connection (a stall) in seconds rather than minutes of dead air: no pong within the stall
# timeout after a ping ends the session as STALLED, which the call treats as a drop.
STALL_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 1.0
_KEEPALIVE_TIMEOUT_REASON = "keepalive ping timeout"  # what websockets sends when a pong is overdue


def _dropped(exc: ConnectionClosed, when: str = "") -> SessionError:
    code = _code(exc)
    if exc.rcvd is None and exc.sent is not None and exc.sent.reason == _KEEPALIVE_TIMEOUT_REASON:
        return SessionError(f"voice stream stalled: no pong to our ping {when}".rstrip(), code="STALLED")
    where = f" {when}" if when else ""
    return SessionError(f"voice stream dropped{where} (close code {code})", code="DROPPED", close_code=code)


async def open_voice_session(
    url: str, token: str, timeout_s: float, *, stall_timeout_s: float = STALL_TIMEOUT_S
) -> SavantsConnection:
    """Connect, send the JWT as the first text frame, and wait for the confirmation (§6.2), all within
    ``timeout_s``. A ping goes out every ``stall_timeout_s / 2`` and must be answered within as long again: a
    stall is reported within about ``stall_timeout_s`` + 1 s."""
    session = VoiceSession()
    connection: SavantsConnection | None = None
    try:
        async with asyncio.timeout(timeout_s):
            ws = await connect(
                url,
                open_timeout=None,
                ping_interval=stall_timeout_s / 2,
                ping_timeout=stall_timeout_s / 2,
                # A stalled peer never completes the close handshake either: the stall is reported once this
                # has passed too, so it must be short (and a healthy Savants answers a close in milliseconds).
                close_timeout=min(CLOSE_TIMEOUT_S, stall_timeout_s / 2),
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
        code = _code(exc)
        return SessionError(
            f"voice stream closed during the handshake (close code {code})", code="CLOSED", close_code=code
        )
    if isinstance(exc, OSError | InvalidHandshake | InvalidURI):
        return SessionError(f"voice stream unreachable: {type(exc).__name__}: {exc}", code="CONNECT_FAILED")
    return exc


def _code(exc: ConnectionClosed) -> int | None:
    return exc.rcvd.code if exc.rcvd else None
