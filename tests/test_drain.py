"""Graceful drain of a real `telephony-bridge serve` process: SIGTERM stops readiness, calls finish, then exit."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.caller import run_call
from tests.support import BridgeProcess, signed_call, wait_until


@pytest.fixture
def serve(emulator: ServerThread, tmp_path: Path) -> Iterator[Callable[[float], BridgeProcess]]:
    processes: list[BridgeProcess] = []

    def start(drain_timeout_s: float) -> BridgeProcess:
        config = tmp_path / "config.yaml"
        config.write_text(f"server:\n  drain_timeout_s: {drain_timeout_s}\n")
        process = BridgeProcess(emulator, {"BRIDGE_CONFIG": str(config)})
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.kill()


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
