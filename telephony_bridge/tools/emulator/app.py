"""``create_emulator_app``: the emulator's routes over one shared state, wiring only."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

from telephony_bridge.clock import Clock, SystemClock
from telephony_bridge.tools.emulator.config import EmulatorConfig
from telephony_bridge.tools.emulator.session import VOICE_STREAM_PATH, VoiceStreamEndpoint
from telephony_bridge.tools.emulator.state import EmulatorState
from telephony_bridge.tools.emulator.token_endpoint import NO_CACHE, TOKEN_PATH, TokenEndpoint
from telephony_bridge.tools.emulator.wav import read_wav_pcm16

STATS_PATH = "/_emulator/stats"


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

    app = Starlette(
        routes=[
            Route(TOKEN_PATH, tokens.handle, methods=["POST"]),
            WebSocketRoute(VOICE_STREAM_PATH, stream.handle),
            Route(STATS_PATH, stats, methods=["GET"]),
        ]
    )
    app.state.emulator = state
    return app
