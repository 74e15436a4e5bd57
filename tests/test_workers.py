"""``serve --workers N``: real worker processes on one port, sharing a real Redis, under real calls."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx
import pytest

from telephony_bridge.cli import main
from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.loadtest import process_cpu_s, run_load
from tests.redis_server import RedisServer
from tests.support import AUTH_TOKEN, PUBLIC_URL, BridgeProcess, wait_until

pytestmark = pytest.mark.timeout(90)


def _workers(pid: int) -> list[int]:
    """The supervisor's worker processes (multiprocessing may also run a resource tracker: not a worker)."""
    children = [
        int(child)
        for task in os.listdir(f"/proc/{pid}/task")
        for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()
    ]
    return [child for child in children if b"spawn_main" in _cmdline(child)]


def _cmdline(pid: int) -> bytes:
    """A process's command line; empty if it exited since it was listed (a killed worker being reaped)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def test_serve_refuses_several_workers_without_redis(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("SAVANTS_BASE_URL", "http://127.0.0.1:9")
    assert main(["serve", "--workers", "2", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "server.workers is 2" in err and "REDIS_URL" in err, err


async def test_workers_share_the_port_and_redis_restart_when_killed_and_drain_on_sigterm(
    emulator: ServerThread, redis_server: RedisServer
) -> None:
    bridge = BridgeProcess(emulator, {"REDIS_URL": redis_server.url, "BRIDGE__SERVER__WORKERS": "2"})
    try:
        wait_until(lambda: len(_workers(bridge.proc.pid)) == 2, 20.0, "two workers")
        workers = _workers(bridge.proc.pid)
        for _ in range(100):  # both workers have their app up (connections are spread by the kernel)
            httpx.get(bridge.http_url + "/healthz", timeout=5).raise_for_status()
        before = {pid: process_cpu_s(pid) for pid in workers}
        async with asyncio.timeout(60):
            result = await run_load(
                bridge.ws_url + "/media-stream", 16, 16, 2.0, 0.5, AUTH_TOKEN, PUBLIC_URL, deadline_s=50
            )
        assert (len(result.of("served")), result.violations) == (16, 0), [f.reason for f in result.flows]
        # Both workers carried calls: a worker with none would have spent almost no CPU.
        used = {pid: process_cpu_s(pid) - before[pid] for pid in workers}
        assert all(seconds > 0.05 for seconds in used.values()), used
        # Accounting is shared: every lease, taken by whichever worker, is back in Redis.
        status = httpx.get(bridge.http_url + "/status", timeout=5).json()
        assert all(device["leases"] == 0 for device in status["accounting"]["devices"].values()), status

        os.kill(workers[0], signal.SIGKILL)
        wait_until(lambda: workers[0] not in _workers(bridge.proc.pid), 10.0, "the killed worker to be reaped")
        wait_until(lambda: len(_workers(bridge.proc.pid)) == 2, 20.0, "the worker to be started again")
        httpx.get(bridge.http_url + "/healthz", timeout=5).raise_for_status()

        workers = _workers(bridge.proc.pid)
        bridge.proc.send_signal(signal.SIGTERM)
        assert bridge.finish(timeout_s=40) == 0
        assert any("exited with code" in str(line["msg"]) for line in bridge.lines)
        wait_until(lambda: not any(_alive(pid) for pid in workers), 10.0, "the workers to exit")
    finally:
        bridge.kill()
