"""``/readyz``: whether this replica should be sent new calls, and if not, which check fails.

The checks, in order: draining; the accounting backend (Redis) answers; some device has both a free slot and
token budget (a new call needs both, spec §8); the Savants token endpoint, then its voice stream, have not
failed recently. A load balancer probes every second or so, so the accounting read (one Lua script on Redis)
is cached for ``cache_s`` and shared by concurrent probes, and each Savants endpoint is judged from real
requests plus, while it fails, an occasional probe that spends no token (``EndpointHealth``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from telephony_bridge.accounting.base import Accounting
from telephony_bridge.clock import Clock
from telephony_bridge.savants.health import EndpointHealth

DRAINING = "draining"
ACCOUNTING = "accounting unavailable"
CAPACITY = "device pool full"
TOKEN_ENDPOINT = "token endpoint failing"
VOICE_STREAM = "voice stream failing"


@dataclass(frozen=True)
class Verdict:
    ready: bool
    reason: str | None = None  # the check that fails: one of the names above
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        if self.ready:
            return {"ready": True}
        return {"ready": False, "reason": self.reason, "detail": self.detail}


def devices_that_can_take_a_call(snapshot: dict[str, Any]) -> list[str]:
    """From an accounting snapshot: devices with a free slot and budget for one more token request."""
    limits = snapshot["limits"]
    return [
        device_id
        for device_id, d in snapshot["devices"].items()
        if d["leases"] + d["reservations"] < limits["max_concurrent"]
        and d["tokens_in_window"] < limits["max_token_requests"]
        and d["exhausted_for_s"] <= 0
    ]


class Readiness:
    def __init__(
        self,
        accounting: Accounting,
        token_health: EndpointHealth,
        voice_health: EndpointHealth,
        clock: Clock,
        *,
        cache_s: float = 1.0,
        not_ready_when_full: bool = True,
    ) -> None:
        self._accounting = accounting
        self._token_health = token_health
        self._voice_health = voice_health
        self._clock = clock
        self._cache_s = cache_s
        self._not_ready_when_full = not_ready_when_full
        self._snapshot: dict[str, Any] | None = None
        self._snapshot_at = float("-inf")
        self._lock = asyncio.Lock()

    async def check(self, *, draining: bool, capacity: bool = True) -> Verdict:
        """``capacity``: whether a full device pool counts (and ``not_ready_when_full`` allows it); SIP OPTIONS
        leaves it out, since a trunk takes our 486 Busy Here better than a dispatcher's own 503."""
        # Asked first, whatever fails before them: a failing endpoint is probed only when asked, and must learn
        # that its outage is over while the pool is full or Redis is down too.
        token_works, voice_works = self._token_health.healthy(), self._voice_health.healthy()
        if draining:
            return Verdict(False, DRAINING, "finishing the calls in progress")
        snapshot = await self._accounting_snapshot()
        if not snapshot.get("available", True):
            return Verdict(False, ACCOUNTING, str(snapshot.get("error", "the accounting backend did not answer")))
        if capacity and self._not_ready_when_full and not devices_that_can_take_a_call(snapshot):
            return Verdict(False, CAPACITY, "no device has both a free slot and token budget")
        if not token_works:
            return Verdict(False, TOKEN_ENDPOINT, f"Savants token requests fail: {self._token_health.last_error}")
        if not voice_works:
            return Verdict(False, VOICE_STREAM, f"Savants voice sessions fail: {self._voice_health.last_error}")
        return Verdict(True)

    async def _accounting_snapshot(self) -> dict[str, Any]:
        """The accounting snapshot, at most ``cache_s`` old; concurrent probes share one read."""
        async with self._lock:
            if self._snapshot is None or self._clock.monotonic() - self._snapshot_at >= self._cache_s:
                self._snapshot = await self._accounting.snapshot()
                self._snapshot_at = self._clock.monotonic()
            return self._snapshot
