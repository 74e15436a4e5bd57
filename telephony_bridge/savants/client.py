"""The /voice-stream driver: a thin shell around ``VoiceSession`` (spec §6) on picows.

All protocol decisions are the session's; this module only moves frames and translates picows' callbacks and
exceptions into ``SessionError`` at the boundary. picows (Cython) is used for its lower CPU per frame than the
websockets library's (issue #10): this leg carries every frame of every call both ways.

picows calls us back for each frame (``on_ws_frame``) as it is read, whether or not anyone is waiting: frames
are always read, pongs included, even while a session opened at the webhook waits unread for its stream. Each
frame is decoded there and its event queued for ``receive`` (a deque and one waiter), or, for the AI's audio
once the call has said where it goes (``deliver_audio_to``), handed there at once: no task switch per frame.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from picows import (
    WSAutoPingStrategy,
    WSCloseCode,
    WSError,
    WSFrame,
    WSInvalidStatusError,
    WSListener,
    WSMsgType,
    WSTransport,
    ws_connect,
)

from telephony_bridge.close_codes import echo_code
from telephony_bridge.errors import SessionError
from telephony_bridge.leg import DirectAudio
from telephony_bridge.savants.protocol import (
    MAX_FRAME_BYTES,
    Audio,
    Confirmed,
    Failed,
    Notice,
    SessionEvent,
    State,
    VoiceSession,
)
from telephony_bridge.ws_fragments import Fault, Reassembler

NORMAL_CLOSURE = 1000
NO_STATUS = 1005  # a close frame without a code (RFC 6455 §7.1.5), as the websockets library reported it
# Savants documents no keepalive (spec §6.6); a WebSocket ping is answered by any RFC 6455 server and finds a
# half-open or hung connection (a stall) in seconds rather than minutes of dead air: once Savants has sent
# nothing for half the stall timeout a ping goes out, and no pong in the other half ends the session as
# STALLED, which the call treats as a drop.
STALL_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 1.0
MAX_MESSAGE_BYTES = 2**20

try:  # built by setup.py where a C compiler is at hand
    from telephony_bridge._taps import AudioTap
except ImportError:
    AudioTap = None

# picows' client logger: a line per connection at INFO, frames below DEBUG; ops/logging holds "picows" at WARNING.
_picows_log = logging.getLogger("picows.client")

_BINARY, _TEXT, _CLOSE, _PING, _PONG = (
    WSMsgType.BINARY,
    WSMsgType.TEXT,
    WSMsgType.CLOSE,
    WSMsgType.PING,
    WSMsgType.PONG,
)


class SavantsConnection(WSListener):
    """An authenticated voice session. ``receive()`` yields audio and notices; ``None`` once Savants closed it
    with 1000, the AI's goodbye. Any other end is a ``SessionError`` with the close code: 1001 ("going away",
    a Savants restart) is a drop like 1011, not a goodbye, so the call can reconnect.

    It is also the picows listener of its connection (the ``on_ws_*`` and ``*_writing`` callbacks)."""

    # The compiled frame path reads and writes these at their fixed offsets (_pyattrs.h); the rest live in
    # the instance dict.
    __slots__ = ("__dict__", "_events")

    def __init__(
        self, session: VoiceSession, stall_timeout_s: float, *, abandoned: bool = False, compiled: bool = True
    ) -> None:
        """``compiled``: hand the AI's audio over with the compiled ``AudioTap`` where it is built."""
        super().__init__()
        self.session = session
        self._abandoned = abandoned  # its opener gave up before the upgrade was answered: nobody will close it
        self._stall_timeout_s = stall_timeout_s
        self._loop = asyncio.get_running_loop()
        self._transport: WSTransport | None = None
        self._events: deque[SessionEvent] = deque()
        self._waiter: asyncio.Future[None] | None = None  # receive() waiting for the next event or the end
        self._writable: asyncio.Future[None] | None = None  # set while the socket's send buffer is over its mark
        self._fragments = Reassembler(MAX_MESSAGE_BYTES)  # a fragmented message being put together
        self._ended = False  # no frame will arrive any more
        self._close_code: int | None = None  # the code of the close frame Savants sent, if it sent one
        self._stall: str | None = None  # why the connection counts as stalled, if it does
        self._closing = False  # close() was called
        self._direct: DirectAudio[[bytes]] = DirectAudio()  # the AI's audio straight to the call core
        self._compiled = compiled and AudioTap is not None
        # While the call takes the AI's audio: ``_tapped``, or its compiled twin. It holds this connection, so it is
        # held only while attached (``deliver_audio_to``): a connection must go by reference counting alone.
        self._tap: Callable[[bytes], bool] | None = None

    @property
    def session_id(self) -> str | None:
        return self.session.session_id

    @property
    def ended(self) -> bool:
        """Whether the connection is over (Savants closed it or it dropped, or ``close`` was called): a session
        opened early and waiting for its call is of no use to it then."""
        return self._ended or self._closing

    async def send_audio(self, pcm: bytes) -> bool:
        """Send caller audio; False once Savants has closed the socket (``receive`` reports the end and why).

        A close that Savants sent is left for ``receive`` to report: an ``error`` message that came just before
        it is the real cause, and only the receiving side reads it (a send racing the close must not report a
        plain drop instead). A connection that died without a close frame is a drop either way.

        While the socket's send buffer is over its high-water mark (Savants reads slower than we send) this
        waits for it to drain, up to the stall timeout: a peer that stops reading cannot grow it without bound."""
        if self._writable is not None:
            await self._drained()
        if self._ended or self._closing:
            if self._close_code is not None or self._closing:
                return False
            raise self._dropped("while sending")
        assert self._transport is not None
        self._transport.send(_BINARY, pcm)  # unchecked: a keepalive ping may have paused writing again since
        return True

    def can_send_now(self) -> bool:
        """Whether ``send_audio_nowait`` may send: open, and the send buffer under its mark (nothing to wait
        for). Otherwise ``send_audio`` waits, or reports the end."""
        return self._writable is None and not self._ended and not self._closing

    def send_audio_nowait(self, pcm: bytes) -> None:
        """``send_audio`` when ``can_send_now()`` has just said yes: from a callback, with no task to wake."""
        if self._transport is None or not self.can_send_now():
            raise RuntimeError("send_audio_nowait without can_send_now(): a bug of ours, not a Savants failure")
        self._transport.send(_BINARY, pcm)

    def deliver_audio_to(self, handler: Callable[[bytes], None] | None) -> None:
        """From now on the AI's audio goes to ``handler`` as it is read, from picows' callback, rather than
        through ``receive`` (which still reports notices and the end). Audio read while events wait unread
        still queues behind them, so nothing is reordered; and what the handler raises, ``receive`` raises.
        The handler runs in the caller's context (what it logs carries the call's IDs)."""
        self._direct.attach(handler)
        if handler is None:
            self._tap = None
        elif not self._compiled:
            self._tap = self._tapped
        else:  # ``_tapped`` in one C call (``_taps.c``)
            self._tap = AudioTap(self, self.session, self._direct, State.CONNECTED, max_frame_bytes=MAX_FRAME_BYTES)

    async def receive(self) -> Audio | Notice | None:
        events = self._events
        while True:
            self._direct.check()  # what the audio handler raised (the audio it failed on was queued)
            if events:
                event = events.popleft()
                if isinstance(event, (Audio, Notice)):  # a tuple: faster than a union
                    return event
                if isinstance(event, Failed):
                    await self.close()
                    raise SessionError(f"voice stream failed: {event.code} {event.message}".rstrip(), code=event.code)
            elif self._ended:
                self.session.closed()
                if self._close_code == NORMAL_CLOSURE:
                    return None
                raise self._dropped()
            else:
                await self._next()

    async def close(self) -> None:
        """Send close 1000 and wait up to ``CLOSE_TIMEOUT_S`` for Savants to answer and disconnect, then cut
        the connection. Idempotent; safe after the peer is gone and from several tasks at once."""
        self.session.closed()
        self._closing = True
        transport = self._transport
        if transport is None:
            return
        if not transport.is_disconnected and not transport.is_close_frame_sent:
            transport.send_close(WSCloseCode.OK)
        try:  # awaited even when already disconnected: it collects picows' reason, if it had one
            if await _disconnected(transport, CLOSE_TIMEOUT_S):
                return
        except asyncio.CancelledError:
            transport.disconnect(graceful=False)  # cancelled while closing: still never leave the socket open
            raise
        transport.disconnect(graceful=False)  # a stalled peer never answers, nor drains a full buffer
        await _disconnected(transport, CLOSE_TIMEOUT_S)

    # --- picows callbacks: run by the event loop as data arrives; never raise ------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._transport = transport
        if self._abandoned:
            self._closing = True
            transport.disconnect(graceful=False)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if transport.is_close_frame_sent:
            # After a close we sent, nothing more counts; after one picows sent for a framing error it goes on
            # parsing what follows (the rest of an oversized frame, as frames) until it disconnects.
            return
        kind = frame.msg_type
        if kind is _BINARY and frame.fin:
            data = frame.get_payload_as_bytes()
            tap = self._tap
            if tap is not None and tap(data):
                return  # the AI's audio, straight to the call: no ``Audio`` event built for it
            event = self.session.receive_binary(data)
        elif kind is _TEXT and frame.fin:
            event = self.session.receive_text(frame.get_payload_as_bytes())
        elif kind is _CLOSE:
            self._peer_closed(transport, frame)
            return
        elif kind is _PONG or kind is _PING:
            return  # pongs unsolicited (picows takes the ones its keepalive waits for); pings picows answers
        else:
            assembled = self._assemble(transport, frame)
            if assembled is None:
                return
            event = assembled
        self._events.append(event)
        self._wake()

    def _tapped(self, data: bytes) -> bool:
        """A binary frame taken as the AI's audio by the call, if nothing waits unread before it; False: it is
        read as an event (``receive_binary`` says what it is)."""
        return not self._events and self.session.is_audio(data) and self._direct.deliver(data)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self._close_code is None:
            # picows' keepalive ends a connection whose pong is overdue by sending close 1001 and aborting: the
            # only 1001 we ever send (ours is 1000, picows' own errors are 1002/1007/1009/1011).
            handshake = transport.close_handshake
            sent = handshake.sent if handshake is not None and handshake.recv is None else None
            if sent is not None and sent.code == WSCloseCode.GOING_AWAY and self._stall is None:
                self._stall = "no pong to our ping"
        self._end()

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    # --- internals -------------------------------------------------------------------------------------------

    async def _next(self) -> None:
        """Wait until an event is queued or the connection has ended."""
        waiter = self._waiter = self._loop.create_future()
        await waiter

    async def _drained(self) -> None:
        writable = self._writable
        if writable is None:
            return
        try:
            async with asyncio.timeout(self._stall_timeout_s):
                await asyncio.shield(writable)
        except TimeoutError:
            if self._ended:
                return
            self._stall = f"Savants read nothing we sent for {self._stall_timeout_s} s"
            assert self._transport is not None
            self._transport.disconnect(graceful=False)
            raise self._dropped("while sending") from None

    def _peer_closed(self, transport: WSTransport, frame: WSFrame) -> None:
        code = frame.get_close_code()
        self._close_code = int(code) or NO_STATUS
        if not transport.is_close_frame_sent:
            transport.send_close(echo_code(int(code)))  # echoed, as RFC 6455 §5.5.1 asks
        transport.disconnect()
        self._end()

    def _end(self) -> None:
        self._ended = True
        self.resume_writing()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _assemble(self, transport: WSTransport, frame: WSFrame) -> SessionEvent | None:
        """A fragmented message (RFC 6455 §5.4), rare: its event once its last fragment is in. Broken framing
        fails the session; a message over ``MAX_MESSAGE_BYTES`` ends the connection at once."""
        result = self._fragments.feed(frame.msg_type.value, frame.get_payload_as_memoryview(), frame.fin)
        if result is None:
            return None
        if result is Fault.TOO_BIG:
            transport.send_close(WSCloseCode.MESSAGE_TOO_BIG)
            transport.disconnect()
            return None
        if isinstance(result, Fault):
            return self._protocol_failure(result.value)
        if result.is_text:
            return self.session.receive_text(result.payload)
        return self.session.receive_binary(result.payload)

    def _protocol_failure(self, message: str) -> Failed:
        self.session.closed()
        return Failed("PROTOCOL", f"expected RFC 6455 framing, got {message}", by_peer_error=False)

    def _dropped(self, when: str = "") -> SessionError:
        if self._stall is not None:
            return SessionError(f"voice stream stalled: {self._stall} {when}".rstrip(), code="STALLED")
        where = f" {when}" if when else ""
        code = self._close_code
        return SessionError(f"voice stream dropped{where} (close code {code})", code="DROPPED", close_code=code)


async def _disconnected(transport: WSTransport, timeout_s: float) -> bool:
    """Whether the connection is gone within ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            await transport.wait_disconnected()
    except TimeoutError:
        return False
    except WSError:
        pass  # picows' own reason for disconnecting (e.g. the peer broke framing): the end is reported already
    return True


Connector = Callable[[str, str, float], Awaitable[SavantsConnection]]


def tls_context(url: str) -> ssl.SSLContext | None:
    """The TLS context for every connection to a ``wss://`` voice stream (None for ``ws://``), to build once.

    Without one, each connection's event loop builds its own (``ssl=True``), reading the system's CA store again:
    ~19 ms of CPU a connection on the bench machine, where the rest of a call's set-up costs ~3 ms. This is the
    context the loop would build: ``ssl.create_default_context()``, certificate and host name checked. The CA
    store is read once, then: a bundle updated on disk counts from the bridge's next start.
    """
    return ssl.create_default_context() if urlsplit(url).scheme == "wss" else None


async def open_voice_session(
    url: str,
    token: str,
    timeout_s: float,
    *,
    stall_timeout_s: float = STALL_TIMEOUT_S,
    ssl_context: ssl.SSLContext | None = None,
    compiled: bool = True,
) -> SavantsConnection:
    """Connect, send the JWT as the first text frame, and wait for the confirmation (§6.2), all within
    ``timeout_s``. A ping goes out once Savants has been quiet for ``stall_timeout_s / 2`` and must be answered
    within as long again: a stall is reported about ``stall_timeout_s`` after the last frame that came.
    ``ssl_context``: for ``wss://``, the one context every connection shares (``tls_context``); None, a new
    default one for this connection. ``compiled``: as ``SavantsConnection``'s."""
    session = VoiceSession()
    opening = _Opening()

    def listener(*_: object) -> SavantsConnection:  # picows passes the upgrade request and response
        opening.connection = SavantsConnection(session, stall_timeout_s, abandoned=opening.abandoned, compiled=compiled)
        return opening.connection

    connected = False
    try:
        async with asyncio.timeout(timeout_s):
            transport, _ = await _ws_connect(
                listener,
                url,
                timeout_s,
                ssl_context,
                enable_auto_ping=True,
                auto_ping_idle_timeout=stall_timeout_s / 2,
                auto_ping_reply_timeout=stall_timeout_s / 2,
                auto_ping_strategy=WSAutoPingStrategy.PING_WHEN_IDLE,
                max_frame_size=MAX_MESSAGE_BYTES,
            )
            connection = opening.connection
            if connection is None:  # the server hung up without answering the upgrade
                raise ConnectionError("the connection closed before the upgrade response")
            connected = True
            transport.send(_TEXT, session.authenticate(token))
            await _confirmation(connection)
            return connection
    except BaseException as exc:
        opening.abandoned = True
        if opening.connection is not None:
            await opening.connection.close()
        translated = _translate(exc, timeout_s, handshake=connected)
        try:
            if translated is exc:
                raise
            raise translated from None
        finally:  # this frame must not hold the error its traceback holds: a cycle, with the JWT and the socket in it
            del translated


async def probe_voice_stream(url: str, timeout_s: float, *, ssl_context: ssl.SSLContext | None = None) -> str | None:
    """Whether the voice stream takes a WebSocket upgrade (None), else what went wrong, within ``timeout_s``. The
    connection is closed with 1000 at once, before any token (spec §6.2): it spends no token and takes no
    device's socket, so ``/readyz`` can run it while the endpoint is failing (savants/health.py)."""
    try:
        async with asyncio.timeout(timeout_s):
            transport, listener = await _ws_connect(WSListener, url, timeout_s, ssl_context)
            if listener is None:  # the server hung up without answering the upgrade: no session could open
                return "CONNECT_FAILED: the connection closed before the upgrade response"
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            await transport.wait_disconnected()
    except BaseException as exc:
        translated = _translate(exc, timeout_s, handshake=False)
        if translated is exc:
            del translated  # as in open_voice_session: no cycle through this frame
            raise
        return f"{translated.code}: {translated}" if isinstance(translated, SessionError) else str(translated)
    return None


def _ws_connect(
    listener: Callable[..., WSListener],
    url: str,
    timeout_s: float,
    ssl_context: ssl.SSLContext | None,
    **options: Any,
) -> Awaitable[tuple[WSTransport, WSListener]]:
    """picows' ``ws_connect`` as every connection to the voice stream makes it. ``timeout_s`` is also picows' own
    deadline for the upgrade: if we give up (time out, or are cancelled) while it is in flight, picows closes
    the socket by then (``open_voice_session``: an answer after that finds ``abandoned``)."""
    return ws_connect(
        listener,
        url,
        websocket_handshake_timeout=timeout_s,
        logger_name=_picows_log,
        proxy=None,
        use_aiofastnet=False,
        ssl_context=ssl_context,
        **options,
    )


class _Opening:
    """What ``open_voice_session`` shares with the listener factory picows calls once the upgrade is answered."""

    abandoned = False
    connection: SavantsConnection | None = None


async def _confirmation(connection: SavantsConnection) -> None:
    events = connection._events
    while True:
        if events:
            event = events.popleft()
            if isinstance(event, Confirmed):
                return
            if isinstance(event, Failed):
                raise SessionError(f"voice stream refused: {event.code} {event.message}".rstrip(), code=event.code)
        elif connection._ended:
            code = connection._close_code
            raise SessionError(
                f"voice stream closed during the handshake (close code {code})", code="CLOSED", close_code=code
            )
        else:
            await connection._next()


def _translate(exc: BaseException, timeout_s: float, *, handshake: bool) -> BaseException:
    """picows' failures as our ``SessionError``; anything else unchanged."""
    if isinstance(exc, TimeoutError):
        if handshake:
            # Ours, not Savants' AUTH_TIMEOUT (a token it got too late): Savants took the upgrade and then said
            # nothing in time, which /readyz counts against the voice stream (savants/health.py).
            return SessionError(f"no confirmation within {timeout_s} s of connecting", code="CONFIRM_TIMEOUT")
        return SessionError(f"voice stream did not open within {timeout_s} s", code="CONNECT_TIMEOUT")
    if isinstance(exc, WSInvalidStatusError) and exc.response is not None:
        status = int(exc.response.status)
        return SessionError(f"voice stream upgrade refused with HTTP {status}", code=f"HTTP_{status}")
    if isinstance(exc, OSError | WSError):
        return SessionError(f"voice stream unreachable: {type(exc).__name__}: {exc}", code="CONNECT_FAILED")
    return exc
