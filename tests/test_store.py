"""The shared store's owned entries (claims): set if absent, kept and removed only by their owner, lapsing; its
counters: one atomic count each, lapsing from the first."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from telephony_bridge.clock import FakeClock
from telephony_bridge.store import SWEEP_EVERY_S, MemoryStore, RedisStore, Store
from tests.redis_server import RedisServer


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore(FakeClock())
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    await client.flushdb()
    yield RedisStore(client)
    await client.aclose()


async def test_store_claim_is_taken_once_kept_and_freed_by_its_owner_only(store: Store) -> None:
    assert await store.add("live-stream:CA1", "first", 30) is True
    assert await store.add("live-stream:CA1", "second", 30) is False
    assert (
        await store.refresh("live-stream:CA1", "second", 30),
        await store.refresh("live-stream:CA1", "first", 30),
    ) == (
        False,
        True,
    )
    assert await store.take_if_equal("live-stream:CA1", "second") is False  # not its claim: nothing happens
    assert await store.get("live-stream:CA1") == "first"
    assert await store.take_if_equal("live-stream:CA1", "first") is True
    assert await store.get("live-stream:CA1") is None
    assert await store.add("live-stream:CA1", "second", 30) is True


async def test_memory_store_claim_lapses_after_its_ttl() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    assert await store.add("live-stream:CA1", "first", 30)
    clock.advance(29.9)
    assert await store.refresh("live-stream:CA1", "first", 30)
    clock.advance(30.0)
    assert not await store.refresh("live-stream:CA1", "first", 30)
    assert await store.add("live-stream:CA1", "second", 30)


async def test_memory_store_drops_expired_entries_nobody_reads_again() -> None:
    """A call's outcome or an unused stream token is never read after it expires: the store must not keep one
    per call since start-up (it held up to 10,000 of them before the sweep)."""
    clock = FakeClock()
    store = MemoryStore(clock)
    for i in range(500):
        await store.put(f"outcome:CA{i}", "completed", 600)
        clock.advance(0.2)  # 5 calls a second, as in bench/soak.py
    assert len(store) == 500  # all still wanted: a <Connect action> may ask for any of them
    clock.advance(600 + SWEEP_EVERY_S)
    await store.put("outcome:CA-last", "completed", 600)
    assert (len(store), await store.get("outcome:CA-last"), await store.get("outcome:CA1")) == (1, "completed", None)


async def test_store_count_counts_each_key_from_one(store: Store) -> None:
    counts = [await store.count("voice-answers:CA1", 60) for _ in range(3)]
    assert (counts, await store.count("voice-answers:CA2", 60), await store.get("voice-answers:CA1")) == (
        [1, 2, 3],
        1,
        "3",
    )


async def test_memory_store_count_lapses_ttl_after_its_first_count_not_its_last() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    assert await store.count("voice-answers:CA1", 30) == 1
    clock.advance(29.9)
    assert await store.count("voice-answers:CA1", 30) == 2  # counted, but its life is not extended
    clock.advance(0.1)
    assert await store.count("voice-answers:CA1", 30) == 1


async def test_redis_store_count_sets_the_ttl_when_it_creates_the_counter_only(redis_server: RedisServer) -> None:
    """INCR keeps a key's TTL: the counter expires ``ttl_s`` after its first count, however often it counts."""
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        await client.flushdb()
        store = RedisStore(client)
        assert await store.count("voice-answers:CA1", 4 * 3600) == 1
        first_ttl_ms = await client.pttl("tb:kv:voice-answers:CA1")
        await client.pexpire("tb:kv:voice-answers:CA1", 5000)  # as if the first count were long ago
        assert await store.count("voice-answers:CA1", 4 * 3600) == 2
        assert 4 * 3600_000 - 60_000 < first_ttl_ms <= 4 * 3600_000
        assert 0 < await client.pttl("tb:kv:voice-answers:CA1") <= 5000  # not set again by the second count
    finally:
        await client.aclose()
