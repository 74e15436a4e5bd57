"""Reconnect faults the emulator cannot make, on real sockets against the scripted fake Savants
(tests/fake_savants.py): devices refused one after another at the voice stream when the call's first session
opens. What the caller hears, the call-ended line, and nothing held after."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from starlette.websockets import WebSocket

from telephony_bridge.serving import ServerThread
from telephony_bridge.settings import Settings
from telephony_bridge.tools.caller import run_call
from tests.fake_savants import FakeSavants, Session, echo, released
from tests.support import (
    bridge_settings,
    signed_call,
    wait_until,
)

RATE_HZ = 8000
AUDIBLE = 200  # as Outbound counts audible AI audio
VOICE = (np.sin(2 * np.pi * 440 * np.arange(RATE_HZ * 10) / RATE_HZ) * 3000).astype(np.int16)


def settings(fake: FakeSavants, **overrides: object) -> Settings:
    return bridge_settings(fake.server, **{"barge_in.enabled": False, "savants.connect_timeout_s": 1.0, **overrides})


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
    serving = opened.to_device  # type: ignore[attr-defined]  # (the call-ended line names the call's first device)
    assert len(refused) == 2 and sorted([*refused, serving]) == devices, [r.getMessage() for r in suspended]
    accounting = httpx.get(bridge.http_url + "/status", timeout=5).json()["accounting"]["devices"]
    assert [accounting[d]["exhausted_for_s"] > 60 for d in devices] == [d in refused for d in devices]
    assert (fake.token_requests, fake.sessions_opened) == (3, 3)  # one token per session
    await asyncio.to_thread(released, bridge, fake)
