"""The accounting contract every backend keeps (memory for one replica, Redis for several).

Savants allows each device at most ``max_concurrent`` sockets and ``max_token_requests`` token requests in
any rolling 60 s window (spec §5, §8). A call holds one slot on one device for its life:

    reserve (Twilio webhook) ──claim (stream start)──> lease ──release──> free
       └── not claimed within ttl_s: expires          └── heartbeats stop (Redis): expires after lease_ttl_s

Every token request is taken from the device's window *before* it is sent, so the bridge never sends a request
over the limit. Every check-and-take is atomic: two calls racing for the last slot cannot both win.

A new call needs both a slot and a token for its first connection, so ``reserve`` and ``acquire`` can ask for
a device with token budget (``token="check"``) or take that token in the same atomic step (``token="take"``:
the webhook's warm token); ``Lease.token_taken`` says whether it was taken. ``move`` carries a call in
progress to another device for a reconnect when its own has no budget left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from telephony_bridge.errors import AdmissionError

TOKEN_WINDOW_S = 60.0
RESERVATION_TTL_S = 10.0  # Twilio connects the stream within a second or two of the webhook
# What a new call needs besides a slot: nothing more, a device with budget for one token request, or that
# request taken from the device's window in the same atomic step.
TokenNeed = Literal["none", "check", "take"]
LEASE_TTL_S = 30.0  # Redis only: a replica killed without releasing frees its slots within this


class AccountingUnavailable(AdmissionError):
    """The shared accounting store (Redis) did not answer: admit nothing rather than risk the device limits."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-device limits (spec §8); ``window_s`` is configurable so tests can roll the window in real time."""

    max_concurrent: int = 10
    max_token_requests: int = 60
    window_s: float = TOKEN_WINDOW_S

    def __post_init__(self) -> None:
        if self.max_concurrent < 1 or self.max_token_requests < 1 or self.window_s <= 0:
            raise ValueError(f"limits must be positive, got {self}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_concurrent": self.max_concurrent,
            "max_token_requests": self.max_token_requests,
            "window_s": self.window_s,
        }


@dataclass(frozen=True, slots=True)
class Lease:
    """One call's slot on one device; the same value whether it is still a reservation or already claimed."""

    call_sid: str
    device_id: str
    # Whether the step that made this lease also took a token request from the device's window (token="take").
    token_taken: bool = field(default=False, compare=False)


def refusal_message(devices: int, with_free_slot: int, limits: Limits) -> str:
    """Why no device can take a new call: every slot taken, or no budget where a slot is free."""
    if not with_free_slot:
        return f"all {devices} devices are at {limits.max_concurrent} calls"
    return (
        f"no token budget on the {with_free_slot} devices with a free slot "
        f"({limits.max_token_requests} requests per {limits.window_s:g} s used, or Savants asked us to wait)"
    )


class Accounting(Protocol):
    unavailable_total: int  # requests the backend did not answer (Redis); exported as a metric by the app

    async def reserve(
        self,
        call_sid: str,
        ttl_s: float = RESERVATION_TTL_S,
        *,
        sticky_key: str | None = None,
        token: TokenNeed = "none",
    ) -> Lease:
        """Hold a slot for a call about to connect (at the webhook), so the stream start cannot find the pool full.

        Picks a device with a free slot (and with ``token`` "check"/"take", token budget; "take" also takes
        one): token budget first, then ``sticky_key``'s last device, then least loaded. Idempotent per
        ``call_sid`` (a retried webhook gets the same lease, with a token taken if "take" and the device has
        budget; an unclaimed reservation's expiry is extended). ``AdmissionError`` if no device qualifies;
        ``AccountingUnavailable`` if the store is unreachable.
        """
        ...

    async def claim(self, call_sid: str) -> Lease | None:
        """Turn this call's reservation into a lease (at stream start); None if it has none (expired, or
        reserved on a replica that shares no store with us): then call ``acquire``. Claiming twice is harmless.
        ``AccountingUnavailable`` if the store is unreachable.
        """
        ...

    async def acquire(self, call_sid: str, sticky_key: str | None = None, *, token: TokenNeed = "none") -> Lease:
        """``reserve`` and ``claim`` in one atomic step; claims this call's reservation if it has one."""
        ...

    async def move(self, lease: Lease) -> Lease | None:
        """Move a call's lease to another device with a free slot and token budget, taking one token request
        there, in one atomic step (a reconnect whose device has no budget left). None, and the call keeps
        its lease, if no device qualifies.
        """
        ...

    async def release_reservation(self, call_sid: str) -> bool:
        """Drop this call's reservation, on whichever device (its stream was refused or has ended); a lease
        (a call in progress) is left alone. True if one was dropped; never raises.
        """
        ...

    async def heartbeat(self, lease: Lease) -> bool:
        """Keep a live lease from expiring (call every ``lease_ttl_s / 3``); False only if the store says the
        lease is lost (it expired and its device filled up meanwhile; Redis takes an expired lease back if room).

        Errors are logged and swallowed (returning True): a call in progress never fails on accounting.
        """
        ...

    async def take_token(self, lease: Lease) -> float:
        """Record one token request (reconnects included) on the lease's device; 0 if taken, else seconds
        until one frees. Never lets request ``max_token_requests + 1`` of a window through. Counts against the
        device whether or not the lease is still held: the request is real either way.
        """
        ...

    async def release(self, lease: Lease) -> None:
        """Give the slot back (lease or reservation); releasing twice is harmless and never raises."""
        ...

    async def exhaust(self, device_id: str, for_s: float) -> None:
        """Savants said 429 anyway (another client shares the device): take no tokens there for ``for_s``."""
        ...

    async def has_capacity(self) -> bool:
        """Whether ``reserve`` would find a free slot now (for /readyz); False if the store is unreachable."""
        ...

    async def snapshot(self) -> dict[str, Any]:
        """Per-device load for /status: leases, reservations, tokens in window, exhaustion, call SIDs."""
        ...

    async def close(self) -> None: ...
