"""Secrets never leak: API key, auth token, JWTs and keypad digits appear in no log line, error, /status or
metric."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
from collections.abc import Callable

import httpx
import numpy as np
import orjson
import pytest

from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.caller import run_call
from tests.support import AUTH_TOKEN, BridgeProcess, bridge_settings, call_form, post_voice, signed_call

API_KEY = "sk_live_do_not_log_me_0123456789"
JWT = re.compile(r"eyJ[\w-]{10,}")  # a JWT's base64 JSON header: not even a truncated one may show
VOICE = (np.sin(2 * np.pi * 500 * np.arange(8000) / 8000) * 3000).astype(np.int16)


def everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)


async def test_a_call_leaks_no_secret(
    start_emulator: Callable[..., ServerThread],
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    emulator = start_emulator(api_key=API_KEY)
    bridge = start_bridge(bridge_settings(emulator, **{"savants.api_key": API_KEY}))
    with caplog.at_level(logging.DEBUG):
        result = await run_call(signed_call(bridge, audio_in=VOICE, seconds=1.5))
        surfaces = [
            everything_logged(caplog),
            httpx.get(bridge.http_url + "/status").text,
            httpx.get(bridge.http_url + "/metrics").text,
        ]
    assert result.heard_s > 0.5
    for text in surfaces:
        assert API_KEY not in text and AUTH_TOKEN not in text
        assert not JWT.search(text)
        assert "BINARY" not in text  # nor a frame dump: that would be call audio


def test_a_refused_token_request_leaks_no_secret(
    start_emulator: Callable[..., ServerThread],
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    emulator = start_emulator(api_key="the-right-key")
    bridge = start_bridge(bridge_settings(emulator, **{"savants.api_key": API_KEY}))
    with caplog.at_level(logging.DEBUG):
        answer = post_voice(bridge, call_form())
    assert "not available" in answer.text
    logged = everything_logged(caplog)
    assert "AUTHENTICATION_FAILED" in logged  # the cause is there, one clear line
    assert API_KEY not in logged and AUTH_TOKEN not in logged


@pytest.mark.parametrize("log_digits", [False, True])
async def test_keypad_digits_reach_the_log_of_a_real_bridge_only_when_asked(
    emulator: ServerThread, log_digits: bool
) -> None:
    """Callers type PINs: by default the log says how many keys, never which (``*`` and ``#`` show nowhere else)."""
    env = {"BRIDGE__TWILIO__LOG_DIGITS": "true"} if log_digits else {}
    bridge = BridgeProcess(emulator, env)
    try:
        result = await run_call(signed_call(bridge, seconds=1.5, dtmf=[(0.2, "*"), (0.4, "#"), (0.6, "*")]))
        bridge.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(bridge.finish, 10.0) == 0
    finally:
        bridge.kill()
    ended = next(line for line in bridge.lines if line["msg"] == "call ended")
    assert ended["call_sid"] == result.call_sid and ended["dtmf_digits"] == 3 and "dtmf" not in ended
    pressed = [line["msg"] for line in bridge.lines if str(line["msg"]).startswith("dtmf")]
    logged = "\n".join(orjson.dumps(line).decode() for line in bridge.lines)
    if log_digits:
        assert pressed == [
            "dtmf digit * (1 in this call)",
            "dtmf digit # (2 in this call)",
            "dtmf digit * (3 in this call)",
        ]
    else:
        assert pressed == [f"dtmf key pressed ({n} in this call)" for n in (1, 2, 3)]
        assert "*" not in logged and "#" not in logged
