"""Admission: which calls reach the AI, on which device, with which token.

At the webhook a call is *admitted*: a device with a free slot *and* token budget is reserved for its CallSid
(a new call needs both: without budget its first connection could not happen), its Savants token is fetched at
once (warm start: the token is taken from the device's budget in the same atomic step as the slot, and the
stream's ``start`` then connects without a token round trip; optionally the Savants socket is opened then
too, and the AI's first audio waits in it), and a random stream token is minted for the TwiML. At ``start``
the stream presents that token and claims the reservation. Every token request is taken from the device's
budget before it is sent, so the bridge never sends the 61st.

Token requests that fail on the endpoint's side (5xx, timeout) are retried with jittered exponential backoff
within the call's deadline (``token_deadline_s``: Twilio waits for the webhook's answer, and a caller at
``start`` waits for the AI); each retry is a new request and takes its own budget. A 429 marks the device
exhausted for ``retryAfter`` and an ``AUTHENTICATION_FAILED``/``DEVICE_INACTIVE`` takes it out of the pool
for ``device_suspend_s``; either way the call moves to another device.

Reservations go as soon as their call cannot use them: a failed admission, the call's stream (its token
proved it) refused at ``start``, a ``/stream-ended`` or ``stream-error`` callback (``forget``); the rest lapse
after ``reservation_ttl_s``. A stream without the right token never gives back a reservation: it is not the
call's, and the real stream may still come.

JWTs stay in this process's memory for at most their life and are never logged; the shared store holds only
a hash of each stream token and how each call ended.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import secrets
from dataclasses import dataclass, field

from telephony_bridge.accounting.base import Accounting, AccountingUnavailable, Lease
from telephony_bridge.clock import Clock
from telephony_bridge.errors import AdmissionError, SessionError, TokenError
from telephony_bridge.ops import logging as oplog
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.savants.client import Connector, SavantsConnection
from telephony_bridge.savants.tokens import TokenClient, endpoint_failed
from telephony_bridge.store import Store, StoreUnavailable

log = logging.getLogger(__name__)

TOKEN_LIFETIME_S = 60.0  # spec §4
WARM_TOKEN_USE_BY_S = 45.0  # leave a warm token time to reach Savants before it expires
MAX_TOKEN_WAIT_S = 2.0  # a caller can afford a short wait for token budget, not a long one
# Twilio requests the <Connect action> as soon as the stream has closed; two minutes covers a slow or retried
# request, and a busy bridge holds the outcomes of its last two minutes of calls, not ten.
OUTCOME_TTL_S = 120.0
RETRY_FIRST_S, RETRY_MAX_S = 0.2, 2.0  # backoff between token requests that failed on the endpoint's side
MIN_ATTEMPT_S = 0.3  # a retry with less time than this left before the deadline is not worth sending
DEVICE_REFUSALS = frozenset({"AUTHENTICATION_FAILED", "DEVICE_INACTIVE"})  # the device, not the call, is refused


@dataclass(frozen=True, slots=True)
class Admitted:
    lease: Lease
    stream_token: str
    warm: bool


@dataclass(slots=True)
class CallSlot:
    """Where a call in progress holds its device slot. A reconnect may move the call to another device, so
    the call core holds this rather than a ``Lease``, and heartbeats and releases ``slot.lease``. ``lock`` is
    held across a move and across a heartbeat: a heartbeat that read the old device and landed after the move
    would put the call back on it (counted twice until its TTL)."""

    lease: Lease
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


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
        reservation_ttl_s: float = 10.0,
        stream_token_ttl_s: float = 60.0,
        sticky_callers: bool = False,
        token_deadline_s: float = 2.5,
        device_suspend_s: float = 300.0,
        rng: random.Random | None = None,
        require_stream_token: bool = True,
        allow_missing_stream_token: bool = False,
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
        self._token_deadline_s = token_deadline_s
        self._device_suspend_s = device_suspend_s
        self._rng = rng or random.Random()
        self._suspended_until: dict[str, float] = {}  # device -> when this replica's suspension ends
        self._require_stream_token = require_stream_token
        self._allow_missing_stream_token = allow_missing_stream_token
        self._warm = Warm(clock)
        self._admitted: dict[str, float] = {}  # call SID -> when its reservation lapses

    # --- at the webhook ----------------------------------------------------------------------------------

    async def admit(self, call_sid: str, caller: str | None = None) -> Admitted:
        """Reserve a device and warm a token. ``AdmissionError``: busy. ``SavantsError``: Savants is failing.

        A 429 (another client shares the device) or a refused device moves the call to the device the pool
        now prefers, as long as the webhook's deadline allows; the pool runs out of such devices eventually.
        """
        sticky_key = caller if self._sticky_callers else None
        deadline = self._clock.monotonic() + self._token_deadline_s
        need = "take" if self._voice.warm_token else "check"
        refused: TokenError | None = None  # Savants refused a device this time: if none is left, say why
        while True:
            try:
                lease = await self.accounting.reserve(
                    call_sid, self._reservation_ttl_s, sticky_key=sticky_key, token=need
                )
            except AdmissionError:
                if refused is None:
                    raise
                try:  # not busy: Savants refuses our devices (a wrong API key?)
                    raise refused from None
                finally:  # this frame must not hold the error its traceback holds: a cycle
                    refused = None
            try:
                warm = await self._warm_up(lease, deadline)
                stream_token = secrets.token_urlsafe(24)
                await self._store.put(f"stream-token:{call_sid}", _digest(stream_token), self._stream_token_ttl_s)
                self._note_admitted(call_sid)
                return Admitted(lease, stream_token, warm)
            except TokenError as exc:
                await self._give_back(lease)
                if not _device_cannot(exc) or self._clock.monotonic() + MIN_ATTEMPT_S > deadline:
                    raise
                # Without its traceback (a cycle, as above): what reads it uses its message and code alone.
                refused = exc.with_traceback(None) if exc.code in DEVICE_REFUSALS else refused
                log.warning("device %s cannot take the call (%s); trying the pool again", lease.device_id, exc.code)
            except BaseException:
                await self._give_back(lease)
                raise

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

    async def _warm_up(self, lease: Lease, deadline: float) -> bool:
        """Fetch the call's token now (and open its socket, with preconnect): its budget was taken with the slot
        (a retried webhook whose device has none left gets no warm token; its stream starts cold)."""
        if not self._voice.warm_token or not lease.token_taken:
            return False
        token = await self._fetch_with_retries(lease, deadline, counted=True)
        if self._voice.preconnect:
            session = await self._voice.connect(self._voice.url, token, self._voice.timeout_s)
            # closed just before the reservation lapses, so the slot and the socket go together
            await self._warm.put(lease.call_sid, lease.device_id, session, 0.9 * self._reservation_ttl_s)
        else:
            await self._warm.put(lease.call_sid, lease.device_id, token, WARM_TOKEN_USE_BY_S)
        return True

    # --- at the stream's start ---------------------------------------------------------------------------

    async def stream_token_ok(self, call_sid: str, presented: str | None) -> bool:
        """Whether a stream's ``start`` may proceed: its token checked, unless the settings say otherwise.

        Dev mode accepts a stream with no token at all (third-party Twilio simulators connect straight to the
        WebSocket and cannot present one), with a warning; a token that is presented must still be right.
        """
        if not self._require_stream_token:
            return True
        if not presented and self._allow_missing_stream_token:
            log.warning("accepting a stream that presents no stream token (dev mode only; production refuses it)")
            return True
        return await self.check_stream_token(call_sid, presented)

    async def check_stream_token(self, call_sid: str, presented: str | None) -> bool:
        """The token minted for this CallSid, presented once, before it expired.

        Compared before it is consumed (one atomic step in the store), so a wrong token spoils nothing: the
        right one still admits the call, with its reservation and whatever was warmed for it. A refused stream
        is not the call's, so it gives nothing back (the reservation lapses if the right stream never comes).
        """
        return bool(presented) and await self._store.take_if_equal(f"stream-token:{call_sid}", _digest(presented))

    async def forget(self, call_sid: str) -> None:
        """This call can no longer use what its webhook prepared: its reservation (not a lease: a call in
        progress keeps its slot) and anything warm here. Never raises."""
        self._admitted.pop(call_sid, None)
        await self._warm.discard(call_sid)
        await self.accounting.release_reservation(call_sid)

    async def lease_for_stream(self, call_sid: str, caller: str | None = None) -> Lease:
        """The webhook's reservation if this replica's accounting knows it, else a fresh lease."""
        lease = await self.accounting.claim(call_sid)
        if lease is not None:
            return lease
        return await self.accounting.acquire(call_sid, caller if self._sticky_callers else None)

    # --- one live stream per call, across replicas ---------------------------------------------------------

    async def claim_stream(self, call_sid: str, owner: str, ttl_s: float) -> bool:
        """Make ``owner`` (one stream) the call's only live stream on every replica; False if another holds it.
        Kept by ``keep_stream`` (the lease heartbeat), lapses ``ttl_s`` after a replica dies."""
        return await self._store.add(f"live-stream:{call_sid}", owner, ttl_s)

    async def within_connect_limit(self, call_sid: str, limit: int, window_s: float) -> bool:
        """Count one more ``/voice`` answer for the call; False past ``limit`` within ``window_s`` of its first
        (``twilio.connect_window_s``: Twilio's longest call, 4 h, by default).

        Twilio signs no timestamp, so a captured request stays valid, and nothing in a replay tells it from
        Twilio asking again (a retry, a ``<Redirect>`` or call update back to ``/voice``, which may repeat the
        very same parameters). So the answers a call gets are bounded instead: a replayed request spends at most
        ``limit`` tokens, and real flows stay well under it. Shared across replicas: one counter per call, one
        store round trip per answer whatever ``limit`` is, counted from the call's first answer (later answers,
        refused ones included, do not extend its life). A store that does not answer gives way: admission, on
        the same store, then refuses busy."""
        try:
            return await self._store.count(f"voice-answers:{call_sid}", window_s) <= limit
        except StoreUnavailable:
            return True

    async def keep_stream(self, call_sid: str, owner: str, ttl_s: float) -> bool:
        return await self._store.refresh(f"live-stream:{call_sid}", owner, ttl_s)

    async def end_stream(self, call_sid: str, owner: str) -> None:
        await self._store.take_if_equal(f"live-stream:{call_sid}", owner)

    async def session_for(self, lease: Lease) -> SavantsConnection:
        """The AI session for a stream: opened at the webhook, or opened now with a warm or fresh token.

        One token per connection attempt (spec §4, §6.7).
        """
        warm = await self._warm.take(lease.call_sid, lease.device_id)
        if isinstance(warm, SavantsConnection):
            if not warm.ended:
                return warm
            # Savants closed it while it waited (even with 1000: that was no goodbye to a caller not yet there).
            log.info("the Savants session opened at the webhook ended before the stream started; opening another")
            await warm.close()
            warm = None
        token = warm if warm is not None else await self._fresh_token(lease)
        return await self._voice.connect(self._voice.url, token, self._voice.timeout_s)

    async def _fresh_token(self, lease: Lease) -> str:
        """A token within the device's budget, waiting briefly (bounded) for budget if need be."""
        now = self._clock.monotonic()
        return await self._fetch_with_retries(lease, now + max(MAX_TOKEN_WAIT_S, self._token_deadline_s))

    # --- mid-call: a fresh connection for a call in progress --------------------------------------------------

    async def reconnect(self, slot: CallSlot, *, deadline: float) -> SavantsConnection:
        """A new AI session for a call in progress, by the monotonic ``deadline``: a fresh token (spec §4: one
        per connection) taken from the call's device, or, when that device has no budget left or is out of
        the pool, from another device with a free slot and budget, to which the call's slot moves
        (``slot.lease`` says where it is, whether or not this succeeds). ``TokenError`` or ``SessionError``
        if no session could be had in time.
        """
        while True:
            self._time_left(deadline, "a token request")  # before any budget is spent on it
            counted = await self._budget_for_reconnect(slot)
            try:
                token = await self._fetch_with_retries(slot.lease, deadline, counted=counted)
            except TokenError as exc:
                if not _device_cannot(exc) or exc.code == "NO_BUDGET":
                    raise
                if deadline - self._clock.monotonic() < MIN_ATTEMPT_S:
                    raise
                continue  # the device is exhausted or suspended now: the next round moves the call
            left_s = self._time_left(deadline, "a voice session", SessionError)
            return await self._voice.connect(self._voice.url, token, min(self._voice.timeout_s, left_s))

    def _time_left(self, deadline: float, what: str, error: type[TokenError | SessionError] = TokenError) -> float:
        """Seconds left before ``deadline`` for one attempt at ``what``; an attempt with less than
        ``MIN_ATTEMPT_S`` left is not made (``error``, code ``DEADLINE``), so none runs past the deadline."""
        left_s = deadline - self._clock.monotonic()
        if left_s < MIN_ATTEMPT_S:
            raise error(f"{left_s:.2f} s left before the deadline: too little for {what}", code="DEADLINE")
        return left_s

    async def _budget_for_reconnect(self, slot: CallSlot) -> bool:
        """Take a token request from the call's device, or move the call to a device that has budget (taking
        it there); False if neither is possible now (the fetch then waits for budget, within its deadline)."""
        async with slot.lock:
            try:
                if await self.accounting.take_token(slot.lease) == 0:
                    return True
                moved = await self.accounting.move(slot.lease)
            except AccountingUnavailable as exc:
                raise TokenError(str(exc), code="ACCOUNTING_UNAVAILABLE") from exc
            if moved is None:
                return False
            log.info("call moves from device %s to %s for its reconnect", slot.lease.device_id, moved.device_id)
            slot.lease = moved
            oplog.rebind(device_id=moved.device_id)  # the call's log lines name the device it is on
            return True

    async def suspend_device(self, device_id: str, code: str) -> None:
        """Take a device out of the pool for ``device_suspend_s``: Savants refused it (``AUTHENTICATION_FAILED``,
        ``DEVICE_INACTIVE``), so no call should be placed on it or reconnect through it for a while (it has no
        token budget in accounting meanwhile). Logged once at ERROR per suspension, by this replica."""
        now = self._clock.monotonic()
        if self._suspended_until.get(device_id, 0.0) <= now:
            log.error(
                "Savants refused device %s (%s): it leaves the pool for %.0f s; check the device and the API key",
                device_id,
                code,
                self._device_suspend_s,
            )
        self._suspended_until[device_id] = now + self._device_suspend_s
        await self.accounting.exhaust(device_id, self._device_suspend_s)

    # --- token requests --------------------------------------------------------------------------------------

    async def _fetch_with_retries(self, lease: Lease, deadline: float, *, counted: bool = False) -> str:
        """A token for the lease's device by ``deadline``: budget taken first (``counted``: already taken),
        waiting for it at most until the deadline; endpoint failures retried with jittered backoff."""
        backoff_s = RETRY_FIRST_S
        while True:
            if not counted:
                await self._wait_for_budget(lease, deadline)
            counted = False
            try:
                return await self._fetch(lease, deadline)
            except TokenError as exc:
                pause_s = backoff_s * (0.5 + self._rng.random() / 2)
                if not endpoint_failed(exc) or self._clock.monotonic() + pause_s + MIN_ATTEMPT_S > deadline:
                    raise
                log.warning("token request failed (%s); retrying in %.2f s", exc.code, pause_s)
                await self._clock.sleep_until(self._clock.monotonic() + pause_s)
                backoff_s = min(RETRY_MAX_S, backoff_s * 2)

    async def _wait_for_budget(self, lease: Lease, deadline: float) -> None:
        """Take one token request from the device's budget, waiting for budget until ``deadline`` at most."""
        while (wait_s := await self._take_token(lease)) > 0:
            if self._clock.monotonic() + wait_s + MIN_ATTEMPT_S > deadline:  # no time left to use it
                self._metrics.token_no_budget.inc()  # not a request: nothing was sent
                raise TokenError(f"device {lease.device_id} has no token budget for {wait_s:.1f} s", code="NO_BUDGET")
            await self._clock.sleep_until(self._clock.monotonic() + wait_s)

    async def _take_token(self, lease: Lease) -> float:
        try:
            return await self.accounting.take_token(lease)
        except AccountingUnavailable as exc:  # mid-call, this is the AI being unreachable, not our bug
            raise TokenError(str(exc), code="ACCOUNTING_UNAVAILABLE") from exc

    async def _fetch(self, lease: Lease, deadline: float) -> str:
        """One token request, already counted against the device's budget, bounded by ``deadline``."""
        timeout_s = self._time_left(deadline, "a token request")
        try:
            token = await self._tokens.fetch(lease.device_id, timeout_s)
        except TokenError as exc:
            self._metrics.token_requests.labels(result=exc.code).inc()
            if exc.status == 429:  # another client shares the device: honour retryAfter (spec §5)
                await self.accounting.exhaust(lease.device_id, exc.retry_after_s or TOKEN_LIFETIME_S)
            elif exc.code in DEVICE_REFUSALS:
                await self.suspend_device(lease.device_id, exc.code)
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


def _device_cannot(exc: TokenError) -> bool:
    """The refusal concerns the device (now exhausted or suspended in accounting), so another may serve."""
    return exc.status == 429 or exc.code in DEVICE_REFUSALS or exc.code == "NO_BUDGET"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
