"""Accounting shared by every replica through Redis: the limits hold across the fleet, not per process.

Each check-and-take is one Lua script (``redis_scripts``), timed by the Redis server's clock. Leases carry a
TTL that ``heartbeat`` refreshes, so a replica killed with SIGKILL frees its slots within ``lease_ttl_s``.
If Redis does not answer, admission fails closed (``AccountingUnavailable``) while calls in progress go on.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from telephony_bridge.accounting import redis_scripts as lua
from telephony_bridge.accounting.base import (
    LEASE_TTL_S,
    RESERVATION_TTL_S,
    AccountingUnavailable,
    Lease,
    Limits,
    TokenNeed,
    refusal_message,
)
from telephony_bridge.errors import AdmissionError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Redis is down, failing over or refusing writes: "unavailable". Any other ResponseError is a bug of ours.
_UNREACHABLE = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.ReadOnlyError,
    rexc.OutOfMemoryError,
    rexc.ClusterDownError,
    OSError,
)


class RedisAccounting:
    def __init__(
        self,
        redis: str | aioredis.Redis,
        device_ids: Sequence[str],
        limits: Limits | None = None,
        *,
        lease_ttl_s: float = LEASE_TTL_S,
        key_prefix: str = "tb:",
        sticky_ttl_s: float = 3600.0,
        timeout_s: float = 1.0,
    ) -> None:
        """``redis`` is a URL (we own the client and close it) or a client (the caller closes it).

        ``timeout_s`` bounds each attempt (one retry) so a webhook is refused quickly when Redis is away.
        """
        if not device_ids:
            raise ValueError("accounting needs at least one device id")
        self.limits = limits or Limits()
        self.unavailable_total = 0  # times Redis did not answer; exported as a metric by the app
        self._device_ids = tuple(device_ids)
        self._prefix = key_prefix
        self._lease_ttl_ms = _ms(lease_ttl_s)
        self._sticky_ttl_ms = _ms(sticky_ttl_s)
        self._window_ms = _ms(self.limits.window_s)
        if isinstance(redis, str):
            self._client = aioredis.Redis.from_url(
                redis,
                decode_responses=True,
                socket_connect_timeout=timeout_s,
                socket_timeout=timeout_s,
                retry=Retry(NoBackoff(), retries=1),
            )
            self._owns_client = True
        else:
            self._client, self._owns_client = redis, False
        self._where = _describe(self._client)
        self._degraded = False
        self._admit = self._client.register_script(lua.ADMIT)
        self._take_token = self._client.register_script(lua.TAKE_TOKEN)
        self._release = self._client.register_script(lua.RELEASE)
        self._release_reservation = self._client.register_script(lua.RELEASE_RESERVATION)
        self._heartbeat = self._client.register_script(lua.HEARTBEAT)
        self._exhaust = self._client.register_script(lua.EXHAUST)
        self._snapshot = self._client.register_script(lua.SNAPSHOT)

    # --- the contract ---------------------------------------------------------------------------------------

    async def reserve(
        self,
        call_sid: str,
        ttl_s: float = RESERVATION_TTL_S,
        *,
        sticky_key: str | None = None,
        token: TokenNeed = "none",
    ) -> Lease:
        return self._admitted(call_sid, await self._run_admit(call_sid, "reserve", ttl_s, sticky_key, token))

    async def claim(self, call_sid: str) -> Lease | None:
        status, device_id, _ = await self._run_admit(call_sid, "claim", 0.0, None, "none")
        return Lease(call_sid, device_id) if status == "leased" else None

    async def acquire(self, call_sid: str, sticky_key: str | None = None, *, token: TokenNeed = "none") -> Lease:
        return self._admitted(call_sid, await self._run_admit(call_sid, "acquire", 0.0, sticky_key, token))

    async def move(self, lease: Lease) -> Lease | None:
        status, device_id, _ = await self._run_admit(lease.call_sid, "move", 0.0, None, "take")
        return Lease(lease.call_sid, device_id, token_taken=True) if status == "leased" else None

    async def release_reservation(self, call_sid: str) -> bool:
        keys = [self._key(device_id, "reserved") for device_id in self._device_ids]
        dropped = await self._swallow(
            "release a reservation", lambda: self._release_reservation(keys=keys, args=[call_sid])
        )
        return bool(dropped)

    async def heartbeat(self, lease: Lease) -> bool:
        keys = [self._key(lease.device_id, "leases"), self._key(lease.device_id, "reserved")]
        args: list[str | int] = [lease.call_sid, self._lease_ttl_ms, self.limits.max_concurrent]
        status = await self._swallow("heartbeat", lambda: self._heartbeat(keys=keys, args=args))
        if status is None:  # Redis away: the lease expires unless a later heartbeat gets through
            return True
        if int(status) == 2:
            log.warning("lease had expired (heartbeats missed); counted again on %s", lease.device_id)
        elif int(status) == 0:
            log.error("lease had expired and %s is full now: this call is not counted", lease.device_id)
        return int(status) != 0

    async def take_token(self, lease: Lease) -> float:
        keys = [self._key(lease.device_id, k) for k in ("tokens", "exhausted", "seq")]
        args = [self.limits.max_token_requests, self._window_ms]
        wait_ms = await self._call("take a token", lambda: self._take_token(keys=keys, args=args))
        return int(wait_ms) / 1000

    async def release(self, lease: Lease) -> None:
        keys = [self._key(lease.device_id, "leases"), self._key(lease.device_id, "reserved")]
        await self._swallow("release", lambda: self._release(keys=keys, args=[lease.call_sid]))

    async def exhaust(self, device_id: str, for_s: float) -> None:
        if for_s > 0:
            key = self._key(device_id, "exhausted")
            await self._swallow("exhaust", lambda: self._exhaust(keys=[key], args=[_ms(for_s)]))

    async def has_capacity(self) -> bool:
        try:
            devices = await self._devices()
        except AccountingUnavailable:
            return False
        return any(d["leases"] + d["reservations"] < self.limits.max_concurrent for d in devices.values())

    async def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "backend": "redis",
            "available": True,
            "limits": self.limits.as_dict(),
            "unavailable_total": self.unavailable_total,
            "devices": {},
        }
        try:
            out["devices"] = await self._devices()
        except AccountingUnavailable as exc:
            out.update(available=False, error=str(exc), unavailable_total=self.unavailable_total)
        return out

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    # --- plumbing -----------------------------------------------------------------------------------------

    def _key(self, device_id: str, kind: str) -> str:
        if device_id not in self._device_ids:
            raise KeyError(f"expected one of the pool's devices {self._device_ids}, got {device_id!r}")
        return f"{self._prefix}dev:{device_id}:{kind}"

    def _device_keys(self) -> list[str]:
        return [self._key(device_id, kind) for device_id in self._device_ids for kind in lua.DEVICE_KEYS]

    async def _run_admit(
        self, call_sid: str, mode: str, ttl_s: float, sticky_key: str | None, token: TokenNeed
    ) -> tuple[str, str, int]:
        """One ADMIT script run: (leased | reserved | none | full, device_id, token taken or free devices)."""
        # Callers' numbers stay out of key names: the sticky key is hashed.
        sticky = hashlib.sha256(sticky_key.encode()).hexdigest()[:32] if sticky_key is not None else ""
        keys = [f"{self._prefix}sticky:{sticky}", *self._device_keys()]
        args: list[str | int] = [
            call_sid,
            mode,
            _ms(ttl_s),
            self._lease_ttl_ms,
            self.limits.max_concurrent,
            self.limits.max_token_requests,
            self._window_ms,
            self._sticky_ttl_ms if sticky_key is not None else 0,
            token,
            *self._device_ids,
        ]
        status, device_id, extra = await self._call(mode, lambda: self._admit(keys=keys, args=args))
        return _text(status), _text(device_id), int(extra)

    def _admitted(self, call_sid: str, result: tuple[str, str, int]) -> Lease:
        status, device_id, extra = result
        if status not in ("leased", "reserved"):
            message = refusal_message(len(self._device_ids), extra, self.limits)
            raise AdmissionError(f"{message} (shared via Redis)")
        return Lease(call_sid, device_id, token_taken=bool(extra))

    async def _devices(self) -> dict[str, dict[str, Any]]:
        rows = await self._call("snapshot", lambda: self._snapshot(keys=self._device_keys(), args=[self._window_ms]))
        devices = {}
        for device_id, (leased, reserved, tokens, exhausted_ms) in zip(self._device_ids, rows, strict=True):
            devices[device_id] = {
                "leases": len(leased),
                "reservations": len(reserved),
                "tokens_in_window": int(tokens),
                "exhausted_for_s": max(0, int(exhausted_ms)) / 1000,
                "calls": sorted(map(_text, leased)),
                "reserved_calls": sorted(map(_text, reserved)),
            }
        return devices

    async def _call(self, what: str, run: Callable[[], Awaitable[T]]) -> T:
        """Run one script; Redis being away becomes ``AccountingUnavailable`` (counted, logged once)."""
        try:
            result = await run()
        except _UNREACHABLE as exc:
            self.unavailable_total += 1
            message = f"accounting unavailable: Redis at {self._where} did not answer ({what}): {exc}"
            if not self._degraded:
                self._degraded = True
                log.error("%s; refusing new calls until it answers", message)
            raise AccountingUnavailable(message) from exc
        if self._degraded:
            self._degraded = False
            log.warning("Redis at %s answers again", self._where)
        return result

    async def _swallow(self, what: str, run: Callable[[], Awaitable[T]]) -> T | None:
        """For calls in progress: a Redis outage must not end them (``_call`` has logged it)."""
        try:
            return await self._call(what, run)
        except AccountingUnavailable:
            return None


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _describe(client: aioredis.Redis) -> str:
    """Where Redis is, for error messages: host:port/db or the socket path, never the password."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
