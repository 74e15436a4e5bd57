"""``create_app``: routes and lifespan, wiring only.

Dependencies are built at the edge: pass ``accounting``, ``store``, ``http_client`` (a ``JsonPoster``),
``clock``, ``connect`` or ``metrics`` to use your own (tests do); the lifespan creates what is missing and closes
only what it created.
``ops_ports`` are the bound ports of the separate ops listeners, when the server has any (``server.ops_port``,
and a worker's own with ``server.worker_ops_port``); unset, they are read from the settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Collection
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from telephony_bridge import __version__
from telephony_bridge.accounting.base import Accounting, Limits
from telephony_bridge.accounting.factory import make_accounting
from telephony_bridge.admission import Admission, VoiceEndpoint
from telephony_bridge.audio import kernels
from telephony_bridge.bridge import CallDeps
from telephony_bridge.clock import Clock, SystemClock
from telephony_bridge.drain import Drain
from telephony_bridge.errors import ConfigError
from telephony_bridge.ops import logging as oplog
from telephony_bridge.ops.access import OpsAccess
from telephony_bridge.ops.heap import MAX_SITES, TOP_SITES, HeapProbe
from telephony_bridge.ops.loop_health import watch_gc, watch_loop_lag
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.ops.readiness import Readiness
from telephony_bridge.ops.runtime import process_figures
from telephony_bridge.ops.tasks import task_report
from telephony_bridge.registry import CallRegistry
from telephony_bridge.savants.client import Connector, open_voice_session, probe_voice_stream, tls_context
from telephony_bridge.savants.health import EndpointHealth, watch_voice_stream
from telephony_bridge.savants.http_post import JsonPoster
from telephony_bridge.savants.tokens import TokenClient
from telephony_bridge.settings import Settings
from telephony_bridge.sip.server import SipServer
from telephony_bridge.store import MemoryStore, RedisStore, Store
from telephony_bridge.twilio.leg import handle_media_stream
from telephony_bridge.twilio.media_route import MediaStreamRoute
from telephony_bridge.twilio.read_pairs import ReadPairs, kernel_lets_go
from telephony_bridge.twilio.signatures import SignatureChecker
from telephony_bridge.twilio.webhooks import (
    MEDIA_STREAM_PATH,
    STREAM_ENDED_PATH,
    STREAM_STATUS_PATH,
    TwilioWebhooks,
)

log = logging.getLogger(__name__)

REDIS_TIMEOUT_S = 1.0  # a webhook is answered (busy) quickly when Redis is away


def create_app(
    settings: Settings,
    *,
    accounting: Accounting | None = None,
    store: Store | None = None,
    http_client: JsonPoster | None = None,
    clock: Clock | None = None,
    connect: Connector | None = None,
    metrics: Metrics | None = None,
    ops_ports: Collection[int] | None = None,
) -> Starlette:
    clock = clock or SystemClock()
    metrics = metrics or Metrics()
    oplog.install_context()
    oplog.guard_wire_loggers()
    registry = CallRegistry()
    metrics.watch_devices(settings.savants.device_ids, settings.accounting.max_concurrent_per_device, registry.snapshot)
    checker = signature_checker(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            # One TLS context (the system's CA store read once) for the voice stream and the token endpoint.
            voice_tls = tls_context(settings.savants.voice_stream_url)
            http = http_client
            if http is None:
                http = JsonPoster(settings.savants.base_url, ssl_context=voice_tls)  # the token endpoint's origin
                stack.push_async_callback(http.aclose)
            acct, kv = accounting, store
            if acct is None or kv is None:
                made_acct, made_kv = _backends(settings, clock, stack)
                acct, kv = acct or made_acct, kv or made_kv
            metrics.count_outages(lambda: acct.unavailable_total + kv.unavailable_total)
            probe_interval_s = settings.savants.probe_interval_s
            token_health = EndpointHealth("Savants token endpoint", clock, probe_interval_s=probe_interval_s)
            stack.push_async_callback(token_health.close)
            voice_health = EndpointHealth("Savants voice stream", clock, probe_interval_s=probe_interval_s)
            stack.push_async_callback(voice_health.close)
            metrics.watch_endpoints({"token": lambda: token_health.up, "voice_stream": lambda: voice_health.up})
            app.state.endpoint_health = {"token_endpoint": token_health, "voice_stream": voice_health}  # /status
            voice_url, connect_timeout_s = settings.savants.voice_stream_url, settings.savants.connect_timeout_s
            voice_health.attach_probe(
                functools.partial(probe_voice_stream, voice_url, connect_timeout_s, ssl_context=voice_tls)
            )
            tokens = TokenClient(
                http,
                settings.savants.api_key.get_secret_value(),
                timeout_s=settings.savants.token_timeout_s,
                health=token_health,
            )
            voice = VoiceEndpoint(
                connect=watch_voice_stream(
                    connect
                    or functools.partial(
                        open_voice_session,
                        stall_timeout_s=settings.savants.stall_timeout_s,
                        ssl_context=voice_tls,  # built once, not per connection
                        compiled=kernels.use_compiled(settings.audio.kernels),  # numpy: the frame path in Python
                    ),
                    voice_health,
                    connect_timeout_s,
                ),
                url=voice_url,
                timeout_s=connect_timeout_s,
                warm_token=settings.savants.warm_token,
                preconnect=settings.savants.preconnect,
            )
            admission = Admission(
                acct,
                tokens,
                voice,
                kv,
                metrics,
                clock,
                reservation_ttl_s=settings.accounting.reservation_ttl_s,
                stream_token_ttl_s=settings.twilio.stream_token_ttl_s,
                sticky_callers=settings.accounting.sticky_callers,
                require_stream_token=settings.twilio.require_stream_token,
                allow_missing_stream_token=settings.dev_mode,
                token_deadline_s=settings.savants.token_deadline_s,
                device_suspend_s=settings.savants.device_suspend_s,
            )
            app.state.readiness = Readiness(
                acct,
                token_health,
                voice_health,
                clock,
                cache_s=settings.accounting.readiness_cache_s,
                not_ready_when_full=settings.accounting.not_ready_when_full,
            )
            stack.push_async_callback(admission.close)
            app.state.deps = CallDeps(
                settings=settings,
                admission=admission,
                metrics=metrics,
                clock=clock,
                registry=registry,
            )
            drain = Drain(
                registry,
                admission.awaiting_streams,
                clock,
                timeout_s=settings.server.drain_timeout_s,
                pending_streams_s=settings.server.drain_pending_streams_s,
            )
            app.state.drain = drain
            metrics.draining.set_function(lambda: float(drain.draining))  # read at each scrape
            app.state.webhooks = TwilioWebhooks(settings, admission, metrics, checker, drain, clock)
            app.state.registry = registry
            app.state.sip = None
            if settings.sip.port is not None:
                sip = SipServer(app.state.deps, draining=lambda: drain.draining, readiness=app.state.readiness)
                await sip.start()
                stack.push_async_callback(sip.stop)
                app.state.sip = sip
            if read_pairs is not None:
                stack.callback(read_pairs.close)
            lag = asyncio.create_task(watch_loop_lag(clock, metrics), name="loop-lag")
            stack.push_async_callback(_cancel, lag)
            stack.callback(watch_gc(metrics))
            yield
            drain.draining = True
            if len(registry):
                log.info("shutting down with %d calls still up", len(registry))
            if media_route is not None:
                await media_route.close()

    async def voice(request: Request) -> Response:
        return await request.app.state.webhooks.voice(request)

    async def stream_status(request: Request) -> Response:
        return await request.app.state.webhooks.stream_status(request)

    async def stream_ended(request: Request) -> Response:
        return await request.app.state.webhooks.stream_ended(request)

    async def media_stream(ws: WebSocket) -> None:
        if not ws.app.state.webhooks.upgrade_signed(ws):
            await ws.close(code=1008)  # before accept: the client sees HTTP 403
            return
        await ws.accept()
        await handle_media_stream(ws, ws.app.state.deps)

    mode = "dev" if settings.dev_mode else "production"

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "mode": mode})

    async def readyz(request: Request) -> Response:
        verdict = await request.app.state.readiness.check(draining=request.app.state.drain.draining)
        return JSONResponse(verdict.to_json(), status_code=200 if verdict.ready else 503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def status(request: Request) -> Response:
        deps: CallDeps = request.app.state.deps
        body: dict[str, Any] = {
            "version": __version__,
            "mode": mode,
            "signatures": "checked" if checker else "off",
            "savants": {
                "base_url": settings.savants.base_url,
                "ws_url": settings.savants.voice_stream_url,
                **{name: health.status() for name, health in request.app.state.endpoint_health.items()},
            },
            "calls": registry.snapshot(),
            "accounting": await deps.admission.accounting.snapshot(),
            "draining": request.app.state.drain.draining,
            "process": process_figures(),
        }
        if request.app.state.sip is not None:
            body["sip"] = request.app.state.sip.status()
        return JSONResponse(body)

    heap_probe = HeapProbe()

    async def debug_heap(request: Request) -> Response:
        try:
            top = request.query_params.get("top", str(TOP_SITES))
            if not (top.isascii() and top.isdigit()) or not 1 <= int(top) <= MAX_SITES:
                raise ValueError(f"expected 'top' to be a whole number from 1 to {MAX_SITES}, got {top!r}")
            return JSONResponse(heap_probe.report(int(top), by=request.query_params.get("by", "lineno")))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    async def debug_tasks(request: Request) -> Response:
        return JSONResponse(task_report(asyncio.all_tasks()))

    app = Starlette(
        routes=[
            Route("/voice", voice, methods=["GET", "POST"]),
            Route(STREAM_STATUS_PATH, stream_status, methods=["GET", "POST"]),
            Route(STREAM_ENDED_PATH, stream_ended, methods=["GET", "POST"]),
            WebSocketRoute(MEDIA_STREAM_PATH, media_stream),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_endpoint),
            Route("/status", status),
            Route("/debug/heap", debug_heap),
            Route("/debug/tasks", debug_tasks),
        ],
        middleware=[
            Middleware(
                OpsAccess,
                ops_ports=_ops_ports(settings, ops_ports),
                token=settings.ops.token.get_secret_value(),
            )
        ],
        lifespan=lifespan,
    )
    media_route: MediaStreamRoute | None = None
    read_pairs: ReadPairs | None = None
    if settings.server.websocket == "picows":
        # uvicorn hands the media-stream upgrade to picows (ws_handoff); the Starlette route above is then unused.
        if settings.twilio.paired_reads and settings.audio.upstream_message_ms == 40:
            if kernel_lets_go():
                read_pairs = ReadPairs(clock, count=lambda change: metrics.paired_reads.labels(change=change).inc())
            else:
                log.info("twilio.paired_reads: off, as this kernel does not wake a reader when SO_RCVLOWAT drops")
        media_route = MediaStreamRoute(app.state, ops_ports=_ops_ports(settings, ops_ports), read_pairs=read_pairs)
        app.state.websocket_router = media_route
    app.state.read_pairs = read_pairs
    return app


def _ops_ports(settings: Settings, bound: Collection[int] | None) -> frozenset[int]:
    """The ops listeners' ports: those bound for them, else the configured ones (``server.ops_port``, 0 or
    unset: none; ``server.worker_ops_port``: the one process's own, as a worker 0's)."""
    if bound is not None:
        return frozenset(bound)
    server = settings.server
    return frozenset([server.ops_port] if server.ops_port else []) | frozenset(server.worker_ops_ports()[:1])


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def drain(app: Starlette) -> None:
    """The first SIGTERM: see ``telephony_bridge.drain``. Before the app has started there is nothing to drain."""
    state: Drain | None = getattr(app.state, "drain", None)
    if state is not None:
        await state.run()


def signature_checker(settings: Settings) -> SignatureChecker | None:
    """Signatures are checked whenever an auth token is set; unsigned is allowed only in dev or when asked."""
    token = settings.twilio.auth_token.get_secret_value()
    if token:
        if not settings.server.public_url:
            raise ConfigError(
                "config key 'server.public_url' (environment variable PUBLIC_URL) must be set when "
                "TWILIO_AUTH_TOKEN is: signatures are checked against the public URL Twilio calls"
            )
        return SignatureChecker(token, settings.server.public_url)
    if settings.dev_mode:
        log.warning("TWILIO_AUTH_TOKEN is not set: Twilio signatures are NOT checked (allowed in dev mode only)")
        return None
    if settings.twilio.allow_unsigned:
        log.warning(
            "TWILIO_AUTH_TOKEN is not set and twilio.allow_unsigned is true: anyone who finds this bridge can "
            "open AI sessions billed to you"
        )
        return None
    raise ConfigError(
        "config key 'twilio.auth_token' (environment variable TWILIO_AUTH_TOKEN) must be set when talking to a "
        "real Savants server, or set twilio.allow_unsigned: true to accept unsigned requests"
    )


def _backends(settings: Settings, clock: Clock, stack: contextlib.AsyncExitStack) -> tuple[Accounting, Store]:
    """Memory backends for one replica; Redis ones when REDIS_URL is set, so replicas share one view."""
    acct_settings = settings.accounting
    limits = Limits(
        max_concurrent=acct_settings.max_concurrent_per_device,
        max_token_requests=acct_settings.max_token_requests_per_minute,
    )
    accounting = make_accounting(
        settings.redis_url, settings.savants.device_ids, limits, clock, lease_ttl_s=acct_settings.lease_ttl_s
    )
    stack.push_async_callback(accounting.close)
    if not settings.redis_url:
        return accounting, MemoryStore(clock)
    # Its own client, with no retries: GETDEL must not be repeated (a retry would find the token spent).
    client = aioredis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        retry=Retry(NoBackoff(), retries=0),
    )
    stack.push_async_callback(client.aclose)
    return accounting, RedisStore(client)
