"""What each asyncio task is waiting on, for ``GET /debug/tasks`` (an ops path): the tool that tells where a call
is stuck when it stays in ``/status`` long after its caller has gone (``bench/soak.py`` prints it then).

Each task's name and chain of awaits, outermost first, as ``function (file:line)``: task names (a SIP call's
carries the start of its Call-ID, which ``/status`` lists anyway) and code locations, never a local variable's
value, so no secret or audio can reach it. It walks the live tasks' coroutine objects and reads no source file,
but holds the event loop meanwhile: ~30 µs a task here, so tens of milliseconds at 250 calls. For diagnosis,
not for scraping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from types import FrameType
from typing import Any

MAX_DEPTH = 40  # awaits followed per task


def task_report(tasks: Iterable[asyncio.Task[Any]]) -> dict[str, Any]:
    """The tasks still running, by name, each with its chain of awaits."""
    rows = [{"name": task.get_name(), "awaiting": await_chain(task.get_coro())} for task in tasks if not task.done()]
    rows.sort(key=lambda row: (row["name"], row["awaiting"]))
    return {"count": len(rows), "tasks": rows}


def await_chain(coro: object) -> list[str]:
    """Where ``coro`` is suspended, and what it awaits in turn, down to the future or object at the bottom."""
    chain: list[str] = []
    while coro is not None and len(chain) < MAX_DEPTH:
        frame = _frame_of(coro)
        if frame is None:
            if hasattr(coro, "cr_await") or hasattr(coro, "gi_yieldfrom"):
                chain.append(f"{getattr(coro, '__qualname__', type(coro).__name__)} (finished)")
            else:  # the bottom: a future, or anything else with __await__
                chain.append(type(coro).__name__)
            break
        lineno = frame.f_lineno if frame.f_lineno is not None else "?"
        chain.append(f"{frame.f_code.co_qualname} ({_short(frame.f_code.co_filename)}:{lineno})")
        awaited = getattr(coro, "cr_await", None)
        coro = awaited if awaited is not None else getattr(coro, "gi_yieldfrom", None)
    return chain


def _frame_of(coro: object) -> FrameType | None:
    for name in ("cr_frame", "gi_frame", "ag_frame"):
        frame = getattr(coro, name, None)
        if frame is not None:
            return frame  # type: ignore[no-any-return]
    return None


def _short(path: str) -> str:
    """The path from the package (or the standard library's module) on: no install location."""
    if "/site-packages/" in path:  # first: a checkout named telephony_bridge may hold the venv
        return path.rsplit("/site-packages/", 1)[1]
    if "/telephony_bridge/" in path:
        return "telephony_bridge/" + path.rsplit("/telephony_bridge/", 1)[1]
    if "/lib/python" in path:  # .../lib/python3.11/asyncio/tasks.py
        return path.rsplit("/lib/python", 1)[1].split("/", 1)[-1]
    return path.rsplit("/", 1)[-1]
