"""The load's own processes (bench/lean_ai.py; the callers bench/capacity.py runs) with the bridge's GC settings
(``ops/gc_tuning.py``), and their pauses counted.

Why: a full collection in a load process stalls every call that process carries at once, and the bridge in front
hears it as the AI's (or the caller's) frames coming late: a hole in each of those calls that is not the
bridge's. A run at 250 calls with exactly one hole in each of 181 calls, while the bridge's loop never lagged
20 ms and it sent nothing late, had that pattern (docs/performance.md). Real callers and a real AI are other
machines.
"""

from __future__ import annotations

import gc
import os
import time

from telephony_bridge.audio.codec import FRAME_S
from telephony_bridge.ops.gc_tuning import tune_gc


class GcPauses:
    """A ``gc.callbacks`` entry that counts the collections that stopped the process for more than a frame."""

    def __init__(self) -> None:
        self.over_a_frame = 0
        self._started: float | None = None

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            if time.perf_counter() - self._started > FRAME_S:
                self.over_a_frame += 1
            self._started = None


PAUSES = GcPauses()


def prepare(cpus: frozenset[int] | None = None) -> None:
    """At a load process's start, once what it needs is imported: its CPUs (when pinned), the bridge's GC
    settings, and its pauses counted in ``PAUSES``."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    tune_gc()
    if PAUSES not in gc.callbacks:
        gc.callbacks.append(PAUSES)
