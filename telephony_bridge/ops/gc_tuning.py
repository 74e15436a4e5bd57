"""Garbage collection settings for a serving process.

Freezing what start-up built (modules, the app, settings: ~71,000 objects the collector tracks) moves it out
of the collector's sight for good, so a full collection walks only what calls made.

Full collections are also made rare: one after 1,000 middle collections, not CPython's 10. A full collection
walks every object the live calls hold (~340 a call: their tasks, futures, contexts, legs and buffers) and
stalls the event loop meanwhile: ~36 ms at 250 calls on one core of the benchmark machine, longer than the
playout lead, so every call heard a hole. Under call churn CPython ran one every few dozen calls set up. It
found next to nothing to free: an ended call's objects go by reference counting when the call does
(``task_group``), and what cyclic garbage is left (an HTTP request's objects, at set-up) dies young, where the
young and middle collections free it. At 1,000, a process carrying 250 calls runs a full collection at most
about every 20 minutes (docs/performance.md); CPython also waits until the objects promoted since the last one
are a quarter of those it kept, and middle collections come with allocation, so a lightly loaded process runs
one far more rarely still. Cyclic garbage that reaches the oldest generation waits that long: a change that
made a call leave a cycle again would hold its memory for hours, which ``tests/test_task_group.py`` guards
against. ``server.gc_tuning: false`` leaves all of it as CPython has it.

The young threshold is CPython's 700 unless ``server.gc_young_threshold`` says otherwise. It counts tracked
objects allocated less those freed, and cyclic garbage is never freed until a collection, so a larger
threshold lets more of it pile up between collections and memory climbs higher before it levels: with 50,000,
resident memory grew 14 MB over 1,000 calls against 6 MB with 700 (``BRIDGE__SERVER__GC_YOUNG_THRESHOLD=50000
python bench/soak.py --scenario normal --no-faults --calls 1000``), and the CPU it saved was within the
run-to-run noise (docs/performance.md).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 700  # CPython's: tracked objects allocated, less those freed, between young collections
CPYTHON_OLDER_THRESHOLDS = (10, 10)  # young collections per middle one, middle ones per full
OLDER_THRESHOLDS = (10, 1000)  # tuned: full collections rare (see above)


def tune_gc(young_threshold: int = YOUNG_THRESHOLD, *, tuned: bool = True) -> None:
    """Call once, after start-up and before serving: sets the thresholds and, if ``tuned``, collects and freezes
    what exists and makes full collections rare."""
    if tuned:
        gc.collect()
        gc.freeze()
    gc.set_threshold(young_threshold, *(OLDER_THRESHOLDS if tuned else CPYTHON_OLDER_THRESHOLDS))
