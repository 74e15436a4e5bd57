"""Who may reach the ops endpoints: which listener serves them, and their bearer token.

``/status`` lists live CallSids, ``/metrics`` the device pool, ``/debug/heap`` the code's allocation sites (and
blocks the event loop while it counts) and ``/debug/tasks`` where each task waits, so none belongs on the port
the internet reaches. With ``server.ops_port`` set, they are served on that listener only (the public one
answers 404), and the ops listener serves nothing but them and the health probes; ``server.worker_ops_port``
adds a listener of the same kind per worker, so there may be several. With ``ops.token`` set, they also need
``Authorization: Bearer <token>``. The health probes (``/healthz``, ``/readyz``) stay open on both listeners:
load balancers and kubelets probe without credentials.
"""

from __future__ import annotations

import hmac

from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketClose

OPS_PATHS = frozenset({"/status", "/metrics", "/debug/heap", "/debug/tasks"})
PROBE_PATHS = frozenset({"/healthz", "/readyz"})


class OpsAccess:
    """Pure ASGI middleware; ``ops_ports`` are the ops listeners' bound ports (empty: one listener for all)."""

    def __init__(self, app: ASGIApp, *, ops_ports: frozenset[int], token: str) -> None:
        self._app = app
        self._ops_ports = ops_ports
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self._app(scope, receive, send)
            return
        path = scope["path"]
        on_ops_listener = (scope.get("server") or ("", None))[1] in self._ops_ports
        if path in OPS_PATHS:
            if self._ops_ports and not on_ops_listener:
                await _refuse(scope, receive, send, 404, "not found")
                return
            if self._token and not self._authorized(scope):
                await _refuse(scope, receive, send, 401, "bearer token required", {"WWW-Authenticate": "Bearer"})
                return
        elif on_ops_listener and path not in PROBE_PATHS:
            await _refuse(scope, receive, send, 404, "not found")
            return
        await self._app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, presented = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(presented.strip(), self._token)


async def _refuse(
    scope: Scope, receive: Receive, send: Send, status: int, text: str, headers: dict[str, str] | None = None
) -> None:
    if scope["type"] == "websocket":
        await WebSocketClose(code=1008)(scope, receive, send)  # before accept: the client sees HTTP 403
        return
    await PlainTextResponse(text, status_code=status, headers=headers)(scope, receive, send)
