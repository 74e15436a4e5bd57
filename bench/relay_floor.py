"""The floor of a whole call on the bridge's own stack, for bench/capacity.py (``relay-picows``): both legs,
carried with the bridge's message counts and conversions, and nothing else. No per-frame code of the bridge
can cost less than this, so the bridge's CPU above it is what pacing, VAD, marks and accounting cost.

Per stream (handed to picows by ``ws_handoff``, as the bridge's is): at ``start`` a Savants token (devices
round-robin from ``SAVANTS_DEVICE_IDS``, as bench/naive_bridge.py), a picows client on ``/voice-stream``, the
JWT, the confirmation. Then, from picows' frame callbacks with no task per frame: each caller frame through
the bridge's compiled upsampler (μ-law 8 kHz -> PCM16 16 kHz), two frames (40 ms, the default
``audio.upstream_message_ms``) a Savants message; each AI frame through its compiled downsampler to μ-law and
out at once as one ``media`` message, as the bridge sends a real-time AI's. Caller audio before the AI is up
is dropped. No pacing, VAD, marks, timeline, accounting or logging per frame.

    PORT=8090 SAVANTS_BASE_URL=http://127.0.0.1:8081 SAVANTS_API_KEY=k SAVANTS_DEVICE_IDS=a,b \
        python bench/relay_floor.py
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import orjson
import uvicorn
from picows import WSCloseCode, WSError, WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_connect
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from telephony_bridge.audio.kernels import UlawUpsampler
from telephony_bridge.audio.pipeline import AiToCaller
from telephony_bridge.close_codes import echo_code
from telephony_bridge.savants.client import tls_context
from telephony_bridge.serving import uvicorn_config
from telephony_bridge.twilio.outbound_messages import MediaMessages
from telephony_bridge.twilio.protocol import media_audio
from telephony_bridge.twilio.twiml import connect_document
from telephony_bridge.ws_handoff import Connection

BASE_URL = os.environ.get("SAVANTS_BASE_URL", "http://127.0.0.1:8081").rstrip("/")
TOKEN_URL = BASE_URL + "/api/websocket-voice/token"
WS_URL = os.environ.get("SAVANTS_WS_URL") or BASE_URL.replace("http", "ws", 1) + "/voice-stream"  # as the bridge
TLS_CONTEXT = tls_context(WS_URL)  # for wss:// (capacity.py --savants-tls): built once, as the bridge does
API_KEY = os.environ.get("SAVANTS_API_KEY", "")
DEVICES = itertools.cycle(os.environ.get("SAVANTS_DEVICE_IDS", "device").split(","))
CONFIRMATIONS = ("savant_voice_connected", "vapi_connected")  # the docs use both (spec §6.4)
OPEN_TIMEOUT_S = 10.0  # token, upgrade and confirmation together
CLOSE_TIMEOUT_S = 2.0  # for the peer's answer to our close frame; then the connection is dropped

log = logging.getLogger("relay_floor")

_TEXT, _BINARY, _CLOSE = WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CLOSE


class CallSetup:
    """One call apart from its audio: Twilio's ``start`` opens the Savants leg (token, upgrade, JWT,
    confirmation); ``stop``, either side's close or a Savants leg that did not open ends both legs, once. The
    audio is its listeners' (``RelayCall`` here; bench/relay_c.py's compiled ones), which ``_join`` connects
    once the AI is up and disconnects at the end."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        self.twilio: WSTransport | None = None  # the media stream's, set by its listener
        self._leg: SavantsLeg | None = None  # from ``start``
        self._opening: asyncio.Task[None] | None = None
        self.ended = False

    def on_event(self, message: dict[str, Any]) -> None:
        """A Twilio message other than caller audio."""
        event = message["event"]
        if event == "start" and self._leg is None:
            self._leg = SavantsLeg(self, message["start"]["streamSid"])
            self._opening = self._relay.spawn(self._open(self._leg))
        elif event == "stop":
            self.end()

    def end(self) -> None:
        """Close both legs, once: Twilio's ``stop``, either side's close, or a Savants leg that did not open."""
        if self.ended:
            return
        self.ended = True
        self._join(False)
        opening, self._opening = self._opening, None
        if opening is not None:
            opening.cancel()
        if self.twilio is not None:
            _close(self.twilio)
        leg = self._leg
        if leg is not None and leg.transport is not None:
            _close(leg.transport)

    def _join(self, joined: bool) -> None:
        """Carry audio between the legs from now on (``joined``: the AI is up), or no more."""
        raise NotImplementedError

    def _listener(self, leg: SavantsLeg) -> WSListener:
        """The listener of the Savants leg's connection: ``leg``, which carries the AI's audio itself."""
        return leg

    async def _open(self, leg: SavantsLeg) -> None:
        listener = self._listener(leg)
        try:
            async with asyncio.timeout(OPEN_TIMEOUT_S):
                token = await self._relay.token()
                transport, _ = await ws_connect(
                    lambda: listener,
                    WS_URL,
                    websocket_handshake_timeout=OPEN_TIMEOUT_S,
                    proxy=None,
                    use_aiofastnet=False,
                    ssl_context=TLS_CONTEXT,
                )
                transport.send(_TEXT, token.encode())
                confirmed = await leg.confirmed
        except asyncio.CancelledError:  # the call ended (``end`` sent our close frame) or the app is stopping
            if leg.transport is not None and not leg.transport.is_close_frame_sent:
                leg.transport.disconnect(graceful=False)
            raise
        except (httpx.HTTPError, OSError, WSError, KeyError, ValueError) as exc:  # TimeoutError is an OSError
            log.warning("the Savants leg of stream %s did not open: %s: %s", leg.stream_sid, type(exc).__name__, exc)
            confirmed = False
        self._opening = None
        if not confirmed:
            self.end()
        elif not self.ended:
            self._join(True)


class RelayCall(CallSetup, WSListener):  # type: ignore[misc]
    """One call: the listener of its Twilio media stream, which opens the Savants leg at ``start``."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(relay)
        self._upstream: WSTransport | None = None  # the Savants leg's, once confirmed: caller audio goes there
        self._upsampler = UlawUpsampler(compiled=True)
        self._held: bytes | None = None  # the first 20 ms of the next 40 ms message

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.twilio = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is _TEXT:
            data = frame.get_payload_as_bytes()
            audio = media_audio(data)  # the bridge's own read of a media message (msgspec)
            if audio is not None:
                upstream = self._upstream
                if upstream is not None:
                    _, pcm = self._upsampler.process(audio[0])
                    held = self._held
                    if held is None:
                        self._held = pcm
                    else:
                        self._held = None
                        upstream.send(_BINARY, held + pcm)
                return
            self.on_event(orjson.loads(data))
        elif kind is _CLOSE:
            answer_close(transport, frame)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.end()

    def _join(self, joined: bool) -> None:
        leg = self._leg
        self._upstream = leg.transport if joined and leg is not None else None
        if leg is not None:
            leg.downstream = self.twilio if joined else None


class SavantsLeg(WSListener):  # type: ignore[misc]
    """The Savants side of one call: its confirmation, then each AI frame to the caller as it is read."""

    def __init__(self, call: CallSetup, stream_sid: str) -> None:
        self._call = call
        self.stream_sid = stream_sid
        self.transport: WSTransport | None = None
        self.confirmed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.downstream: WSTransport | None = None  # the Twilio stream's, once confirmed
        self._to_caller = AiToCaller(compiled=True)
        self._media = MediaMessages(stream_sid)  # as the bridge's leg builds them: once a stream

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        if self._call.ended:  # the call gave up while the upgrade was in flight
            transport.disconnect(graceful=False)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is _BINARY:
            downstream = self.downstream
            if downstream is not None:
                ulaw = self._to_caller.push(frame.get_payload_as_bytes())
                if ulaw:
                    downstream.send(_TEXT, self._media.encode(ulaw))
        elif kind is _TEXT:
            if not self.confirmed.done():
                sort = orjson.loads(frame.get_payload_as_bytes()).get("type")
                if sort in CONFIRMATIONS or sort == "error":
                    self.confirmed.set_result(sort != "error")
        elif kind is _CLOSE:
            answer_close(transport, frame)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.confirmed.done():
            self.confirmed.set_result(False)
        self._call.end()


def answer_close(transport: WSTransport, frame: WSFrame) -> None:
    """The peer's close frame: echoed (RFC 6455 §5.5.1) unless ours went first, then the connection dropped."""
    if not transport.is_close_frame_sent:
        transport.send_close(echo_code(int(frame.get_close_code())))
    transport.disconnect()


def _close(transport: WSTransport) -> None:
    """Our close frame; the connection goes when the peer answers it (``answer_close``) or after
    ``CLOSE_TIMEOUT_S``: dropping it at once would reset a peer that is still sending."""
    if transport.is_disconnected or transport.is_close_frame_sent:
        return
    transport.send_close(WSCloseCode.OK)
    asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, transport.disconnect)


class Relay:
    """The media-stream router (a ``ws_handoff.WebSocketRouter``) and what its calls share: the HTTP client for
    tokens, and the tasks opening Savants legs (held until done, cancelled when the app stops)."""

    def __init__(self, new_call: Callable[[Relay], WSListener] = RelayCall) -> None:
        self._new_call = new_call  # a media stream's listener
        self._http: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, request: WSUpgradeRequest, connection: Connection) -> WSListener | None:
        return self._new_call(self) if request.path.startswith(b"/media-stream") else None

    def spawn(self, opening: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(opening)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def token(self) -> str:
        """A JWT for the next device of the round (spec §3)."""
        assert self._http is not None, "the app's lifespan has not started"
        response = await self._http.post(TOKEN_URL, json={"apiKey": API_KEY, "deviceId": next(DEVICES)})
        response.raise_for_status()
        return str(response.json()["token"])

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(trust_env=False, timeout=OPEN_TIMEOUT_S) as http:
            self._http = http
            try:
                yield
            finally:
                openings = list(self._tasks)
                for task in openings:
                    task.cancel()
                if openings:
                    await asyncio.wait(openings)


async def voice(request: Request) -> Response:
    return Response(connect_document(f"ws://{request.url.netloc}/media-stream"), media_type="application/xml")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def serve(relay: Relay) -> None:
    """The webhook and the media streams on ``PORT`` (127.0.0.1), until interrupted."""
    app = Starlette(
        routes=[Route("/voice", voice, methods=["POST"]), Route("/healthz", healthz)], lifespan=relay.lifespan
    )
    app.state.websocket_router = relay
    uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=int(os.environ["PORT"]))).run()


if __name__ == "__main__":
    serve(Relay())
