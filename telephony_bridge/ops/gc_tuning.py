"""Garbage collection settings for a serving process.

A bridge allocates a few short-lived objects per 20 ms frame (messages, events, small arrays); almost none of
them form cycles, yet with CPython's default thresholds (700, 10, 10) they trigger a young collection every
few hundred frames, and every so often a full one that walks every long-lived object (20–28 ms pauses were
measured at load: longer than a frame). Freezing what start-up built (modules, the app, settings) moves it out
of the collector's sight for good, and a larger young generation makes collections rarer; cyclic garbage is
still collected, just in bigger, less frequent batches.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000  # allocations between young collections (CPython default 700)
OLDER_THRESHOLDS = (20, 100)  # young collections per middle one, middle ones per full (defaults 10, 10)


def tune_gc() -> None:
    """Call once, after start-up and before serving: freezes what exists and raises the thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
