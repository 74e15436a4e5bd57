"""The media stream on picows, handed over by uvicorn on the same port (``ws_handoff``, ``twilio.media_route``).

The rest of the suite drives the media stream through the default (picows); here: that it is picows carrying
it, that ``server.websocket: uvicorn`` still carries a whole call, the seam's refusals (404, 403), messages
split over frames, garbage, and streams still open when the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.caller import new_sid, run_call
from telephony_bridge.twilio import protocol as tw
from telephony_bridge.twilio.media_route import MediaStreamRoute
from telephony_bridge.ws_handoff import WebSocketHandoff
from tests.support import (
    bridge_settings,
    call_form,
    emulator_stats,
    leases,
    post_voice,
    signed_call,
    stream_parameters,
    upgrade_signature,
    wait_until,
)


def media_route(bridge: ServerThread) -> MediaStreamRoute | None:
    return getattr(bridge.server.config.app.state, "websocket_router", None)


def twilio_errors(bridge: ServerThread) -> float:
    text = httpx.get(bridge.http_url + "/metrics", timeout=5).text
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "bridge_protocol_errors"]
    return sum(s.value for s in family.samples if s.name.endswith("_total") and s.labels.get("peer") == "twilio")


async def open_stream(bridge: ServerThread) -> tuple[Any, str, str]:
    """A signed stream up to ``start``, as Twilio opens it (the caller's side left to the test)."""
    form = call_form()
    params = stream_parameters(post_voice(bridge, form))
    ws = await connect(bridge.ws_url + "/media-stream", additional_headers=upgrade_signature(), proxy=None)
    stream_sid = new_sid("MZ")
    await ws.send(tw.Connected().to_json())
    await ws.send(tw.Start(stream_sid, form["CallSid"], form["AccountSid"], custom_parameters=params).to_json())
    return ws, form["CallSid"], stream_sid


async def until_closed(ws: Any) -> None:
    """Read (and drop) what the bridge sends until it closes the stream."""
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(15):
            while True:
                await ws.recv()


def live_calls(bridge: ServerThread) -> int:
    return len(httpx.get(bridge.http_url + "/status", timeout=5).json()["calls"])


@pytest.mark.parametrize("websocket", ["picows", "uvicorn"])
async def test_a_whole_call_over_either_websocket_server(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread], websocket: str
) -> None:
    bridge = start_bridge(bridge_settings(emulator, **{"server.websocket": websocket}))
    assert (media_route(bridge) is not None) == (websocket == "picows")
    result = await run_call(signed_call(bridge, seconds=2.0))
    assert result.violations == [] and result.ended_by == "caller"
    assert result.received_ms > 500, "the AI's audio (its greeting) reached the caller"
    assert result.marks_echoed, "marks went out and were echoed"
    wait_until(lambda: live_calls(bridge) == 0, what="the call end")
    assert leases(bridge) == 0
    wait_until(lambda: emulator_stats(emulator)["sessions_active"] == 0, what="the AI session to close")


async def test_picows_carries_the_stream_and_lets_it_go(bridge: ServerThread) -> None:
    route = media_route(bridge)
    assert route is not None
    ws, _, _ = await open_stream(bridge)
    try:
        wait_until(lambda: len(route) == 1, what="the stream on picows")
        wait_until(lambda: live_calls(bridge) == 1, what="the call to start")
    finally:
        await ws.close()
    wait_until(lambda: len(route) == 0, what="the stream's task to end")
    wait_until(lambda: live_calls(bridge) == 0, what="the call end")
    assert leases(bridge) == 0


async def test_unknown_path_is_404_and_a_bad_signature_403(bridge: ServerThread) -> None:
    with pytest.raises(InvalidStatus) as info:
        await connect(bridge.ws_url + "/elsewhere", additional_headers=upgrade_signature(), proxy=None)
    assert info.value.response.status_code == 404
    with pytest.raises(InvalidStatus) as info:
        await connect(bridge.ws_url + "/media-stream", additional_headers={"X-Twilio-Signature": "AAAA"}, proxy=None)
    assert info.value.response.status_code == 403
    with pytest.raises(InvalidStatus) as info:
        await connect(bridge.ws_url + "/media-stream", proxy=None)
    assert info.value.response.status_code == 403
    metrics = httpx.get(bridge.http_url + "/metrics", timeout=5).text
    assert 'bridge_signature_failures_total{path="/media-stream"} 2.0' in metrics


async def test_a_message_split_over_frames_counts_and_garbage_is_only_counted(bridge: ServerThread) -> None:
    """RFC 6455 lets a peer fragment a message: a fragmented ``stop`` still ends the call. A binary frame and a
    fragmented non-JSON text are bad messages: counted, the call unaffected."""
    ws, call_sid, stream_sid = await open_stream(bridge)  # no media sent: the call lives for the silence timeout
    wait_until(lambda: live_calls(bridge) == 1, what="the call to start")
    before = twilio_errors(bridge)
    await ws.send(b"\xff\xfe not json")
    await ws.send(["{not ", "json"])
    wait_until(lambda: twilio_errors(bridge) == before + 2, what="both bad messages counted")
    assert live_calls(bridge) == 1, "the call is still up"
    stop = tw.Stop(stream_sid, call_sid, new_sid("AC"), sequence_number=99).to_json()
    await ws.send([stop[:10], stop[10:25], stop[25:]])
    await until_closed(ws)
    assert ws.close_code == 1000
    wait_until(lambda: live_calls(bridge) == 0, what="the call end")
    assert leases(bridge) == 0


async def test_streams_still_open_when_the_server_stops_are_hung_up_and_released(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread]
) -> None:
    """Without a drain (ServerThread.stop is not SIGTERM), uvicorn's shutdown closes open streams with 1012 (the
    handoff's protocols are among its connections) and the calls release the AI session."""
    bridge = start_bridge(bridge_settings(emulator))
    ws, _, _ = await open_stream(bridge)
    wait_until(lambda: live_calls(bridge) == 1, what="the call to start")
    stopping = threading.Thread(target=bridge.stop)
    stopping.start()
    await until_closed(ws)
    assert ws.close_code == 1012
    await asyncio.to_thread(stopping.join, 15)
    assert not stopping.is_alive(), "the server stopped"
    wait_until(lambda: emulator_stats(emulator)["sessions_active"] == 0, what="the AI session to close")


async def test_apps_that_route_no_websockets_get_uvicorns_protocol(emulator: ServerThread) -> None:
    """The emulator (a plain Starlette app) keeps uvicorn's websockets-sansio: the handoff picks per app."""
    config = emulator.server.config
    protocol = WebSocketHandoff(config=config, server_state=emulator.server.server_state, app_state={})
    assert type(protocol).__name__ == "WebSocketsSansIOProtocol"


async def test_a_close_without_a_code_is_answered_with_1000(bridge: ServerThread) -> None:
    """RFC 6455: 1005 means "no code" and is never sent; an empty close frame is echoed as 1000 (picows' default
    would put 0 on the wire, which a strict peer rejects as a protocol error)."""
    ws, _, _ = await open_stream(bridge)
    wait_until(lambda: live_calls(bridge) == 1, what="the call to start")
    async with ws.send_context():
        ws.protocol.send_close()  # a close frame with no status code
    await asyncio.wait_for(ws.wait_closed(), 10)
    assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1000
    wait_until(lambda: live_calls(bridge) == 0, what="the call end")
    assert leases(bridge) == 0


async def test_a_message_over_the_size_limit_across_frames_ends_the_stream_with_1009(bridge: ServerThread) -> None:
    """picows bounds each frame; the whole of a fragmented message is bounded too (1 MiB), or a peer could grow
    our memory without end one frame at a time."""
    ws, _, _ = await open_stream(bridge)
    wait_until(lambda: live_calls(bridge) == 1, what="the call to start")
    chunk = "x" * 400_000
    with contextlib.suppress(ConnectionClosed):
        await ws.send([chunk, chunk, chunk, chunk])  # 1.6 MB in four frames
    await until_closed(ws)
    assert ws.close_code == 1009
    wait_until(lambda: live_calls(bridge) == 0, what="the call end")
    assert leases(bridge) == 0
