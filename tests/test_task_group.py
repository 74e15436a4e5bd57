"""``task_group.TaskGroup``: a call's tasks end by raising, and nothing they held may wait for the cycle collector.

Each test runs with the collector off: what is freed is freed by reference counting alone, at once, as a call's
objects must be (``task_group``'s docstring says why). The end-to-end tests place real calls, Twilio and SIP,
through the bridge.
"""

from __future__ import annotations

import asyncio
import gc
import traceback
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from telephony_bridge.bridge import Call
from telephony_bridge.serving import ServerThread
from telephony_bridge.sip.leg import SipLeg
from telephony_bridge.task_group import TaskGroup
from telephony_bridge.tools.caller import run_call
from telephony_bridge.tools.emulator.faults import SessionFault
from telephony_bridge.tools.sip_caller import SipCallConfig, place_sip_call
from telephony_bridge.ws_handoff import _PicowsUpgrade
from tests.support import bridge_settings, signed_call, wait_until
from tests.support import collector_off as cycles_left
from tests.test_end_to_end import speech_band_noise
from tests.test_sip_calls import assert_all_released, start_sip_bridge, target

T = TypeVar("T")


class Held:
    """Something a task's frame holds, as a call's tasks hold the call."""


class Boom(Exception):
    pass


@pytest.fixture
def collector_off() -> Iterator[None]:
    """The collector off for the test; afterwards, none of the bridge's own objects may be cyclic garbage."""
    with cycles_left() as left:
        yield
    assert not left, f"left for the cycle collector: {left}"


async def _hold_until_cancelled(held: Held) -> None:
    await asyncio.sleep(3600)


async def _hold_and_fail(held: Held) -> None:
    await asyncio.sleep(0)
    raise Boom("the call's failure")


async def test_a_cancelled_group_frees_what_its_tasks_held(collector_off: None) -> None:
    """A call ending: the task that runs the group is cancelled while its children wait."""
    held = Held()
    gone = weakref.ref(held)

    async def parent(held: Held) -> None:
        async with TaskGroup() as tg:
            tg.create_task(_hold_until_cancelled(held))
            tg.create_task(_hold_until_cancelled(held))
            await asyncio.sleep(3600)

    task = asyncio.create_task(parent(held))
    del held
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    del task
    assert await _freed(gone), "the group's exit left a reference cycle: the tasks' objects wait for a collection"


async def test_a_failing_group_frees_what_its_tasks_held_and_keeps_the_traceback(collector_off: None) -> None:
    """A call ending on an error: one child fails, the other is cancelled, the caller handles the group."""
    held = Held()
    gone = weakref.ref(held)
    logged: list[str] = []

    async def parent(held: Held) -> None:
        try:
            async with TaskGroup() as tg:
                tg.create_task(_hold_and_fail(held))
                tg.create_task(_hold_until_cancelled(held))
        except* Boom as group:
            logged.append("".join(traceback.format_exception(group.exceptions[0])))  # as bridge.py logs one

    await parent(held)
    del held
    assert await _freed(gone), "the group's exit left a reference cycle: the tasks' objects wait for a collection"
    assert "_hold_and_fail" in logged[0]  # the failure's traceback was whole when it was handled


async def test_a_caught_and_kept_exception_raised_again_in_a_child_leaves_its_keeper_running() -> None:
    """An exception that one task caught and keeps carries that task's suspended frame in its traceback; when a
    child raises it again, leaving the group must not close the keeper (3.11's ``frame.clear()`` would)."""
    kept: list[ValueError] = []
    resumed = asyncio.Event()

    async def keeper() -> None:
        try:
            raise ValueError("kept")
        except ValueError as exc:
            kept.append(exc)
        await resumed.wait()  # suspended here while the group exits

    async def raise_kept() -> None:
        raise kept[0]

    keeping = asyncio.create_task(keeper())
    await asyncio.sleep(0)
    with pytest.raises(ExceptionGroup):
        async with TaskGroup() as tg:
            tg.create_task(raise_kept())
    resumed.set()
    await asyncio.wait_for(keeping, 1.0)  # it ran to its end, not closed under it


@pytest.mark.parametrize(
    ("fault", "settings", "ended_by"),
    [
        (None, {}, "caller"),  # the caller hangs up
        ("drop", {"savants.reconnect_deadline_s": 0}, "bridge"),  # the AI's socket drops: the call ends at once
        # the AI fails, the bridge reconnects, and on (every session fails a second in: no limit on reconnects)
        ("error", {"savants.reconnect_deadline_s": 2.0, "savants.max_reconnects_per_minute": 60}, "caller"),
        ("goodbye", {}, "bridge"),  # the AI closes with 1000: it hung up, and the call ends after its last words
    ],
)
async def test_an_ended_call_is_freed_without_the_cycle_collector(
    start_emulator: Callable[..., ServerThread],
    start_bridge: Callable[..., ServerThread],
    collector_off: None,
    fault: str | None,
    settings: dict[str, object],
    ended_by: str,
) -> None:
    """The whole call (legs, buffers, tasks, transports) goes when the call does, however it ends: with 250 calls
    on a core, a full collection that had ended calls to free stalled every call's audio (README, Performance),
    and full collections are rare now (``ops/gc_tuning.py``)."""
    # The fault comes after the echo's first audio has reached the caller (0.2 s echo delay, a 60 ms prebuffer,
    # set-up): at 0.3 s a slow run had heard none yet, and the check below that audio flowed failed.
    emulator = start_emulator(voice="echo", **_emulator_fault(fault))
    bridge = start_bridge(bridge_settings(emulator, **settings))
    placed = asyncio.create_task(run_call(signed_call(bridge, seconds=1.0 if fault is None else 6.0)))
    await asyncio.to_thread(wait_until, lambda: _calls() != [], 5.0, "the call to start")
    [call] = _calls()
    [stream] = _of_type(_PicowsUpgrade)
    # The call, and its Outbound: the leg's mark handler (Outbound.mark_echoed) makes a cycle through the leg (its
    # sink) until the call detaches it, and a failure the reconnector re-raised one through the AI side's frames.
    # The media stream's protocol: its logger once held it back, and through it both transports, their buffers and
    # the listener, a connection's ~0.8 KB of C heap that only a full collection freed (docs/performance.md).
    gone = [weakref.ref(call), weakref.ref(call.outbound), weakref.ref(stream), weakref.ref(stream.listener)]
    del call, stream
    result = await placed
    assert result.received_ms > 0 and not result.violations
    assert result.ended_by == ended_by
    freed = lambda: all(ref() is None for ref in gone)  # noqa: E731
    await asyncio.to_thread(wait_until, freed, 5.0, "the ended call's objects to be freed")


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_an_ended_sip_call_is_freed_without_the_cycle_collector(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread, collector_off: None, transport: str
) -> None:
    """The same for a SIP call: its leg (the RTP and RTCP sockets' state, the jitter buffer) once made a cycle with
    the server's record of the INVITE through its hang-up callback, and waited for a full collection."""
    bridge = start_sip_bridge(start_bridge, emulator)
    config = SipCallConfig(target(bridge), audio_in=speech_band_noise(), seconds=1.5, transport=transport)
    placed = asyncio.create_task(place_sip_call(config))
    await asyncio.to_thread(wait_until, lambda: _of_type(SipLeg) != [] and _calls() != [], 5.0, "the call to start")
    [leg], [call] = _of_type(SipLeg), _calls()
    gone = [weakref.ref(leg), weakref.ref(call)]
    del leg, call
    result = await placed
    assert result.answered and result.ended_by == "caller", result.summary()
    await asyncio.to_thread(assert_all_released, bridge, emulator)
    freed = lambda: all(ref() is None for ref in gone)  # noqa: E731
    await asyncio.to_thread(wait_until, freed, 5.0, "the ended SIP call's objects to be freed")


async def test_a_failing_group_raises_its_errors_where_asyncio_lets_go_of_the_parent_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Later 3.12 and 3.13 patch releases clear ``_parent_task`` in asyncio's own exit (gh-128552): what this group
    does with the parent after that exit must not read it from there (an AttributeError instead of the errors)."""
    exit_of_asyncio = asyncio.TaskGroup.__aexit__

    async def exit_that_lets_go(self: asyncio.TaskGroup, *args: Any) -> bool | None:
        try:
            return await exit_of_asyncio(self, *args)
        finally:
            self._parent_task = None  # type: ignore[attr-defined]

    monkeypatch.setattr(asyncio.TaskGroup, "__aexit__", exit_that_lets_go)

    async def fails() -> None:
        raise Boom("child failed")

    with pytest.raises(ExceptionGroup) as raised:
        async with TaskGroup() as tg:
            tg.create_task(fails())
            await asyncio.sleep(1)
    assert raised.value.subgroup(Boom) is not None


async def _freed(ref: weakref.ref[Held]) -> bool:
    """Whether what ``ref`` names is freed within a few turns of the loop (callbacks already queued may hold it)."""
    for _ in range(10):
        if ref() is None:
            return True
        await asyncio.sleep(0)
    return False


def _emulator_fault(fault: str | None) -> dict[str, Any]:
    if fault == "goodbye":
        return {"session_faults": (SessionFault(kind="close", close_code=1000, after_s=1.0),)}
    return {"fault": fault, "fault_after_s": 1.0} if fault else {}


def _calls() -> list[Call]:
    return _of_type(Call)


def _of_type(kind: type[T]) -> list[T]:
    return [obj for obj in gc.get_objects() if type(obj) is kind]


async def test_a_cancellation_from_outside_during_a_failing_exit_is_kept() -> None:
    """A call's AI side runs a group of its own inside the call's group. When the call ends (the outer group
    cancels the AI side) in the same turn as a child of the inner group fails, the inner group raises the failure;
    the cancellation must still reach the AI side at its next await, or it would catch the failure, go on, and
    hold the call for ever (3.11 and 3.12 lost it; 3.13 keeps it)."""
    turn = asyncio.Event()
    went_on: list[str] = []

    async def fail_on_the_turn() -> None:
        await turn.wait()
        raise Boom("the AI dropped")

    async def ai_side() -> None:
        try:
            async with TaskGroup() as tg:
                tg.create_task(fail_on_the_turn())
        except* Boom:
            pass
        went_on.append("caught the drop")
        await asyncio.sleep(0)  # the cancellation lands here
        went_on.append("reconnected after the call ended")

    async def caller_hangs_up() -> None:
        await turn.wait()
        raise Boom("the caller hung up")

    with pytest.raises(ExceptionGroup) as ended:
        async with asyncio.timeout(5):  # a lost cancellation would leave the outer group waiting for ever
            async with TaskGroup() as tg:
                tg.create_task(caller_hangs_up())
                tg.create_task(ai_side())
                await asyncio.sleep(0)
                turn.set()
    assert [str(e) for e in ended.value.exceptions] == ["the caller hung up"]
    assert went_on == ["caught the drop"]


async def test_a_failing_child_leaves_its_parent_uncancelled() -> None:
    """The group's own cancellation of its parent, made when a child fails, is taken back on exit: the parent
    goes on normally (the AI side reconnects after a drop), and its count does not grow drop after drop."""

    async def fail() -> None:
        await asyncio.sleep(0)
        raise Boom("the AI dropped")

    for _ in range(3):
        with pytest.raises(ExceptionGroup):
            async with TaskGroup() as tg:
                tg.create_task(fail())
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # not cancelled


async def test_a_timeout_around_a_failing_group_that_fires_during_its_exit_cancels_nothing_after_it() -> None:
    """An ``asyncio.timeout`` whose deadline passes while the group waits for a slow child: the group's errors
    go out through the timeout, which takes its cancellation back; the task then goes on, uncancelled (a
    cancellation issued again at once by the group would still have landed on 3.11 and 3.12)."""

    async def fail() -> None:
        raise Boom("failed at once")

    async def slow_to_cancel() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.shield(asyncio.sleep(0.05))  # still cancelling when the deadline passes

    with pytest.raises(ExceptionGroup):
        async with asyncio.timeout(0.02):
            async with TaskGroup() as tg:
                tg.create_task(slow_to_cancel())
                tg.create_task(fail())
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0.01)  # not cancelled
