"""A scriptable fake Savants for fault tests: its token endpoint and /voice-stream (Starlette under uvicorn on
127.0.0.1) answer as each test says, where the emulator cannot make the fault; it counts what the bridge did.
``start_fake`` (conftest.py) starts one for a test and stops it after."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from telephony_bridge.serving import ServerThread
from tests.support import leases, wait_until

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJkZXZpY2UtYSJ9.ZmFrZS1zaWduYXR1cmU"  # opaque to the bridge: three parts

TokenAnswer = Callable[[dict[str, object]], Response]
Session = Callable[["FakeSavants", WebSocket], Awaitable[None]]
Upgrade = Callable[[], Response | None]  # a refusal of the WebSocket upgrade (an HTTP response), or None: accept


def token_or_400(body: dict[str, object]) -> Response:
    """Savants' answer (spec §3): a token, or 400 to a request without apiKey/deviceId (the readiness probe)."""
    if not body:
        return JSONResponse({"error": {"code": "INVALID_REQUEST", "message": "apiKey required"}}, status_code=400)
    return JSONResponse({"token": JWT, "expiresIn": 60})


async def echo(fake: FakeSavants, ws: WebSocket) -> None:
    """Confirm, then say back every frame of caller audio at once."""
    await ws.send_json({"type": "savant_voice_connected", "sessionId": f"sess_{fake.sessions_opened}"})
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("bytes"):
            await ws.send_bytes(message["bytes"])


class FakeSavants:
    """A throwaway Savants whose token answer and voice session each test scripts; counts what the bridge did."""

    def __init__(
        self, token: TokenAnswer = token_or_400, session: Session = echo, upgrade: Upgrade = lambda: None
    ) -> None:
        self.token = token
        self.session = session
        self.upgrade = upgrade
        self.token_requests = 0  # real ones, with a body (not the readiness probe's empty one)
        self.upgrades_refused = 0
        self.closed_before_token = 0  # upgrades closed before any token came (the readiness probe's)
        self.sessions_opened = 0  # upgrades accepted, the readiness probe's included
        self.sessions_active = 0

        async def token_route(request: Request) -> Response:
            body = orjson.loads(await request.body() or b"{}")
            self.token_requests += bool(body)
            return self.token(body)

        async def voice_route(ws: WebSocket) -> None:
            refusal = self.upgrade()
            if refusal is not None:
                self.upgrades_refused += 1
                await ws.send_denial_response(refusal)
                return
            await ws.accept()
            self.sessions_opened += 1
            self.sessions_active += 1
            try:
                if (await ws.receive())["type"] == "websocket.disconnect":  # else the JWT, as the first text frame
                    self.closed_before_token += 1
                    return
                await self.session(self, ws)
            except WebSocketDisconnect:
                pass
            finally:
                self.sessions_active -= 1

        routes = [
            Route("/api/websocket-voice/token", token_route, methods=["POST"]),
            WebSocketRoute("/voice-stream", voice_route),
        ]
        self.server = ServerThread(Starlette(routes=routes))


def calls_up(bridge: ServerThread) -> int:
    return len(httpx.get(bridge.http_url + "/status", timeout=5).json()["calls"])


def released(bridge: ServerThread, fake: FakeSavants) -> None:
    """Accounting back to zero: no call, no lease or reservation, no Savants socket."""
    wait_until(lambda: calls_up(bridge) == 0 and leases(bridge) == 0, what="the call to be released")
    wait_until(lambda: fake.sessions_active == 0, what="the Savants sockets to close")
