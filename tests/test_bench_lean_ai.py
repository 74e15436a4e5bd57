"""bench/lean_ai.py, capacity.py's ``--ai lean``: what the bridge sees of it is the emulator's echo voice (its
frames, its refusals), or the figures measured against it would not mean what they mean against the emulator."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect

from telephony_bridge.clock import FakeClock
from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.caller import read_wav, run_call
from telephony_bridge.tools.emulator import EmulatorConfig
from telephony_bridge.tools.emulator.protocol import FRAME_S
from telephony_bridge.tools.emulator.voices import EchoVoice
from tests.support import BENCH, SPEECH_WAV, bridge_settings, emulator_stats, signed_call, wait_until

sys.path.insert(0, str(BENCH))
import cython_build  # bench/ is no package: imported from its folder
import lean_ai

pytestmark = pytest.mark.timeout(30)

SECRET = "lean-test-secret-0123456789abcdef"  # shared by the emulator (tokens) and the echo (their check)
STEP_S = 5.0  # bound on any single socket or HTTP step


# --- the per-session echo and the grid, without I/O ---------------------------------------------------------


def line_type(kind: str) -> Callable[[float], Any]:
    """``lean_ai.EchoLine``, or its C twin (``--ai compiled``: bench/lean_ai_c.pyx, built on first use)."""
    return lean_ai.EchoLine if kind == "python" else cython_build.load(lean_ai.BENCH / "lean_ai_c.pyx").EchoLine


@pytest.mark.parametrize("kind", ["python", "compiled"])
@pytest.mark.parametrize("seed", range(6))
def test_lean_echo_line_says_what_the_emulators_echo_voice_says_tick_for_tick(kind: str, seed: int) -> None:
    """Messages of the bridge's sizes (40 ms), of 20 ms, odd sizes that leave part-frames, and pauses that make
    the last part-frame padded: the same frames, or none, at every tick (the C line too, whose lists drop what
    it has said only now and then: 400 messages pass that point several times)."""
    rng = random.Random(seed)
    voice, line = EchoVoice(0.2), line_type(kind)(0.2)
    arrival_s, tick_s = 0.0, 0.0
    said: list[bytes] = []
    for _ in range(400):
        arrival_s += rng.choice([0.0, 0.005, 0.02, 0.04, 0.3])
        size = rng.choice([1280, 1280, 640, 320, 2 * rng.randint(1, 1500)])
        pcm = rng.randbytes(size)
        voice.hear(pcm, arrival_s)
        line.hear(pcm, arrival_s)
        while tick_s <= arrival_s:
            expected, got = voice.speak(tick_s), line.speak(tick_s)
            assert (None if got is None else bytes(got)) == expected, f"tick at {tick_s:.3f} s"
            said += [expected] if expected is not None else []
            tick_s += FRAME_S
    for _ in range(200):  # and what is left, after the talk
        expected, got = voice.speak(tick_s), line.speak(tick_s)
        assert (None if got is None else bytes(got)) == expected
        tick_s += FRAME_S
    assert len(said) > 100 and line.speak(tick_s) is None


class Recorder:
    def __init__(self, name: str, heard: list[tuple[str, float]]) -> None:
        self.name, self.heard = name, heard

    def on_tick(self, at_s: float) -> None:
        self.heard.append((self.name, round(at_s, 6)))


def test_lean_wheel_ticks_each_session_every_20ms_on_its_phase_and_stops_when_empty() -> None:
    heard: list[tuple[str, float]] = []
    wheel = lean_ai.Wheel(slots=4)
    a, b = Recorder("a", heard), Recorder("b", heard)
    wheel.add(a, 10.0)  # an empty wheel: a fresh grid from now
    assert wheel.tick(10.0) == pytest.approx(10.005)
    wheel.add(b, 10.001)  # the next tick's phase
    assert wheel.tick(10.021) == pytest.approx(10.025)  # 16 ms late: every tick due is served, none skipped
    assert wheel.late == 0  # within a frame: not counted late
    assert wheel.tick(10.025) == pytest.approx(10.03)
    assert heard == [("a", 10.0), ("b", 10.005), ("a", 10.02), ("b", 10.025)]
    heard.clear()
    wheel.discard(b)
    assert wheel.tick(10.2) == pytest.approx(10.205)  # 165 ms late: the grid moves, no burst to catch up
    assert wheel.late == 1  # the echo's own lateness, in its stats for capacity.py
    assert wheel.tick(10.21) == pytest.approx(10.215)
    assert heard == [("a", 10.21)]  # its phase's next tick
    wheel.discard(a)
    assert (wheel.tick(10.3), len(wheel)) == (None, 0)


def test_lean_compiled_session_runs_its_audio_in_and_frames_out_in_c() -> None:
    """picows calls ``on_ws_frame`` and the wheel ``on_tick``: the compiled session's must be ``EchoCore``'s, not
    ``EchoSession``'s in Python (the tests over sockets would pass either way, the C line being the same)."""
    core = cython_build.load(lean_ai.BENCH / "lean_ai_c.pyx")
    session = lean_ai.compiled_session_class()
    assert (session.on_ws_frame, session.on_tick) == (core.EchoCore.on_ws_frame, core.EchoCore.on_tick)
    assert session._line_type is core.EchoLine


def test_lean_compiled_echo_refuses_a_clock_other_than_the_systems() -> None:
    """Its C half reads the system's monotonic clock: a test clock would put the wheel and the line out of step."""
    with pytest.raises(ValueError, match="system's monotonic clock"):
        lean_ai.LeanAi(EmulatorConfig(api_key="unused", jwt_secret=SECRET), FakeClock(), compiled=True)


# --- over real sockets: the real bridge and emulator (tokens), the lean echo (voice stream) --------------------


@pytest.fixture(params=["python", "compiled"])
def lean(request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    """The echo, its sessions in Python or with their per-frame work in C: every test over sockets runs on both."""
    config = EmulatorConfig(api_key="unused", jwt_secret=SECRET)
    server = ServerThread(lean_ai.create_lean_app(config, compiled=request.param == "compiled"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def lean_stats(lean: ServerThread) -> dict[str, Any]:
    return dict(httpx.get(lean.http_url + lean_ai.STATS_PATH, timeout=STEP_S).json())


async def test_lean_echo_behind_a_real_bridge_says_the_callers_speech_back_after_the_echo_delay(
    start_emulator: Callable[..., ServerThread], start_bridge: Callable[..., ServerThread], lean: ServerThread
) -> None:
    emulator = start_emulator(voice="echo", jwt_secret=SECRET)
    bridge = start_bridge(bridge_settings(emulator, **{"savants.ws_url": f"{lean.ws_url}/voice-stream"}))
    speech = read_wav(SPEECH_WAV)[: 8000 * 2]
    result = await run_call(signed_call(bridge, audio_in=speech, seconds=3.0))

    assert (result.ended_by, result.violations) == ("caller", [])
    wait_until(lambda: lean_stats(lean)["sessions_active"] == 0, what="the echo's session to end")
    stats = lean_stats(lean)
    # No hole, unless the load stalled: the caller's own beat (its overdue ticks then play at once, and all it
    # hears after comes that much later, a gap mid-speech, as in tests/test_end_to_end.py), or the echo's own
    # ticks or collections more than a frame late (its frames then reach the bridge late: a hole the bridge counts
    # as the AI's, which on a loaded runner it is; CI saw one once, at 0.6 s, with the caller's beat steady).
    echo_late = stats["ticks_late_over_a_frame"] + stats["gc_pauses_over_a_frame"]
    stalled = bool(result.beat_stalls_s) or echo_late > 0
    assert result.underruns == 0 or stalled, f"{result.underruns} holes with neither the caller nor the echo late"
    heard, said = result.heard.astype(float), speech.astype(float)
    correlation = np.correlate(heard, said, mode="valid")
    lag = int(np.argmax(correlation))
    similarity = correlation[lag] / (np.linalg.norm(said) * np.linalg.norm(heard[lag : lag + said.size]))
    # After a stall the speech comes back in parts, each at its own lag: the best lag matches the largest part
    # (half of it at least, with one stall), and anything else the echo could return matches nothing.
    assert similarity > (0.3 if stalled else 0.9), f"what came back does not resemble what was said ({similarity:.3f})"
    assert 0.2 <= lag / 8000 < 1.0, f"the echo came back after {lag / 8000:.3f} s"
    assert stats.pop("ticks_late_over_a_frame") >= 0  # a count; how late this machine's loop ran is no test's business
    assert stats.pop("gc_pauses_over_a_frame") >= 0  # the same, for its own collections
    assert stats == {"sessions_opened": 1, "sessions_active": 0, "refused": {}}
    assert emulator_stats(emulator)["sessions_opened"] == 0  # the emulator gave the token, nothing more


async def _refusal(url: str, first: str | bytes) -> tuple[str, str, int | None, str | None]:
    """(message type, error code, close code, close reason) of a socket whose first message is ``first``."""
    async with connect(url, proxy=None, compression=None, open_timeout=STEP_S) as ws:
        await ws.send(first)
        message = json.loads(await asyncio.wait_for(ws.recv(), STEP_S))
        await asyncio.wait_for(ws.wait_closed(), STEP_S)
        return message["type"], message["error"]["code"], ws.close_code, ws.close_reason


async def _token(emulator: ServerThread) -> str:
    async with httpx.AsyncClient(trust_env=False, timeout=STEP_S) as http:
        body = {"apiKey": "test-key", "deviceId": "dev-1"}
        response = await http.post(emulator.http_url + "/api/websocket-voice/token", json=body)
    return str(response.json()["token"])


async def test_lean_echo_refuses_a_bad_token_a_binary_first_frame_and_a_reused_token_as_the_emulator_does(
    start_emulator: Callable[..., ServerThread], lean: ServerThread
) -> None:
    emulator = start_emulator(voice="echo", jwt_secret=SECRET)
    other = start_emulator(voice="echo")  # another key: its tokens are not this echo's
    for first in ("not-a-jwt", b"\0\0", await _token(other)):
        assert await _refusal(f"{lean.ws_url}/voice-stream", first) == await _refusal(
            f"{emulator.ws_url}/voice-stream", first
        )
    token = await _token(emulator)
    async with connect(f"{lean.ws_url}/voice-stream", proxy=None, compression=None, open_timeout=STEP_S) as ws:
        await ws.send(token)
        assert json.loads(await asyncio.wait_for(ws.recv(), STEP_S))["type"] == "savant_voice_connected"
    reused = await _refusal(f"{lean.ws_url}/voice-stream", token)
    assert reused == ("error", "TOKEN_REUSED", 4409, "TOKEN_REUSED")
    assert lean_stats(lean)["refused"] == {"INVALID_TOKEN": 3, "TOKEN_REUSED": 1}


async def test_lean_echo_ends_a_session_the_client_closes_and_refuses_bad_audio_as_the_emulator(
    start_emulator: Callable[..., ServerThread], lean: ServerThread
) -> None:
    emulator = start_emulator(voice="echo", jwt_secret=SECRET)
    for server in (lean, emulator):
        async with connect(f"{server.ws_url}/voice-stream", proxy=None, compression=None) as ws:
            await ws.send(await _token(emulator))
            await asyncio.wait_for(ws.recv(), STEP_S)  # the confirmation
            await ws.send(b"\0" * 641)
            message = json.loads(await asyncio.wait_for(ws.recv(), STEP_S))
            await asyncio.wait_for(ws.wait_closed(), STEP_S)
        assert (message["error"]["code"], ws.close_code) == ("INVALID_AUDIO", 4415)
    async with connect(f"{lean.ws_url}/voice-stream", proxy=None, compression=None) as ws:
        await ws.send(await _token(emulator))
        await asyncio.wait_for(ws.recv(), STEP_S)
        await ws.send(b"\1\0" * 640)  # 40 ms
        echoed = [await asyncio.wait_for(ws.recv(), STEP_S) for _ in range(2)]
        assert echoed == [b"\1\0" * 320] * 2  # 20 ms frames
        await ws.send([b"\2\0" * 200, b"\2\0" * 120])  # 20 ms in two fragments: heard whole, off the fast path
        assert await asyncio.wait_for(ws.recv(), STEP_S) == b"\2\0" * 320
    assert ws.close_code == 1000
    wait_until(lambda: lean_stats(lean)["sessions_active"] == 0, what="the closed session to end")


def test_a_load_process_counts_its_collections_longer_than_a_frame() -> None:
    import load_gc  # bench/, as lean_ai

    pauses = load_gc.GcPauses()
    for held_s in (0.0, FRAME_S * 1.5, 0.001):
        pauses("start", {})
        deadline = time.perf_counter() + held_s
        while time.perf_counter() < deadline:
            pass
        pauses("stop", {})
    pauses("stop", {})  # a stop without its start (counting began mid-collection): nothing to time
    assert pauses.over_a_frame == 1
