"""``serve --workers N``: real worker processes on one port, sharing a real Redis, under real calls."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
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


def _two_free_ports() -> int:
    """The first of two consecutive free ports on 127.0.0.1, below Linux's ephemeral range (32768 up), so that
    the bridge's PORT=0 cannot land on them, and above the default RTP ports (free when looked at: a test's
    small race)."""
    for _ in range(200):
        port = random.randrange(21000, 32000)
        with socket.socket() as first, socket.socket() as second:
            try:
                first.bind(("127.0.0.1", port))
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free ports")


def _pid_on(port: int) -> int | None:
    """The pid of the process whose /status answers on ``port``; None while nothing answers there."""
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/status", timeout=5)
    except httpx.TransportError:
        return None
    return int(response.json()["process"]["pid"]) if response.status_code == 200 else None


def test_each_worker_answers_alone_on_its_own_ops_port_and_gets_it_back_when_started_again(
    emulator: ServerThread, redis_server: RedisServer
) -> None:
    """``WORKER_OPS_PORT``: worker k's /status and /metrics on that port + k, always that worker (the shared
    ports reach whichever the kernel picks), so a scrape can follow each worker's counters and its CPU."""
    first = _two_free_ports()
    env = {"REDIS_URL": redis_server.url, "BRIDGE__SERVER__WORKERS": "2", "WORKER_OPS_PORT": str(first)}
    bridge = BridgeProcess(emulator, env)
    try:
        wait_until(lambda: len(_workers(bridge.proc.pid)) == 2, 20.0, "two workers")
        wait_until(lambda: None not in (_pid_on(first), _pid_on(first + 1)), 20.0, "both workers' ops ports")
        owners = [_pid_on(first), _pid_on(first + 1)]
        assert sorted(owners) == sorted(_workers(bridge.proc.pid)), owners  # one worker a port, both workers
        assert [_pid_on(first) for _ in range(10)] == [owners[0]] * 10  # always the same one
        metrics = httpx.get(f"http://127.0.0.1:{first + 1}/metrics", timeout=5).text
        assert "\nprocess_cpu_seconds_total " in metrics and "\nbridge_calls_active " in metrics
        # Ops endpoints are for ops listeners only; the probes stay on the public port too.
        assert httpx.get(bridge.http_url + "/status", timeout=5).status_code == 404
        httpx.get(bridge.http_url + "/healthz", timeout=5).raise_for_status()
        assert httpx.get(f"http://127.0.0.1:{first}/voice", timeout=5).status_code == 404

        assert owners[0] is not None
        os.kill(owners[0], signal.SIGKILL)  # the supervisor starts it again, on the same port
        wait_until(lambda: _pid_on(first) not in (None, owners[0]), 20.0, "worker 0 back on its port")
        assert _pid_on(first) in _workers(bridge.proc.pid)
        bridge.proc.send_signal(signal.SIGTERM)
        assert bridge.finish(timeout_s=40) == 0
    finally:
        bridge.kill()
