"""A deliberately naive bridge, the baseline for bench/capacity.py: written the way the public Twilio Media
Streams samples are (stdlib ``json``, ``audioop`` μ-law and ``ratecv``, no pacing, no VAD, no accounting).

Per call: answer ``/voice`` with ``<Connect><Stream>``; at the stream's ``start`` fetch a Savants token, open
``/voice-stream``, send the JWT, wait for the confirmation; then forward every caller frame (μ-law 8 kHz ->
PCM16 16 kHz) and send every AI frame straight back as one ``media`` message (16 -> 8 kHz -> μ-law), as fast
as it comes. Devices are taken round-robin from ``SAVANTS_DEVICE_IDS``. Not for production: it is here so
capacity figures are compared with what a straightforward bridge costs in the same run.

    PORT=8090 SAVANTS_BASE_URL=http://127.0.0.1:8081 SAVANTS_API_KEY=k SAVANTS_DEVICE_IDS=a,b \
        python bench/naive_bridge.py
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import audioop  # the stdlib module up to 3.12; the audioop-lts package on 3.13+

import httpx
import uvicorn
import websockets
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

BASE_URL = os.environ.get("SAVANTS_BASE_URL", "http://127.0.0.1:8081").rstrip("/")
WS_URL = os.environ.get("SAVANTS_WS_URL") or BASE_URL.replace("http", "ws", 1) + "/voice-stream"  # as the bridge
API_KEY = os.environ.get("SAVANTS_API_KEY", "")
DEVICES = itertools.cycle(os.environ.get("SAVANTS_DEVICE_IDS", "device").split(","))


async def voice(request: Request) -> Response:
    twiml = (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
        f'<Stream url="ws://{request.url.netloc}/media-stream" /></Connect></Response>'
    )
    return Response(twiml, media_type="application/xml")


async def media_stream(twilio: WebSocket) -> None:
    await twilio.accept()
    stream_sid = None
    savants = None
    up_state = down_state = None
    http: httpx.AsyncClient = twilio.app.state.http

    async def ai_to_caller() -> None:
        nonlocal down_state
        async for message in savants:
            if isinstance(message, bytes):
                pcm8k, down_state = audioop.ratecv(message, 2, 1, 16000, 8000, down_state)
                payload = base64.b64encode(audioop.lin2ulaw(pcm8k, 2)).decode()
                await twilio.send_text(
                    json.dumps({"event": "media", "streamSid": stream_sid, "media": {"payload": payload}})
                )

    forward = None
    try:
        while True:
            data = json.loads(await twilio.receive_text())
            if data["event"] == "start":
                stream_sid = data["start"]["streamSid"]
                response = await http.post(
                    BASE_URL + "/api/websocket-voice/token", json={"apiKey": API_KEY, "deviceId": next(DEVICES)}
                )
                savants = await websockets.connect(WS_URL, compression=None)
                await savants.send(response.json()["token"])
                while json.loads(await savants.recv()).get("type") not in ("savant_voice_connected", "vapi_connected"):
                    pass
                forward = asyncio.create_task(ai_to_caller())
            elif data["event"] == "media" and savants is not None:
                pcm8k = audioop.ulaw2lin(base64.b64decode(data["media"]["payload"]), 2)
                pcm16k, up_state = audioop.ratecv(pcm8k, 2, 1, 8000, 16000, up_state)
                await savants.send(pcm16k)
            elif data["event"] == "stop":
                break
    except (WebSocketDisconnect, websockets.ConnectionClosed):
        pass
    finally:
        if forward is not None:
            forward.cancel()
        if savants is not None:
            await savants.close()
    with contextlib.suppress(RuntimeError):  # already closed by the caller
        await twilio.close()


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
        app.state.http = http
        yield


app = Starlette(
    routes=[
        Route("/voice", voice, methods=["POST"]),
        WebSocketRoute("/media-stream", media_stream),
        Route("/healthz", healthz),
    ],
    lifespan=lifespan,
)

if __name__ == "__main__":
    # uvicorn's defaults, as the samples run it (``uvicorn.run(app)``)
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["PORT"]), log_level="warning")
