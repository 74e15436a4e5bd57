"""Safe defaults: dev mode only when asked for, loopback unless told otherwise, and loud about itself;
``python3 dev.py serve`` is the bridge process itself, so a SIGTERM to it drains."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from telephony_bridge.cli import main
from telephony_bridge.tools.caller import CallConfig, new_sid, run_call
from telephony_bridge.tools.twilio_flow import run_flow
from tests.support import BRIDGE_VARIABLES, BridgeProcess, wait_until

ROOT = Path(__file__).parent.parent
VOICE = (np.sin(2 * np.pi * 500 * np.arange(16000) / 8000) * 3000).astype(np.int16)


@pytest.fixture
def processes() -> Iterator[list[BridgeProcess]]:
    started: list[BridgeProcess] = []
    yield started
    for process in started:
        process.kill()


@pytest.mark.parametrize(
    "image_env",
    [{}, {"HOST": "0.0.0.0", "PORT": "8080", "BRIDGE_CONFIG": str(ROOT / "config.yaml")}],  # bare; as the Dockerfile
)
def test_serve_without_savants_settings_refuses_in_one_sentence_naming_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], image_env: dict[str, str]
) -> None:
    for var in [v for v in os.environ if v.startswith(BRIDGE_VARIABLES)]:
        monkeypatch.delenv(var)
    for var, value in image_env.items():
        monkeypatch.setenv(var, value)
    assert main(["serve"]) == 2  # before binding anything: no port is taken
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "SAVANTS_BASE_URL, SAVANTS_API_KEY, SAVANTS_DEVICE_IDS must be set" in err
    assert "--dev (BRIDGE_DEV=1)" in err


async def test_dev_mode_binds_loopback_says_so_and_accepts_a_stream_without_token(
    processes: list[BridgeProcess],
) -> None:
    bridge = BridgeProcess(None, args=("serve", "--dev"))
    processes.append(bridge)
    assert bridge.host == "127.0.0.1"  # HOST not given: a developer's machine, not the network
    warnings = [str(line["msg"]) for line in bridge.lines if line["level"] == "WARNING"]
    assert any(m.startswith("DEV MODE, not for production") for m in warnings)
    assert httpx.get(bridge.http_url + "/healthz").json() == {"status": "ok", "mode": "dev"}
    assert httpx.get(bridge.http_url + "/status").json()["mode"] == "dev"
    # a third-party simulator: straight to the WebSocket, no webhook, so no stream token
    config = CallConfig(bridge.ws_url + "/media-stream", audio_in=VOICE, seconds=2.5, call_sid=new_sid("CA"))
    result = await run_call(config)
    assert result.ended_by == "caller" and result.heard_s > 0.5  # the echo voice answered
    await asyncio.to_thread(
        wait_until,
        lambda: httpx.get(bridge.http_url + "/status").json()["calls"] == [],
        5.0,
        "the call to end",
    )
    bridge.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(bridge.finish, 10.0) == 0
    assert "accepting a stream that presents no stream token (dev mode only; production refuses it)" in [
        str(line["msg"]) for line in bridge.lines
    ]


def test_dev_mode_by_environment_listens_where_host_says(processes: list[BridgeProcess]) -> None:
    bridge = BridgeProcess(None, {"BRIDGE_DEV": "1", "HOST": "127.0.0.2"})
    processes.append(bridge)
    assert bridge.host == "127.0.0.2"
    assert httpx.get(f"http://127.0.0.2:{bridge.port}/healthz").json()["mode"] == "dev"


async def test_sigterm_to_dev_py_serve_drains_the_bridge_itself(processes: list[BridgeProcess]) -> None:
    bridge = BridgeProcess(None, command=(sys.executable, str(ROOT / "dev.py")))
    processes.append(bridge)
    cmdline = (await asyncio.to_thread(Path(f"/proc/{bridge.proc.pid}/cmdline").read_bytes)).split(b"\0")
    assert cmdline[-3:-1] == [b"serve", b"--dev"]  # dev.py's own pid is the bridge now (os.execv)
    async with httpx.AsyncClient(trust_env=False, timeout=15) as http:
        call = asyncio.create_task(run_flow(bridge.http_url, http=http, seconds=3.0))
        await asyncio.to_thread(
            wait_until, lambda: len(httpx.get(bridge.http_url + "/status").json()["calls"]) == 1, 10.0, "the call"
        )
        bridge.proc.send_signal(signal.SIGTERM)
        result = await call
    assert result.outcome == "served" and result.call is not None and result.call.ended_by == "caller"
    assert await asyncio.to_thread(bridge.finish, 10.0) == 0
    assert "drained: no calls left" in [str(line["msg"]) for line in bridge.lines]


def test_dev_py_commands_take_paths_from_where_they_are_run(processes: list[BridgeProcess], tmp_path: Path) -> None:
    """``dev.py serve --config bridge.yaml`` (as ``call --wav``, ``--out``) from another directory reads the file
    there, not in the checkout: dev.py changes directory for the tests alone."""
    (tmp_path / "bridge.yaml").write_text("{}\n")  # only where it is run from: in the checkout it is not found
    bridge = BridgeProcess(
        None,
        command=(sys.executable, str(ROOT.resolve() / "dev.py")),
        args=("serve", "--config", "bridge.yaml"),
        cwd=tmp_path,
    )
    processes.append(bridge)
    assert httpx.get(bridge.http_url + "/healthz").json()["mode"] == "dev"
