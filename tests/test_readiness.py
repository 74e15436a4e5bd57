"""``/readyz`` on real servers: 503 naming the failing check (accounting backend down, no device with a slot and
budget, token endpoint failing; draining is in test_drain.py), and cheap enough to probe every second."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import redis

from telephony_bridge.serving import ServerThread
from tests.redis_server import RedisServer
from tests.support import bridge_settings, call_form, post_voice, stream_callback, wait_until


def readyz(bridge: ServerThread) -> tuple[int, dict[str, Any]]:
    response = httpx.get(bridge.http_url + "/readyz", timeout=5)
    return response.status_code, response.json()


def scripts_run(server: RedisServer) -> int:
    """How many Lua scripts the Redis server has run (EVAL and EVALSHA), from its own statistics."""
    stats = redis.Redis.from_url(server.url).info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("eval", "evalsha"))


def test_readyz_names_the_unreachable_accounting_backend(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread], own_redis_server: RedisServer
) -> None:
    bridge = start_bridge(
        bridge_settings(emulator, redis_url=own_redis_server.url, **{"accounting.readiness_cache_s": 0.2})
    )
    assert readyz(bridge) == (200, {"ready": True})
    own_redis_server.stop()
    wait_until(lambda: readyz(bridge)[0] == 503, 5.0, "readyz to notice Redis is gone")
    code, body = readyz(bridge)
    assert (code, body["ready"], body["reason"]) == (503, False, "accounting unavailable")
    assert "did not answer" in body["detail"] and "password" not in body["detail"]


def test_readyz_reads_accounting_at_most_once_per_cache_period(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread], redis_server: RedisServer
) -> None:
    bridge = start_bridge(bridge_settings(emulator, redis_url=redis_server.url))
    assert readyz(bridge)[0] == 200
    before, started = scripts_run(redis_server), time.monotonic()
    probes = 40
    for _ in range(probes):
        assert readyz(bridge)[0] == 200
    elapsed_s = time.monotonic() - started
    scripts = scripts_run(redis_server) - before
    assert scripts <= elapsed_s / 1.0 + 2, f"{scripts} scripts for {probes} probes in {elapsed_s:.2f} s"


def test_readyz_turns_503_once_no_device_has_budget_and_200_again_when_a_slot_frees(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread]
) -> None:
    bridge = start_bridge(
        bridge_settings(
            emulator,
            **{
                "savants.device_ids": ["only"],
                "accounting.max_concurrent_per_device": 1,
                "accounting.readiness_cache_s": 0.1,
            },
        )
    )
    form = call_form()
    assert "<Connect" in post_voice(bridge, form).text
    wait_until(lambda: readyz(bridge)[0] == 503, 5.0, "readyz to see the pool full")
    assert readyz(bridge)[1]["reason"] == "device pool full"
    stream_callback(bridge, "/stream-ended", {"CallSid": form["CallSid"], "AccountSid": form["AccountSid"]})
    wait_until(lambda: readyz(bridge)[0] == 200, 5.0, "readyz once the reservation is given back")


def test_status_reports_what_the_process_holds(emulator: ServerThread, bridge: ServerThread) -> None:
    """What bench/soak.py watches for leaks: asyncio tasks, open file descriptors, resident memory, Python's
    allocated blocks, the C heap (traced bytes only under tracemalloc, which this process is not)."""
    process = httpx.get(bridge.http_url + "/status", timeout=5).json()["process"]
    assert set(process) == {
        "pid", "asyncio_tasks", "open_fds", "rss_bytes", "python_allocated_blocks", "python_traced_bytes", "malloc"
    }  # fmt: skip
    assert process["asyncio_tasks"] >= 1 and process["open_fds"] > 3 and process["rss_bytes"] > 10 * 2**20
    assert process["python_allocated_blocks"] > 10_000 and process["python_traced_bytes"] is None
    assert set(process["malloc"]) == {"in_use_bytes", "free_bytes", "arena_bytes", "mmap_bytes"}
