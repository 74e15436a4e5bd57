"""On real calls: playback holes counted by cause and the adaptive prebuffer's steps in the call-ended line and
/metrics (the pacing itself is tested on a fake clock in test_outbound.py); joined upstream messages."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httpx
import numpy as np
import pytest

from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.caller import run_call
from tests.support import bridge_settings, emulator_stats, metric_values, signed_call, wait_until

pytestmark = pytest.mark.timeout(30)


async def test_call_ended_line_and_metrics_count_underruns_by_cause(
    bridge: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        result = await run_call(signed_call(bridge, seconds=1.5))
        await asyncio.to_thread(
            wait_until, lambda: any(r.getMessage() == "call ended" for r in caplog.records), 5.0, "call ended"
        )
    assert result.violations == []
    [ended] = [r for r in caplog.records if r.getMessage() == "call ended"]
    figures = {k: getattr(ended, k) for k in ("underruns_ai_late", "underruns_scheduling", "prebuffer_grows")}
    assert all(isinstance(v, int) and v >= 0 for v in figures.values()), figures
    assert ended.prebuffer_shrinks == 0  # type: ignore[attr-defined]  # a 1.5 s call is shorter than the calm
    metrics = httpx.get(bridge.http_url + "/metrics", timeout=5).text
    for cause in ("ai_late", "scheduling"):
        count = figures[f"underruns_{cause}"]
        assert f'bridge_playout_underruns_total{{cause="{cause}"}} {float(count)}' in metrics
    assert f'bridge_playout_prebuffer_changes_total{{direction="up"}} {float(figures["prebuffer_grows"])}' in metrics


async def test_forty_ms_upstream_messages_reach_the_ai_and_come_back(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread]
) -> None:
    bridge = start_bridge(bridge_settings(emulator, **{"audio.upstream_message_ms": 40}))
    said = (np.sin(np.arange(16000) * 2 * np.pi * 440 / 8000) * 8000).astype(np.int16)
    result = await run_call(signed_call(bridge, audio_in=said, seconds=2.5))
    assert result.violations == [] and result.heard_s > 1.0  # the echo of the tone, through joined messages
    stats = emulator_stats(emulator)
    assert stats["violations"] == []
    # Joined for real: the AI got 1,280-byte messages (a lone 640 only where the caller paused or at the end).
    [session] = [s for s in stats["sessions"] if s["frames_in"]]
    assert session["bytes_in"] / session["frames_in"] >= 1200, session


async def test_with_no_reconnect_buffer_the_ai_still_gets_all_the_callers_audio(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread]
) -> None:
    """``audio.reconnect_buffer_ms: 0`` (keep nothing while reconnecting) once left room for one 20 ms frame, so
    with 40 ms messages each first frame was dropped when its second came: the AI heard half the caller."""
    settings = bridge_settings(emulator, **{"audio.upstream_message_ms": 40, "audio.reconnect_buffer_ms": 0})
    bridge = start_bridge(settings)
    result = await run_call(signed_call(bridge, seconds=2.5))
    assert result.violations == []
    [session] = [s for s in emulator_stats(emulator)["sessions"] if s["frames_in"]]
    # 2.5 s of the caller at 16 kHz is 80,000 bytes; what the AI got before it connected is also in there.
    assert session["bytes_in"] >= 0.9 * 2.5 * 32000, session
    # None dropped for want of room, unless the caller's own beat stalled: its overdue frames then come as one
    # burst, more than a backlog of two frames holds. The bug dropped every other frame (~60 here).
    dropped = metric_values(bridge, "bridge_inbound_frames_dropped_total", "reason").get("overflow", 0.0)
    assert dropped == 0 or (result.beat_stalls_s and dropped < 20), (dropped, result.beat_stalls_s)
