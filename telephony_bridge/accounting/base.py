"""The accounting contract every backend keeps (memory now; Redis shares the contract).

Savants allows each device at most ``max_concurrent`` sockets and ``max_token_requests`` token requests in
any rolling 60 s window (spec §5, §8). A lease pins a call to a device for its life; every token request is
taken from the device's window *before* it is sent, so the bridge never sends a request over the limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

TOKEN_WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class Limits:
    max_concurrent: int = 10
    max_token_requests: int = 60
    window_s: float = TOKEN_WINDOW_S


@dataclass(frozen=True, slots=True)
class Lease:
    call_sid: str
    device_id: str


class Accounting(Protocol):
    async def acquire(self, call_sid: str) -> Lease:
        """Lease the least-loaded device that has a free socket and token budget; ``AdmissionError`` if none."""
        ...

    async def take_token(self, lease: Lease) -> float:
        """Record one token request on the lease's device; 0 if taken, else seconds until one frees."""
        ...

    async def release(self, lease: Lease) -> None:
        """Give the device slot back; releasing twice is harmless."""
        ...

    async def exhaust(self, device_id: str, for_s: float) -> None:
        """Savants said 429 anyway (another client shares the device): take no tokens there for ``for_s``."""
        ...

    async def snapshot(self) -> dict[str, Any]:
        """Per-device load for /status: leases, tokens in window, the call SIDs each serves."""
        ...

    async def close(self) -> None: ...
