"""The load generator against the real bridge and the echo emulator on loopback."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.commands import write_wav
from telephony_bridge.tools.loadtest import loadtest_command, require_loopback, run_load
from tests.conftest import bridge_settings

pytestmark = pytest.mark.timeout(20)

TOKEN = "loadtest-auth-token"
PUBLIC = "https://public.example"


@pytest.fixture
def signed_bridge(emulator: ServerThread, start_bridge: Callable[..., ServerThread]) -> ServerThread:
    """Explicit public URL and token, so the tests hold whether or not the bridge checks signatures."""
    return start_bridge(bridge_settings(emulator, **{"server.public_url": PUBLIC, "twilio.auth_token": TOKEN}))


@pytest.fixture
def voice_wav(tmp_path: Path) -> str:
    path = str(tmp_path / "caller.wav")
    write_wav(path, np.random.default_rng(5).normal(0, 3000, 8000).clip(-32768, 32767).astype(np.int16))
    return path


async def test_run_load_serves_every_call_without_violations(signed_bridge: ServerThread, voice_wav: str) -> None:
    async with asyncio.timeout(15):
        result = await run_load(
            signed_bridge.ws_url + "/media-stream", 3, 3, 2.0, 0.2, TOKEN, PUBLIC, voice_wav, deadline_s=12
        )
    reasons = [flow.reason for flow in result.flows]
    assert (len(result.of("served")), len(result.of("busy")), len(result.of("failed"))) == (3, 0, 0), reasons
    assert (result.violations, len(result.first_audio_s)) == (0, 3)
    assert len({flow.call_sid for flow in result.flows}) == 3
    # The echo AI says each frame back 0.2 s after it heard it: no round trip can be quicker than that, and
    # with the byte count mapping frames a round trip is never a whole second.
    assert result.round_trips_s and 0.2 <= result.round_trips_s[0] <= result.round_trips_s[-1] < 1.0
    assert result.added_s[0] == 0.0 and len(result.added_s) == len(result.round_trips_s)
    # When each message was played: on the caller's 20 ms beat, so whole frames, and never before it arrived.
    heard = sorted(t for flow in result.of("served") for t in flow.call.heard_round_trips_s)
    assert heard and heard[0] >= 0.2 and len(heard) <= len(result.round_trips_s)
    assert all(abs(t / 0.02 - round(t / 0.02)) < 1e-9 for t in heard)
    assert result.heard_added_s[0] == 0.0 and len(result.heard_added_s) == len(heard)


async def test_loadtest_command_prints_the_table(
    signed_bridge: ServerThread, voice_wav: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with asyncio.timeout(10):
        code = await loadtest_command(
            signed_bridge.ws_url + "/media-stream", 1, 1, 0.6, 0.0, voice_wav, auth_token=TOKEN, public_url=PUBLIC
        )
    out, err = capsys.readouterr()
    assert (code, err) == (0, ""), out
    rows = [line.split()[0] for line in out.splitlines()]
    assert rows == ["calls", "served", "busy", "failed", "first", "round", "added", "heard", "underruns", "violations"]
    assert "served         1\n" in out and "violations     0\n" in out


async def test_loadtest_command_reports_bridge_cpu_and_writes_json(
    signed_bridge: ServerThread, voice_wav: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "load.json"
    async with asyncio.timeout(10):
        code = await loadtest_command(
            signed_bridge.ws_url + "/media-stream",
            2,
            2,
            1.0,
            0.0,
            voice_wav,
            auth_token=TOKEN,
            public_url=PUBLIC,
            pids=(os.getpid(),),  # the bridge runs in this process's thread
            json_out=str(out_path),
        )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "bridge CPU" in out
    figures = json.loads(out_path.read_text())
    assert (figures["served"], figures["refused"], figures["failed"], figures["violations"]) == (2, 0, 0, 0)
    assert set(figures["round_trip_ms"]) == {"p50", "p90", "p99", "max", "n"}
    assert figures["first_audio_ms"]["n"] == 2 and figures["underruns_per_call"]["n"] == 2
    assert figures["calls_whose_beat_stalled"] in (0, 1, 2)  # the load's own stalls, this machine's business
    assert figures["bridge_cpu"]["cpu_s"] > 0 and figures["bridge_cpu"]["us_per_call_per_20ms"] > 0


async def test_loadtest_command_names_a_process_it_cannot_read(capsys: pytest.CaptureFixture[str]) -> None:
    code = await loadtest_command("ws://127.0.0.1:9/media-stream", 1, 1, 1.0, 0.0, pids=(2**22 + 7,))
    assert code == 2
    assert capsys.readouterr().err.startswith("cannot read the CPU time of process")


async def test_loadtest_command_refuses_a_bridge_that_is_not_on_loopback(capsys: pytest.CaptureFixture[str]) -> None:
    code = await loadtest_command("ws://192.0.2.1:8080/media-stream", 1, 1, 1.0, 0.0)
    assert (code, capsys.readouterr().err) == (
        2,
        "the load generator only targets loopback bridges (127.0.0.1, ::1, localhost), got '192.0.2.1'\n",
    )
    require_loopback("ws://[::1]:8080/media-stream")
    require_loopback("ws://localhost:8080/media-stream")
