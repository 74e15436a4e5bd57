"""The naive floor for bench/capacity.py: answers /voice with a <Connect><Stream> and echoes every media
frame straight back, under the same uvicorn settings as the bridge. No codec, no resampling, no AI socket.

``ECHO_WEBSOCKET=picows``: the stream is handed to picows as the bridge's is (``ws_handoff``), so the floor of
the bridge's own WebSocket stack is measured too (capacity.py's ``echo-picows``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
import uvicorn
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from telephony_bridge.close_codes import echo_code
from telephony_bridge.serving import uvicorn_config
from telephony_bridge.twilio.twiml import connect_document
from telephony_bridge.ws_handoff import Connection


async def voice(request: Request) -> Response:
    return Response(connect_document(f"ws://{request.url.netloc}/media-stream"), media_type="application/xml")


async def media_stream(ws: WebSocket) -> None:
    await ws.accept()
    stream_sid = ""
    try:
        while True:
            message = orjson.loads(await ws.receive_text())
            if message["event"] == "start":
                stream_sid = message["start"]["streamSid"]
            elif message["event"] == "media":
                reply = {"event": "media", "streamSid": stream_sid, "media": {"payload": message["media"]["payload"]}}
                await ws.send_text(orjson.dumps(reply).decode())
            elif message["event"] == "stop":
                break
    except WebSocketDisconnect:
        return
    await ws.close()


class PicowsEcho(WSListener):  # type: ignore[misc]
    """The same echo, on picows' frame callbacks."""

    stream_sid = ""

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(echo_code(int(frame.get_close_code())))
            transport.disconnect()
        elif frame.msg_type == WSMsgType.TEXT:
            message = orjson.loads(frame.get_payload_as_bytes())
            if message["event"] == "start":
                self.stream_sid = message["start"]["streamSid"]
            elif message["event"] == "media":
                payload = message["media"]["payload"]
                reply = {"event": "media", "streamSid": self.stream_sid, "media": {"payload": payload}}
                transport.send(WSMsgType.TEXT, orjson.dumps(reply))


def route(request: WSUpgradeRequest, connection: Connection) -> PicowsEcho | None:
    return PicowsEcho() if request.path.startswith(b"/media-stream") else None


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[
        Route("/voice", voice, methods=["POST"]),
        WebSocketRoute("/media-stream", media_stream),
        Route("/healthz", healthz),
    ]
)

if os.environ.get("ECHO_WEBSOCKET") == "picows":
    app.state.websocket_router = route

if __name__ == "__main__":
    uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=int(os.environ["PORT"]))).run()
