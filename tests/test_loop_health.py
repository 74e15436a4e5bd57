"""The event loop's lag and the collector's pauses reach /metrics, where ops (and bench/capacity.py) read why
paced audio went late."""

from __future__ import annotations

import asyncio
import gc
import time

from telephony_bridge.clock import SystemClock
from telephony_bridge.ops.loop_health import watch_gc, watch_loop_lag
from telephony_bridge.ops.metrics import Metrics


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


async def test_a_blocked_event_loop_shows_as_lag() -> None:
    metrics = Metrics()
    task = asyncio.create_task(watch_loop_lag(SystemClock(), metrics, interval_s=0.01))
    try:
        await asyncio.sleep(0.05)
        time.sleep(0.15)  # a stall: nothing runs on the loop for 150 ms
        await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    observed = sample(metrics, "bridge_event_loop_lag_seconds_count")
    under_100ms = sample(metrics, "bridge_event_loop_lag_seconds_bucket", {"le": "0.1"})
    assert observed >= 3
    # The stall, and at most one late wake-up of the runner's own: a schedule that drifted after the stall
    # (due += interval rather than from now) would count several over 100 ms.
    assert 1 <= observed - under_100ms <= 2
    assert sample(metrics, "bridge_event_loop_lag_seconds_sum") >= 0.1


def test_each_collection_is_timed_by_generation_until_stopped() -> None:
    metrics = Metrics()
    stop = watch_gc(metrics)
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        stop()
    assert sample(metrics, "bridge_gc_pause_seconds_count", {"generation": "0"}) >= 1
    assert sample(metrics, "bridge_gc_pause_seconds_count", {"generation": "2"}) >= 1
    counted = sample(metrics, "bridge_gc_pause_seconds_count", {"generation": "2"})
    gc.collect()
    assert sample(metrics, "bridge_gc_pause_seconds_count", {"generation": "2"}) == counted  # stopped
