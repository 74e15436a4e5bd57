"""Server transactions and the 2xx retransmission, as pure state machines (spec §4; RFC 3261 §17.2, RFC 6026).

No I/O and no clock reads: every method takes ``now`` (monotonic seconds) and returns the responses to send;
``deadline`` says when ``poll`` must be called next. The driver keeps one table of transactions by ``key`` and
one timer loop.

    INVITE:      Proceeding --3xx-6xx--> Completed --ACK--> Confirmed --Timer I--> Terminated
                      |                      '--Timer H (no ACK)--> Terminated (timed_out)
                      '------2xx------> Accepted --Timer L--> Terminated
    non-INVITE:  Trying/Proceeding --final--> Completed --Timer J--> Terminated

The 2xx itself is resent by the UAS core (``AnswerRetransmit``), not the transaction (§13.3.1.4): every
transport, T1 doubling to T2, until the ACK or 64·T1 (gotchas G1, G4).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from telephony_bridge.sip.address import BRANCH_COOKIE, parse_via
from telephony_bridge.sip.message import Request, Response

T1_S = 0.5
T2_S = 4.0
T4_S = 5.0


@dataclass(frozen=True, slots=True)
class Timers:
    """RFC 3261 Appendix A values; tests shrink them."""

    t1_s: float = T1_S
    t2_s: float = T2_S
    t4_s: float = T4_S

    @property
    def give_up_s(self) -> float:
        """64·T1: Timers H, J, L and the 2xx give-up."""
        return 64 * self.t1_s


def transaction_key(request: Request) -> tuple[str, str, str] | None:
    """(branch, sent-by, method) with ACK folded into INVITE (§17.2.3); None without the RFC 3261 cookie."""
    vias = request.headers.values("Via")
    via = parse_via(vias[0]) if vias else None
    if via is None or not via.branch.startswith(BRANCH_COOKIE):
        return None
    method = "INVITE" if request.method == "ACK" else request.method
    return via.branch, via.sent_by.lower(), method


class State(enum.Enum):
    PROCEEDING = "proceeding"
    COMPLETED = "completed"
    CONFIRMED = "confirmed"
    ACCEPTED = "accepted"
    TERMINATED = "terminated"


class InviteServerTransaction:
    """One INVITE server transaction. ``timed_out`` is set when Timer H fired without an ACK."""

    def __init__(self, request: Request, *, reliable: bool, now: float, timers: Timers = Timers()) -> None:
        self.request = request
        self.reliable = reliable
        self.timers = timers
        self.state = State.PROCEEDING
        self.last_response: Response | None = None
        self.timed_out = False
        self._retransmit_at: float | None = None
        self._interval = timers.t1_s
        self._end_at: float | None = None

    @property
    def deadline(self) -> float | None:
        candidates = [t for t in (self._retransmit_at, self._end_at) if t is not None]
        return min(candidates) if candidates else None

    def respond(self, response: Response, now: float) -> list[Response]:
        """Send ``response`` through the transaction; ignored once a final was sent."""
        if self.state is not State.PROCEEDING:
            return []
        self.last_response = response
        if response.status >= 300:
            self.state = State.COMPLETED
            if not self.reliable:
                self._retransmit_at = now + self._interval
            self._end_at = now + self.timers.give_up_s  # Timer H
        elif response.status >= 200:
            self.state = State.ACCEPTED
            self._end_at = now + self.timers.give_up_s  # Timer L
        return [response]

    def on_retransmission(self, now: float) -> list[Response]:
        """A retransmitted INVITE: resend the latest provisional or the non-2xx final; absorbed once Accepted."""
        if self.state in (State.PROCEEDING, State.COMPLETED) and self.last_response is not None:
            return [self.last_response]
        return []

    def on_ack(self, now: float) -> None:
        """The ACK of a non-2xx final (same branch, §17.1.1.3)."""
        if self.state is State.COMPLETED:
            self.state = State.CONFIRMED
            self._retransmit_at = None
            self._end_at = now + (0.0 if self.reliable else self.timers.t4_s)  # Timer I

    def poll(self, now: float) -> list[Response]:
        out: list[Response] = []
        if self._end_at is not None and now >= self._end_at:
            self.timed_out = self.state is State.COMPLETED
            self.state = State.TERMINATED
            self._retransmit_at = self._end_at = None
            return out
        if self._retransmit_at is not None and now >= self._retransmit_at and self.last_response is not None:
            out.append(self.last_response)  # Timer G
            self._interval = min(self._interval * 2, self.timers.t2_s)
            self._retransmit_at = now + self._interval
        return out


class NonInviteServerTransaction:
    """BYE, CANCEL, OPTIONS…: a retransmitted request gets the last response again until Timer J."""

    def __init__(self, request: Request, *, reliable: bool, now: float, timers: Timers = Timers()) -> None:
        self.request = request
        self.reliable = reliable
        self.timers = timers
        self.state = State.PROCEEDING
        self.last_response: Response | None = None
        self.deadline: float | None = None

    def respond(self, response: Response, now: float) -> list[Response]:
        if self.state is not State.PROCEEDING:
            return []
        self.last_response = response
        if response.status >= 200:
            self.state = State.COMPLETED
            self.deadline = now + (0.0 if self.reliable else self.timers.give_up_s)  # Timer J
        return [response]

    def on_retransmission(self, now: float) -> list[Response]:
        return [self.last_response] if self.last_response is not None else []

    def poll(self, now: float) -> list[Response]:
        if self.deadline is not None and now >= self.deadline:
            self.state = State.TERMINATED
            self.deadline = None
        return []


class AnswerRetransmit:
    """Resends our 2xx to an INVITE until its ACK (§13.3.1.4): at T1, 2T1, 4T1 … capped at T2, on every
    transport, for 64·T1. ``gave_up`` then says the session must be ended with BYE (G1)."""

    def __init__(self, response: Response, *, now: float, timers: Timers = Timers()) -> None:
        self.response = response
        self.timers = timers
        self.acked = False
        self.gave_up = False
        self.sent = 1
        self._interval = timers.t1_s
        self._next_at = now + self._interval
        self._end_at = now + timers.give_up_s

    @property
    def deadline(self) -> float | None:
        return None if self.acked or self.gave_up else min(self._next_at, self._end_at)

    def ack(self) -> None:
        self.acked = True

    def poll(self, now: float) -> list[Response]:
        if self.acked or self.gave_up:
            return []
        if now >= self._end_at:
            self.gave_up = True
            return []
        if now < self._next_at:
            return []
        self.sent += 1
        self._interval = min(self._interval * 2, self.timers.t2_s)  # keep going at T2, never stop at T2 (G4)
        self._next_at = now + self._interval
        return [self.response]
