"""Warm start: what the webhook prepares for the stream (a token; optionally an open Savants socket)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.caller import run_call
from tests.support import bridge_settings, call_form, emulator_stats, post_voice, signed_call, wait_until

VOICE = (np.sin(2 * np.pi * 500 * np.arange(8000 * 2) / 8000) * 3000).astype(np.int16)


def test_warm_token_is_fetched_at_the_webhook(emulator: ServerThread, bridge: ServerThread) -> None:
    post_voice(bridge, call_form())
    assert emulator_stats(emulator)["tokens_issued"] == 1
    assert emulator_stats(emulator)["sessions_opened"] == 0


async def test_cold_start_fetches_the_token_at_stream_start(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread]
) -> None:
    bridge = start_bridge(bridge_settings(emulator, **{"savants.warm_token": False}))
    config = signed_call(bridge, audio_in=VOICE, seconds=2.5)
    assert emulator_stats(emulator)["tokens_issued"] == 0
    result = await run_call(config)
    assert result.heard_s > 1.0
    assert emulator_stats(emulator)["tokens_issued"] == 1


async def test_preconnect_opens_the_socket_at_the_webhook_and_the_stream_uses_it(
    start_emulator: Callable[..., ServerThread], start_bridge: Callable[..., ServerThread]
) -> None:
    emulator = start_emulator(voice="tone")  # speaks from the first moment: that audio waits for the stream
    bridge = start_bridge(bridge_settings(emulator, **{"savants.preconnect": True}))
    config = signed_call(bridge, seconds=1.5)
    assert emulator_stats(emulator)["sessions_active"] == 1
    result = await run_call(config)
    # The AI's first words waited in the socket: they reach the caller without any set-up round trip
    # (bench/call_setup.py measures it); the bound here only rules out a cold start.
    assert result.first_audio_s is not None and result.first_audio_s < 1.0
    stats = emulator_stats(emulator)
    assert (stats["sessions_opened"], stats["tokens_issued"], stats["violations"]) == (1, 1, [])


def test_preconnected_socket_is_closed_when_no_stream_claims_it(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread]
) -> None:
    # A TTL with room for the webhook and the stats request after it on a loaded runner.
    settings = bridge_settings(emulator, **{"savants.preconnect": True, "accounting.reservation_ttl_s": 2.0})
    bridge = start_bridge(settings)
    post_voice(bridge, call_form())
    assert emulator_stats(emulator)["sessions_active"] == 1
    wait_until(lambda: emulator_stats(emulator)["sessions_active"] == 0, 6.0, "the unclaimed socket to close")
