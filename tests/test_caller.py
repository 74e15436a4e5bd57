"""The simulated caller: its playout model (data in, data out) and whole calls against a scripted bridge."""

from __future__ import annotations

import asyncio
import re
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from starlette.applications import Starlette

from telephony_bridge.audio.analysis import delay_s
from telephony_bridge.audio.codec import pcm16_to_ulaw, ulaw_to_pcm16
from telephony_bridge.serving import running
from telephony_bridge.tools.caller import CallConfig, call_command, read_wav, run_call, write_wav
from telephony_bridge.tools.twilio_playout import Playout
from telephony_bridge.twilio.protocol import Connected, Dtmf, Mark, Media, Start, Stop
from tests.scripted_bridge import ScriptedBridge, noise, served
from tests.support import frames_a_stall_cost

pytestmark = pytest.mark.timeout(10)

SILENCE = b"\xff" * 160
A, B, C = b"\x01" * 160, b"\x02" * 160, b"\x03" * 160


# --- the playout model -------------------------------------------------------------------------------


def test_playout_plays_silence_when_empty() -> None:
    playout = Playout()
    assert [playout.tick(160) for _ in range(3)] == [(SILENCE, [])] * 3
    assert (playout.bytes_played, playout.underruns) == (0, 0)


def test_playout_plays_in_order_across_chunk_boundaries() -> None:
    playout = Playout()
    playout.push_media(b"\x01" * 100)
    playout.push_media(b"\x02" * 100)
    assert playout.max_buffered_bytes == 200
    assert [playout.tick(160)[0] for _ in range(2)] == [
        b"\x01" * 100 + b"\x02" * 60,
        b"\x02" * 40 + b"\xff" * 120,
    ]
    assert (playout.buffered_bytes, playout.bytes_played, playout.max_lead_ms) == (0, 200, 25.0)


def test_playout_echoes_marks_in_order_once_their_audio_has_played() -> None:
    playout = Playout()
    assert playout.push_media(A) is None
    assert playout.push_mark("a") == []
    playout.push_media(B)
    assert playout.push_mark("b") == []
    # A mark whose audio ends in a frame is due when that frame has finished, at the next tick.
    assert [playout.tick(160) for _ in range(3)] == [(A, []), (B, ["a"]), (SILENCE, ["b"])]
    assert (playout.marks_received, playout.marks_echoed, playout.underruns) == (2, 2, 0)


def test_playout_echoes_a_mark_at_once_when_nothing_is_playing() -> None:
    playout = Playout()
    assert playout.push_mark("idle") == ["idle"]
    playout.push_media(A)
    playout.tick(160)
    assert playout.push_mark("behind-playing-frame") == []
    assert playout.push_mark("next") == []
    assert playout.tick(160) == (SILENCE, ["behind-playing-frame", "next"])
    assert playout.push_mark("later") == ["later"]


def test_playout_clear_drops_audio_and_echoes_every_pending_mark() -> None:
    playout = Playout()
    for item in (A, "a", B, "b", C, "c"):
        playout.push_media(item) if isinstance(item, bytes) else playout.push_mark(item)
    assert playout.tick(160) == (A, [])  # "a" is now waiting for frame A to finish
    assert playout.clear() == ["a", "b", "c"]
    assert playout.tick(160) == (SILENCE, [])
    assert (playout.bytes_played, playout.bytes_cleared, playout.buffered_bytes) == (160, 320, 0)
    assert (playout.clears, playout.marks_echoed, playout.underruns) == (1, 3, 0)
    assert playout.push_mark("after") == ["after"]
    playout.push_media(A + A)
    playout.tick(100)
    playout.clear()  # mid-chunk
    playout.push_media(B)
    assert playout.tick(160) == (B, [])


def test_playout_counts_short_gaps_inside_a_stream_as_underruns() -> None:
    playout = Playout(max_gap_ms=100)
    script: list[bytes | int] = [A, 160, 160, B, 160, B[:80], 160, C, 160]  # bytes: push; int: tick
    for step in script:
        playout.push_media(step) if isinstance(step, bytes) else playout.tick(step)
    # A, a 20 ms hole, B, then half a frame of B and a 10 ms hole before C
    assert (playout.underruns, playout.underrun_ms) == (2, 30.0)
    assert playout.underrun_ends_ms == [40.0, 80.0]  # the ticks where B and C began to play
    for _ in range(6):  # 120 ms: a pause between utterances, not an underrun
        playout.tick(160)
    playout.push_media(A)
    playout.tick(160)
    playout.clear()  # silence after a clear is intended
    playout.tick(160)
    playout.push_media(B)
    playout.tick(160)
    assert (playout.underruns, playout.underrun_ms) == (2, 30.0)
    assert playout.underrun_ends_ms == [40.0, 80.0]


def test_playout_heard_length_is_ticks_times_bytes() -> None:
    playout = Playout()
    playout.push_media(bytes(range(256)) * 3)
    heard = b"".join(playout.tick(n)[0] for n in (1, 7, 160, 333, 0, 500))
    assert heard == bytes(range(256)) * 3 + b"\xff" * (1001 - 768)


# --- whole calls against a scripted bridge ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bridge() -> Iterator[ScriptedBridge]:
    with served() as fake:
        yield fake


async def test_call_hears_its_own_voice_echoed_back(bridge: ScriptedBridge) -> None:
    voice = noise(0.4)
    async with asyncio.timeout(5):
        # 0.8 s of call after the voice: a stall of this process's beat delays all it hears by the stall's length
        # (its catch-up ticks play silence), and what is still unheard when the call ends is lost.
        result = await run_call(CallConfig(bridge.url("echo"), audio_in=voice, seconds=1.2))
    said = ulaw_to_pcm16(pcm16_to_ulaw(voice))
    lag_s = delay_s(result.heard, said, 8000)
    assert 0.015 <= lag_s <= 0.5, lag_s  # a frame or more of playout; the bound is generous for loaded CI
    # Every frame came back intact and in order, whatever the network jitter did to their timing.
    audible = [frame for frame in result.heard.reshape(-1, 160) if np.any(frame != 0)]
    assert np.array_equal(np.concatenate(audible), said)
    assert (result.ended_by, result.close_code, result.violations) == ("caller", 1000, [])
    assert result.heard_s == pytest.approx(0.4)
    assert result.first_audio_s is not None and result.first_heard_s is not None
    assert 0 < result.first_audio_s <= result.first_heard_s < 0.5
    assert len(result.heard) == result.media_sent * 160 == 60 * 160
    assert result.summary().count("\n") == 0 and "0 protocol violations" in result.summary()


async def test_call_records_the_ticks_of_its_own_beat_that_ran_a_frame_late(bridge: ScriptedBridge) -> None:
    """A caller process that stalls (here its event loop blocked for 100 ms) plays the ticks due meanwhile at once,
    faster than real time: the result says when, so that a hole soon after is not blamed on the bridge."""
    asyncio.get_running_loop().call_later(0.25, time.sleep, 0.1)
    async with asyncio.timeout(5):
        result = await run_call(CallConfig(bridge.url("echo"), audio_in=noise(0.4), seconds=0.6))
    assert result.beat_stalls_s, result.summary()
    assert all(0.0 < t <= 0.6 + 1e-9 for t in result.beat_stalls_s)  # the last tick, at 30 x 20 ms, included
    assert result.beat_stalls_s == tuple(sorted(result.beat_stalls_s))


async def test_call_echoes_marks_in_order_and_numbers_messages_like_twilio(
    bridge: ScriptedBridge,
) -> None:
    config = CallConfig(
        bridge.url("echo"),
        seconds=0.3,
        custom_parameters={"token": "t-1"},
        dtmf=[(0.1, "5")],
    )
    async with asyncio.timeout(5):
        result = await run_call(config)
    assert re.fullmatch(r"CA[0-9a-f]{32}", result.call_sid) and re.fullmatch(r"MZ[0-9a-f]{32}", result.stream_sid)
    # The last frame's mark is cut off, and two frames' more slack, and as many more as a stall of the caller's own
    # beat cost the tail.
    assert len(result.marks_echoed) >= result.media_sent - 3 - frames_a_stall_cost(result), result.summary()
    assert result.marks_echoed == [f"m{i}" for i in range(1, len(result.marks_echoed) + 1)]

    events = await bridge.events_of(result.call_sid)
    assert events[0] == Connected()
    start, *rest = events[1:]
    assert isinstance(start, Start) and start.custom_parameters == {"token": "t-1"}
    assert isinstance(rest[-1], Stop) and rest[-1].call_sid == result.call_sid
    assert [e.sequence_number for e in events[1:]] == list(range(1, len(events)))  # type: ignore[union-attr]
    media = [e for e in rest if isinstance(e, Media)]
    assert [(m.chunk, m.timestamp_ms, len(m.payload)) for m in media] == [(i + 1, 20 * i, 160) for i in range(15)]
    assert [e.name for e in rest if isinstance(e, Mark)] == result.marks_echoed
    assert [e.digit for e in rest if isinstance(e, Dtmf)] == ["5"]
    assert {e.stream_sid for e in events[1:]} == {result.stream_sid}  # type: ignore[union-attr]


async def test_call_counts_a_malformed_message_as_a_violation(bridge: ScriptedBridge) -> None:
    async with asyncio.timeout(5):
        result = await run_call(CallConfig(bridge.url("malformed"), audio_in=noise(0.2), seconds=1.0))  # slack: above
    assert len(result.violations) == 1 and "31951" in result.violations[0]
    assert "1 protocol violations (first: " in result.summary()
    assert result.heard_s == pytest.approx(0.18)  # the malformed first frame was never played


async def test_call_counts_a_message_before_start_as_a_violation(bridge: ScriptedBridge) -> None:
    async with asyncio.timeout(5):
        result = await run_call(CallConfig(bridge.url("eager"), seconds=0.1, start_delay_s=0.2))
    assert len(result.violations) == 1 and "before 'start'" in result.violations[0]


async def test_call_ended_by_the_bridge(bridge: ScriptedBridge) -> None:
    async with asyncio.timeout(5):
        result = await run_call(CallConfig(bridge.url("hangup"), audio_in=noise(1.0), seconds=3.0))
    assert (result.ended_by, result.close_code, result.violations) == ("bridge", 1000, [])
    # ended early by the bridge (the call is 3 s), unless a stall of the caller's beat sent a burst first
    assert result.media_sent >= 5
    assert (result.media_sent < 20 and result.duration_s < 1.0) or result.beat_stalls_s, result.summary()
    events = await bridge.events_of(result.call_sid)
    assert not any(isinstance(e, Stop) for e in events)  # Twilio sends no stop when the bridge hangs up


# --- the command and its WAV files -------------------------------------------------------------------


def _write(path: Path, samples: np.ndarray, rate: int, channels: int = 1) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples.astype("<i2").tobytes())


async def test_call_command_writes_what_was_heard(
    bridge: ScriptedBridge, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path / "in.wav", noise(0.2), 8000)
    async with asyncio.timeout(5):
        code = await call_command(
            bridge.url("echo"), str(tmp_path / "in.wav"), str(tmp_path / "out.wav"), 0.3, webhook=False
        )
    out, err = capsys.readouterr()
    assert (code, err, out.count("\n")) == (0, "", 1)
    heard = read_wav(str(tmp_path / "out.wav"))
    assert len(heard) == 15 * 160 and np.count_nonzero(heard) > 0


async def test_call_command_fails_in_one_sentence_when_it_cannot_connect(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with running(Starlette()) as server:  # a free port, closed again below
        url = f"{server.ws_url}/media-stream"
    async with asyncio.timeout(5):
        code = await call_command(url, None, None, 1.0)
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err.startswith(f"could not connect to {url}: ") and err.count("\n") == 1


async def test_call_command_exits_1_on_violations(bridge: ScriptedBridge, capsys: pytest.CaptureFixture[str]) -> None:
    async with asyncio.timeout(5):
        code = await call_command(bridge.url("malformed"), None, None, 0.1, webhook=False)
    assert code == 1
    assert "broke the Media Streams protocol 1 times" in capsys.readouterr().err


def test_read_wav_filters_16_khz_down_and_refuses_other_formats(tmp_path: Path) -> None:
    _write(tmp_path / "wide.wav", np.zeros(3200, dtype=np.int16), 16000)
    assert np.array_equal(read_wav(str(tmp_path / "wide.wav")), np.zeros(1600, dtype=np.int16))
    _write(tmp_path / "stereo.wav", np.zeros(3200, dtype=np.int16), 8000, channels=2)
    with pytest.raises(ValueError, match="expected a mono 16-bit WAV at 8000 or 16000 Hz, got 2 channels"):
        read_wav(str(tmp_path / "stereo.wav"))
    write_wav(str(tmp_path / "round.wav"), np.arange(-5, 5, dtype=np.int16))
    assert np.array_equal(read_wav(str(tmp_path / "round.wav")), np.arange(-5, 5, dtype=np.int16))
