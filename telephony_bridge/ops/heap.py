"""Where the Python heap grows, for ``GET /debug/heap`` (an ops path): the tool that tells a leak from an
allocator's high-water mark when RSS climbs over thousands of calls (``bench/soak.py`` reads it).

Allocation sites are known only when the process runs under tracemalloc, which costs CPU and memory, so the
bridge never starts it itself: run it with Python's own switch, ``PYTHONTRACEMALLOC=1`` (or ``-X
tracemalloc``; a larger number keeps more frames per site). Without it the endpoint still gives the cheap
figures (allocated blocks, gc objects, the cyclic garbage by type). The answer holds type and function names,
source file names, line numbers and sizes, never a value from the heap, so no secret or audio can reach it. Each answer
runs two full collections, which ``bridge_gc_pause_seconds{generation="2"}`` counts like any other.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import linecache
import sys
import sysconfig
import tracemalloc
from collections import Counter
from collections.abc import Callable
from types import FrameType
from typing import Any

TOP_SITES = 15  # allocation sites (and garbage types) listed per answer, unless ?top= says otherwise
MAX_SITES = 500
GROUPINGS = ("lineno", "traceback")
_STDLIB = sysconfig.get_paths()["stdlib"]


Sizes = dict[tracemalloc.Traceback, tuple[int, int]]  # site -> (bytes, blocks)


class HeapProbe:
    """Keeps the previous report's sizes per site (not the snapshot: its traces would be a heap of their own)
    so each answer says what grew since the last one."""

    def __init__(self) -> None:
        self._previous: dict[str, Sizes] = {}

    def report(self, top: int = TOP_SITES, by: str = "lineno") -> dict[str, Any]:
        """Heap figures now and, under tracemalloc, the ``top`` sites by growth since the previous report
        grouped the same way (the first compares with an empty heap, so it lists the largest sites). ``by`` is
        ``lineno`` (the allocating line) or ``traceback`` (every frame tracemalloc kept: who called it)."""
        if by not in GROUPINGS:
            raise ValueError(f"expected 'by' to be one of {', '.join(GROUPINGS)}, got {by!r}")
        # What refcounting could not free since the last collection, by type; its second collection leaves
        # what survives one, which is what the figures below count (cyclic garbage is not a leak).
        garbage = cyclic_garbage(top)
        body: dict[str, Any] = {
            "cyclic_garbage": garbage,
            "gc_thresholds": list(gc.get_threshold()),
            "allocated_blocks": sys.getallocatedblocks(),
            "gc_objects": len(gc.get_objects()),
            "gc_frozen_objects": gc.get_freeze_count(),
            "tracing": tracemalloc.is_tracing(),
        }
        body["malloc"] = malloc_figures()
        if not tracemalloc.is_tracing():
            body["hint"] = "start the process with PYTHONTRACEMALLOC=1 to see allocation sites"
            return body
        peak = tracemalloc.get_traced_memory()[1]
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, path) for path in (tracemalloc.__file__, linecache.__file__, __file__)]
        )
        now: Sizes = {stat.traceback: (stat.size, stat.count) for stat in snapshot.statistics(by)}
        del snapshot
        before = self._previous.get(by, {})
        self._previous[by] = now
        growth = [(site, *now.get(site, (0, 0)), *before.get(site, (0, 0))) for site in now.keys() | before.keys()]
        growth.sort(key=lambda g: (abs(g[1] - g[3]), abs(g[2] - g[4])), reverse=True)
        body.update(
            traced_bytes=sum(size for size, _ in now.values()),  # the program's: not this probe's own sizes
            traced_peak_bytes=peak,
            tracemalloc_overhead_bytes=tracemalloc.get_tracemalloc_memory(),
            growth=[
                _site(site, size, size - size0, count, count - count0)
                for site, size, count, size0, count0 in growth[:top]
            ],
        )
        return body


def cyclic_garbage(top: int = TOP_SITES) -> dict[str, Any]:
    """A full collection that keeps what it finds unreachable (``DEBUG_SAVEALL``), counted by type and then
    freed by a second collection: the objects only the cycle collector frees. They wait for a collection, so
    the more of them a call leaves, the higher memory climbs between collections. Type names only, never a
    value; entries already in ``gc.garbage`` (someone's own debugging) are left as they were. A frame is named
    by its function and line as well (``builtins.frame Outbound.run (telephony_bridge/outbound.py:120)``): a
    frame in a cycle is usually an exception kept with its traceback, and it holds all its locals, so where it
    ran says what to fix."""
    debug = gc.get_debug()
    before = len(gc.garbage)
    gc.set_debug(debug | gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = gc.garbage[before:]
        types = Counter(map(garbage_kind, found))
        del found
    finally:
        del gc.garbage[before:]
        gc.set_debug(debug)
        gc.collect()  # kept alive only to be counted: free them now
    return {"objects": sum(types.values()), "top_types": types.most_common(top)}


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def malloc_figures() -> dict[str, int] | None:
    """glibc's view of the C heap (``mallinfo2``; None elsewhere): bytes in use by C allocations (numpy
    buffers, large bytes objects, the event loop's and parsers' own), bytes free but kept in its arenas
    (fragmentation), and bytes in separate mmaps. Python's small objects live in pymalloc's own arenas."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    return {
        "in_use_bytes": info.uordblks + info.hblkhd,
        "free_bytes": info.fordblks,
        "arena_bytes": info.arena,
        "mmap_bytes": info.hblkhd,
    }


@functools.cache
def _mallinfo2() -> Callable[[], _Mallinfo2] | None:
    try:
        function = ctypes.CDLL(None).mallinfo2  # the process's own symbols: glibc's, where it is the C library
    except (AttributeError, OSError):
        return None
    function.restype = _Mallinfo2
    return function  # type: ignore[no-any-return]


def garbage_kind(obj: object) -> str:
    """How the garbage counts name ``obj``: its type, and a frame also by its function and file:line."""
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if type(obj) is FrameType:  # not isinstance: a dead weak proxy in the garbage raises ReferenceError
        code = obj.f_code
        return f"{kind} {code.co_qualname} ({_short(code.co_filename)}:{obj.f_lineno})"
    return kind


def _site(traceback: tracemalloc.Traceback, size: int, size_diff: int, count: int, count_diff: int) -> dict[str, Any]:
    return {
        "site": " <- ".join(f"{_short(frame.filename)}:{frame.lineno}" for frame in reversed(traceback)),
        "bytes": size,
        "bytes_diff": size_diff,
        "blocks": count,
        "blocks_diff": count_diff,
    }


def _short(filename: str) -> str:
    """The path from the package, site-packages or the standard library on: enough to find the line, without
    the machine's layout."""
    _, sep, tail = filename.rpartition("site-packages/")
    if sep:
        return tail
    _, sep, tail = filename.rpartition("/telephony_bridge/")
    if sep:
        return "telephony_bridge/" + tail
    return filename.removeprefix(_STDLIB + "/")
