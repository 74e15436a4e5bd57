"""Device accounting: one contract suite over both backends, a model-based property test of the memory backend,
and what only a shared Redis can get wrong (replicas racing, crashed replicas, Redis going away).

The memory backend runs on a ``FakeClock``; the Redis backend on a real ``redis-server`` whose own clock times
windows and TTLs, so its tests use short windows and let real time pass.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from telephony_bridge.accounting.base import Accounting, AccountingUnavailable, Lease, Limits, TokenNeed
from telephony_bridge.accounting.factory import make_accounting
from telephony_bridge.accounting.memory import MemoryAccounting
from telephony_bridge.accounting.redis import RedisAccounting
from telephony_bridge.clock import FakeClock
from telephony_bridge.errors import AdmissionError
from tests.redis_server import RedisServer, free_port

pytestmark = pytest.mark.timeout(15)

DEVICES = ("dev-a", "dev-b", "dev-c")


@dataclass
class Harness:
    """One backend plus a way to let time pass for it, so one test body serves both."""

    name: str
    window_s: float  # the token window the tests use (Redis: short enough to roll in real time)
    tolerance_s: float  # how far a reported wait may be from the ideal
    make: Callable[..., Accounting]
    advance: Callable[[float], Awaitable[None]]
    now: Callable[[], float]  # the time the backend goes by (Redis: real time passes while a test runs)

    def limits(self, max_concurrent: int = 10, max_token_requests: int = 60) -> Limits:
        return Limits(max_concurrent, max_token_requests, self.window_s)


@pytest.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    made: list[Accounting] = []
    if request.param == "memory":
        clock = FakeClock()

        def make_memory(devices: tuple[str, ...] = DEVICES, limits: Limits | None = None) -> Accounting:
            made.append(MemoryAccounting(devices, limits or h.limits(), clock))
            return made[-1]

        async def advance_memory(seconds: float) -> None:
            clock.advance(seconds)

        h = Harness("memory", 60.0, 1e-9, make_memory, advance_memory, clock.monotonic)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        prefix = f"t{uuid.uuid4().hex[:8]}:"  # each test its own keyspace on the shared server

        def make_redis(devices: tuple[str, ...] = DEVICES, limits: Limits | None = None) -> Accounting:
            made.append(RedisAccounting(server.url, devices, limits or h.limits(), key_prefix=prefix))
            return made[-1]

        async def advance_redis(seconds: float) -> None:
            await asyncio.sleep(seconds + 0.02)  # the server's clock must really move; margin for ms rounding

        h = Harness("redis", 1.0, 0.1, make_redis, advance_redis, time.monotonic)
    yield h
    for acct in made:
        await acct.close()


def loads(snapshot: dict[str, Any]) -> dict[str, int]:
    return {d: v["leases"] + v["reservations"] for d, v in snapshot["devices"].items()}


# --- the contract, on both backends -------------------------------------------------------------------------


async def test_acquire_picks_least_loaded_device(harness: Harness) -> None:
    acct = harness.make()
    first = [await acct.acquire(f"CA{i}") for i in range(3)]
    assert [lease.device_id for lease in first] == list(DEVICES)
    await acct.acquire("CA3")  # a tie: pool order
    await acct.release(first[1])
    assert (await acct.acquire("CA4")).device_id == "dev-b"
    assert loads(await acct.snapshot()) == {"dev-a": 2, "dev-b": 1, "dev-c": 1}


async def test_acquire_refuses_past_max_concurrent_per_device(harness: Harness) -> None:
    acct = harness.make(devices=("dev-a", "dev-b"))
    leases = [await acct.acquire(f"CA{i}") for i in range(20)]
    assert sorted(lease.device_id for lease in leases) == ["dev-a"] * 10 + ["dev-b"] * 10
    with pytest.raises(AdmissionError, match="at 10 calls") as refused:
        await acct.acquire("CA20")
    assert not isinstance(refused.value, AccountingUnavailable)
    with pytest.raises(AdmissionError):
        await acct.reserve("CA21")


async def test_reserve_is_idempotent_per_call(harness: Harness) -> None:
    acct = harness.make()
    lease = await acct.reserve("CA1", sticky_key="+15550001")
    assert await acct.reserve("CA1") == lease
    assert await acct.acquire("CA1") == lease
    assert await acct.reserve("CA1") == lease  # already a lease: stays one
    assert loads(await acct.snapshot()) == {"dev-a": 1, "dev-b": 0, "dev-c": 0}


async def test_retried_webhook_extends_reservation(harness: Harness) -> None:
    acct = harness.make()
    ttl_s = harness.window_s * 3 / 5  # Redis: 0.6 s, so the second half-TTL has room for a late wake-up
    lease = await acct.reserve("CA1", ttl_s)
    await harness.advance(ttl_s / 2)
    assert await acct.reserve("CA1", ttl_s) == lease
    await harness.advance(ttl_s / 2)  # past the first expiry, within the second
    assert await acct.claim("CA1") == lease


async def test_reservation_expires_when_not_claimed(harness: Harness) -> None:
    acct = harness.make(devices=("dev-a",), limits=harness.limits(max_concurrent=1))
    ttl_s = harness.window_s / 5
    await acct.reserve("CA1", ttl_s)
    with pytest.raises(AdmissionError):
        await acct.reserve("CA2", ttl_s)
    await harness.advance(ttl_s)
    assert await acct.reserve("CA2", ttl_s) == Lease("CA2", "dev-a")
    assert await acct.claim("CA1") is None


async def test_claim_turns_reservation_into_lease(harness: Harness) -> None:
    acct = harness.make()
    ttl_s = harness.window_s / 5
    lease = await acct.reserve("CA1", ttl_s)
    assert await acct.claim("CA1") == lease
    assert await acct.claim("CA1") == lease
    assert await acct.claim("CA-unknown") is None
    await harness.advance(ttl_s)  # a lease does not expire with the reservation it came from
    snapshot = await acct.snapshot()
    assert (snapshot["devices"]["dev-a"]["calls"], snapshot["devices"]["dev-a"]["reserved_calls"]) == (["CA1"], [])
    assert await acct.heartbeat(lease) is True


async def test_release_twice_is_harmless(harness: Harness) -> None:
    acct = harness.make()
    lease = await acct.acquire("CA1")
    reservation = await acct.reserve("CA2")
    await acct.release(lease)
    await acct.release(lease)
    await acct.release(reservation)
    await acct.release(Lease("CA-never", "dev-c"))
    assert loads(await acct.snapshot()) == {"dev-a": 0, "dev-b": 0, "dev-c": 0}
    assert await acct.claim("CA2") is None


async def test_token_window_rolls(harness: Harness) -> None:
    acct = harness.make()
    window_s = harness.window_s
    lease = await acct.acquire("CA1")
    other = await acct.acquire("CA2")
    assert await acct.take_token(lease) == 0
    first_at = harness.now()
    await harness.advance(window_s / 4)
    second_at = harness.now()
    assert [await acct.take_token(lease) for _ in range(59)] == [0] * 59
    wait_s = await acct.take_token(lease)
    # until the first request leaves the window (on a loaded machine the 59 requests take real time too)
    assert wait_s == pytest.approx(window_s - (harness.now() - first_at), abs=harness.tolerance_s)
    assert await acct.take_token(other) == 0  # the window is per device
    await harness.advance(window_s * 3 / 4)  # the first request has left the window
    assert await acct.take_token(lease) == 0
    # Until the second request leaves: window_s / 4 on the fake clock; on Redis less what the requests and the
    # sleeps took (none, if a stall had let it leave already).
    until_s = max(0.0, second_at + window_s - harness.now())
    assert await acct.take_token(lease) == pytest.approx(until_s, abs=harness.tolerance_s)
    assert (await acct.snapshot())["devices"]["dev-a"]["tokens_in_window"] == 60


async def test_exhaust_pauses_tokens_and_steers_admission(harness: Harness) -> None:
    acct = harness.make(devices=("dev-a", "dev-b"))
    pause_s = harness.window_s / 4
    lease = await acct.acquire("CA1")
    assert lease.device_id == "dev-a"
    await acct.exhaust("dev-a", pause_s)
    await acct.exhaust("dev-a", pause_s / 10)  # a shorter pause never cuts a longer one
    assert await acct.take_token(lease) == pytest.approx(pause_s, abs=harness.tolerance_s)
    assert [(await acct.acquire(f"CA{i}")).device_id for i in (2, 3, 4)] == ["dev-b"] * 3  # budget beats load
    await harness.advance(pause_s)
    assert await acct.take_token(lease) == 0
    assert (await acct.acquire("CA5")).device_id == "dev-a"


async def test_a_new_call_can_need_token_budget_or_take_its_token_with_the_slot(harness: Harness) -> None:
    acct = harness.make(devices=("dev-a", "dev-b"), limits=harness.limits(max_token_requests=2))
    for _ in range(2):
        await acct.take_token(Lease("CA-other", "dev-a"))
    # "none": any free slot (budget only ranks); "check"/"take": only a device with budget
    assert (await acct.reserve("CA1", token="check")).device_id == "dev-b"
    taken = await acct.reserve("CA2", token="take")
    assert (taken.device_id, taken.token_taken) == ("dev-b", True)
    assert (await acct.snapshot())["devices"]["dev-b"]["tokens_in_window"] == 1
    again = await acct.reserve("CA2", token="take")  # a retried webhook: same slot, another token if budget
    assert (again.device_id, again.token_taken) == ("dev-b", True)
    with pytest.raises(AdmissionError, match="no token budget on the 2 devices with a free slot"):
        await acct.acquire("CA3", token="check")
    assert (await acct.acquire("CA3")).device_id == "dev-a"  # "none" still admits on a free slot
    retried = await acct.reserve("CA2", token="take")
    assert (retried.device_id, retried.token_taken) == ("dev-b", False)  # no budget left: nothing taken
    assert {d: v["tokens_in_window"] for d, v in (await acct.snapshot())["devices"].items()} == {"dev-a": 2, "dev-b": 2}


async def test_move_carries_a_call_to_a_device_with_budget_taking_its_token(harness: Harness) -> None:
    acct = harness.make(devices=("dev-a", "dev-b", "dev-c"), limits=harness.limits(max_concurrent=1))
    lease = await acct.acquire("CA1")
    await acct.acquire("CA2")  # dev-b is full
    await acct.exhaust("dev-a", harness.window_s)
    moved = await acct.move(lease)
    assert moved == Lease("CA1", "dev-c") and moved.token_taken
    snapshot = (await acct.snapshot())["devices"]
    assert [snapshot[d]["calls"] for d in ("dev-a", "dev-b", "dev-c")] == [[], ["CA2"], ["CA1"]]
    assert snapshot["dev-c"]["tokens_in_window"] == 1
    assert await acct.heartbeat(moved)
    assert await acct.move(moved) is None  # dev-a out of budget, dev-b full: the call stays
    assert (await acct.snapshot())["devices"]["dev-c"]["calls"] == ["CA1"]
    assert await acct.move(Lease("CA-unknown", "dev-a")) is None


async def test_release_reservation_drops_a_reservation_never_a_lease(harness: Harness) -> None:
    acct = harness.make(devices=("dev-a", "dev-b"))
    await acct.reserve("CA1")
    await acct.acquire("CA2")
    assert await acct.release_reservation("CA1")
    assert not await acct.release_reservation("CA1")
    assert not await acct.release_reservation("CA2")  # a call in progress keeps its slot
    assert loads(await acct.snapshot()) == {"dev-a": 0, "dev-b": 1}


async def test_sticky_key_prefers_last_device_while_it_has_room(harness: Harness) -> None:
    acct = harness.make(devices=("dev-a", "dev-b"))
    assert (await acct.acquire("CA1", sticky_key="+15550001")).device_id == "dev-a"
    assert (await acct.acquire("CA2")).device_id == "dev-b"
    assert (await acct.acquire("CA3")).device_id == "dev-a"
    assert (await acct.acquire("CA4", sticky_key="+15550001")).device_id == "dev-a"  # 3 on a, 1 on b
    for i in range(5, 12):
        await acct.acquire(f"CA{i}", sticky_key="+15550001")
    assert loads(await acct.snapshot()) == {"dev-a": 10, "dev-b": 1}
    assert (await acct.acquire("CA12", sticky_key="+15550001")).device_id == "dev-b"


async def test_has_capacity_until_every_device_is_full(harness: Harness) -> None:
    acct = harness.make(devices=("dev-a",), limits=harness.limits(max_concurrent=2))
    assert await acct.has_capacity()
    await acct.acquire("CA1")
    reservation = await acct.reserve("CA2")
    assert not await acct.has_capacity()
    await acct.release(reservation)
    assert await acct.has_capacity()


async def test_snapshot_shape(harness: Harness) -> None:
    acct = harness.make(devices=("dev-a", "dev-b"))
    lease = await acct.acquire("CA1")
    await acct.reserve("CA2")
    await acct.take_token(lease)
    await acct.take_token(lease)
    await acct.exhaust("dev-b", harness.window_s / 2)
    assert await acct.snapshot() == {
        "backend": harness.name,
        "available": True,
        "limits": {"max_concurrent": 10, "max_token_requests": 60, "window_s": harness.window_s},
        "unavailable_total": 0,
        "devices": {
            "dev-a": {
                "leases": 1,
                "reservations": 0,
                "tokens_in_window": 2,
                "exhausted_for_s": 0,
                "calls": ["CA1"],
                "reserved_calls": [],
            },
            "dev-b": {
                "leases": 0,
                "reservations": 1,
                "tokens_in_window": 0,
                "exhausted_for_s": pytest.approx(harness.window_s / 2, abs=harness.tolerance_s),
                "calls": [],
                "reserved_calls": ["CA2"],
            },
        },
    }


# --- the memory backend against a model, any sequence of operations ------------------------------------------

MODEL_DEVICES = ("dev-a", "dev-b", "dev-c")
MODEL_LIMITS = Limits(max_concurrent=3, max_token_requests=5, window_s=10.0)  # small, so sequences reach them
CALLS = st.sampled_from([f"CA{i}" for i in range(10)])
TOKEN_NEEDS = st.sampled_from(["none", "check", "take"])  # 10 calls for 9 slots: the pool does fill up


class MemoryAccountingModel(RuleBasedStateMachine):
    """Drives ``MemoryAccounting`` and a plain model side by side; they must agree after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.clock = FakeClock()
        self.acct = MemoryAccounting(MODEL_DEVICES, MODEL_LIMITS, self.clock)
        self.leases: dict[str, str] = {}  # call_sid -> device
        self.reserved: dict[str, tuple[str, float]] = {}  # call_sid -> (device, expires at)
        self.takes: dict[str, list[float]] = {d: [] for d in MODEL_DEVICES}
        self.exhausted_until = dict.fromkeys(MODEL_DEVICES, 0.0)

    def teardown(self) -> None:
        self.runner.close()

    def run(self, coro: Awaitable[Any]) -> Any:
        return self.runner.run(coro)  # type: ignore[arg-type]

    # the model ------------------------------------------------------------------------------------------

    def expire(self) -> None:
        now = self.clock.monotonic()
        self.reserved = {sid: (d, exp) for sid, (d, exp) in self.reserved.items() if exp > now}

    def held_on(self, call_sid: str) -> str | None:
        if call_sid in self.leases:
            return self.leases[call_sid]
        return self.reserved[call_sid][0] if call_sid in self.reserved else None

    def load(self, device: str) -> int:
        return sum(d == device for d in self.leases.values()) + sum(d == device for d, _ in self.reserved.values())

    def expected_wait_s(self, device: str) -> float:
        now = self.clock.monotonic()
        in_window = [t for t in self.takes[device] if t > now - MODEL_LIMITS.window_s]
        wait_s = max(0.0, self.exhausted_until[device] - now)
        if len(in_window) >= MODEL_LIMITS.max_token_requests:
            wait_s = max(wait_s, in_window[0] + MODEL_LIMITS.window_s - now)
        return wait_s

    def admit(self, call_sid: str, lease: Lease | None, *, claim: bool, ttl_s: float, token: str = "none") -> None:
        self.expire()
        now = self.clock.monotonic()
        held = self.held_on(call_sid)
        if held is not None:
            assert lease == Lease(call_sid, held)
            if call_sid in self.reserved:
                if claim:
                    del self.reserved[call_sid]
                    self.leases[call_sid] = held
                else:
                    expires = max(self.reserved[call_sid][1], now + ttl_s)
                    self.reserved[call_sid] = (held, expires)
            can_take = token == "take" and self.expected_wait_s(held) == 0
            assert lease.token_taken == can_take
            if can_take:
                self.takes[held].append(now)
        elif lease is None:
            assert all(
                self.load(d) >= MODEL_LIMITS.max_concurrent or (token != "none" and self.expected_wait_s(d) > 0)
                for d in MODEL_DEVICES
            ), "refused with room"
        else:
            assert self.load(lease.device_id) < MODEL_LIMITS.max_concurrent, "admitted onto a full device"
            if token != "none":
                assert self.expected_wait_s(lease.device_id) == 0, "admitted onto a device without budget"
            assert lease.token_taken == (token == "take")
            if token == "take":
                self.takes[lease.device_id].append(now)
            if claim:
                self.leases[call_sid] = lease.device_id
            else:
                self.reserved[call_sid] = (lease.device_id, now + ttl_s)

    async def try_admit(self, op: Awaitable[Lease]) -> Lease | None:
        try:
            return await op
        except AdmissionError:
            return None

    # the rules ------------------------------------------------------------------------------------------

    @rule(
        call_sid=CALLS,
        ttl_s=st.sampled_from([1.0, 5.0, 20.0]),
        sticky=st.sampled_from([None, "+1", "+2"]),
        token=TOKEN_NEEDS,
    )
    def reserve(self, call_sid: str, ttl_s: float, sticky: str | None, token: TokenNeed) -> None:
        lease = self.run(self.try_admit(self.acct.reserve(call_sid, ttl_s, sticky_key=sticky, token=token)))
        self.admit(call_sid, lease, claim=False, ttl_s=ttl_s, token=token)

    @rule(call_sid=CALLS, sticky=st.sampled_from([None, "+1", "+2"]), token=TOKEN_NEEDS)
    def acquire(self, call_sid: str, sticky: str | None, token: TokenNeed) -> None:
        lease = self.run(self.try_admit(self.acct.acquire(call_sid, sticky_key=sticky, token=token)))
        self.admit(call_sid, lease, claim=True, ttl_s=0.0, token=token)

    @rule(call_sid=CALLS)
    def move(self, call_sid: str) -> None:
        device = self.leases.get(call_sid)
        moved = self.run(self.acct.move(Lease(call_sid, device or "dev-a")))
        self.expire()
        candidates = [
            d
            for d in MODEL_DEVICES
            if d != device and self.load(d) < MODEL_LIMITS.max_concurrent and self.expected_wait_s(d) == 0
        ]
        if device is None or not candidates:
            assert moved is None
            return
        assert moved is not None and moved.device_id in candidates and moved.token_taken
        self.leases[call_sid] = moved.device_id
        self.takes[moved.device_id].append(self.clock.monotonic())

    @rule(call_sid=CALLS)
    def release_reservation(self, call_sid: str) -> None:
        self.expire()
        assert self.run(self.acct.release_reservation(call_sid)) == (call_sid in self.reserved)
        self.reserved.pop(call_sid, None)

    @rule(call_sid=CALLS)
    def claim(self, call_sid: str) -> None:
        lease = self.run(self.acct.claim(call_sid))
        self.expire()
        held = self.held_on(call_sid)
        assert lease == (Lease(call_sid, held) if held else None)
        if held:
            self.reserved.pop(call_sid, None)
            self.leases[call_sid] = held

    @rule(call_sid=CALLS, device=st.sampled_from(MODEL_DEVICES))
    def release(self, call_sid: str, device: str) -> None:
        held = self.held_on(call_sid)
        self.run(self.acct.release(Lease(call_sid, held or device)))
        self.leases.pop(call_sid, None)
        self.reserved.pop(call_sid, None)

    @rule(call_sid=CALLS)
    def heartbeat(self, call_sid: str) -> None:
        device = self.leases.get(call_sid, "dev-a")
        assert self.run(self.acct.heartbeat(Lease(call_sid, device))) == (call_sid in self.leases)

    @rule(device=st.sampled_from(MODEL_DEVICES))
    def take_token(self, device: str) -> None:
        expected = self.expected_wait_s(device)
        wait_s = self.run(self.acct.take_token(Lease("CA-any", device)))
        assert wait_s == pytest.approx(expected)
        if wait_s == 0:
            self.takes[device].append(self.clock.monotonic())

    @rule(device=st.sampled_from(MODEL_DEVICES), for_s=st.sampled_from([1.0, 5.0, 30.0]))
    def exhaust(self, device: str, for_s: float) -> None:
        self.run(self.acct.exhaust(device, for_s))
        self.exhausted_until[device] = max(self.exhausted_until[device], self.clock.monotonic() + for_s)

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0, 10.0, 25.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    # the invariants ------------------------------------------------------------------------------------

    @invariant()
    def agrees_with_model(self) -> None:
        self.expire()
        snapshot = self.run(self.acct.snapshot())["devices"]
        for device in MODEL_DEVICES:
            calls = sorted(sid for sid, d in self.leases.items() if d == device)
            reserved = sorted(sid for sid, (d, _) in self.reserved.items() if d == device)
            assert (snapshot[device]["calls"], snapshot[device]["reserved_calls"]) == (calls, reserved)
            assert len(calls) + len(reserved) <= MODEL_LIMITS.max_concurrent

    @invariant()
    def never_over_token_limit(self) -> None:
        for takes in self.takes.values():
            for t in takes:
                in_window = [u for u in takes if t - MODEL_LIMITS.window_s < u <= t]
                assert len(in_window) <= MODEL_LIMITS.max_token_requests


async def test_memory_reservations_expire_on_time_whichever_was_made_or_claimed_first() -> None:
    """Reservations are only looked at once the earliest could have expired: a shorter one made after a longer
    one, and a longer one left when the earliest was claimed, each still goes at its own time."""
    clock = FakeClock()
    acct = MemoryAccounting(DEVICES, Limits(), clock)

    async def reserved() -> list[str]:
        devices = (await acct.snapshot())["devices"].values()
        return sorted(sid for device in devices for sid in device["reserved_calls"])

    await acct.reserve("CA-long", ttl_s=20.0)
    await acct.reserve("CA-short", ttl_s=2.0)
    await acct.reserve("CA-claimed", ttl_s=1.0)
    assert await acct.claim("CA-claimed") == Lease("CA-claimed", "dev-c")
    clock.advance(1.5)
    assert (await reserved(), await acct.claim("CA-claimed")) == (["CA-long", "CA-short"], Lease("CA-claimed", "dev-c"))
    clock.advance(1.0)
    assert (await reserved(), await acct.claim("CA-short")) == (["CA-long"], None)
    clock.advance(17.0)
    await acct.reserve("CA-later", ttl_s=5.0)
    assert await reserved() == ["CA-later", "CA-long"]
    clock.advance(0.5)
    assert await reserved() == ["CA-later"]


MemoryAccountingModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
# A longer bound than the module's: shrinking a failure takes a while (a pass takes ~2 s).
test_memory_accounting_keeps_limits_and_leases = pytest.mark.timeout(60)(MemoryAccountingModel.TestCase)


# --- Redis only: replicas racing, replicas dying, Redis going away -------------------------------------------


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[Callable[..., RedisAccounting]]:
    """Independent ``RedisAccounting`` instances (own client and pool each) sharing one keyspace: replicas."""
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    made: list[RedisAccounting] = []

    def make(
        devices: tuple[str, ...] = ("dev-a", "dev-b"), limits: Limits | None = None, **kwargs: Any
    ) -> RedisAccounting:
        made.append(RedisAccounting(redis_server.url, devices, limits, key_prefix=prefix, **kwargs))
        return made[-1]

    yield make
    for acct in made:
        await acct.close()


async def outcome(op: Awaitable[Lease]) -> str:
    try:
        return (await op).device_id
    except AdmissionError:
        return "refused"


async def test_redis_replicas_never_overadmit(replicas: Callable[..., RedisAccounting]) -> None:
    one, two = replicas(), replicas()
    results = await asyncio.gather(*(outcome((one, two)[i % 2].acquire(f"CA{i}")) for i in range(25)))
    assert sorted(results).count("dev-a") == 10
    assert sorted(results).count("dev-b") == 10
    assert sorted(results).count("refused") == 5


async def test_redis_replicas_never_overspend_tokens(replicas: Callable[..., RedisAccounting]) -> None:
    one, two = replicas(), replicas()
    lease = await one.acquire("CA1")
    waits = await asyncio.gather(*((one, two)[i % 2].take_token(lease) for i in range(61)))
    assert sorted(waits)[:60] == [0] * 60
    assert sorted(waits)[60] > 0


async def test_redis_lease_without_heartbeats_expires(replicas: Callable[..., RedisAccounting]) -> None:
    limits = Limits(max_concurrent=1)
    crashed, survivor = replicas(("dev-a",), limits, lease_ttl_s=1.5), replicas(("dev-a",), limits)
    lease = await crashed.acquire("CA1")
    for _ in range(3):  # heartbeats keep it past its TTL (a third of it apart, as the bridge does)
        await asyncio.sleep(0.5)
        assert await crashed.heartbeat(lease) is True
    with pytest.raises(AdmissionError):
        await survivor.acquire("CA2")
    await asyncio.sleep(1.6)  # the replica "dies": no heartbeat, no release
    assert await survivor.acquire("CA2") == Lease("CA2", "dev-a")


async def test_redis_heartbeat_counts_an_expired_lease_again(replicas: Callable[..., RedisAccounting]) -> None:
    # A TTL with room for the heartbeat and the snapshot after it on a loaded runner.
    acct = replicas(("dev-a",), Limits(max_concurrent=1), lease_ttl_s=0.5)
    lease = await acct.acquire("CA1")
    await asyncio.sleep(1.0)  # Redis was away longer than the TTL; the call's socket is still open
    assert (await acct.snapshot())["devices"]["dev-a"]["calls"] == []
    assert await acct.heartbeat(lease) is True
    assert (await acct.snapshot())["devices"]["dev-a"]["calls"] == ["CA1"]
    await asyncio.sleep(1.0)
    await acct.acquire("CA2")  # took the slot meanwhile: the lost lease cannot come back
    assert await acct.heartbeat(lease) is False


async def test_redis_keys_expire_on_their_own(redis_server: RedisServer) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    acct = RedisAccounting(redis_server.url, ("dev-a",), key_prefix=prefix)
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        lease = await acct.acquire("CA1", sticky_key="+15550001")
        await acct.reserve("CA2")
        await acct.take_token(lease)
        await acct.exhaust("dev-a", 5)
        keys = sorted(str(key) for key in await client.keys(prefix + "*"))
        assert [k.removeprefix(prefix) for k in keys if "sticky" not in k] == [
            "dev:dev-a:exhausted",
            "dev:dev-a:leases",
            "dev:dev-a:reserved",
            "dev:dev-a:seq",
            "dev:dev-a:tokens",
        ]
        assert "+15550001" not in "".join(keys)
        assert all([await client.pttl(k) > 0 for k in keys])
    finally:
        await client.aclose()
        await acct.close()


async def test_redis_unreachable_fails_closed() -> None:
    port = free_port()  # nothing listens there
    acct = RedisAccounting(f"redis://127.0.0.1:{port}/0", ("dev-a",), timeout_s=0.5)
    try:
        with pytest.raises(AccountingUnavailable, match=f"Redis at 127.0.0.1:{port}/0 did not answer") as exc:
            await acct.acquire("CA1")
        assert isinstance(exc.value, AdmissionError)
        with pytest.raises(AccountingUnavailable):
            await acct.reserve("CA1")
        with pytest.raises(AccountingUnavailable):
            await acct.take_token(Lease("CA1", "dev-a"))
        await acct.release(Lease("CA1", "dev-a"))
        assert await acct.heartbeat(Lease("CA1", "dev-a")) is True  # unknown: the call goes on
        await acct.exhaust("dev-a", 5)
        assert not await acct.has_capacity()
        snapshot = await acct.snapshot()
        assert (snapshot["available"], snapshot["devices"]) == (False, {})
        assert acct.unavailable_total == 8
    finally:
        await acct.close()


async def test_redis_outage_mid_call_spares_the_call(own_redis_server: RedisServer) -> None:
    acct = RedisAccounting(own_redis_server.url, ("dev-a",), timeout_s=0.5)
    try:
        lease = await acct.acquire("CA1")
        own_redis_server.stop()
        await acct.release(lease)
        assert await acct.heartbeat(lease) is True
        with pytest.raises(AccountingUnavailable, match="did not answer"):
            await acct.take_token(lease)
        assert acct.unavailable_total == 3
    finally:
        await acct.close()


async def test_make_accounting_picks_backend_from_url(redis_server: RedisServer) -> None:
    memory = make_accounting("", DEVICES, Limits(), FakeClock())
    shared = make_accounting(redis_server.url, DEVICES, Limits(), FakeClock())
    try:
        assert ((await memory.snapshot())["backend"], (await shared.snapshot())["backend"]) == ("memory", "redis")
    finally:
        await memory.close()
        await shared.close()
