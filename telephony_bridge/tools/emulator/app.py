"""``create_emulator_app``: the emulator's routes over one shared state, wiring only."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

from telephony_bridge.clock import Clock, SystemClock
from telephony_bridge.errors import ConfigError
from telephony_bridge.tools.emulator.config import EmulatorConfig
from telephony_bridge.tools.emulator.faults import Fault, session_fault_from_mapping, token_fault_from_mapping
from telephony_bridge.tools.emulator.session import VOICE_STREAM_PATH, VoiceStreamEndpoint
from telephony_bridge.tools.emulator.state import EmulatorState
from telephony_bridge.tools.emulator.token_endpoint import NO_CACHE, TOKEN_PATH, TokenEndpoint
from telephony_bridge.tools.emulator.transport import TransportInScope
from telephony_bridge.tools.emulator.wav import read_wav_pcm16

STATS_PATH = "/_emulator/stats"
FAULTS_PATH = "/_emulator/faults"
FAULT_BUILDERS: dict[str, Callable[[Any], Fault]] = {
    "session": session_fault_from_mapping,
    "token": token_fault_from_mapping,
}


def create_emulator_app(config: EmulatorConfig | None = None, *, clock: Clock | None = None) -> Starlette:
    """An emulator of the Savants Voice API; its live state is ``app.state.emulator`` (an ``EmulatorState``).

    The WAV file of the ``file`` voice is read here, so a bad file fails at start-up.
    """
    config = config or EmulatorConfig()
    state = EmulatorState(config, clock or SystemClock())
    wav_pcm = read_wav_pcm16(config.wav_path) if config.voice == "file" and config.wav_path else b""
    tokens = TokenEndpoint(state)
    stream = VoiceStreamEndpoint(state, wav_pcm)

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(state.snapshot(), headers=NO_CACHE)

    async def faults(request: Request) -> JSONResponse:
        """GET: the armed faults and how often each kind fired; DELETE: disarm all; POST .../session or
        .../token: arm one (a JSON object of ``faults.SessionFault`` / ``TokenFault`` fields)."""
        if request.method == "DELETE":
            state.faults.clear()
        elif request.method == "POST":
            build = FAULT_BUILDERS.get(request.path_params["target"])
            if build is None:
                return JSONResponse({"error": "expected .../session or .../token"}, status_code=404)
            try:
                fault = build(json.loads(await request.body() or b"{}"))
            except ValueError:
                return JSONResponse({"error": "expected a JSON object"}, status_code=400, headers=NO_CACHE)
            except ConfigError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400, headers=NO_CACHE)
            state.faults.arm(fault)
        return JSONResponse(state.faults.to_json(), headers=NO_CACHE)

    app = Starlette(
        routes=[
            Route(TOKEN_PATH, tokens.handle, methods=["POST"]),
            WebSocketRoute(VOICE_STREAM_PATH, stream.handle),
            Route(STATS_PATH, stats, methods=["GET"]),
            Route(FAULTS_PATH, faults, methods=["GET", "DELETE"]),
            Route(FAULTS_PATH + "/{target:str}", faults, methods=["POST"]),
        ],
        middleware=[Middleware(TransportInScope)],
    )
    app.state.emulator = state
    return app
