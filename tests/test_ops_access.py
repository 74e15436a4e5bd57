"""Ops endpoints: a separate listener (``server.ops_port``) and a bearer token (``ops.token``); the health
probes stay open everywhere."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from telephony_bridge.ops.gc_tuning import OLDER_THRESHOLDS
from telephony_bridge.ops.tasks import task_report
from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.caller import CallResult, run_call
from telephony_bridge.tools.twilio_flow import run_flow
from tests.redis_server import RedisServer
from tests.support import AUTH_TOKEN, PUBLIC_URL, BridgeProcess, bridge_settings, signed_call, wait_until

OPS_TOKEN = "ops-token-0123456789"
BEARER = {"Authorization": f"Bearer {OPS_TOKEN}"}


@pytest.fixture
def bridge_with_ops_port(emulator: ServerThread) -> Iterator[BridgeProcess]:
    bridge = BridgeProcess(emulator, {"OPS_PORT": "0", "OPS_TOKEN": OPS_TOKEN})
    yield bridge
    bridge.kill()


async def test_ops_port_serves_status_and_metrics_the_public_port_does_not(
    bridge_with_ops_port: BridgeProcess,
) -> None:
    bridge = bridge_with_ops_port
    ops = f"http://127.0.0.1:{bridge.ops_port}"
    assert bridge.ops_port and bridge.ops_port != bridge.port
    async with httpx.AsyncClient(trust_env=False, timeout=15) as http:
        flow = await run_flow(bridge.http_url, http=http, seconds=1.0, auth_token=AUTH_TOKEN, public_url=PUBLIC_URL)
        assert flow.outcome == "served"  # the public port still takes calls
        public = {path: (await http.get(bridge.http_url + path)).status_code for path in ("/status", "/metrics")}
        assert public == {"/status": 404, "/metrics": 404}
        for path in ("/healthz", "/readyz"):  # probes: on both listeners, no credentials
            assert (await http.get(bridge.http_url + path)).status_code == 200
            assert (await http.get(ops + path)).status_code == 200
        refused = await http.get(ops + "/status")
        assert (refused.status_code, refused.headers["www-authenticate"]) == (401, "Bearer")
        wrong = await http.get(ops + "/metrics", headers={"Authorization": "Bearer not-it"})
        assert wrong.status_code == 401
        status = await http.get(ops + "/status", headers=BEARER)
        assert status.status_code == 200 and status.json()["mode"] == "production"
        metrics = await http.get(ops + "/metrics", headers=BEARER)
        assert 'bridge_webhook_answers_total{document="connect"} 1.0' in metrics.text
        assert (await http.post(ops + "/voice", data={"CallSid": "CA1"})).status_code == 404  # calls: public only
    with pytest.raises(InvalidStatus) as refused:  # 404 on the ops listener (unsigned, the public port says 403)
        async with connect(f"ws://127.0.0.1:{bridge.ops_port}/media-stream"):
            pass
    assert refused.value.response.status_code == 404
    assert all(OPS_TOKEN not in str(line) for line in bridge.lines)


async def test_a_lone_process_serves_ops_on_its_worker_ops_port_too_and_no_media_stream_there(
    emulator: ServerThread,
) -> None:
    """``WORKER_OPS_PORT`` without ``--workers``: the one process is worker 0, with its own ops listener beside
    ``OPS_PORT``; both are ops listeners (no calls, no media stream), and the public port serves no ops path."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        own = probe.getsockname()[1]
    bridge = BridgeProcess(emulator, {"OPS_PORT": "0", "WORKER_OPS_PORT": str(own)})
    try:
        assert bridge.ops_port not in (0, own, bridge.port)
        async with httpx.AsyncClient(trust_env=False, timeout=15) as http:
            for port in (bridge.ops_port, own):
                assert (await http.get(f"http://127.0.0.1:{port}/status")).status_code == 200
                assert (await http.post(f"http://127.0.0.1:{port}/voice", data={"CallSid": "CA1"})).status_code == 404
            assert (await http.get(bridge.http_url + "/metrics")).status_code == 404
        with pytest.raises(InvalidStatus) as refused:  # 404: no media stream here (unsigned, the public port says 403)
            async with connect(f"ws://127.0.0.1:{own}/media-stream"):
                pass
        assert refused.value.response.status_code == 404
    finally:
        bridge.kill()


def test_ops_token_alone_guards_status_and_metrics_on_the_public_port(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread]
) -> None:
    bridge = start_bridge(bridge_settings(emulator, **{"ops.token": OPS_TOKEN}))
    for path in ("/status", "/metrics"):
        assert httpx.get(bridge.http_url + path).status_code == 401
        assert httpx.get(bridge.http_url + path, headers={"Authorization": OPS_TOKEN}).status_code == 401
        assert httpx.get(bridge.http_url + path, headers=BEARER).status_code == 200
    assert httpx.get(bridge.http_url + "/healthz").json() == {"status": "ok", "mode": "production"}
    assert httpx.get(bridge.http_url + "/readyz").status_code == 200


def test_without_ops_settings_everything_is_on_one_open_port(bridge: ServerThread) -> None:
    for path in ("/status", "/metrics", "/healthz", "/readyz"):
        assert httpx.get(bridge.http_url + path).status_code == 200


def test_a_running_bridge_reports_its_event_loop_lag(bridge: ServerThread) -> None:
    """The lag probe runs from start-up: a scrape a moment later has samples (ops/loop_health.py)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = httpx.get(bridge.http_url + "/metrics").text
        count = [row for row in text.splitlines() if row.startswith("bridge_event_loop_lag_seconds_count ")]
        if count and float(count[0].split()[1]) >= 2:
            return
        time.sleep(0.05)
    raise AssertionError("no event loop lag samples within 5 s")


def test_workers_share_the_ops_listener_like_the_public_one(emulator: ServerThread, redis_server: RedisServer) -> None:
    bridge = BridgeProcess(emulator, {"REDIS_URL": redis_server.url, "BRIDGE__SERVER__WORKERS": "2", "OPS_PORT": "0"})
    try:
        ops = f"http://127.0.0.1:{bridge.ops_port}"
        assert bridge.ops_port and bridge.ops_port != bridge.port
        wait_until(lambda: httpx.get(ops + "/healthz", timeout=5).status_code == 200, 20.0, "a worker's ops listener")
        for _ in range(20):  # whichever worker the kernel picks
            assert httpx.get(ops + "/status", timeout=5).json()["mode"] == "production"
            assert httpx.get(bridge.http_url + "/status", timeout=5).status_code == 404
        bridge.proc.send_signal(signal.SIGTERM)
        assert bridge.finish(timeout_s=40) == 0
    finally:
        bridge.kill()


async def test_debug_heap_is_an_ops_path_and_names_allocation_sites_only(emulator: ServerThread) -> None:
    """``/debug/heap`` under ``PYTHONTRACEMALLOC``: on the ops listener with the token only; file:line sites and
    sizes (what grew since the previous answer), never a value from the heap."""
    env = {
        "OPS_PORT": "0",
        "OPS_TOKEN": OPS_TOKEN,
        "PYTHONTRACEMALLOC": "1",
        "BRIDGE__SERVER__GC_YOUNG_THRESHOLD": "1000000",
    }
    bridge = BridgeProcess(emulator, env)
    try:
        ops = f"http://127.0.0.1:{bridge.ops_port}/debug/heap"
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            assert (await http.get(bridge.http_url + "/debug/heap", headers=BEARER)).status_code == 404
            assert (await http.get(ops)).status_code == 401
            assert (await http.get(ops, params={"by": "size"}, headers=BEARER)).status_code == 400
            for top in ("0", "501", "x"):
                assert (await http.get(ops, params={"top": top}, headers=BEARER)).status_code == 400
            first = (await http.get(ops, headers=BEARER)).json()
            flow = await run_flow(bridge.http_url, http=http, seconds=1.0, auth_token=AUTH_TOKEN, public_url=PUBLIC_URL)
            assert flow.outcome == "served"
            second = await http.get(ops, params={"by": "traceback"}, headers=BEARER)
            third = (await http.get(ops, params={"by": "traceback", "top": "3"}, headers=BEARER)).json()
            status = (await http.get(f"http://127.0.0.1:{bridge.ops_port}/status", headers=BEARER)).json()
    finally:
        bridge.kill()
    assert (first["tracing"], first["traced_bytes"] > 0, first["gc_objects"] > 0) == (True, True, True)
    assert len(first["growth"]) == 15 and all(site["bytes_diff"] == site["bytes"] for site in first["growth"])
    assert all(re.fullmatch(r"[^ ]+:\d+( <- [^ ]+:\d+)*", site["site"]) for site in third["growth"])
    assert status["process"]["python_traced_bytes"] > 0 and status["process"]["python_allocated_blocks"] > 0
    assert first["malloc"]["in_use_bytes"] > 0 and status["process"]["malloc"]["in_use_bytes"] > 0  # glibc
    assert first["gc_thresholds"] == [1_000_000, *OLDER_THRESHOLDS] and first["gc_frozen_objects"] > 0  # applied
    # With that threshold nothing collects during the test, so the cycles the call's requests left wait for this
    # count (the call's own objects are freed when it ends: tests/test_task_group.py).
    garbage = second.json()["cyclic_garbage"]
    assert garbage["objects"] > 0 and garbage["objects"] >= sum(count for _, count in garbage["top_types"])
    assert all(
        re.fullmatch(r"[\w.]+( [\w.<>]+ \([^ ]+:\d+\))?", name) and count > 0 for name, count in garbage["top_types"]
    )
    assert len(third["growth"]) == 3 and len(third["cyclic_garbage"]["top_types"]) <= 3
    for secret in (AUTH_TOKEN, OPS_TOKEN, "test-key", flow.call_sid):
        assert secret not in second.text


async def test_debug_tasks_is_an_ops_path_and_shows_where_a_live_calls_tasks_wait(emulator: ServerThread) -> None:
    """``/debug/tasks`` during a call: on the ops listener with the token only; each of the call's tasks by name
    with its chain of awaits as code locations (where a call that never ends is stuck), never a value."""
    bridge = BridgeProcess(emulator, {"OPS_PORT": "0", "OPS_TOKEN": OPS_TOKEN})
    call: asyncio.Task[CallResult] | None = None
    try:
        ops = f"http://127.0.0.1:{bridge.ops_port}"
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            assert (await http.get(bridge.http_url + "/debug/tasks", headers=BEARER)).status_code == 404
            assert (await http.get(ops + "/debug/tasks")).status_code == 401
            call = asyncio.create_task(run_call(signed_call(bridge, seconds=3.0)))

            async def connected() -> bool:
                calls = (await http.get(ops + "/status", headers=BEARER)).json()["calls"]
                return any(c["ai_connected"] for c in calls)

            deadline = time.monotonic() + 10
            while not await connected():
                assert time.monotonic() < deadline, "the call's AI session never connected"
                await asyncio.sleep(0.05)
            answer = await http.get(ops + "/debug/tasks", headers=BEARER)
            result = await call
    finally:
        if call is not None:
            call.cancel()  # (done by now unless an assertion above failed)
        bridge.kill()
    assert result.ended_by == "caller"
    report = answer.json()
    by_name = {task["name"]: task["awaiting"] for task in report["tasks"]}
    assert report["count"] == len(report["tasks"]) > 0
    for name in ("caller-pump", "caller-watchdog", "ai-side", "outbound", "lease-heartbeat", "to-ai", "from-ai"):
        assert name in by_name, f"{name} not among {sorted(by_name)}"
    assert by_name["caller-pump"][0].startswith("Call._caller_pump (telephony_bridge/bridge.py:")
    assert by_name["ai-side"][0].startswith("AiSide.run (telephony_bridge/ai_side.py:")
    assert any(step.startswith("AiSide._converse (telephony_bridge/ai_side.py:") for step in by_name["ai-side"])
    assert all(re.fullmatch(r"[\w.<>]+ \([\w/.]+:(\d+|\?)\)|[\w.<>]+( \(finished\))?", step)
               for task in report["tasks"] for step in task["awaiting"])  # fmt: skip
    for secret in (AUTH_TOKEN, OPS_TOKEN, "test-key", result.call_sid):
        assert secret not in answer.text


async def test_an_await_chain_names_each_coroutine_down_to_the_future() -> None:
    """``ops.tasks.await_chain`` alone: outermost first, file relative to the package, the bottom's type."""
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def inner() -> None:
        await waiter

    async def outer() -> None:
        await inner()

    task = asyncio.create_task(outer(), name="witness")
    await asyncio.sleep(0)
    report = task_report([task])
    waiter.set_result(None)
    await task
    (row,) = report["tasks"]
    assert row["name"] == "witness" and report["count"] == 1
    outer_step, inner_step, bottom = row["awaiting"]
    assert re.fullmatch(r"test_an_await_chain_.*\.<locals>\.outer \(test_ops_access\.py:\d+\)", outer_step)
    assert re.fullmatch(r"test_an_await_chain_.*\.<locals>\.inner \(test_ops_access\.py:\d+\)", inner_step)
    assert bottom in ("FutureIter", "Future")
    assert task_report([task]) == {"count": 0, "tasks": []}  # a finished task is not listed
