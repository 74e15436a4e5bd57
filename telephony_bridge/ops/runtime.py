"""What the serving process holds right now, for ``/status``: asyncio tasks, open file descriptors, resident
memory. A leak of any of them over thousands of calls is what ``bench/soak.py`` looks for."""

from __future__ import annotations

import asyncio
import os
import sys
import tracemalloc
from pathlib import Path
from typing import Any

from telephony_bridge.ops.heap import malloc_figures

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def process_figures() -> dict[str, Any]:
    """``asyncio_tasks`` on this event loop, ``open_fds``, ``rss_bytes`` (None where the OS does not say), and
    ``python_allocated_blocks``: live blocks of Python's own allocator, which rise with a leak of Python objects
    but not with the allocator's high-water mark, as RSS does; ``python_traced_bytes`` under tracemalloc;
    ``malloc``: the C heap in use and free (``heap.malloc_figures``)."""
    return {
        "pid": os.getpid(),
        "asyncio_tasks": len(asyncio.all_tasks()),
        "open_fds": _count_fds(),
        "rss_bytes": _rss_bytes(),
        "python_allocated_blocks": sys.getallocatedblocks(),
        "python_traced_bytes": tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None,
        "malloc": malloc_figures(),
    }


def _count_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def _rss_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return None
