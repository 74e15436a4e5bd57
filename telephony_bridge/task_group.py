"""``asyncio.TaskGroup`` whose exit leaves no reference cycle behind, so a call's objects go when the call does.

When a call ends, its tasks end by raising: one with the exception that ended the call, the others cancelled.
Each exception's traceback holds the frames it passed through, and those frames hold their locals: the call, its
legs, buffers and transports. Two cycles closed through them on Python 3.11 and 3.12:
- a cancelled child keeps its ``CancelledError``, whose traceback's frames hold (through the child's own task
  group, in ``AiSide._converse``) that very task;
- ``TaskGroup.__aexit__`` keeps the exception it raises in its own locals, and the exception's traceback holds
  that frame.
Reference counting cannot free a cycle, so each ended call's ~100 objects waited for a full collection; with
250 calls on a core, one such collection (250 ended calls' garbage beside the live calls' objects) stalled the
event loop ~40 ms: a hole in every call's audio.

A third closes when the task running a group ends by raising through it (the AI side, when the AI says goodbye):
the task keeps its exception, whose traceback holds the frames that entered and exited the group, which hold the
group, which holds its parent: that task (3.11.7, 3.12.1 and 3.13.0 all keep it; later patch releases let go of
it themselves, gh-128552).

On exit this group breaks all three: it takes each cancelled child's ``CancelledError`` (nobody else reads it) and
drops its traceback, it clears the locals of ``TaskGroup.__aexit__``'s own frame, which has returned by raising,
in the exception it raises, and it lets go of its parent task. It clears no other frame: ``frame.clear()`` on
3.11 and 3.12 closes a coroutine that is suspended in that frame (3.13 refuses instead), and an exception that one
task caught and kept can carry such a frame in its traceback. A child's own failure keeps its traceback whole, for
the logs.

It also keeps a cancellation from outside that arrives while the group is exiting because a child failed. On
Python 3.11 and 3.12 the group raises its children's errors and the outside ``CancelledError`` is lost (fixed
in 3.13, gh-116720). A call's AI side runs its session's tasks in a group of its own, inside the call's group. If
the caller hung up just as the AI dropped, the AI side caught the drop, reconnected, and ran for ever. The call's
group waited for it: the call held its device slot and never ended (seen in ``bench/soak.py``, 7 Dec). As 3.13
does, the parent task is cancelled again when a cancellation is still pending (on the loop's next turn), so the
next ``await`` that suspends it raises.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from contextvars import Context
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

# Before 3.13 asyncio's group drops an outside cancellation when its children's errors are raised instead, and
# never takes back its own request to cancel its parent if made during the exit (``_keep_outside_cancellation``).
_LOSES_CANCELLATION = sys.version_info < (3, 13)


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
        # No local of this frame may outlive the call below but ``self``: what this frame raises holds it.
        requested_before = self._parent_cancel_requested
        parent = self._parent_task  # read first: later patch releases clear it in their own exit (gh-128552)
        try:
            return await super().__aexit__(et, exc, tb)
        except BaseException as raised:
            exc = tb = None  # what it raises, or what it was given: the same cycle again
            _clear_returned_aexit(raised)
            if _LOSES_CANCELLATION and parent is not None:
                cancelled = isinstance(raised, asyncio.CancelledError)
                self._keep_outside_cancellation(parent, requested_before, cancelled)
            raise
        finally:
            _drop_cancellations(self._children)
            # The parent task keeps what it raises, and that exception's traceback holds this frame and the one
            # that entered the group (``self`` in both): a finished group has no use for its parent.
            parent = None
            if not self._tasks:
                self._parent_task = None

    def _keep_outside_cancellation(self, parent: asyncio.Task[Any], requested_before: bool, cancelled: bool) -> None:
        """What 3.13's ``TaskGroup.__aexit__`` does and 3.11's and 3.12's do not. The group's own request to
        cancel its parent (made when a child failed) is taken back here if it was made during the exit, where
        asyncio's own exit no longer looks at it. Any request left then came from outside: if the group is
        raising errors rather than ``CancelledError``, the parent is cancelled again, keeping the count, so
        that the cancellation is not lost.

        Again on the loop's next turn, not at once: before 3.13 ``uncancel()`` does not call off a cancellation
        already issued, so one issued here would still land after its requester took it back in this same step
        (an ``asyncio.timeout`` around the group, or an outer group in the same task, whose exit the raised
        errors pass through). The parent's next await that suspends still raises ``CancelledError``."""
        if self._parent_cancel_requested and not requested_before:
            parent.uncancel()
        if not cancelled and parent.cancelling():
            asyncio.get_running_loop().call_soon(_cancel_again, parent)


def _cancel_again(task: asyncio.Task[Any]) -> None:
    """A cancellation still pending on ``task`` (nobody has taken it back), issued again, keeping the count."""
    if not task.done() and task.cancelling():
        task.uncancel()
        task.cancel()


def _clear_returned_aexit(raised: BaseException) -> None:
    """Clear asyncio's ``__aexit__`` frame in ``raised``'s traceback: the entry after the one of our ``__aexit__``
    (still running), a frame that has returned, by raising ``raised``."""
    ours = raised.__traceback__
    if ours is not None and ours.tb_next is not None:
        ours.tb_next.tb_frame.clear()


def _drop_cancellations(children: list[asyncio.Task[Any]]) -> None:
    """Take each cancelled task's ``CancelledError`` (the task keeps it until someone asks) and its traceback."""
    for task in children:
        if task.cancelled():
            try:
                task.result()
            except asyncio.CancelledError as cancelled:
                cancelled.__traceback__ = None  # its frames (all returned: the task is done) go now, and their locals
    children.clear()
