"""Build the accounting a replica runs with: in memory alone, through Redis when replicas share one."""

from __future__ import annotations

from collections.abc import Sequence

from telephony_bridge.accounting.base import LEASE_TTL_S, Accounting, Limits
from telephony_bridge.accounting.memory import MemoryAccounting
from telephony_bridge.accounting.redis import RedisAccounting
from telephony_bridge.clock import Clock


def make_accounting(
    settings_redis_url: str,
    device_ids: Sequence[str],
    limits: Limits | None = None,
    clock: Clock | None = None,
    *,
    lease_ttl_s: float = LEASE_TTL_S,
    key_prefix: str = "tb:",
) -> Accounting:
    """Memory when ``settings_redis_url`` is empty (one replica), else Redis (limits shared by all replicas).

    The clock only drives the memory backend: Redis times windows and TTLs by its own server clock.
    ``lease_ttl_s`` and ``key_prefix`` only apply to Redis (memory leases die with the process).
    """
    if not settings_redis_url:
        return MemoryAccounting(tuple(device_ids), limits, clock)
    return RedisAccounting(settings_redis_url, device_ids, limits, lease_ttl_s=lease_ttl_s, key_prefix=key_prefix)
