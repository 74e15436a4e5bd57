"""The ``/media-stream`` upgrade when picows carries it (``server.websocket: picows``, see ``ws_handoff``).

It does what Starlette's route and ``OpsAccess`` do for the same request: not on the ops listener, the
signature checked before the upgrade is answered (403 otherwise), then one task per stream running
``handle_media_stream``, exactly as under Starlette. The tasks are the app's: ``close`` waits for those still
running when the app stops (after the drain has had its chance, and uvicorn has closed their sockets).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from picows import WSUpgradeRequest, WSUpgradeResponse, WSUpgradeResponseWithListener

from telephony_bridge.twilio.leg import CloseCode, handle_media_stream
from telephony_bridge.twilio.read_pairs import ReadPairs
from telephony_bridge.twilio.stream_socket import StreamSocket
from telephony_bridge.twilio.webhooks import MEDIA_STREAM_PATH
from telephony_bridge.ws_handoff import Connection, ListenerOrResponse

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0  # for calls still up when the app stops to hang up and release what they hold


class MediaStreamRoute:
    """A ``ws_handoff.WebSocketRouter``. ``state`` is the app's (``webhooks`` and ``deps`` are read per
    request: they exist once the lifespan has started, which is before uvicorn accepts a connection)."""

    def __init__(self, state: Any, *, ops_ports: frozenset[int], read_pairs: ReadPairs | None = None) -> None:
        self._state = state
        self._read_pairs = read_pairs
        self._ops_ports = ops_ports  # listeners that serve no media stream
        self._streams: dict[asyncio.Task[None], StreamSocket] = {}

    def __call__(self, request: WSUpgradeRequest, connection: Connection) -> ListenerOrResponse:
        path = request.path.partition(b"?")[0].decode("latin-1")
        if path != MEDIA_STREAM_PATH or connection.local_port in self._ops_ports:
            return None  # 404
        if not self._state.webhooks.stream_signed(path, request.headers.get("x-twilio-signature"), connection.remote):
            forbidden = WSUpgradeResponse.create_error_response(403, b"invalid signature")
            return WSUpgradeResponseWithListener(forbidden, None)
        return StreamSocket(self._start, self._read_pairs)

    def __len__(self) -> int:
        return len(self._streams)

    def _start(self, socket: StreamSocket) -> None:
        task = asyncio.get_running_loop().create_task(self._run(socket), name="media-stream")
        self._streams[task] = socket
        task.add_done_callback(self._streams.pop)

    async def _run(self, socket: StreamSocket) -> None:
        try:
            await handle_media_stream(socket, self._state.deps)
        except Exception:
            log.exception("media stream handler failed; closing the stream")
            await socket.close(CloseCode.INTERNAL_ERROR)
        else:
            await socket.close(CloseCode.NORMAL)

    async def close(self) -> None:
        """Wait, bounded, for the calls of streams still running to release what they hold. uvicorn's shutdown has
        closed their sockets already (1012: ``ws_handoff``), so each call is ending; one that does not is
        cancelled."""
        if not self._streams:
            return
        log.info("waiting for %d media streams to end", len(self._streams))
        _, pending = await asyncio.wait(list(self._streams), timeout=STOP_TIMEOUT_S)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
