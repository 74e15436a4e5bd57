"""Secrets never leak: API key, auth token and JWTs appear in no log line, error, /status or metric."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import httpx
import numpy as np
import pytest

from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.caller import run_call
from tests.support import AUTH_TOKEN, bridge_settings, call_form, post_voice, signed_call

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
