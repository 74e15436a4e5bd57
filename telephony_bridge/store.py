"""Short-lived values shared by the replicas: stream tokens, how calls ended, which stream a call has live.

``MemoryStore`` serves one replica; ``RedisStore`` lets a webhook answered by one replica be honoured by the
replica that receives the stream. Both expire entries on their own; ``take`` is an atomic get-and-delete so
a value can be used once only, and ``take_if_equal`` consumes it only when it matches, so a wrong guess
leaves it for its rightful owner. ``add`` / ``refresh`` make an owned entry (a claim): set only if absent,
kept alive only by whoever holds it (``take_if_equal`` removes it), so a claim's owner can die and its claim
lapse.
``count`` is a counter that lives ``ttl_s`` from its first count: one atomic step per count (one Lua script on
Redis), however high it goes.
"""

from __future__ import annotations

from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from telephony_bridge.clock import Clock, SystemClock
from telephony_bridge.errors import BridgeError


class StoreUnavailable(BridgeError):
    """The shared store (Redis) did not answer."""


class Store(Protocol):
    unavailable_total: int  # requests the store did not answer (Redis); exported as a metric by the app

    async def put(self, key: str, value: str, ttl_s: float) -> None: ...
    async def get(self, key: str) -> str | None: ...
    async def take(self, key: str) -> str | None: ...
    async def add(self, key: str, value: str, ttl_s: float) -> bool:
        """Set ``key`` only if it holds nothing (atomically); True if it was set."""
        ...

    async def refresh(self, key: str, value: str, ttl_s: float) -> bool:
        """Extend ``key``'s life if it still holds ``value``; True if it did."""
        ...

    async def take_if_equal(self, key: str, value: str) -> bool:
        """Delete the entry if it holds ``value`` (one atomic step); whether it did."""
        ...

    async def count(self, key: str, ttl_s: float) -> int:
        """Add one to the counter at ``key`` (one atomic step) and return it: 1 when there was none, which then
        expires ``ttl_s`` later; later counts do not extend that. ``key`` must hold nothing but counts."""
        ...

    async def close(self) -> None: ...


SWEEP_EVERY_S = 10.0  # how often a put drops the expired entries nobody asked for again


class MemoryStore:
    """One replica's store. An entry nobody reads again (a call's outcome, a stream that never came) is
    dropped by a sweep on a later put, at most ``SWEEP_EVERY_S`` after it expired: the store holds what the
    last TTL's calls left, not what every call since start-up left."""

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self.unavailable_total = 0  # never unavailable
        self._items: dict[str, tuple[str, float]] = {}
        self._next_sweep = self._clock.monotonic() + SWEEP_EVERY_S

    def __len__(self) -> int:
        """Entries held, expired ones not yet swept included."""
        return len(self._items)

    def _live(self, key: str) -> str | None:
        item = self._items.get(key)
        if item is None:
            return None
        value, expires = item
        if self._clock.monotonic() >= expires:
            del self._items[key]
            return None
        return value

    async def put(self, key: str, value: str, ttl_s: float) -> None:
        now = self._clock.monotonic()
        if now >= self._next_sweep:  # one pass over the entries every SWEEP_EVERY_S, not one per put
            self._items = {k: v for k, v in self._items.items() if v[1] > now}
            self._next_sweep = now + SWEEP_EVERY_S
        self._items[key] = (value, now + ttl_s)

    async def get(self, key: str) -> str | None:
        return self._live(key)

    async def take(self, key: str) -> str | None:
        value = self._live(key)
        self._items.pop(key, None)
        return value

    async def add(self, key: str, value: str, ttl_s: float) -> bool:
        if self._live(key) is not None:
            return False
        await self.put(key, value, ttl_s)
        return True

    async def refresh(self, key: str, value: str, ttl_s: float) -> bool:
        if self._live(key) != value:
            return False
        await self.put(key, value, ttl_s)
        return True

    async def take_if_equal(self, key: str, value: str) -> bool:
        if self._live(key) != value:
            return False
        del self._items[key]
        return True

    async def count(self, key: str, ttl_s: float) -> int:
        value = self._live(key)
        if value is None:
            await self.put(key, "1", ttl_s)
            return 1
        counted = int(value) + 1
        self._items[key] = (str(counted), self._items[key][1])  # the first count's expiry stands
        return counted

    async def close(self) -> None:
        self._items.clear()


# Compare, then delete only on a match: one script, so nothing runs between the two. The values compared are
# SHA-256 digests of the secret, so a comparison that is not constant-time reveals nothing useful.
TAKE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# One more count; the counter's life is set when it is created and never extended (INCR keeps a key's TTL).
COUNT = """
local counted = redis.call('INCR', KEYS[1])
if counted == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return counted
"""


class RedisStore:
    """Over a client its creator owns and closes; it must not retry commands (``take`` is a GETDEL, and a retried
    ``count`` would count twice)."""

    def __init__(self, client: aioredis.Redis, prefix: str = "tb:kv:") -> None:
        self._redis = client
        self._prefix = prefix
        self.unavailable_total = 0
        self._refresh = client.register_script(_REFRESH_IF_HELD)
        self._take_if_equal = client.register_script(TAKE_IF_EQUAL)
        self._count = client.register_script(COUNT)

    async def put(self, key: str, value: str, ttl_s: float) -> None:
        try:
            await self._redis.set(self._prefix + key, value, px=_ms(ttl_s))
        except RedisError as exc:
            raise self._unavailable(f"redis did not store {key.split(':')[0]}", exc) from None

    async def get(self, key: str) -> str | None:
        try:
            value = await self._redis.get(self._prefix + key)
        except RedisError as exc:
            raise self._unavailable("redis did not answer", exc) from None
        return _text(value)

    async def take(self, key: str) -> str | None:
        try:
            value = await self._redis.getdel(self._prefix + key)
        except RedisError as exc:
            raise self._unavailable("redis did not answer", exc) from None
        return _text(value)

    async def add(self, key: str, value: str, ttl_s: float) -> bool:
        try:
            return bool(await self._redis.set(self._prefix + key, value, px=_ms(ttl_s), nx=True))
        except RedisError as exc:
            raise self._unavailable(f"redis did not store {key.split(':')[0]}", exc) from None

    async def refresh(self, key: str, value: str, ttl_s: float) -> bool:
        try:
            return bool(await self._refresh(keys=[self._prefix + key], args=[value, _ms(ttl_s)]))
        except RedisError as exc:
            raise self._unavailable("redis did not answer", exc) from None

    async def take_if_equal(self, key: str, value: str) -> bool:
        try:
            taken = await self._take_if_equal(keys=[self._prefix + key], args=[value])
        except RedisError as exc:
            raise self._unavailable("redis did not answer", exc) from None
        return bool(taken)

    async def count(self, key: str, ttl_s: float) -> int:
        try:
            return int(await self._count(keys=[self._prefix + key], args=[_ms(ttl_s)]))
        except RedisError as exc:
            raise self._unavailable(f"redis did not count {key.split(':')[0]}", exc) from None

    async def close(self) -> None:
        return None

    def _unavailable(self, what: str, exc: RedisError) -> StoreUnavailable:
        self.unavailable_total += 1
        return StoreUnavailable(f"{what}: {type(exc).__name__}")


_REFRESH_IF_HELD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def _ms(ttl_s: float) -> int:
    return max(1, int(ttl_s * 1000))


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value
