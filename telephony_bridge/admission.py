"""Admission: which calls reach the AI, on which device, with which token.

At the webhook a call is *admitted*: a device is reserved for its CallSid, its Savants token is fetched at
once (warm start: the stream's ``start`` then connects without a token round trip; optionally the Savants
socket is opened then too, and the AI's first audio waits in it), and a random stream token is minted for the
TwiML. At ``start`` the stream presents that token (checked once, in constant time)
and claims the reservation. Every token request is taken from the device's budget before it is sent, so the
bridge never sends the 61st.

JWTs stay in this process's memory for at most their life and are never logged; the shared store holds only
a hash of each stream token and how each call ended.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass

from telephony_bridge.accounting.base import Accounting, AccountingUnavailable, Lease
from telephony_bridge.clock import Clock
from telephony_bridge.errors import TokenError
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.savants.client import Connector, SavantsConnection
from telephony_bridge.savants.tokens import TokenClient
from telephony_bridge.store import Store

log = logging.getLogger(__name__)

TOKEN_LIFETIME_S = 60.0  # spec §4
WARM_TOKEN_USE_BY_S = 45.0  # leave a warm token time to reach Savants before it expires
MAX_TOKEN_WAIT_S = 2.0  # a caller can afford a short wait for token budget, not a long one
OUTCOME_TTL_S = 600.0


@dataclass(frozen=True, slots=True)
class Admitted:
    lease: Lease
    stream_token: str
    warm: bool


@dataclass(frozen=True, slots=True)
class VoiceEndpoint:
    """How to reach /voice-stream, and whether to go early (at the webhook) and how far."""

    connect: Connector
    url: str
    timeout_s: float
    warm_token: bool = True
    preconnect: bool = False


class Warm:
    """What the webhook prepared for a call's stream (a token, or an open session), waiting in this process.

    Never shared or stored: a stream that lands on another replica simply starts cold. Whatever waits past
    its use-by time is dropped: an open session is closed by a timer at once (it holds one of the device's
    sockets, and the accounting frees that slot when the reservation lapses), a token on the next put or take.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._items: dict[str, tuple[str, str | SavantsConnection, float]] = {}
        self._timers: set[asyncio.Task[None]] = set()

    async def put(self, call_sid: str, device_id: str, item: str | SavantsConnection, use_by_s: float) -> None:
        use_by = self._clock.monotonic() + use_by_s
        # Swap before any await, so two overlapping puts for one call cannot lose a session between them.
        replaced = self._items.pop(call_sid, None)  # a retried webhook: its earlier preparation goes
        self._items[call_sid] = (device_id, item, use_by)
        if isinstance(item, SavantsConnection):
            timer = asyncio.get_running_loop().create_task(self._expire_at(use_by))
            self._timers.add(timer)
            timer.add_done_callback(self._timers.discard)
        if replaced is not None:
            await _discard(replaced[1])
        await self._sweep()

    async def _expire_at(self, when: float) -> None:
        await self._clock.sleep_until(when)
        await self._sweep()

    async def take(self, call_sid: str, device_id: str) -> str | SavantsConnection | None:
        await self._sweep()
        entry = self._items.pop(call_sid, None)
        if entry is None:
            return None
        if entry[0] != device_id:  # the stream got another device: this one's preparation is useless
            await _discard(entry[1])
            return None
        return entry[1]

    async def discard(self, call_sid: str) -> None:
        """Drop what was prepared for this call (closing an open session), if anything."""
        entry = self._items.pop(call_sid, None)
        if entry is not None:
            await _discard(entry[1])

    async def _sweep(self) -> None:
        now = self._clock.monotonic()
        # Take every expired entry out before the first await, so concurrent sweeps never meet the same one.
        expired = [self._items.pop(sid) for sid in [sid for sid, e in self._items.items() if e[2] <= now]]
        for _, item, _ in expired:
            await _discard(item)

    async def close(self) -> None:
        for timer in list(self._timers):
            timer.cancel()
        items, self._items = list(self._items.values()), {}
        for _, item, _ in items:
            await _discard(item)


async def _discard(item: str | SavantsConnection) -> None:
    if isinstance(item, SavantsConnection):
        await item.close()


class Admission:
    def __init__(
        self,
        accounting: Accounting,
        tokens: TokenClient,
        voice: VoiceEndpoint,
        store: Store,
        metrics: Metrics,
        clock: Clock,
        *,
        reservation_ttl_s: float = 30.0,
        stream_token_ttl_s: float = 60.0,
        sticky_callers: bool = False,
    ) -> None:
        self.accounting = accounting
        self._tokens = tokens
        self._voice = voice
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._reservation_ttl_s = reservation_ttl_s
        self._stream_token_ttl_s = stream_token_ttl_s
        self._sticky_callers = sticky_callers
        self._warm = Warm(clock)
        self._admitted: dict[str, float] = {}  # call SID -> when its reservation lapses

    # --- at the webhook ----------------------------------------------------------------------------------

    async def admit(self, call_sid: str, caller: str | None = None) -> Admitted:
        """Reserve a device and warm a token. ``AdmissionError``: busy. ``SavantsError``: Savants is failing.

        A 429 here means another client shares the device (we never exceed its budget ourselves): the device is
        marked exhausted for ``retryAfter`` and the call tries once more, on the device the pool now prefers.
        """
        sticky_key = caller if self._sticky_callers else None
        for attempt in (1, 2):
            lease = await self.accounting.reserve(call_sid, self._reservation_ttl_s, sticky_key=sticky_key)
            try:
                warm = await self._warm_up(lease)
                stream_token = secrets.token_urlsafe(24)
                await self._store.put(f"stream-token:{call_sid}", _digest(stream_token), self._stream_token_ttl_s)
                self._note_admitted(call_sid)
                return Admitted(lease, stream_token, warm)
            except TokenError as exc:
                await self._give_back(lease)
                if exc.status != 429 or attempt == 2:
                    raise
                log.warning("device %s is rate limited by Savants; trying the pool again", lease.device_id)
            except BaseException:
                await self._give_back(lease)
                raise
        raise AssertionError("unreachable")

    async def _give_back(self, lease: Lease) -> None:
        await self._warm.discard(lease.call_sid)
        await self.accounting.release(lease)

    def _note_admitted(self, call_sid: str) -> None:
        self._admitted[call_sid] = self._clock.monotonic() + self._reservation_ttl_s
        self.awaiting_streams()  # prunes the lapsed ones, so the dict stays as small as the calls ringing

    def stream_started(self, call_sid: str) -> None:
        """The call's stream is up (and in the registry): drain no longer needs to wait for it here."""
        self._admitted.pop(call_sid, None)

    def awaiting_streams(self) -> int:
        """Calls admitted here whose stream has not started yet (and whose reservation has not lapsed).

        A stream that lands on another replica is forgotten here when its reservation lapses.
        """
        now = self._clock.monotonic()
        self._admitted = {sid: until for sid, until in self._admitted.items() if until > now}
        return len(self._admitted)

    async def _warm_up(self, lease: Lease) -> bool:
        """Fetch the call's token now (and open its socket, with preconnect) if the device has budget."""
        if not self._voice.warm_token or await self.accounting.take_token(lease) > 0:
            return False
        token = await self._fetch(lease)
        if self._voice.preconnect:
            session = await self._voice.connect(self._voice.url, token, self._voice.timeout_s)
            # closed just before the reservation lapses, so the slot and the socket go together
            await self._warm.put(lease.call_sid, lease.device_id, session, 0.9 * self._reservation_ttl_s)
        else:
            await self._warm.put(lease.call_sid, lease.device_id, token, WARM_TOKEN_USE_BY_S)
        return True

    # --- at the stream's start ---------------------------------------------------------------------------

    async def check_stream_token(self, call_sid: str, presented: str | None) -> bool:
        """The token minted for this CallSid, presented once, before it expired."""
        expected = await self._store.take(f"stream-token:{call_sid}")
        if expected is None or not presented:
            return False
        return hmac.compare_digest(expected, _digest(presented))

    async def lease_for_stream(self, call_sid: str, caller: str | None = None) -> Lease:
        """The webhook's reservation if this replica's accounting knows it, else a fresh lease."""
        lease = await self.accounting.claim(call_sid)
        if lease is not None:
            return lease
        return await self.accounting.acquire(call_sid, caller if self._sticky_callers else None)

    async def release_reservation(self, call_sid: str) -> None:
        """A stream refused at 'start' (while it is this CallSid's only stream) frees its device slot and whatever
        the webhook warmed for it at once, rather than when the reservation lapses."""
        await self._warm.discard(call_sid)
        lease = await self.accounting.claim(call_sid)
        if lease is not None:
            await self.accounting.release(lease)
        self._admitted.pop(call_sid, None)

    async def session_for(self, lease: Lease) -> SavantsConnection:
        """The AI session for a stream: opened at the webhook, or opened now with a warm or fresh token.

        One token per connection attempt (spec §4, §6.7).
        """
        warm = await self._warm.take(lease.call_sid, lease.device_id)
        if isinstance(warm, SavantsConnection):
            return warm
        token = warm if warm is not None else await self._fresh_token(lease)
        return await self._voice.connect(self._voice.url, token, self._voice.timeout_s)

    async def _fresh_token(self, lease: Lease) -> str:
        """A token within the device's budget, waiting briefly (bounded) for budget if need be."""
        deadline = self._clock.monotonic() + MAX_TOKEN_WAIT_S
        while (wait_s := await self._take_token(lease)) > 0:
            if self._clock.monotonic() + wait_s > deadline:
                self._metrics.token_requests.labels(result="NO_BUDGET").inc()
                raise TokenError(f"device {lease.device_id} has no token budget for {wait_s:.1f} s", code="NO_BUDGET")
            await self._clock.sleep_until(self._clock.monotonic() + wait_s)
        return await self._fetch(lease)

    async def _take_token(self, lease: Lease) -> float:
        try:
            return await self.accounting.take_token(lease)
        except AccountingUnavailable as exc:  # mid-call, this is the AI being unreachable, not our bug
            raise TokenError(str(exc), code="ACCOUNTING_UNAVAILABLE") from exc

    async def _fetch(self, lease: Lease) -> str:
        """One token request, already counted against the device's budget."""
        try:
            token = await self._tokens.fetch(lease.device_id)
        except TokenError as exc:
            self._metrics.token_requests.labels(result=exc.code).inc()
            if exc.status == 429:  # another client shares the device: honour retryAfter (spec §5)
                await self.accounting.exhaust(lease.device_id, exc.retry_after_s or TOKEN_LIFETIME_S)
            raise
        self._metrics.token_requests.labels(result="OK").inc()
        return token

    # --- after the stream ---------------------------------------------------------------------------------

    async def record_outcome(self, call_sid: str, outcome: str) -> None:
        await self._store.put(f"outcome:{call_sid}", outcome, OUTCOME_TTL_S)

    async def outcome(self, call_sid: str) -> str | None:
        return await self._store.get(f"outcome:{call_sid}")

    async def close(self) -> None:
        await self._warm.close()


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
