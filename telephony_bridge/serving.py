"""Running Starlette apps under uvicorn on sockets we bind ourselves.

Binding first lets callers ask for port 0 and learn the real port before the server starts, which is how
tests and the dev-mode emulator get free ports without races.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn

from telephony_bridge.sip.inet import Stack, is_wildcard
from telephony_bridge.ws_handoff import WebSocketHandoff

log = logging.getLogger(__name__)


def bind_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening socket; ``reuse_port``: one of several on the same port (``serve --workers``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    # Accepted sockets inherit this on Linux; without it uvicorn's separate header and body writes stall
    # ~40 ms on Nagle + delayed ACK, and 20 ms audio frames bunch up.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(512)
    sock.set_inheritable(True)
    return sock


def host_port(host: str, port: int) -> str:
    """``host:port`` as a URL writes it: an IPv6 address in brackets (``[::]:8080``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def warn_if_ipv6_only(sock: socket.socket, host: str, listener: str, clients: str, setting: str) -> None:
    """One WARNING when a bind on the IPv6 wildcard takes IPv6 alone (``net.ipv6.bindv6only`` is 1), naming who
    cannot reach ``listener`` and the ``setting`` that fixes it."""
    if is_wildcard(host) and Stack.of(sock) is Stack.IPV6:
        log.warning(
            "%s on %s takes IPv6 only on this system (net.ipv6.bindv6only is 1): %s cannot reach it; set %s to "
            "0.0.0.0 for IPv4, or net.ipv6.bindv6only to 0 for both",
            listener,
            host_port(host, sock.getsockname()[1]),
            clients,
            setting,
        )


def uvicorn_config(app: Any, **overrides: Any) -> uvicorn.Config:
    """Our uvicorn settings: no access log (our own logging covers calls); WebSockets to picows for an app
    that routes its own (``ws_handoff``), else to uvicorn's sansio websockets."""
    options: dict[str, Any] = {
        "log_config": None,
        "access_log": False,
        "lifespan": "on",
        "ws": WebSocketHandoff,
        "ws_ping_interval": None,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


class ServerThread:
    """A uvicorn server on its own event loop in a daemon thread (used by tests and tools)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        self.sock = bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn_config(app, **config))
        self._thread = threading.Thread(target=self._run, name=f"uvicorn:{self.port}", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))
        finally:
            self.loop.close()

    def start(self, timeout_s: float = 10.0) -> None:
        self._thread.start()
        for _ in range(int(timeout_s / 0.01)):
            if self.server.started:
                return
            if not self._thread.is_alive():
                break
            threading.Event().wait(0.01)
        raise RuntimeError(f"server on port {self.port} did not start within {timeout_s} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)
        self.sock.close()


@contextlib.contextmanager
def running(app: Any, **kwargs: Any) -> Iterator[ServerThread]:
    thread = ServerThread(app, **kwargs)
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains before it stops.

    uvicorn's own shutdown closes every WebSocket at once (close code 1012), which would hang up on every
    caller. Here the first signal runs ``drain`` (the app stops being ready and waits for its calls, bounded
    by its own timeout) and only then lets uvicorn shut down; a second signal exits at once, abandoning
    whatever is still open.
    """

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain
        self._drain_task: asyncio.Task[None] | None = None
        self._signalled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled or self.should_exit or self._loop is None:
            self.force_exit = True  # uvicorn skips waiting for connections and the lifespan's shutdown
            super().handle_exit(sig, frame)
            return
        self._signalled = True
        # A signal handler runs between two bytecodes of the loop's thread: schedule, and wake the selector. In a
        # context of its own: the one current here is whatever the signal interrupted, often a call's task.
        self._loop.call_soon_threadsafe(self._start_drain, context=contextvars.Context())

    def _start_drain(self) -> None:
        if not self.should_exit:
            assert self._loop is not None
            self._drain_task = self._loop.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain()
        finally:
            self.should_exit = True
