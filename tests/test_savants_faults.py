"""Failures found by a fault-injection pass on the Savants side (helper-44), each on real sockets: a scriptable fake
Savants (token endpoint and /voice-stream, Starlette under uvicorn on 127.0.0.1) where the emulator cannot make
the fault, the bridge in-process, a simulated Twilio caller; what the caller hears, the log lines, /readyz, and
nothing held after."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import httpx
import numpy as np
import pytest
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect

from telephony_bridge.savants.health import TRIP_AFTER
from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.caller import CallConfig, CallResult, new_sid, run_call
from telephony_bridge.twilio import protocol as tw
from tests.fake_savants import FakeSavants, calls_up, echo, released, token_or_400
from tests.support import (
    bridge_settings,
    call_form,
    metric_values,
    post_voice,
    signed_call,
    stream_ended,
    stream_parameters,
    upgrade_signature,
    wait_until,
)

VOICE = (np.sin(2 * np.pi * 440 * np.arange(8000 * 6) / 8000) * 3000).astype(np.int16)


def readyz(bridge: ServerThread) -> tuple[int, str | None]:
    answer = httpx.get(bridge.http_url + "/readyz", timeout=5)
    return answer.status_code, answer.json().get("reason")


async def three_calls(bridge: ServerThread) -> list[CallResult]:
    """``TRIP_AFTER`` calls at once, each of whose sessions fails to open: each hears the apology, no dead air."""
    calls = (run_call(signed_call(bridge, audio_in=VOICE, seconds=4)) for _ in range(TRIP_AFTER))
    results = await asyncio.gather(*calls)
    for result in results:
        assert result.ended_by == "bridge" and result.duration_s < 3
        assert [child.tag for child in stream_ended(bridge, result.call_sid)] == ["Say", "Hangup"]  # the apology
    return results


def endpoints_up(bridge: ServerThread) -> dict[str, float]:
    return metric_values(bridge, "bridge_savants_endpoint_up", "endpoint")


async def test_readyz_stays_not_ready_while_the_token_endpoint_answers_200_without_a_token(
    start_fake: Callable[..., FakeSavants], start_bridge: Callable[..., ServerThread]
) -> None:
    """A token endpoint that answers 200 with no JWT (a wrong base URL reaching a web server that answers any POST,
    a proxy's error page) fails every token request (BAD_RESPONSE), and /readyz says so. But its probe, an empty
    body that Savants refuses with 400, took any answer below 500 as "up": the 200 page made the replica ready
    again a probe interval later ("Savants token endpoint answers again"), and the load balancer sent it calls
    that could only be answered "unavailable", flapping for as long as the misconfiguration lasted."""
    fake = start_fake(token=lambda body: PlainTextResponse("<html>Welcome</html>", status_code=200))
    bridge = start_bridge(bridge_settings(fake.server, **{"savants.probe_interval_s": 1}))
    webhook = post_voice(bridge, call_form())
    assert "<Connect" not in webhook.text  # "unavailable": no token could be had
    assert readyz(bridge) == (503, "token endpoint failing")
    assert endpoints_up(bridge) == {"token": 0.0, "voice_stream": 1.0}
    probes_due = time.monotonic() + 3.0  # three probe intervals
    while time.monotonic() < probes_due:
        assert readyz(bridge) == (503, "token endpoint failing")
        await asyncio.sleep(0.1)


async def test_readyz_comes_back_once_the_token_endpoint_answers_again(
    start_fake: Callable[..., FakeSavants], start_bridge: Callable[..., ServerThread]
) -> None:
    """The other side of the test above (it passed before the fix, and must still): an outage (503) makes the
    replica not ready, and the probe finds the recovery without any call."""
    down = True

    def answer(body: dict[str, object]) -> Response:
        if down:
            return JSONResponse({"error": {"code": "SERVICE_UNAVAILABLE", "message": "down"}}, status_code=503)
        return token_or_400(body)

    fake = start_fake(token=answer)
    bridge = start_bridge(bridge_settings(fake.server, **{"savants.probe_interval_s": 1}))
    post_voice(bridge, call_form())
    assert readyz(bridge) == (503, "token endpoint failing")
    down = False
    await asyncio.to_thread(wait_until, lambda: readyz(bridge) == (200, None), 4.0, "ready again")


async def test_readyz_is_not_ready_while_the_voice_stream_refuses_upgrades_and_a_probe_finds_it_back(
    start_fake: Callable[..., FakeSavants], start_bridge: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture
) -> None:
    """Token requests work but the voice stream refuses every upgrade (503: a Savants gateway without backends).
    Every call could only apologise, yet /readyz stayed 200, so the load balancer kept sending this replica
    calls. Now three failed sessions in a row (``TRIP_AFTER``) make it 503 "voice stream failing", with one ERROR
    line; while it fails, a probe (an upgrade closed at once, before any token) runs every
    ``savants.probe_interval_s`` and spends no token, and the first one that gets through makes the replica
    ready again, without a call."""
    down = True
    fake = start_fake(upgrade=lambda: PlainTextResponse("no backend", status_code=503) if down else None)
    settings = {"savants.probe_interval_s": 1, "savants.reconnect_deadline_s": 0}
    bridge = start_bridge(bridge_settings(fake.server, **settings))
    assert readyz(bridge) == (200, None)
    with caplog.at_level(logging.INFO):
        results = await three_calls(bridge)
    assert readyz(bridge) == (503, "voice stream failing")
    assert endpoints_up(bridge) == {"token": 1.0, "voice_stream": 0.0}
    savants = httpx.get(bridge.http_url + "/status", timeout=5).json()["savants"]
    assert (savants["token_endpoint"]["up"], savants["voice_stream"]["up"]) == (True, False)
    assert savants["voice_stream"]["last_error"].startswith("HTTP_503")
    failing = [r for r in caplog.records if "voice stream failing" in r.getMessage()]
    assert [r.levelno for r in failing] == [logging.ERROR] and "HTTP_503" in failing[0].getMessage()
    await asyncio.to_thread(released, bridge, fake)
    tokens, refused = fake.token_requests, fake.upgrades_refused
    while fake.upgrades_refused < refused + 2:  # two probes, refused too: still not ready
        assert readyz(bridge) == (503, "voice stream failing")
        await asyncio.sleep(0.1)
    down = False
    await asyncio.to_thread(wait_until, lambda: readyz(bridge) == (200, None), 4.0, "ready again")
    assert fake.token_requests == tokens == len(results)  # the probes spent no token
    await asyncio.to_thread(
        wait_until, lambda: fake.closed_before_token >= 1 and fake.sessions_active == 0, 5.0, "the probe's close"
    )
    assert any(r.getMessage() == "Savants voice stream answers again" for r in caplog.records)
    assert endpoints_up(bridge) == {"token": 1.0, "voice_stream": 1.0}
    savants = httpx.get(bridge.http_url + "/status", timeout=5).json()["savants"]
    assert savants["voice_stream"] == {"up": True, "last_error": None, "probe_interval_s": 1.0}


async def confirm_never(fake: FakeSavants, ws: WebSocket) -> None:
    while (await ws.receive())["type"] != "websocket.disconnect":
        pass  # reads on, never confirms


def refuses_in_band(code: str) -> Callable[[FakeSavants, WebSocket], Awaitable[None]]:
    async def session(fake: FakeSavants, ws: WebSocket) -> None:
        await ws.send_json({"type": "error", "error": {"code": code, "message": "refused"}})
        await ws.close(4401 if code == "TOKEN_EXPIRED" else 1008)

    return session


def closes_with(code: int) -> Callable[[FakeSavants, WebSocket], Awaitable[None]]:
    async def session(fake: FakeSavants, ws: WebSocket) -> None:
        await ws.close(code)

    return session


@pytest.mark.parametrize(
    ("session", "ready"),
    [
        (refuses_in_band("TOKEN_EXPIRED"), (200, None)),  # Savants answered and judged the token
        (refuses_in_band("INVALID_TOKEN"), (200, None)),
        (closes_with(4408), (200, None)),  # an application's close: Savants' own auth timeout
        (closes_with(1011), (503, "voice stream failing")),  # a server-side failure before the confirmation
        (closes_with(1013), (503, "voice stream failing")),  # try again later: overloaded
        (confirm_never, (503, "voice stream failing")),  # upgraded, then silent past connect_timeout_s
    ],
    ids=["token-expired", "invalid-token", "close-4408", "close-1011", "close-1013", "no-confirmation"],
)
async def test_which_failed_sessions_make_the_replica_not_ready(
    start_fake: Callable[..., FakeSavants],
    start_bridge: Callable[..., ServerThread],
    session: Callable[[FakeSavants, WebSocket], Awaitable[None]],
    ready: tuple[int, str | None],
) -> None:
    """Sessions refused in-band are about their token or device, and the voice stream works: ready. Closes for a
    server-side reason, or no confirmation within ``savants.connect_timeout_s``: the voice stream fails (three in
    a row). Either way each caller hears the apology and nothing stays held."""
    fake = start_fake(session=session)
    settings: dict[str, float] = {"savants.reconnect_deadline_s": 0}
    if session is confirm_never:
        settings["savants.connect_timeout_s"] = 1  # else the default, 5 s: a loaded machine never passes it
    bridge = start_bridge(bridge_settings(fake.server, **settings))
    await three_calls(bridge)
    assert readyz(bridge) == ready
    await asyncio.to_thread(released, bridge, fake)


async def test_a_preconnected_session_savants_closed_before_the_stream_started_is_not_taken_for_a_goodbye(
    start_fake: Callable[..., FakeSavants],
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With ``savants.preconnect`` the session opened at the webhook waits for the stream; Savants may close it
    meanwhile (an idle session, a restart). Closed with 1000, the stream's ``start`` took that dead session,
    logged "AI session connected", read its close as the AI's goodbye and hung up at once: the caller heard
    nothing, no apology, and the call counted ``completed`` (reason "AI closed the session") with no line above
    INFO. A session that ended before the call began said goodbye to nobody: the call needs a live one."""

    async def first_closes_while_warm(fake: FakeSavants, ws: WebSocket) -> None:
        if fake.sessions_opened > 1:
            await echo(fake, ws)
            return
        await ws.send_json({"type": "savant_voice_connected", "sessionId": "sess_warm"})
        await asyncio.sleep(0.2)
        await ws.close(1000)

    fake = start_fake(session=first_closes_while_warm)
    bridge = start_bridge(bridge_settings(fake.server, **{"savants.preconnect": True, "barge_in.enabled": False}))
    form = call_form()
    params = stream_parameters(post_voice(bridge, form))
    await asyncio.to_thread(wait_until, lambda: fake.sessions_opened == 1 and fake.sessions_active == 0, 5.0, "close")
    config = CallConfig(
        url=bridge.ws_url + "/media-stream",
        call_sid=form["CallSid"],
        custom_parameters=params,
        headers=upgrade_signature(),
        audio_in=VOICE,
        seconds=3.0,
    )
    with caplog.at_level(logging.INFO):
        result = await run_call(config)
        await asyncio.to_thread(
            wait_until, lambda: any(r.getMessage() == "call ended" for r in caplog.records), 5.0, "call ended"
        )
    assert result.ended_by == "caller", f"hung up on the caller after {result.duration_s:.2f} s"
    assert result.heard_s > 1.5  # the AI (an echo) was heard
    [ended] = [r for r in caplog.records if r.getMessage() == "call ended"]
    assert getattr(ended, "reason", None) == "caller hung up"
    assert [child.tag for child in stream_ended(bridge, result.call_sid)] == ["Hangup"]
    released(bridge, fake)


async def test_a_dtmf_message_that_is_not_json_never_puts_its_digit_in_a_log_line(
    start_fake: Callable[..., FakeSavants],
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A frame that is not JSON is logged with its first 40 characters ("bad message from twilio: expected a
    JSON object, got '...'"). A sender that writes the ``dtmf`` object first (Twilio-protocol senders other
    than Twilio, README) and breaks the JSON after it put the caller's key press in that line, although digits
    reach logs only with ``twilio.log_digits`` (off here): a PIN typed through such a sender ends up in the
    logs key by key."""
    fake = start_fake()
    bridge = start_bridge(bridge_settings(fake.server))
    form = call_form()
    params = stream_parameters(post_voice(bridge, form))
    sid = new_sid("MZ")
    with caplog.at_level(logging.DEBUG):
        async with connect(bridge.ws_url + "/media-stream", additional_headers=upgrade_signature(), proxy=None) as ws:
            await ws.send(tw.Connected().to_json())
            await ws.send(tw.Start(sid, form["CallSid"], form["AccountSid"], custom_parameters=params).to_json())
            await asyncio.to_thread(wait_until, lambda: calls_up(bridge) == 1, 5.0, "the call")
            await ws.send('{"event":"dtmf","dtmf":{"digit":"7"},"streamSid":"' + sid + '",}')  # a trailing comma
            await ws.send(tw.Stop(sid, form["CallSid"], form["AccountSid"], 4).to_json())
        await asyncio.to_thread(released, bridge, fake)
    bad = [r for r in caplog.records if "bad message from twilio" in r.getMessage()]
    assert len(bad) == 1 and getattr(bad[0], "call_sid", None) == form["CallSid"]  # still one line naming the call
    leaks = [r.getMessage() for r in caplog.records if '"7"' in r.getMessage() or "'7'" in r.getMessage()]
    assert leaks == []


async def test_a_bare_401_from_the_token_endpoint_takes_the_device_out_of_the_pool(
    start_fake: Callable[..., FakeSavants], start_bridge: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture
) -> None:
    """A 401 without Savants' error envelope (a gateway in front of it refusing the API key) was recorded as
    ``HTTP_401``: no device left the pool, /readyz stayed 200, and every call asked again and heard "unavailable".
    It is the API key refused, as ``AUTHENTICATION_FAILED`` is: each device is suspended, once, and /readyz says
    so."""
    fake = start_fake(
        token=lambda body: PlainTextResponse("Unauthorized", status_code=401) if body else token_or_400(body)
    )
    bridge = start_bridge(bridge_settings(fake.server))
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert "<Connect" not in post_voice(bridge, call_form()).text
    assert readyz(bridge) == (503, "device pool full")
    assert fake.token_requests == 2  # one per device (device-a, device-b), then none: both are out of the pool
    suspended = [r for r in caplog.records if r.levelno == logging.ERROR and "leaves the pool" in r.getMessage()]
    assert len(suspended) == 2, [r.getMessage() for r in suspended]
