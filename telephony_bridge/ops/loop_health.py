"""How late the event loop runs, and how long garbage collection stops the process.

Every call's audio is paced from this one event loop: when it wakes a timer more than a frame late, the
caller's playback can run dry (an underrun the bridge counts as ``scheduling``). These two histograms say
why it was late: the loop was busy or the machine gave it no CPU (``bridge_event_loop_lag_seconds``), or the
collector had stopped everything (``bridge_gc_pause_seconds``). Ops alert on the first; a bridge whose lag
p99 passes 20 ms needs fewer calls or another process.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from telephony_bridge.clock import Clock
from telephony_bridge.ops.metrics import Metrics

LAG_SAMPLE_S = 0.05  # one timer every 50 ms: a cheap probe that still sees a stall of a frame or two


async def watch_loop_lag(clock: Clock, metrics: Metrics, interval_s: float = LAG_SAMPLE_S) -> None:
    """Sleep ``interval_s`` at a time, for ever, and record how late each wake-up came."""
    due = clock.monotonic() + interval_s
    while True:
        await clock.sleep_until(due)
        now = clock.monotonic()
        metrics.loop_lag.observe(max(0.0, now - due))
        due = now + interval_s


def watch_gc(metrics: Metrics) -> Callable[[], None]:
    """Time every garbage collection into ``bridge_gc_pause_seconds``; returns the function that stops it."""
    started: list[float] = []

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            pause_s = time.perf_counter() - started.pop()
            metrics.gc_pause.labels(generation=str(info.get("generation", ""))).observe(pause_s)

    gc.callbacks.append(on_gc)

    def stop() -> None:
        if on_gc in gc.callbacks:
            gc.callbacks.remove(on_gc)

    return stop
