"""uvicorn's WebSocket upgrades handed to picows, on the same port as the app's HTTP routes.

Every frame of every call crosses the media stream, so its WebSocket stack's cost is paid 75 times a second a
call (docs/performance.md). uvicorn parses the upgrade request and then hands the socket to its ``ws``
protocol class; ``WebSocketHandoff`` is that class. For an app that routes
its own WebSockets (``app.state.websocket_router``, see ``WebSocketRouter``) the socket goes to a picows
protocol: frames are parsed and built in C and delivered by callback, with no ASGI messages and no task per
socket. Any other app gets uvicorn's own websockets-sansio protocol, exactly as ``ws="websockets-sansio"``.

picows' server protocol is built the way ``picows.ws_create_server`` builds it; the request uvicorn has already
read is replayed into it through the buffered-protocol interface (``get_buffer``/``buffer_updated``), since
picows reads no other way. ``tests/test_ws_handoff.py`` pins both ends of this seam.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, NamedTuple, Protocol

from picows import WSAutoPingStrategy, WSListener, WSUpgradeRequest, WSUpgradeResponseWithListener
from picows.picows import WSProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

MAX_FRAME_BYTES = 2**20  # a Twilio media message is ~250 bytes; nothing legitimate comes near this
READ_BUFFER_BYTES = 4096
SERVICE_RESTART = 1012
# picows logs every accepted connection at INFO and frames at its own level below DEBUG: held at WARNING.
PICOWS_LOGGER = logging.getLogger("picows.server")

ListenerOrResponse = WSListener | WSUpgradeResponseWithListener | None


class Connection(NamedTuple):
    """Where an upgrade came from: ``local_port`` is the listener's (the ops listener is a separate one)."""

    local_port: int | None
    remote: str | None


class WebSocketRouter(Protocol):
    """Picks the listener for one upgrade request, or refuses it (a response, or ``None`` for 404)."""

    def __call__(self, request: WSUpgradeRequest, connection: Connection) -> ListenerOrResponse: ...


def WebSocketHandoff(config: Any, server_state: Any, app_state: dict[str, Any], **kwargs: Any) -> Any:
    """uvicorn's ``ws`` protocol class (called once per upgrade, like a class): picows when the app routes its
    own WebSockets, else uvicorn's websockets-sansio protocol."""
    state = getattr(config.app, "state", None)
    router: WebSocketRouter | None = getattr(state, "websocket_router", None) if state is not None else None
    if router is None:
        return WebSocketsSansIOProtocol(config=config, server_state=server_state, app_state=app_state, **kwargs)
    return _PicowsUpgrade(router, server_state.connections)


class _WireLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """picows' logger for one connection. Its parser refusing a frame (over ``MAX_FRAME_BYTES``, malformed) is
    the peer's fault: it goes to the listener's ``on_protocol_error``, which names the call (the media stream's
    leg logs it), rather than an ERROR line naming none. A listener without one gets a WARNING here.

    It holds its protocol weakly: the protocol holds it, and a cycle between them would keep each connection's
    objects (both transports and their buffers, the listener, the upgrade request and response) until a full
    collection, which is rare in a serving process (``ops/gc_tuning.py``)."""

    def __init__(self, protocol: WSProtocol) -> None:
        super().__init__(PICOWS_LOGGER, {})
        self._protocol = weakref.ref(protocol)

    def error(self, msg: object, *args: object, **kwargs: Any) -> None:
        refusal = args[0] if args and isinstance(args[0], tuple) and len(args[0]) == 2 else None
        if not (isinstance(msg, str) and msg.startswith("WS parser error") and refusal is not None):
            super().error(msg, *args, **kwargs)
            return
        code, detail = int(refusal[0]), str(refusal[1])
        protocol = self._protocol()
        report = getattr(protocol.listener, "on_protocol_error", None) if protocol is not None else None
        if report is not None:
            report(code, detail)
        else:
            self.logger.warning("closing a WebSocket with %d: %s", code, detail)


class _Route:
    """picows' listener factory for one connection: the router, told where the upgrade came from. Apart from the
    protocol, which holds it, so that the two make no cycle (see ``_WireLog``)."""

    __slots__ = ("connection", "router")

    def __init__(self, router: WebSocketRouter) -> None:
        self.router = router
        self.connection = Connection(None, None)  # filled in when the socket is handed over

    def __call__(self, request: WSUpgradeRequest) -> ListenerOrResponse:
        return self.router(request, self.connection)


class _PicowsUpgrade(WSProtocol):  # type: ignore[misc]
    """A picows server protocol that takes the upgrade request from uvicorn rather than from the socket."""

    def __init__(self, router: WebSocketRouter, connections: set[Any]) -> None:
        self._route = _Route(router)
        self._connections = connections  # uvicorn's: it shuts down, and waits for, what is in it
        super().__init__(
            None,  # host and port: a client's
            None,  # path: a client's
            False,  # server side
            self._route,
            _WireLog(self),
            True,  # disconnect when a listener callback raises
            None,  # handshake timeout: uvicorn has read the request already
            False,  # auto ping: Twilio sends media every 20 ms, and the leg's watchdog notices silence
            20.0,
            20.0,
            WSAutoPingStrategy.PING_WHEN_IDLE,
            True,  # answer pings
            MAX_FRAME_BYTES,
            None,  # extra response headers
            READ_BUFFER_BYTES,
        )

    def connection_made(self, transport: Any) -> None:
        local, remote = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
        self._route.connection = Connection(
            local[1] if isinstance(local, tuple) else None, remote[0] if isinstance(remote, tuple) else None
        )
        self._connections.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """uvicorn is stopping (after the drain, when there is one): close with 1012, service restart, as its own
        WebSocket protocols do; the call then ends and releases what it holds."""
        transport = self.transport
        if transport is None or transport.is_disconnected:
            return
        if not transport.is_close_frame_sent:
            transport.send_close(SERVICE_RESTART)
        transport.disconnect()

    def data_received(self, data: bytes) -> None:
        """The request uvicorn already read, fed in as if picows had read it from the socket."""
        view = memoryview(data)
        while view:
            buffer = self.get_buffer(len(view))
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]
