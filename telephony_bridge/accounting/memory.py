"""In-process accounting: one replica, no Redis."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from telephony_bridge.accounting.base import Lease, Limits
from telephony_bridge.clock import Clock, SystemClock
from telephony_bridge.errors import AdmissionError


class _Device:
    def __init__(self) -> None:
        self.calls: set[str] = set()
        self.token_times: deque[float] = deque()
        self.exhausted_until = 0.0


class MemoryAccounting:
    def __init__(self, device_ids: tuple[str, ...], limits: Limits | None = None, clock: Clock | None = None) -> None:
        if not device_ids:
            raise ValueError("accounting needs at least one device id")
        self.limits = limits or Limits()
        self._clock = clock or SystemClock()
        self._devices = {device_id: _Device() for device_id in device_ids}
        self._lock = asyncio.Lock()

    def _prune(self, device: _Device, now: float) -> None:
        while device.token_times and device.token_times[0] <= now - self.limits.window_s:
            device.token_times.popleft()

    def _wait_s(self, device: _Device, now: float) -> float:
        """Seconds until this device may take a token request (0 = now)."""
        self._prune(device, now)
        wait = max(0.0, device.exhausted_until - now)
        if len(device.token_times) >= self.limits.max_token_requests:
            wait = max(wait, device.token_times[0] + self.limits.window_s - now)
        return wait

    async def acquire(self, call_sid: str) -> Lease:
        async with self._lock:
            now = self._clock.monotonic()
            candidates = [
                (self._wait_s(dev, now) > 0, len(dev.calls), len(dev.token_times), device_id)
                for device_id, dev in self._devices.items()
                if len(dev.calls) < self.limits.max_concurrent
            ]
            if not candidates:
                raise AdmissionError(f"all {len(self._devices)} devices are at {self.limits.max_concurrent} calls")
            *_, device_id = min(candidates)
            self._devices[device_id].calls.add(call_sid)
            return Lease(call_sid, device_id)

    async def take_token(self, lease: Lease) -> float:
        async with self._lock:
            device = self._devices[lease.device_id]
            now = self._clock.monotonic()
            wait = self._wait_s(device, now)
            if wait == 0:
                device.token_times.append(now)
            return wait

    async def release(self, lease: Lease) -> None:
        async with self._lock:
            self._devices[lease.device_id].calls.discard(lease.call_sid)

    async def exhaust(self, device_id: str, for_s: float) -> None:
        async with self._lock:
            device = self._devices[device_id]
            device.exhausted_until = max(device.exhausted_until, self._clock.monotonic() + for_s)

    async def snapshot(self) -> dict[str, Any]:
        async with self._lock:
            now = self._clock.monotonic()
            out = {}
            for device_id, dev in self._devices.items():
                self._prune(dev, now)
                out[device_id] = {
                    "calls": sorted(dev.calls),
                    "leases": len(dev.calls),
                    "tokens_in_window": len(dev.token_times),
                    "exhausted_for_s": round(max(0.0, dev.exhausted_until - now), 1),
                }
            return {"backend": "memory", "limits": vars_of(self.limits), "devices": out}

    async def close(self) -> None:
        return None


def vars_of(limits: Limits) -> dict[str, Any]:
    return {
        "max_concurrent": limits.max_concurrent,
        "max_token_requests": limits.max_token_requests,
        "window_s": limits.window_s,
    }
