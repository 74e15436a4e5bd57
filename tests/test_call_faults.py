"""Faults on either side: one clear line, the caller ends gracefully, nothing held, other calls untouched."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import wave
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.caller import new_sid, run_call
from telephony_bridge.twilio import protocol as tw
from tests.support import (
    bridge_settings,
    call_form,
    emulator_stats,
    leases,
    post_voice,
    signed_call,
    stream_ended,
    stream_parameters,
    upgrade_signature,
    wait_until,
)

DATA = Path(__file__).parent / "data"
VOICE = (np.sin(2 * np.pi * 440 * np.arange(8000 * 3) / 8000) * 3000).astype(np.int16)


def calls_up(bridge: ServerThread) -> int:
    return len(httpx.get(bridge.http_url + "/status", timeout=5).json()["calls"])


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("error", "SERVER_ERROR"), ("garbage", "PROTOCOL"), ("drop", "DROPPED")],
)
async def test_ai_failure_mid_call_ends_the_stream_and_the_caller_hears_the_apology(
    start_emulator: Callable[..., ServerThread],
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
    fault: str,
    reason: str,
) -> None:
    """With reconnects off (``savants.reconnect_deadline_s: 0``) every AI failure ends the call at once."""
    emulator = start_emulator(voice="echo", fault=fault, fault_after_s=0.5)
    bridge = start_bridge(bridge_settings(emulator, **{"savants.reconnect_deadline_s": 0}))
    with caplog.at_level(logging.INFO):
        result = await run_call(signed_call(bridge, audio_in=VOICE, seconds=5))
    assert result.ended_by == "bridge" and result.close_code == 1000 and result.duration_s < 3
    failures = [r for r in caplog.records if "the AI side failed" in r.getMessage()]
    assert len(failures) == 1 and reason in failures[0].getMessage()
    assert getattr(failures[0], "call_sid", None) == result.call_sid
    root = stream_ended(bridge, result.call_sid)
    assert [child.tag for child in root] == ["Say", "Hangup"]
    wait_until(lambda: calls_up(bridge) == 0 and leases(bridge) == 0, what="the call to be released")
    wait_until(lambda: emulator_stats(emulator)["sessions_active"] == 0, what="the Savants socket to close")
    metrics = httpx.get(bridge.http_url + "/metrics").text
    assert 'bridge_calls_total{ingress="twilio",outcome="ai_unavailable"} 1.0' in metrics


async def test_ai_closing_normally_hangs_up_without_apology(
    start_emulator: Callable[..., ServerThread], start_bridge: Callable[..., ServerThread]
) -> None:
    emulator = start_emulator(voice="echo")
    bridge = start_bridge(bridge_settings(emulator))
    result = await run_call(signed_call(bridge, seconds=1))
    assert result.ended_by == "caller"
    assert [child.tag for child in stream_ended(bridge, result.call_sid)] == ["Hangup"]


async def test_one_failing_call_leaves_the_other_calls_going(
    start_emulator: Callable[..., ServerThread], start_bridge: Callable[..., ServerThread]
) -> None:
    emulator = start_emulator(voice="echo", fault="drop", fault_after_s=0.5, fault_device_ids=frozenset({"device-a"}))
    bridge = start_bridge(bridge_settings(emulator, **{"savants.reconnect_deadline_s": 0}))  # the drop ends it
    first = signed_call(bridge, audio_in=VOICE, seconds=3)  # least loaded: device-a (faulty)
    second = signed_call(bridge, audio_in=VOICE, seconds=3)  # then device-b (healthy)
    failed, healthy = await asyncio.gather(run_call(first), run_call(second))
    assert failed.ended_by == "bridge"
    assert healthy.ended_by == "caller" and healthy.heard_s > 2.0 and healthy.violations == []


@contextlib.asynccontextmanager
async def raw_stream(bridge: ServerThread) -> AsyncIterator[tuple[ClientConnection, dict[str, str], str]]:
    """A stream opened by hand, as Twilio would after a signed webhook, for sending what Twilio never would.

    Yields the socket, the webhook's form and the stream SID; ``start`` is already sent.
    """
    form = call_form()
    params = stream_parameters(post_voice(bridge, form))
    stream_sid = new_sid("MZ")
    async with connect(bridge.ws_url + "/media-stream", additional_headers=upgrade_signature(), proxy=None) as ws:
        await ws.send(tw.Connected().to_json())
        await ws.send(tw.Start(stream_sid, form["CallSid"], form["AccountSid"], custom_parameters=params).to_json())
        yield ws, form, stream_sid


async def test_malformed_twilio_message_is_logged_once_and_the_call_continues(
    emulator: ServerThread, bridge: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    frame = base64.b64encode(bytes(160)).decode()
    with caplog.at_level(logging.WARNING):
        async with raw_stream(bridge) as (ws, form, stream_sid):
            await ws.send('{"event": "media", "streamSid": "' + stream_sid + '", "media": {"payload": "%%%"}}')
            for i in range(25):
                await ws.send(
                    orjson.dumps(
                        {
                            "event": "media",
                            "sequenceNumber": str(i + 3),
                            "streamSid": stream_sid,
                            "media": {
                                "track": "inbound",
                                "chunk": str(i + 1),
                                "timestamp": str(i * 20),
                                "payload": frame,
                            },
                        }
                    ).decode()
                )
                await asyncio.sleep(0.02)
            await ws.send(tw.Stop(stream_sid, form["CallSid"], new_sid("AC"), 30).to_json())
    bad = [r for r in caplog.records if "bad message from twilio" in r.getMessage()]
    assert len(bad) == 1 and "not valid base64" in bad[0].getMessage()
    assert getattr(bad[0], "call_sid", None) == form["CallSid"]
    wait_until(lambda: emulator_stats(emulator)["audio_bytes_in"] >= 20 * 640, what="caller audio at the AI")
    wait_until(lambda: calls_up(bridge) == 0, what="the call to end")


async def test_dtmf_is_logged_as_a_count_with_the_call_sid_never_the_digits_by_default(
    emulator: ServerThread, bridge: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        result = await run_call(signed_call(bridge, seconds=1.0, dtmf=[(0.3, "5"), (0.5, "#")]))
        await asyncio.to_thread(
            wait_until, lambda: any(r.getMessage() == "call ended" for r in caplog.records), 5.0, "call ended"
        )
    pressed = [r for r in caplog.records if r.getMessage().startswith("dtmf")]
    assert [r.getMessage() for r in pressed] == [f"dtmf key pressed ({n} in this call)" for n in (1, 2)]
    assert all(getattr(r, "call_sid", None) == result.call_sid for r in pressed)
    ended = next(r for r in caplog.records if r.getMessage() == "call ended")
    assert getattr(ended, "dtmf_digits", None) == 2 and not hasattr(ended, "dtmf")
    assert "bridge_dtmf_total 2.0" in httpx.get(bridge.http_url + "/metrics").text


async def test_dtmf_digits_are_logged_only_when_asked(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture
) -> None:
    bridge = start_bridge(bridge_settings(emulator, **{"twilio.log_digits": True}))
    with caplog.at_level(logging.INFO):
        await run_call(signed_call(bridge, seconds=1.0, dtmf=[(0.3, "5"), (0.5, "#")]))
    pressed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dtmf")]
    assert pressed == ["dtmf digit 5 (1 in this call)", "dtmf digit # (2 in this call)"]


async def test_dtmf_ignore_counts_without_a_line(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture
) -> None:
    settings = bridge_settings(emulator, **{"twilio.dtmf_action": "ignore", "twilio.log_digits": True})
    bridge = start_bridge(settings)
    with caplog.at_level(logging.DEBUG):
        await run_call(signed_call(bridge, seconds=1.0, dtmf=[(0.3, "5")]))
    assert not [r for r in caplog.records if r.getMessage().startswith("dtmf")]
    assert "bridge_dtmf_total 1.0" in httpx.get(bridge.http_url + "/metrics").text


async def test_the_ais_goodbye_is_heard_before_the_stream_closes(
    start_emulator: Callable[..., ServerThread], start_bridge: Callable[..., ServerThread]
) -> None:
    """A TTS-like AI sends its last 2.8 s faster than real time and hangs up at once (G8)."""
    goodbye = DATA / "speech_16k.wav"
    emulator = start_emulator(voice="file", wav_path=str(goodbye), burst=True, close_after_s=0.3)
    bridge = start_bridge(bridge_settings(emulator))
    result = await run_call(signed_call(bridge, seconds=10.0))
    assert result.ended_by == "bridge" and result.cut_off_ms == 0
    with wave.open(str(goodbye)) as wav:
        spoken = np.flatnonzero(np.abs(np.frombuffer(wav.readframes(wav.getnframes()), "<i2").astype(int)) > 200)
    heard = np.flatnonzero(np.abs(result.heard.astype(np.int32)) > 200)
    assert (heard[-1] - heard[0]) / 8000 > (spoken[-1] - spoken[0]) / 16000 - 0.05  # all of it
    assert [child.tag for child in stream_ended(bridge, result.call_sid)] == ["Hangup"]  # no apology


async def test_only_the_first_few_bad_messages_get_a_line_each(
    emulator: ServerThread, bridge: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        async with raw_stream(bridge) as (ws, form, stream_sid):
            for _ in range(10):
                await ws.send("{not json")
            await ws.send(tw.Stop(stream_sid, form["CallSid"], new_sid("AC"), 12).to_json())
        wait_until(lambda: calls_up(bridge) == 0, what="the call to end")
    bad = [r for r in caplog.records if "bad message from twilio" in r.getMessage()]
    assert len(bad) == 3
    assert 'bridge_protocol_errors_total{peer="twilio"} 10.0' in httpx.get(bridge.http_url + "/metrics").text


async def test_gaps_in_caller_audio_become_silence_and_late_frames_are_dropped(
    emulator: ServerThread, bridge: ServerThread
) -> None:
    """Twilio's media.timestamp places each frame: a missing stretch is filled, a late duplicate dropped."""
    payload = base64.b64encode(bytes([0xFF]) * 160).decode()

    def media(sequence: int, timestamp_ms: int) -> str:
        body = {"track": "inbound", "chunk": str(sequence), "timestamp": str(timestamp_ms), "payload": payload}
        message = {"event": "media", "sequenceNumber": str(sequence), "streamSid": sid, "media": body}
        return orjson.dumps(message).decode()

    async with raw_stream(bridge) as (ws, form, sid):
        timestamps = [0, 20, 40, 200, 220, 40, 240]  # 140 ms lost after 40; then a late copy of 40
        for i, timestamp_ms in enumerate(timestamps):
            await ws.send(media(i + 2, timestamp_ms))
        # 260 ms of caller audio reaches the AI: 6 frames plus the 140 ms gap, as 13 frames of 20 ms.
        await asyncio.to_thread(
            wait_until, lambda: emulator_stats(emulator)["audio_bytes_in"] == 13 * 640, 5.0, "260 ms at the AI"
        )
        await ws.send(tw.Stop(sid, form["CallSid"], form["AccountSid"], 20).to_json())
    wait_until(lambda: calls_up(bridge) == 0, what="the call to end")
    metrics = httpx.get(bridge.http_url + "/metrics").text
    assert 'bridge_inbound_frames_dropped_total{reason="late"} 1.0' in metrics
    assert "bridge_inbound_gap_fill_seconds_total 0.14" in metrics
