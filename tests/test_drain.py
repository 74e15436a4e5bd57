"""Graceful drain of a real `telephony-bridge serve` process: SIGTERM stops readiness, calls finish, then exit."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.caller import run_call
from tests.support import AUTH_TOKEN, DEVICE_IDS, PUBLIC_URL, signed_call, wait_until


class BridgeProcess:
    def __init__(self, emulator: ServerThread, config: Path) -> None:
        env = {
            **os.environ,
            "SAVANTS_BASE_URL": emulator.http_url,
            "SAVANTS_API_KEY": "test-key",
            "SAVANTS_DEVICE_IDS": ",".join(DEVICE_IDS),
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "PUBLIC_URL": PUBLIC_URL,
            "HOST": "127.0.0.1",
            "PORT": "0",
            "BRIDGE_CONFIG": str(config),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "telephony_bridge", "serve"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[dict[str, object]] = []
        self.port = 0
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            record = json.loads(line)
            self.lines.append(record)
            message = str(record["msg"])
            if message.startswith("bridge listening on"):
                self.port = int(message.rsplit(":", 1)[1])
            if message == "Application startup complete.":
                break
        assert self.port, f"bridge did not start: {self.lines}"
        self.http_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"

    def finish(self, timeout_s: float) -> int:
        assert self.proc.stderr is not None
        _, rest = self.proc.communicate(timeout=timeout_s)
        self.lines += [json.loads(line) for line in rest.splitlines() if line.startswith("{")]
        return self.proc.returncode


@pytest.fixture
def serve(emulator: ServerThread, tmp_path: Path) -> Iterator[Callable[[float], BridgeProcess]]:
    processes: list[BridgeProcess] = []

    def start(drain_timeout_s: float) -> BridgeProcess:
        config = tmp_path / "config.yaml"
        config.write_text(f"server:\n  drain_timeout_s: {drain_timeout_s}\n")
        process = BridgeProcess(emulator, config)
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.communicate()


async def test_drain_lets_calls_finish_then_exits(serve: Callable[..., BridgeProcess]) -> None:
    bridge = serve(drain_timeout_s=30)
    call = asyncio.create_task(run_call(signed_call(bridge, seconds=3.0)))
    await asyncio.to_thread(wait_until, lambda: len(httpx.get(bridge.http_url + "/status").json()["calls"]) == 1)
    bridge.proc.send_signal(signal.SIGTERM)
    await asyncio.to_thread(
        wait_until, lambda: httpx.get(bridge.http_url + "/readyz").status_code == 503, 5.0, "readyz to fail"
    )
    result = await call
    assert result.ended_by == "caller"  # not cut by the shutdown
    assert await asyncio.to_thread(bridge.finish, 10.0) == 0
    messages = [str(line["msg"]) for line in bridge.lines]
    assert any(m.startswith("draining: not ready any more") for m in messages)
    assert "drained: no calls left" in messages


async def test_drain_timeout_ends_the_remaining_calls(serve: Callable[..., BridgeProcess]) -> None:
    bridge = serve(drain_timeout_s=0.5)
    call = asyncio.create_task(run_call(signed_call(bridge, seconds=10.0)))
    await asyncio.to_thread(wait_until, lambda: len(httpx.get(bridge.http_url + "/status").json()["calls"]) == 1)
    bridge.proc.send_signal(signal.SIGTERM)
    result = await call
    assert result.ended_by == "bridge" and result.duration_s < 5
    assert await asyncio.to_thread(bridge.finish, 10.0) == 0
