"""``create_app``: routes and lifespan, wiring only.

Dependencies are built at the edge: pass ``accounting``, ``http_client``, ``clock``, ``connect`` or ``metrics``
to use your own (tests do); the lifespan creates what is missing and closes only what it created.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from telephony_bridge import __version__
from telephony_bridge.accounting.base import Accounting
from telephony_bridge.accounting.memory import MemoryAccounting
from telephony_bridge.bridge import CallDeps, handle_media_stream
from telephony_bridge.clock import Clock, SystemClock
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.registry import CallRegistry
from telephony_bridge.savants.client import Connector, open_voice_session
from telephony_bridge.savants.tokens import TokenClient
from telephony_bridge.settings import Settings
from telephony_bridge.twilio.twiml import connect_document

log = logging.getLogger(__name__)

MEDIA_STREAM_PATH = "/media-stream"
TWIML_MEDIA_TYPE = "application/xml"


def create_app(
    settings: Settings,
    *,
    accounting: Accounting | None = None,
    http_client: httpx.AsyncClient | None = None,
    clock: Clock | None = None,
    connect: Connector | None = None,
    metrics: Metrics | None = None,
) -> Starlette:
    clock = clock or SystemClock()
    metrics = metrics or Metrics()
    registry = CallRegistry()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            http = http_client or await stack.enter_async_context(httpx.AsyncClient(trust_env=False))
            acct = accounting or MemoryAccounting(settings.savants.device_ids, clock=clock)
            if accounting is None:
                stack.push_async_callback(acct.close)
            app.state.deps = CallDeps(
                settings=settings,
                tokens=TokenClient(
                    http,
                    settings.savants.base_url,
                    settings.savants.api_key.get_secret_value(),
                    timeout_s=settings.savants.token_timeout_s,
                ),
                connect=connect or open_voice_session,
                accounting=acct,
                metrics=metrics,
                clock=clock,
                registry=registry,
            )
            app.state.draining = False
            yield
            app.state.draining = True
            if len(registry):
                log.info("draining: %d calls still up", len(registry))

    async def voice(request: Request) -> Response:
        form = await request.form() if request.method == "POST" else request.query_params
        parameters = {k: str(form[k]) for k in ("From", "To") if form.get(k)}
        xml = connect_document(_stream_url(settings, request), {k.lower(): v for k, v in parameters.items()})
        return Response(xml, media_type=TWIML_MEDIA_TYPE)

    async def media_stream(ws: WebSocket) -> None:
        await ws.accept()
        await handle_media_stream(ws, ws.app.state.deps)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if request.app.state.draining:
            return JSONResponse({"ready": False, "reason": "draining"}, status_code=503)
        return JSONResponse({"ready": True})

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def status(request: Request) -> Response:
        deps: CallDeps = request.app.state.deps
        body: dict[str, Any] = {
            "version": __version__,
            "mode": "dev (embedded emulator)" if settings.dev_mode else "production",
            "savants": {"base_url": settings.savants.base_url, "ws_url": settings.savants.voice_stream_url},
            "calls": registry.snapshot(),
            "accounting": await deps.accounting.snapshot(),
            "draining": request.app.state.draining,
        }
        return JSONResponse(body)

    return Starlette(
        routes=[
            Route("/voice", voice, methods=["GET", "POST"]),
            WebSocketRoute(MEDIA_STREAM_PATH, media_stream),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_endpoint),
            Route("/status", status),
        ],
        lifespan=lifespan,
    )


def _stream_url(settings: Settings, request: Request) -> str:
    """The wss:// URL Twilio must open: from PUBLIC_URL when set, else from the request (dev only)."""
    if settings.server.public_url:
        public = urlsplit(settings.server.public_url)
        scheme = "wss" if public.scheme == "https" else "ws"
        return f"{scheme}://{public.netloc}{public.path.rstrip('/')}{MEDIA_STREAM_PATH}"
    scheme = "wss" if request.url.scheme == "https" else "ws"
    return f"{scheme}://{request.url.netloc}{MEDIA_STREAM_PATH}"
