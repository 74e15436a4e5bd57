"""Garbage collection settings for a serving process.

Freezing what start-up built (modules, the app, settings: ~65,000 objects the collector tracks) moves it out
of the collector's sight for good, so a full collection walks only what calls made: shorter pauses under load.

The thresholds are CPython's (700, 10, 10) unless ``server.gc_young_threshold`` says otherwise. A call's whole
object graph (~290 objects: the call, its legs and buffers, its tasks, tracebacks and frames, and uvicorn's and
websockets' protocol objects, which sit in cycles of their own) is freed only by the cycle collector
(``GET /debug/heap`` counts it by type). The young threshold counts tracked objects allocated less those
freed, and that garbage is never freed until a collection, so a larger threshold lets more of it pile up
between collections and memory climbs higher before it levels: with 50,000, resident memory grew 14 MB over
1,000 calls against 6 MB with 700 (``BRIDGE__SERVER__GC_YOUNG_THRESHOLD=50000 python bench/soak.py --scenario
normal --no-faults --calls 1000``), and the CPU it saved was within the run-to-run noise (README, Performance).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 700  # CPython's: tracked objects allocated, less those freed, between young collections
OLDER_THRESHOLDS = (10, 10)  # CPython's: young collections per middle one, middle ones per full


def tune_gc(young_threshold: int = YOUNG_THRESHOLD, *, freeze: bool = True) -> None:
    """Call once, after start-up and before serving: sets the thresholds and, with ``freeze``, collects and
    freezes what exists."""
    if freeze:
        gc.collect()
        gc.freeze()
    gc.set_threshold(young_threshold, *OLDER_THRESHOLDS)
