"""Twilio's flow around the stream: TwiML read as values, signatures, URL mapping, and whole calls on sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from urllib.parse import parse_qsl

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from telephony_bridge.serving import ServerThread, running
from telephony_bridge.tools.twilio_flow import (
    Connect,
    FlowError,
    Hangup,
    Other,
    Reject,
    Say,
    Twiml,
    http_base,
    local_url,
    parse_twiml,
    place_call,
    run_flow,
)
from telephony_bridge.twilio.protocol import Start, parse_message
from telephony_bridge.twilio.signatures import SignatureChecker
from tests.conftest import bridge_settings

pytestmark = pytest.mark.timeout(20)

TOKEN = "flow-test-auth-token"
PUBLIC = "https://public.example"

CONNECT_XML = (
    '<?xml version="1.0" encoding="UTF-8"?><Response><Connect action="https://public.example/stream-ended" '
    'method="POST"><Stream statusCallback="https://public.example/stream-status" statusCallbackMethod="POST" '
    'url="wss://public.example/media-stream"><Parameter name="token" value="&lt;single use&gt;" />'
    '<Parameter name="from" value="+15551230000" /></Stream></Connect></Response>'
)
SAY_XML = (
    '<?xml version="1.0" encoding="UTF-8"?><Response><Say>Sorry, we lost the connection to the assistant. '
    "Please call again.</Say><Hangup /></Response>"
)
REJECT_XML = '<?xml version="1.0" encoding="UTF-8"?><Response><Reject reason="busy" /></Response>'


# --- TwiML, signatures and URLs: no server ------------------------------------------------------------------


def test_parse_twiml_reads_connect_with_parameters_action_and_status_callback() -> None:
    assert parse_twiml(CONNECT_XML) == Twiml(
        (
            Connect(
                stream_url="wss://public.example/media-stream",
                parameters={"token": "<single use>", "from": "+15551230000"},
                status_callback="https://public.example/stream-status",
                action="https://public.example/stream-ended",
                method="POST",
            ),
        )
    )


def test_parse_twiml_reads_say_then_hangup_and_describes_it() -> None:
    twiml = parse_twiml(SAY_XML)
    text = "Sorry, we lost the connection to the assistant. Please call again."
    assert twiml == Twiml((Say(text), Hangup()))
    assert twiml.describe() == 'Say "Sorry, we lost the connection to the as…" + Hangup'


def test_parse_twiml_reads_reject_and_keeps_unknown_verbs_as_values() -> None:
    assert parse_twiml(REJECT_XML) == Twiml((Reject("busy"),))
    assert parse_twiml("<Response><Pause length='1'/><Connect><Room>r</Room></Connect></Response>") == Twiml(
        (Other("Pause"), Other("Connect"))
    )
    assert Twiml().describe() == "hang up"


@pytest.mark.parametrize("text", ["not xml", "<Html/>", ""])
def test_parse_twiml_refuses_what_is_not_a_response(text: str) -> None:
    with pytest.raises(FlowError, match="expected a TwiML"):
        parse_twiml(text)


def test_local_url_moves_public_urls_to_the_bridge_and_keeps_the_path() -> None:
    bridge = "http://127.0.0.1:8123"
    assert local_url("wss://public.example/media-stream", bridge) == "ws://127.0.0.1:8123/media-stream"
    assert local_url("https://public.example/stream-ended?x=1", bridge) == "http://127.0.0.1:8123/stream-ended?x=1"
    assert (
        local_url("wss://public.example/tb/media-stream", bridge, "https://public.example/tb")
        == "ws://127.0.0.1:8123/media-stream"
    )
    assert (
        local_url("wss://public.example/media-stream", "https://127.0.0.1:8443") == "wss://127.0.0.1:8443/media-stream"
    )
    assert (http_base("ws://127.0.0.1:8080/media-stream"), http_base("wss://h.example/media-stream")) == (
        "http://127.0.0.1:8080",
        "https://h.example",
    )


async def test_place_call_signs_the_public_url_as_the_bridge_checks_it() -> None:
    checker = SignatureChecker(TOKEN, PUBLIC)
    seen: list[tuple[str, dict[str, str], bool]] = []

    def bridge(request: httpx.Request) -> httpx.Response:
        form = dict(parse_qsl(request.content.decode()))
        valid = checker.check_http(request.url.path, "", form, request.headers.get("x-twilio-signature"))
        seen.append((str(request.url), form, valid))
        return httpx.Response(200, text=REJECT_XML)

    async with httpx.AsyncClient(transport=httpx.MockTransport(bridge)) as http, asyncio.timeout(5):
        placed = await place_call("http://127.0.0.1:8080", http=http, public_url=PUBLIC, auth_token=TOKEN)
    [(url, form, valid)] = seen
    assert (url, valid, placed.url, placed.twiml) == (
        "http://127.0.0.1:8080/voice",
        True,
        "https://public.example/voice",
        Twiml((Reject("busy"),)),
    )
    assert form["CallSid"] == placed.call_sid and form["AccountSid"] == placed.account_sid
    assert (form["From"], form["To"], form["CallStatus"], form["Direction"], form["ApiVersion"]) == (
        "+15005550006",
        "+15005550001",
        "ringing",
        "inbound",
        "2010-04-01",
    )


# --- whole flows against a small Twilio-facing app on real sockets ------------------------------------------


class FakeBridge:
    """Checks every signature like the bridge; ``/voice`` answers per ``answer``; the stream closes after
    ``start``, so Twilio asks ``/after`` (a relative action) what comes next."""

    def __init__(self) -> None:
        self.checker = SignatureChecker(TOKEN, PUBLIC)
        self.answer = "connect"
        self.parameters: list[dict[str, str]] = []
        self.app = Starlette(
            routes=[
                Route("/voice", self.voice, methods=["POST"]),
                Route("/after", self.after, methods=["POST"]),
                WebSocketRoute("/media-stream", self.stream),
            ]
        )

    async def _signed(self, request: Request) -> bool:
        form = await request.form()
        return self.checker.check_http(request.url.path, "", form, request.headers.get("x-twilio-signature"))

    async def voice(self, request: Request) -> Response:
        if not await self._signed(request):
            return PlainTextResponse("invalid signature", status_code=403)
        if self.answer == "reject":
            return Response(REJECT_XML, media_type="application/xml")
        return Response(
            '<Response><Connect action="/after"><Stream url="wss://public.example/media-stream">'
            '<Parameter name="token" value="t-1"/></Stream></Connect><Pause length="5"/></Response>',
            media_type="application/xml",
        )

    async def after(self, request: Request) -> Response:
        if not await self._signed(request):
            return PlainTextResponse("invalid signature", status_code=403)
        return Response(SAY_XML, media_type="application/xml")

    async def stream(self, ws: WebSocket) -> None:
        if not self.checker.check_upgrade(ws.url.path, ws.headers.get("x-twilio-signature")):
            await ws.close(1008)
            return
        await ws.accept()
        async for text in ws.iter_text():
            if isinstance(event := parse_message(text), Start):
                self.parameters.append(event.custom_parameters)
                break
        await ws.close(1000)


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[FakeBridge, str]]:
    bridge = FakeBridge()
    with running(bridge.app) as server:
        yield bridge, server.http_url


async def test_flow_signs_the_upgrade_and_the_action_and_reports_what_comes_after(
    fake: tuple[FakeBridge, str],
) -> None:
    bridge, url = fake
    bridge.answer = "connect"
    async with httpx.AsyncClient() as http, asyncio.timeout(10):
        flow = await run_flow(url, http=http, seconds=2.0, auth_token=TOKEN, public_url=PUBLIC)
    assert flow.error is None and flow.call is not None
    assert (flow.call.ended_by, flow.call.violations, bridge.parameters[-1]) == ("bridge", [], {"token": "t-1"})
    assert flow.after == parse_twiml(SAY_XML)
    assert flow.outcome == "failed"  # the bridge ended the stream and apologised
    assert flow.summary().endswith('; then: Say "Sorry, we lost the connection to the as…" + Hangup')


async def test_flow_reports_a_rejected_call_and_a_refused_signature(fake: tuple[FakeBridge, str]) -> None:
    bridge, url = fake
    bridge.answer = "reject"
    async with httpx.AsyncClient() as http, asyncio.timeout(10):
        busy = await run_flow(url, http=http, seconds=1.0, auth_token=TOKEN, public_url=PUBLIC)
        unsigned = await run_flow(url, http=http, seconds=1.0, auth_token="wrong", public_url=PUBLIC)
    assert (busy.outcome, busy.call, busy.reason) == ("busy", None, "Reject busy")
    assert busy.summary() == f"call {busy.call_sid} turned away by the webhook: Reject busy"
    assert (unsigned.outcome, unsigned.webhook, unsigned.call) == ("failed", None, None)
    assert unsigned.reason == f"webhook: POST {url}/voice: expected 200 with TwiML, got 403 'invalid signature'"


# --- one real call through the bridge (echo emulator) --------------------------------------------------------


async def test_flow_end_to_end_connects_streams_and_hears_the_echo(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread]
) -> None:
    # Explicit public URL and token, so this holds whether or not the bridge checks signatures.
    bridge = start_bridge(bridge_settings(emulator, **{"server.public_url": PUBLIC, "twilio.auth_token": TOKEN}))
    said = np.random.default_rng(3).normal(0, 3000, 8000).clip(-32768, 32767).astype(np.int16)
    async with httpx.AsyncClient() as http, asyncio.timeout(10):
        flow = await run_flow(
            bridge.http_url, http=http, audio_in=said, seconds=1.5, auth_token=TOKEN, public_url=PUBLIC
        )
    assert flow.webhook is not None and flow.webhook.connect is not None, flow.summary()
    assert flow.webhook.connect.stream_url == "wss://public.example/media-stream"
    assert flow.call is not None, flow.summary()
    assert (flow.outcome, flow.error, flow.after, flow.call.ended_by, flow.call.violations) == (
        "served",
        None,
        None,
        "caller",
        [],
    )
    assert flow.call.first_audio_s is not None and flow.call.heard_s > 0.2, flow.summary()
