"""Reconnect faults the emulator cannot make, on real sockets against the scripted fake Savants
(tests/fake_savants.py): a token answer without a JWT, devices refused one after another at the voice stream
when the call's first session opens, and a call that ends while a reconnect is under way. What the caller
hears, the call-ended line, /metrics, and nothing held after."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect

from telephony_bridge.accounting.memory import MemoryAccounting
from telephony_bridge.serving import ServerThread
from telephony_bridge.settings import Settings
from telephony_bridge.tools.caller import new_sid, run_call
from telephony_bridge.twilio import protocol as tw
from tests.fake_savants import FakeSavants, Session, TokenAnswer, echo, released, token_or_400
from tests.support import (
    bridge_settings,
    call_form,
    post_voice,
    signed_call,
    stream_parameters,
    upgrade_signature,
    wait_until,
)

RATE_HZ = 8000
AUDIBLE = 200  # as Outbound counts audible AI audio
VOICE = (np.sin(2 * np.pi * 440 * np.arange(RATE_HZ * 10) / RATE_HZ) * 3000).astype(np.int16)
DROP_AFTER_S = 1.0
NO_JWT = {"expiresIn": 60}  # a 200 whose body has no 'token': BAD_RESPONSE


def settings(fake: FakeSavants, **overrides: object) -> Settings:
    return bridge_settings(fake.server, **{"barge_in.enabled": False, "savants.connect_timeout_s": 1.0, **overrides})


def without_a_jwt_to(*requests: int) -> TokenAnswer:
    """Savants' answer, but a 200 without a JWT to the real token requests numbered ``requests`` (from 1)."""
    seen = 0

    def answer(body: dict[str, object]) -> Response:
        nonlocal seen
        seen += bool(body)
        return JSONResponse(NO_JWT) if body and seen in requests else token_or_400(body)

    return answer


def without_a_jwt_for(seconds: float) -> TokenAnswer:
    """Savants' answer, but a 200 without a JWT for ``seconds`` after the first real token request."""
    first: float | None = None

    def answer(body: dict[str, object]) -> Response:
        nonlocal first
        if not body:
            return token_or_400(body)
        first = time.monotonic() if first is None else first
        return JSONResponse(NO_JWT) if time.monotonic() - first < seconds else token_or_400(body)

    return answer


async def drops_first(fake: FakeSavants, ws: WebSocket) -> None:
    """The first session echoes for ``DROP_AFTER_S``, then closes 1011 (a drop worth a reconnect); the rest echo."""
    if fake.sessions_opened > 1:
        await echo(fake, ws)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DROP_AFTER_S):
            await echo(fake, ws)
    await ws.close(1011)


def refusing_first(sessions: int) -> Session:
    """The first ``sessions`` are refused as a deactivated device's (spec §6.4's error, before any
    confirmation); the rest echo."""

    async def session(fake: FakeSavants, ws: WebSocket) -> None:
        if fake.sessions_opened > sessions:
            await echo(fake, ws)
            return
        error = {"code": "DEVICE_INACTIVE", "message": "Device has been deactivated"}
        await ws.send_json({"type": "error", "error": error})
        await ws.close(4403)

    return session


def call_ended(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    wait_until(lambda: any(r.getMessage() == "call ended" for r in caplog.records), what="the call ended line")
    [record] = [r for r in caplog.records if r.getMessage() == "call ended"]
    return record


def reconnect_figures(ended: logging.LogRecord) -> dict[str, object]:
    return {k: getattr(ended, k) for k in ("outcome", "ai_drops", "ai_reconnect", "ai_reconnect_attempts")}


def resumed(attempts: object) -> dict[str, object]:
    """The figures of a call completed after one drop, which a reconnect of ``attempts`` resumed."""
    return {"outcome": "completed", "ai_drops": 1, "ai_reconnect": "resumed", "ai_reconnect_attempts": attempts}


async def served_call(bridge: ServerThread, caplog: pytest.LogCaptureFixture, seconds: float) -> logging.LogRecord:
    """The call-ended line of a signed call of ``seconds`` that the caller hung up, having heard the AI (an echo of
    the caller's tone) in its last two seconds."""
    with caplog.at_level(logging.INFO):
        result = await run_call(signed_call(bridge, audio_in=VOICE, seconds=seconds))
        ended = call_ended(caplog)
    assert result.ended_by == "caller" and result.violations == []
    assert np.mean(np.abs(result.heard.astype(np.int32)[-2 * RATE_HZ :]) >= AUDIBLE) > 0.5
    return ended


def metric_lines(bridge: ServerThread, prefix: str) -> list[str]:
    text = httpx.get(bridge.http_url + "/metrics", timeout=5).text
    return [line for line in text.splitlines() if line.startswith(prefix)]


async def test_a_token_answer_without_a_jwt_during_a_reconnect_is_retried_and_the_call_carries_on(
    start_fake: Callable[..., FakeSavants],
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The AI drops; the reconnect's token request is answered 200 without a JWT (a proxy's page), once. Like a
    5xx, it is asked again within the reconnect's deadline, and the caller hears the AI again. (This passed
    before retry.py's table took BAD_RESPONSE for RETRY: the token requests of one attempt already retried it.
    The next test is the case the table decides.)"""
    fake = start_fake(token=without_a_jwt_to(2), session=drops_first)  # 1: the webhook's warm token
    bridge = start_bridge(settings(fake, **{"savants.max_reconnects_per_minute": 1}))
    ended = await served_call(bridge, caplog, 6.0)
    assert reconnect_figures(ended) == resumed(1)
    assert (fake.token_requests, fake.sessions_opened) == (3, 2)  # warm, no JWT, the reconnect's; two sessions
    assert metric_lines(bridge, "bridge_token_requests_total") == [
        'bridge_token_requests_total{result="OK"} 2.0',
        'bridge_token_requests_total{result="BAD_RESPONSE"} 1.0',
    ]
    assert metric_lines(bridge, "bridge_ai_reconnects_total") == ['bridge_ai_reconnects_total{result="resumed"} 1.0']
    await asyncio.to_thread(released, bridge, fake)


async def test_a_first_session_whose_token_answers_lack_a_jwt_past_the_start_deadline_is_retried_as_a_drop(
    start_fake: Callable[..., FakeSavants],
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cold start (no warm token) whose token endpoint answers 200 without a JWT for 3 s: the start's own
    retries give up after ``savants.token_deadline_s`` (2.5 s), and the first session is retried as a drop, as
    it is after 2.5 s of 503s. retry.py's table said GIVE_UP for BAD_RESPONSE, so this call ended with the
    fallback at once (``not_retried``) although the webhook retries the very same answer."""
    fake = start_fake(token=without_a_jwt_for(3.0))
    bridge = start_bridge(settings(fake, **{"savants.warm_token": False}))
    ended = await served_call(bridge, caplog, 9.0)
    attempts = ended.ai_reconnect_attempts  # type: ignore[attr-defined]  # as many as the outage took
    assert reconnect_figures(ended) == resumed(attempts) and attempts >= 1
    opened = [r for r in caplog.records if r.getMessage().startswith("AI session could not be opened")]
    assert [(r.levelno, "without a JWT" in r.getMessage()) for r in opened] == [(logging.WARNING, True)]
    assert fake.sessions_opened == 1
    await asyncio.to_thread(released, bridge, fake)


async def test_two_devices_refused_in_a_row_at_the_start_move_the_call_to_a_third(
    start_fake: Callable[..., FakeSavants],
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The voice stream refuses the call's first session (DEVICE_INACTIVE), and the first attempt's too, on the
    device the call moved to. Each refused device leaves the pool (one ERROR line each) and the next attempt
    moves the call again: the third device serves it. Before b74de21 only the first refusal moved the call; the
    second ended it with the fallback (``failed``)."""
    fake = start_fake(session=refusing_first(2))
    devices = ["device-a", "device-b", "device-c"]
    bridge = start_bridge(settings(fake, **{"savants.device_ids": devices}))
    ended = await served_call(bridge, caplog, 5.0)
    assert reconnect_figures(ended) == resumed(2)
    suspended = [r for r in caplog.records if r.levelno == logging.ERROR and "leaves the pool" in r.getMessage()]
    refused = [r.args[0] for r in suspended if isinstance(r.args, tuple)]
    [opened] = [r for r in caplog.records if r.getMessage().startswith("AI session opened after")]
    serving = opened.to_device  # type: ignore[attr-defined]
    assert len(refused) == 2 and sorted([*refused, serving]) == devices, [r.getMessage() for r in suspended]
    assert (opened.device_id, ended.device_id) == (serving, serving)  # the call's lines name the device it is on
    accounting = httpx.get(bridge.http_url + "/status", timeout=5).json()["accounting"]["devices"]
    assert [accounting[d]["exhausted_for_s"] > 60 for d in devices] == [d in refused for d in devices]
    assert (fake.token_requests, fake.sessions_opened) == (3, 3)  # one token per session
    await asyncio.to_thread(released, bridge, fake)


class SlowToSuspend(MemoryAccounting):
    """Memory accounting whose suspension of a device never finishes (a Redis slow to answer): ``begun`` is set
    once one is under way."""

    def __init__(self, device_ids: list[str]) -> None:
        super().__init__(device_ids)
        self.begun = threading.Event()

    async def exhaust(self, device_id: str, for_s: float) -> None:
        self.begun.set()
        await asyncio.get_running_loop().create_future()  # until the call's end cancels it


async def test_a_call_that_ends_while_a_refused_device_is_suspended_counts_its_reconnect_abandoned_once(
    start_fake: Callable[..., FakeSavants],
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first session is refused (DEVICE_INACTIVE); while the refused device is being suspended (the
    reconnect's verdict, before any attempt) the caller hangs up. The drop is counted, and its reconnect
    ``abandoned``, once; it was counted nowhere (``ai_reconnect`` stayed ``none``), as a call ending while the
    dropped session closed was."""
    fake = start_fake(session=refusing_first(1))
    accounting = SlowToSuspend(["device-a", "device-b"])
    bridge = start_bridge(settings(fake), accounting=accounting)
    form = call_form()
    params = stream_parameters(post_voice(bridge, form))
    sid, call_sid, account_sid = new_sid("MZ"), form["CallSid"], form["AccountSid"]
    with caplog.at_level(logging.INFO):
        async with connect(bridge.ws_url + "/media-stream", additional_headers=upgrade_signature(), proxy=None) as ws:
            await ws.send(tw.Connected().to_json())
            await ws.send(tw.Start(sid, call_sid, account_sid, custom_parameters=params).to_json())
            await asyncio.to_thread(wait_until, accounting.begun.is_set, 5.0, "the refused device's suspension")
            await ws.send(tw.Stop(sid, call_sid, account_sid, 2).to_json())
        ended = await asyncio.to_thread(call_ended, caplog)
    assert {k: getattr(ended, k) for k in ("ai_drops", "ai_reconnect")} == {"ai_drops": 1, "ai_reconnect": "abandoned"}
    assert metric_lines(bridge, "bridge_ai_reconnects_total") == ['bridge_ai_reconnects_total{result="abandoned"} 1.0']
    assert any(r.getMessage().startswith("reconnect abandoned: the call ended") for r in caplog.records)
    await asyncio.to_thread(released, bridge, fake)
