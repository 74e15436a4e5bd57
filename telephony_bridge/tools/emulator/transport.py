"""Reaching under the WebSocket to its TCP connection, which the faults ``reset`` and ``stall`` need.

ASGI hides the transport, but uvicorn passes its protocol's bound ``send`` to the app; a middleware placed
before Starlette wraps anything picks the transport from it and puts it in the scope. Only the emulator does
this: it is a test tool that must break connections in ways a well-behaved server never would.
"""

from __future__ import annotations

import asyncio
import socket
import struct

from starlette.types import ASGIApp, Receive, Scope, Send

TRANSPORT_SCOPE_KEY = "emulator.transport"


class TransportInScope:
    """ASGI middleware: ``scope["emulator.transport"]`` is the connection's asyncio transport, when known."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        transport = getattr(getattr(send, "__self__", None), "transport", None)
        if scope["type"] == "websocket" and transport is not None:
            scope = {**scope, TRANSPORT_SCOPE_KEY: transport}
        await self.app(scope, receive, send)


def transport_of(scope: Scope) -> asyncio.Transport | None:
    transport: asyncio.Transport | None = scope.get(TRANSPORT_SCOPE_KEY)
    return transport


def reset(transport: asyncio.Transport) -> None:
    """Kill the connection with a TCP RST: no close frame, no FIN (SO_LINGER 0, then abort)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
