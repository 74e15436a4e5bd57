"""The reconnect loop on a fake clock: attempts spaced by the jittered backoff, all within the deadline;
failures not worth a retry end it at once; a refused device is suspended. And one attempt
(``Admission.reconnect``): never given more time than is left, never made with less than ``MIN_ATTEMPT_S``."""

from __future__ import annotations

import asyncio
import itertools
import random
from typing import Any

import pytest

from telephony_bridge.accounting.base import Lease
from telephony_bridge.accounting.memory import MemoryAccounting
from telephony_bridge.admission import MIN_ATTEMPT_S, Admission, CallSlot, VoiceEndpoint
from telephony_bridge.clock import FakeClock
from telephony_bridge.errors import SavantsError, SessionError, TokenError
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.reconnect import Reconnector
from telephony_bridge.savants.retry import backoff_s
from telephony_bridge.store import MemoryStore
from tests.support import collector_off

DROP = SessionError("voice stream dropped (close code 1011)", code="DROPPED", close_code=1011)


class FakeAdmission:
    """Answers each reconnect with the next of ``answers`` (an error to raise, or a session to return)."""

    def __init__(self, clock: FakeClock, answers: list[Any]) -> None:
        self.clock = clock
        self.answers = answers
        self.attempted_at: list[float] = []
        self.suspended: list[tuple[str, str]] = []

    async def reconnect(self, slot: CallSlot, *, deadline: float) -> Any:
        self.attempted_at.append(self.clock.monotonic())
        answer = self.answers.pop(0) if self.answers else SessionError("still down", code="CONNECT_FAILED")
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def suspend_device(self, device_id: str, code: str) -> None:
        self.suspended.append((device_id, code))


class FakeSession:
    session_id = "sess_new"

    async def close(self) -> None:
        pass


class Hang:
    """An await that ends only when cancelled (a peer that never answers our close, a Redis that does not
    answer), and says when it has begun."""

    def __init__(self) -> None:
        self.begun = asyncio.Event()

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.begun.set()
        await asyncio.get_running_loop().create_future()


async def on_clock(clock: FakeClock, coro: Any) -> asyncio.Task[Any]:
    """Run ``coro`` to its end, the fake clock moving 10 ms at a time."""
    task = asyncio.create_task(coro)
    async with asyncio.timeout(5):
        while not task.done():
            await asyncio.sleep(0)
            clock.advance(0.01)
    return task


async def run(admission: FakeAdmission, clock: FakeClock, failure: SavantsError, deadline_s: float) -> Any:
    reconnector = Reconnector(admission, clock, Metrics(), deadline_s=deadline_s, rng=random.Random(1))  # type: ignore[arg-type]
    task = await on_clock(clock, reconnector.recover(failure, CallSlot(Lease("CA1", "device-a"))))
    return reconnector.figures, task


async def test_reconnect_backs_off_with_jitter_and_gives_up_within_the_deadline() -> None:
    clock = FakeClock()
    admission = FakeAdmission(clock, [])
    figures, task = await run(admission, clock, DROP, deadline_s=5.0)
    with pytest.raises(SessionError, match="AI unreachable"):
        task.result()
    t0 = 1000.0
    rng = random.Random(1)  # the same draws as the reconnector's
    times = [t0, *admission.attempted_at]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    waits = [backoff_s(n, rng) for n in range(1, len(gaps) + 2)]
    # each attempt after its backoff (the clock moves in 10 ms steps); none starts after the deadline
    assert all(w - 1e-9 <= g <= w + 0.011 for g, w in zip(gaps, waits, strict=False))
    # none starts with less than MIN_ATTEMPT_S left; the next would have had less
    assert admission.attempted_at[-1] <= t0 + 5.0 - MIN_ATTEMPT_S and len(gaps) >= 4
    assert admission.attempted_at[-1] + waits[len(gaps)] > t0 + 5.0 - MIN_ATTEMPT_S - 0.011
    assert (figures.drops, figures.attempts, figures.outcome) == (1, len(gaps), "failed")
    assert figures.gap_s <= 5.0


async def test_reconnect_resumes_on_the_first_session_it_gets() -> None:
    clock = FakeClock()
    session = FakeSession()
    admission = FakeAdmission(clock, [SessionError("x", code="CONNECT_TIMEOUT"), session])
    figures, task = await run(admission, clock, DROP, deadline_s=10.0)
    assert task.result() is session
    assert (figures.attempts, figures.outcome) == (2, "resumed")


async def test_failed_attempts_leave_no_cycle_whether_one_then_succeeds_or_all_fail() -> None:
    """The last failure is kept for the message if every attempt fails; kept with its traceback, which reaches the
    loop's own frame, it made a cycle holding the call's slot and lease until a full collection (rare in a
    serving process)."""
    clock = FakeClock()
    with collector_off() as left:
        admission = FakeAdmission(clock, [SessionError("x", code="CONNECT_TIMEOUT"), FakeSession()])
        figures, task = await run(admission, clock, DROP, deadline_s=10.0)
        assert figures.outcome == "resumed"
        figures, task = await run(FakeAdmission(clock, []), clock, DROP, deadline_s=5.0)
        assert figures.outcome == "failed" and "still down" in str(task.exception())
        del figures, task
    # Less each run's Metrics (one a process in service), whose registry calls back into it: a cycle by design.
    assert not [name for name in left if not name.startswith("telephony_bridge.ops.metrics.")], left


@pytest.mark.parametrize("deadline_s", [10.0, 0.0])
async def test_a_failure_not_worth_a_retry_or_reconnects_off_end_it_at_once(deadline_s: float) -> None:
    clock = FakeClock()
    admission = FakeAdmission(clock, [])
    failure = SessionError("voice stream failed: PROTOCOL", code="PROTOCOL") if deadline_s else DROP
    figures, task = await run(admission, clock, failure, deadline_s=deadline_s)
    with pytest.raises(SessionError) as raised:
        task.result()
    assert raised.value is failure
    assert (admission.attempted_at, figures.outcome) == ([], "not_retried")


async def test_a_device_savants_refuses_is_suspended_and_not_retried() -> None:
    clock = FakeClock()
    admission = FakeAdmission(clock, [])
    refused = SessionError("voice stream failed: DEVICE_INACTIVE", code="DEVICE_INACTIVE")
    figures, task = await run(admission, clock, refused, deadline_s=10.0)
    with pytest.raises(SessionError):
        task.result()
    assert admission.suspended == [("device-a", "DEVICE_INACTIVE")]
    assert (admission.attempted_at, figures.outcome) == ([], "not_retried")


async def test_drops_past_the_limit_within_a_minute_are_not_retried_and_the_window_rolls() -> None:
    """Two drops a minute are retried; a third within the minute is not (``limited``); one a minute after the
    first is again."""
    clock = FakeClock()
    admission = FakeAdmission(clock, [FakeSession() for _ in range(4)])
    reconnector = Reconnector(admission, clock, Metrics(), deadline_s=10.0, rng=random.Random(1), max_per_minute=2)  # type: ignore[arg-type]
    slot = CallSlot(Lease("CA1", "device-a"))
    first = clock.monotonic()
    outcomes = []
    for wait_s in (0.0, 20.0, 20.0, 25.0):  # drops at ~0, ~20, ~40 and ~65 s after the first
        clock.advance(wait_s)
        task = await on_clock(clock, reconnector.recover(DROP, slot))
        outcomes.append(
            reconnector.figures.outcome if task.exception() is None else f"raised {reconnector.figures.outcome}"
        )
    assert outcomes == ["resumed", "resumed", "raised limited", "resumed"]
    assert len(admission.attempted_at) == 3 and admission.attempted_at[-1] >= first + 60.0


@pytest.mark.parametrize("where", ["closing the dropped session", "suspending a refused device", "an attempt"])
async def test_a_call_ending_anywhere_in_a_reconnect_counts_it_abandoned_once(where: str) -> None:
    """The call's end cancels the reconnect at whichever await it is: that drop's result is ``abandoned``, counted
    once. Closing the dropped session and the verdict's suspension of a refused device were counted nowhere."""
    clock = FakeClock()
    admission, dropped, hang = FakeAdmission(clock, []), FakeSession(), Hang()
    failure: SavantsError = DROP
    if where == "closing the dropped session":
        dropped.close = hang  # type: ignore[method-assign]
    elif where == "suspending a refused device":
        admission.suspend_device = hang  # type: ignore[method-assign]
        failure = SessionError("voice stream refused: DEVICE_INACTIVE", code="DEVICE_INACTIVE")
    else:
        admission.reconnect = hang  # type: ignore[method-assign]
    metrics = Metrics()
    reconnector = Reconnector(admission, clock, metrics, deadline_s=10.0, rng=random.Random(1))  # type: ignore[arg-type]
    slot = CallSlot(Lease("CA1", "device-a"))
    task = asyncio.create_task(reconnector.recover(failure, slot, dropped=dropped))  # type: ignore[arg-type]
    async with asyncio.timeout(5):
        while not hang.begun.is_set():
            await asyncio.sleep(0)
            clock.advance(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    figures = reconnector.figures
    assert (figures.drops, figures.outcome) == (1, "abandoned")
    results = ("resumed", "failed", "not_retried", "limited", "abandoned")
    counted = {r: metrics.registry.get_sample_value("bridge_ai_reconnects_total", {"result": r}) for r in results}
    assert counted == {r: 1.0 if r == "abandoned" else None for r in results}


class SlowTokens:
    """A token endpoint answering after ``takes_s`` of fake time (``TIMEOUT`` past the timeout it is given)."""

    def __init__(self, clock: FakeClock, takes_s: float) -> None:
        self.clock = clock
        self.takes_s = takes_s
        self.timeouts: list[float] = []

    async def fetch(self, device_id: str, timeout_s: float) -> str:
        self.timeouts.append(timeout_s)
        await self.clock.sleep_until(self.clock.monotonic() + min(self.takes_s, timeout_s))
        if self.takes_s > timeout_s:
            raise TokenError(f"token endpoint did not answer within {timeout_s:g} s", code="TIMEOUT")
        return "jwt"


class Voice:
    """The voice-stream connector: records the timeout each session was opened with."""

    def __init__(self) -> None:
        self.timeouts: list[float] = []

    async def connect(self, url: str, token: str, timeout_s: float) -> FakeSession:
        self.timeouts.append(timeout_s)
        return FakeSession()


@pytest.mark.parametrize(
    ("left_s", "token_takes_s", "token_timeouts", "connect_timeouts", "code"),
    [
        (0.2, 0.1, [], [], "DEADLINE"),  # too little left to start: no request, no budget spent
        (1.0, 0.8, [1.0], [], "DEADLINE"),  # the token came with 0.2 s left: no session opened
        (1.0, 0.1, [1.0], [0.9], None),  # a session gets what is left, not its 5 s connect timeout
    ],
)
async def test_a_reconnect_attempt_never_runs_past_the_deadline(
    left_s: float, token_takes_s: float, token_timeouts: list[float], connect_timeouts: list[float], code: str | None
) -> None:
    clock = FakeClock()
    accounting = MemoryAccounting(("device-a",), clock=clock)
    tokens, voice = SlowTokens(clock, token_takes_s), Voice()
    endpoint = VoiceEndpoint(voice.connect, "ws://127.0.0.1:9/voice-stream", 5.0)  # type: ignore[arg-type]
    admission = Admission(accounting, tokens, endpoint, MemoryStore(clock), Metrics(), clock)  # type: ignore[arg-type]
    slot = CallSlot(await accounting.acquire("CA1"))
    deadline = clock.monotonic() + left_s
    task = await on_clock(clock, admission.reconnect(slot, deadline=deadline))
    assert clock.monotonic() <= deadline + 0.011  # it ended by the deadline (the clock moves in 10 ms steps)
    assert tokens.timeouts == pytest.approx(token_timeouts, abs=0.02)
    assert voice.timeouts == pytest.approx(connect_timeouts, abs=0.02)
    if code is None:
        assert isinstance(task.result(), FakeSession)
    else:
        assert getattr(task.exception(), "code", None) == code
    tokens_in_window = (await accounting.snapshot())["devices"]["device-a"]["tokens_in_window"]
    assert tokens_in_window == len(token_timeouts)
