"""In-process accounting: one replica, no Redis. Time comes from the injected ``Clock``.

Every method runs to completion without awaiting, so on one event loop each check-and-take is atomic without a
lock. Leases here cannot outlive the process, so they carry no TTL and ``heartbeat`` only reports whether the
lease is held; reservations expire after their ``ttl_s`` like in Redis.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

from telephony_bridge.accounting.base import RESERVATION_TTL_S, Lease, Limits, TokenNeed, refusal_message
from telephony_bridge.clock import Clock, SystemClock
from telephony_bridge.errors import AdmissionError

MAX_STICKY_KEYS = 10_000  # bounded memory; a forgotten caller just gets the least-loaded device


class _Device:
    def __init__(self) -> None:
        self.leases: set[str] = set()
        self.reserved: dict[str, float] = {}  # call_sid -> expires at (monotonic)
        self.token_times: deque[float] = deque()
        self.exhausted_until = 0.0

    @property
    def load(self) -> int:
        return len(self.leases) + len(self.reserved)


class MemoryAccounting:
    def __init__(
        self,
        device_ids: Sequence[str],
        limits: Limits | None = None,
        clock: Clock | None = None,
        *,
        sticky_ttl_s: float = 3600.0,
    ) -> None:
        if not device_ids:
            raise ValueError("accounting needs at least one device id")
        self.limits = limits or Limits()
        self.unavailable_total = 0  # same attribute as RedisAccounting; memory is never unavailable
        self._clock = clock or SystemClock()
        self._devices = {device_id: _Device() for device_id in device_ids}
        # No reservation expires before this (a lower bound: one claimed or released early may leave it low), so
        # until then no device's reservations need looking at: what each call's reserve and claim would scan.
        self._expiry_bound = math.inf
        self._sticky: OrderedDict[str, tuple[str, float]] = OrderedDict()  # key -> (device_id, expires at)
        self._sticky_ttl_s = sticky_ttl_s

    # --- the contract ---------------------------------------------------------------------------------------

    async def reserve(
        self,
        call_sid: str,
        ttl_s: float = RESERVATION_TTL_S,
        *,
        sticky_key: str | None = None,
        token: TokenNeed = "none",
    ) -> Lease:
        return self._admit(call_sid, claim=False, ttl_s=ttl_s, sticky_key=sticky_key, token=token)

    async def claim(self, call_sid: str) -> Lease | None:
        self._expire_reservations()  # an expired reservation cannot be claimed
        found = self._find(call_sid)
        if found is None:
            return None
        device_id, device = found
        if device.reserved.pop(call_sid, None) is not None:
            device.leases.add(call_sid)
        return Lease(call_sid, device_id)

    async def acquire(self, call_sid: str, sticky_key: str | None = None, *, token: TokenNeed = "none") -> Lease:
        return self._admit(call_sid, claim=True, ttl_s=0.0, sticky_key=sticky_key, token=token)

    async def move(self, lease: Lease) -> Lease | None:
        now = self._expire_reservations()
        old = self._devices.get(lease.device_id)
        if old is None or lease.call_sid not in old.leases:
            return None
        candidates = [
            (device.load, len(device.token_times), i)
            for i, (device_id, device) in enumerate(self._devices.items())
            if device_id != lease.device_id
            and device.load < self.limits.max_concurrent
            and self._token_wait_s(device, now) == 0
        ]
        if not candidates:
            return None
        device_id = list(self._devices)[min(candidates)[-1]]
        device = self._devices[device_id]
        old.leases.discard(lease.call_sid)
        device.leases.add(lease.call_sid)
        device.token_times.append(now)
        return Lease(lease.call_sid, device_id, token_taken=True)

    async def release_reservation(self, call_sid: str) -> bool:
        self._expire_reservations()
        return any(device.reserved.pop(call_sid, None) is not None for device in self._devices.values())

    async def heartbeat(self, lease: Lease) -> bool:
        device = self._devices.get(lease.device_id)
        return device is not None and lease.call_sid in device.leases

    async def take_token(self, lease: Lease) -> float:
        device = self._devices[lease.device_id]
        now = self._clock.monotonic()
        wait_s = self._token_wait_s(device, now)
        if wait_s == 0:
            device.token_times.append(now)
        return wait_s

    async def release(self, lease: Lease) -> None:
        device = self._devices.get(lease.device_id)
        if device is not None:
            device.leases.discard(lease.call_sid)
            device.reserved.pop(lease.call_sid, None)

    async def exhaust(self, device_id: str, for_s: float) -> None:
        device = self._devices[device_id]
        device.exhausted_until = max(device.exhausted_until, self._clock.monotonic() + for_s)

    async def has_capacity(self) -> bool:
        self._expire_reservations()
        return any(device.load < self.limits.max_concurrent for device in self._devices.values())

    async def snapshot(self) -> dict[str, Any]:
        now = self._expire_reservations()
        devices = {}
        for device_id, device in self._devices.items():
            self._prune_tokens(device, now)
            devices[device_id] = {
                "leases": len(device.leases),
                "reservations": len(device.reserved),
                "tokens_in_window": len(device.token_times),
                "exhausted_for_s": round(max(0.0, device.exhausted_until - now), 3),
                "calls": sorted(device.leases),
                "reserved_calls": sorted(device.reserved),
            }
        return {
            "backend": "memory",
            "available": True,
            "limits": self.limits.as_dict(),
            "unavailable_total": 0,
            "devices": devices,
        }

    async def close(self) -> None:
        return None

    # --- inside one atomic step -------------------------------------------------------------------------------

    def _expire_reservations(self) -> float:
        """The current time, with every expired reservation dropped."""
        now = self._clock.monotonic()
        if now < self._expiry_bound:
            return now
        bound = math.inf
        for device in self._devices.values():
            for call_sid in [sid for sid, expires in device.reserved.items() if expires <= now]:
                del device.reserved[call_sid]
            if device.reserved:
                bound = min(bound, *device.reserved.values())
        self._expiry_bound = bound
        return now

    def _find(self, call_sid: str) -> tuple[str, _Device] | None:
        for device_id, device in self._devices.items():
            if call_sid in device.leases or call_sid in device.reserved:
                return device_id, device
        return None

    def _admit(self, call_sid: str, *, claim: bool, ttl_s: float, sticky_key: str | None, token: TokenNeed) -> Lease:
        now = self._expire_reservations()
        found = self._find(call_sid)
        if found is not None:  # idempotent: a retried webhook, or acquire after reserve
            device_id, device = found
            if call_sid in device.reserved:
                if claim:
                    del device.reserved[call_sid]
                    device.leases.add(call_sid)
                else:
                    device.reserved[call_sid] = max(device.reserved[call_sid], now + ttl_s)
            return Lease(call_sid, device_id, token_taken=token == "take" and self._take(device, now))
        sticky_device = self._sticky_device(sticky_key, now)
        candidates = []
        for i, (device_id, device) in enumerate(self._devices.items()):
            no_budget = self._token_wait_s(device, now) > 0
            if device.load < self.limits.max_concurrent and not (no_budget and token != "none"):
                candidates.append((no_budget, device_id != sticky_device, device.load, len(device.token_times), i))
        if not candidates:
            raise AdmissionError(self._refusal())
        device_id = list(self._devices)[min(candidates)[-1]]
        device = self._devices[device_id]
        if claim:
            device.leases.add(call_sid)
        else:
            device.reserved[call_sid] = now + ttl_s
            self._expiry_bound = min(self._expiry_bound, now + ttl_s)
        if sticky_key is not None:
            self._remember_sticky(sticky_key, device_id, now)
        return Lease(call_sid, device_id, token_taken=token == "take" and self._take(device, now))

    def _refusal(self) -> str:
        free = sum(device.load < self.limits.max_concurrent for device in self._devices.values())
        return refusal_message(len(self._devices), free, self.limits)

    def _take(self, device: _Device, now: float) -> bool:
        if self._token_wait_s(device, now) > 0:
            return False
        device.token_times.append(now)
        return True

    def _sticky_device(self, sticky_key: str | None, now: float) -> str | None:
        entry = self._sticky.get(sticky_key) if sticky_key is not None else None
        return entry[0] if entry is not None and entry[1] > now else None

    def _remember_sticky(self, sticky_key: str, device_id: str, now: float) -> None:
        self._sticky[sticky_key] = (device_id, now + self._sticky_ttl_s)
        self._sticky.move_to_end(sticky_key)
        while len(self._sticky) > MAX_STICKY_KEYS:
            self._sticky.popitem(last=False)

    def _prune_tokens(self, device: _Device, now: float) -> None:
        while device.token_times and device.token_times[0] <= now - self.limits.window_s:
            device.token_times.popleft()

    def _token_wait_s(self, device: _Device, now: float) -> float:
        """Seconds until this device may take a token request (0 = now)."""
        self._prune_tokens(device, now)
        wait_s = max(0.0, device.exhausted_until - now)
        if len(device.token_times) >= self.limits.max_token_requests:
            wait_s = max(wait_s, device.token_times[0] + self.limits.window_s - now)
        return wait_s
