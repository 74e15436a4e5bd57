"""``asyncio.TaskGroup`` whose exit leaves no reference cycle behind, so a call's objects go when the call does.

When a call ends, its tasks end by raising (cancelled, or the exception that ended the call). Each exception's
traceback holds the frames it passed through, and those frames hold their locals: the call, its legs, buffers
and transports, and (through the task group) the task that holds the exception: a cycle. Python 3.11's and
3.12's ``TaskGroup.__aexit__`` adds one of its own (it keeps the exception it raises in its locals). Refcounting
cannot free a cycle, so each ended call's ~100 objects waited for a full collection; with 250 calls on a core,
one such collection (the garbage of 250 ended calls, beside the live calls' objects) stalled the event loop for
~40 ms: a hole in every call's audio.

On exit this group clears the locals of the finished frames in its children's exceptions and in the one it
raises (``traceback.clear_frames``: the tracebacks themselves, files and lines, stay for the logs), so nothing
of a call outlives it but what is still in use.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Coroutine
from contextvars import Context
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")


class TaskGroup(asyncio.TaskGroup):
    def __init__(self) -> None:
        super().__init__()
        self._children: list[asyncio.Task[Any]] = []

    def create_task(
        self, coro: Coroutine[Any, Any, T], *, name: str | None = None, context: Context | None = None
    ) -> asyncio.Task[T]:
        task = super().create_task(coro, name=name, context=context)
        self._children.append(task)
        return task

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        try:
            return await super().__aexit__(et, exc, tb)
        except BaseException as raised:
            exc = tb = None  # this frame would hold what it raises: the same cycle again
            traceback.clear_frames(raised.__traceback__)  # this frame is still running: it is skipped
            raise
        finally:
            for task in self._children:
                _clear_outcome_frames(task)
            self._children.clear()


def _clear_outcome_frames(task: asyncio.Task[Any]) -> None:
    """Clear the locals of the frames a finished task's exception passed through (all finished: the task is)."""
    if not task.done():
        return
    try:
        failure = task.exception()  # the cancellation itself, for a cancelled task
    except asyncio.CancelledError as cancelled:
        failure = cancelled
    if failure is not None:
        traceback.clear_frames(failure.__traceback__)
        del failure  # its traceback now holds this frame too
