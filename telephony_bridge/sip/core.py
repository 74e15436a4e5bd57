"""The UAS core: transactions and dialogs of many calls behind one call-by-call API, without I/O (spec §3–§7).

The driver feeds ``receive(parsed, peer, now)`` and ``poll(now)`` and gets back a list of ``Send`` actions and
events (``IncomingCall``, ``CallConfirmed``, ``CallCancelled``, ``CallEnded``, ``AckTimeout``, ``ReOffer``,
``ReOfferConfirmed``, ``InfoDigit``, ``CallIdInUse``, ``RequestNotSent``). It decides admission itself and answers
with ``ring``/``answer``/``reject``; ``hangup`` sends our BYE, held back until the ACK (or its timeout), since a
BYE must not precede the ACK (§4), to where ``Dialog.destination`` says.

What the core answers by itself: ``100 Trying`` at once; retransmissions (never a second call, G11); CANCEL
(``200`` + ``487``, or ``481``); BYE (``200``); OPTIONS (``200``, or ``503`` while ``not_ready``); in-dialog
requests for an unknown dialog (``481``) or with a CSeq that went down (``500``); a second re-INVITE while one is
open (``500`` + ``Retry-After``); a new offer while ours awaits its ACK (``491``); unsupported ``Require``
(``420``); methods we do not take (``405``/``501``); malformed requests (``400``). Calls are keyed by Call-ID:
a UAS sees one dialog per Call-ID in practice, and a new INVITE naming a Call-ID still held here is not allowed
to take the call over: it is handed to the driver (``CallIdInUse``), which answers it with ``refuse_invite``
(``401`` first when the sender must authenticate, so that only an authenticated peer learns the Call-ID is live;
then ``482``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from telephony_bridge.sip.address import new_tag, parse_name_addr, parse_via
from telephony_bridge.sip.dialog import ALLOW, SUPPORTED, Dialog, Peer, build_response, response_target
from telephony_bridge.sip.hop import Refused, anywhere
from telephony_bridge.sip.inet import uri_host
from telephony_bridge.sip.message import Malformed, Parsed, Request, Response
from telephony_bridge.sip.transaction import (
    AnswerRetransmit,
    InviteServerTransaction,
    NonInviteServerTransaction,
    State,
    Timers,
    transaction_key,
)

KNOWN_METHODS = {"INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "UPDATE", "INFO"}
REFUSED_METHODS = {"REGISTER", "REFER", "SUBSCRIBE", "NOTIFY", "MESSAGE", "PRACK", "PUBLISH"}
SUPPORTED_TAGS = {"timer"}
REASONS = {
    100: "Trying",
    180: "Ringing",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    405: "Method Not Allowed",
    420: "Bad Extension",
    422: "Session Interval Too Small",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    491: "Request Pending",
    500: "Server Internal Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes
    to: Peer


@dataclass(frozen=True, slots=True)
class IncomingCall:
    call_id: str
    invite: Request
    peer: Peer


@dataclass(frozen=True, slots=True)
class CallConfirmed:
    call_id: str
    ack: Request


@dataclass(frozen=True, slots=True)
class CallCancelled:
    call_id: str


@dataclass(frozen=True, slots=True)
class CallEnded:
    """The peer sent BYE (already answered ``200``)."""

    call_id: str


@dataclass(frozen=True, slots=True)
class AckTimeout:
    """64·T1 without the ACK of our 2xx (G1): the call must end; ``hangup`` now sends the BYE."""

    call_id: str


@dataclass(frozen=True, slots=True)
class ReOffer:
    """A re-INVITE or UPDATE in a dialog: answer with ``answer_reoffer``. ``request.body`` may be empty
    (a session refresh without SDP)."""

    call_id: str
    request: Request


@dataclass(frozen=True, slots=True)
class InfoDigit:
    """A DTMF digit sent as SIP INFO (``application/dtmf-relay``)."""

    call_id: str
    digit: str


@dataclass(frozen=True, slots=True)
class ReOfferConfirmed:
    """The ACK to our ``200`` for a re-INVITE: it carries the answer when that ``200`` carried our offer (a
    re-INVITE without SDP, §10.4)."""

    call_id: str
    ack: Request


@dataclass(frozen=True, slots=True)
class RequestNotSent:
    """Our in-dialog request (a BYE) may not go to its next hop (``hop``): ``host`` and why. On UDP, when that
    hop was refused for where it is, the request goes to where the INVITE came from instead (``to_source``: in a
    proxy's path that is the proxy, which may name itself by host name in Record-Route); otherwise nothing is sent.
    The call is over on our side all the same; the driver logs it."""

    call_id: str
    method: str
    host: str
    reason: str
    to_source: bool = False


@dataclass(frozen=True, slots=True)
class CallIdInUse:
    """A new INVITE (no To tag, its own branch) named the Call-ID of a call still held here, such as a forking
    proxy's second copy or a PBX that reuses Call-IDs; the held call is untouched. Not answered yet: the driver
    answers it with ``refuse_invite``, ``482`` (RFC 3261 §8.2.2.2) or, to a sender that must authenticate and
    has not, ``401`` (a ``482`` would tell it which Call-IDs are live), and logs and counts it. A forking proxy's
    second copy from outside the allow-list carries the first's credentials, nc and all, so it is a replay and
    gets the ``401``; the proxy takes the first branch's ``200`` either way."""

    call_id: str
    peer: Peer
    invite: Request


Event = (
    IncomingCall
    | CallConfirmed
    | CallCancelled
    | CallEnded
    | AckTimeout
    | ReOffer
    | ReOfferConfirmed
    | InfoDigit
    | CallIdInUse
    | RequestNotSent
)
Output = Send | Event
_Txn = InviteServerTransaction | NonInviteServerTransaction


@dataclass
class _Call:
    invite: Request
    txn: InviteServerTransaction
    peer: Peer
    to_tag: str
    dialog: Dialog | None = None
    answer: AnswerRetransmit | None = None
    reoffer: InviteServerTransaction | NonInviteServerTransaction | None = None
    reoffer_answer: AnswerRetransmit | None = None
    bye_pending: bool = False
    ended: bool = False
    forgotten: bool = False  # the driver is done with it: dropped as soon as it has ended


@dataclass
class _ClientRetransmit:
    """Our BYE over UDP: resent on Timer E until a final response or Timer F (64·T1)."""

    data: bytes
    to: Peer
    next_at: float
    interval: float
    end_at: float


def _no_host(host: str) -> bool:
    return False


def _open(connection: int) -> bool:
    return True


@dataclass
class UserAgentCore:
    """``connected`` tells whether a TCP connection (the driver's id) is still open, so that our requests go on it
    or, once it has closed, to the next hop; ``may_send_to`` whether an address other than the INVITE's source may
    be that next hop when the INVITE's source is one too (``hop``: the allow-list; by default none); ``udp_reaches``
    whether our UDP socket can send to an address at all (not IPv6 from an IPv4 bind; by default any)."""

    advertised_host: str
    port: int
    timers: Timers = field(default_factory=Timers)
    # Why this replica should not be sent calls (``/readyz``'s reason: "draining", "voice stream failing"...), or
    # None: what OPTIONS, a dispatcher's health check, hears (200, or 503 with Retry-After and a Warning naming it).
    not_ready: str | None = None
    connected: Callable[[int], bool] = _open
    may_send_to: Callable[[str], bool] = _no_host
    udp_reaches: Callable[[str], bool] = anywhere
    _txns: dict[tuple[str, str, str], tuple[_Txn, Peer]] = field(default_factory=dict)
    _calls: dict[str, _Call] = field(default_factory=dict)
    _client: dict[str, _ClientRetransmit] = field(default_factory=dict)

    def contact(self, peer: Peer) -> str:
        suffix = ";transport=tcp" if peer.transport == "tcp" else ""
        return f"<sip:bridge@{uri_host(self.advertised_host)}:{self.port}{suffix}>"

    @property
    def active_calls(self) -> int:
        return sum(1 for c in self._calls.values() if not c.ended)

    # --- input -----------------------------------------------------------------------------------------------

    def receive(self, parsed: Parsed, peer: Peer, now: float) -> list[Output]:
        if isinstance(parsed, Response):
            self._on_response(parsed)
            return []
        if isinstance(parsed, Malformed):
            if parsed.request is None or parsed.request.method == "ACK":
                return []
            return self._send(parsed.request, peer, build_response(parsed.request, 400, "Bad Request", peer=peer))
        if not isinstance(parsed, Request):
            return []  # keep-alives are the driver's
        return self._on_request(parsed, peer, now)

    def _on_request(self, request: Request, peer: Peer, now: float) -> list[Output]:
        key = transaction_key(request)
        found = self._txns.get(key) if key is not None else None
        txn = found[0] if found is not None else None
        if request.method == "ACK":
            return self._on_ack(request, txn, now)
        if txn is not None:
            return [Send(r.to_bytes(), response_target(request, peer)) for r in txn.on_retransmission(now)]
        if request.method not in KNOWN_METHODS:
            code = 405 if request.method in REFUSED_METHODS else 501
            return self._stateless(request, peer, now, key, code, rows=[("Allow", ALLOW)])
        if request.method == "CANCEL":
            return self._on_cancel(request, peer, now, key)
        if request.method == "OPTIONS" and not _to_tag(request):
            rows = [("Allow", ALLOW), ("Accept", "application/sdp"), ("Supported", SUPPORTED)]
            if self.not_ready is None:
                return self._stateless(request, peer, now, key, 200, rows=rows)
            # RFC 3261 §20.43: 399, a miscellaneous warning, from a pseudonym rather than our address.
            rows += [("Retry-After", "5"), ("Warning", f'399 telephony-bridge "{self.not_ready}"')]
            return self._stateless(request, peer, now, key, 503, rows=rows)
        if request.method == "INVITE" and not _to_tag(request):
            return self._on_invite(request, peer, now, key)
        return self._in_dialog(request, peer, now, key)

    def _on_invite(self, request: Request, peer: Peer, now: float, key: tuple[str, str, str] | None) -> list[Output]:
        unsupported = request.headers.tokens("Require") - SUPPORTED_TAGS
        if unsupported:
            return self._stateless(
                request, peer, now, key, 420, rows=[("Unsupported", ", ".join(sorted(unsupported)))], invite=True
            )
        existing = self._calls.get(request.call_id)
        # A new INVITE (its own branch) under a Call-ID held here, answered or not: a forking proxy's second copy
        # (RFC 3261 §8.2.2.2's merged request) or a PBX reusing Call-IDs. Until the driver forgets the held call,
        # a new one under its Call-ID would replace it.
        if existing is not None:
            if key is None and _same_request(request, existing.invite):
                return []  # a retransmission from a UA without RFC 3261 branches (§17.2.3): no transaction matched it
            return [CallIdInUse(request.call_id, peer, request)]
        txn = InviteServerTransaction(request, reliable=peer.reliable, now=now, timers=self.timers)
        if key is not None:
            self._txns[key] = (txn, peer)
        call = _Call(request, txn, peer, new_tag())
        self._calls[request.call_id] = call
        trying = build_response(request, 100, "Trying", peer=peer)
        out: list[Output] = [Send(r.to_bytes(), response_target(request, peer)) for r in txn.respond(trying, now)]
        out.append(IncomingCall(request.call_id, request, peer))
        return out

    def _on_ack(
        self, request: Request, txn: InviteServerTransaction | NonInviteServerTransaction | None, now: float
    ) -> list[Output]:
        if isinstance(txn, InviteServerTransaction) and txn.state is State.COMPLETED:
            txn.on_ack(now)  # the ACK of a non-2xx final: same branch (§17.1.1.3)
            return []
        call = self._calls.get(request.call_id)
        if call is None or call.dialog is None or not call.dialog.matches(request):
            return []
        out: list[Output] = []
        for answer in (call.answer, call.reoffer_answer):
            if answer is not None and not answer.acked and request.cseq[0] == answer.response.cseq[0]:
                answer.ack()
                if answer is call.answer:
                    out.append(CallConfirmed(request.call_id, request))
                    if call.bye_pending:
                        out += self._send_bye(call, now)
                else:
                    out.append(ReOfferConfirmed(request.call_id, request))
        return out

    def _on_cancel(self, request: Request, peer: Peer, now: float, key: tuple[str, str, str] | None) -> list[Output]:
        invite_key = (key[0], key[1], "INVITE") if key is not None else None
        found = self._txns.get(invite_key) if invite_key is not None else None
        invite_txn = found[0] if found is not None else None
        if not isinstance(invite_txn, InviteServerTransaction):
            return self._stateless(request, peer, now, key, 481)
        call = self._calls.get(invite_txn.request.call_id)
        tag = call.to_tag if call is not None else None
        out = self._stateless(request, peer, now, key, 200, to_tag=tag)
        if invite_txn.state is State.PROCEEDING and call is not None:
            terminated = build_response(invite_txn.request, 487, REASONS[487], peer=call.peer, to_tag=call.to_tag)
            out += self._respond(call, terminated, now)
            self._end(call)
            out.append(CallCancelled(call.invite.call_id))
        return out

    def _in_dialog(self, request: Request, peer: Peer, now: float, key: tuple[str, str, str] | None) -> list[Output]:
        call = self._calls.get(request.call_id)
        dialog = call.dialog if call is not None and not call.ended else None
        if call is None or dialog is None or not dialog.matches(request):
            return self._stateless(request, peer, now, key, 481, invite=request.method == "INVITE")
        if not dialog.accept_cseq(request):
            return self._stateless(request, peer, now, key, 500, invite=request.method == "INVITE")
        if request.method == "BYE":
            self._end(call)
            out = self._stateless(request, peer, now, key, 200)
            if call.reoffer is not None and call.reoffer.state is State.PROCEEDING:
                pending = build_response(call.reoffer.request, 487, REASONS[487], peer=call.peer)
                out += [Send(r.to_bytes(), call.peer) for r in call.reoffer.respond(pending, now)]
            return [*out, CallEnded(request.call_id)]
        if request.method == "INFO":
            out = self._stateless(request, peer, now, key, 200)
            digit = _dtmf_relay(request)
            return [*out, InfoDigit(request.call_id, digit)] if digit else out
        if request.method in ("INVITE", "UPDATE"):
            if call.reoffer is not None and call.reoffer.state is State.PROCEEDING:
                return self._stateless(
                    request, peer, now, key, 500, rows=[("Retry-After", "2")], invite=request.method == "INVITE"
                )
            if _offer_awaits_ack(call) and (request.body or request.method == "INVITE"):
                return self._stateless(request, peer, now, key, 491, invite=request.method == "INVITE")
            txn_cls = InviteServerTransaction if request.method == "INVITE" else NonInviteServerTransaction
            txn = txn_cls(request, reliable=peer.reliable, now=now, timers=self.timers)
            if key is not None:
                self._txns[key] = (txn, peer)
            call.reoffer = txn
            return [ReOffer(request.call_id, request)]
        return self._stateless(request, peer, now, key, 200)  # in-dialog OPTIONS

    def _on_response(self, response: Response) -> None:
        vias = response.headers.values("Via")
        via = parse_via(vias[0]) if vias else None
        branch = via.branch if via is not None else ""
        if response.status >= 200:
            self._client.pop(branch, None)

    # --- decisions from the driver ---------------------------------------------------------------------------

    def ring(self, call_id: str, now: float) -> list[Output]:
        call = self._calls.get(call_id)
        if call is None or call.ended:
            return []
        ringing = build_response(
            call.invite,
            180,
            REASONS[180],
            peer=call.peer,
            to_tag=call.to_tag,
            rows=[("Contact", self.contact(call.peer))],
        )
        return self._respond(call, ringing, now)

    def answer(
        self, call_id: str, sdp: bytes, now: float, *, rows: list[tuple[str, str]] | None = None
    ) -> list[Output]:
        call = self._calls.get(call_id)
        if call is None or call.ended or call.txn.state is not State.PROCEEDING:
            return []
        contact = self.contact(call.peer)
        ok = build_response(
            call.invite,
            200,
            "OK",
            peer=call.peer,
            to_tag=call.to_tag,
            rows=[
                *[("Record-Route", rr) for rr in call.invite.headers.values("Record-Route")],
                ("Contact", contact),
                ("Allow", ALLOW),
                ("Supported", SUPPORTED),
                *(rows or []),
                ("Content-Type", "application/sdp"),
            ],
            body=sdp,
        )
        call.dialog = Dialog.from_invite(call.invite, local_tag=call.to_tag, peer=call.peer, contact=contact)
        call.answer = AnswerRetransmit(ok, now=now, timers=self.timers)
        return self._respond(call, ok, now)

    def reject(
        self, call_id: str, status: int, now: float, *, rows: list[tuple[str, str]] | None = None
    ) -> list[Output]:
        call = self._calls.get(call_id)
        if call is None or call.txn.state is not State.PROCEEDING:
            return []
        response = build_response(
            call.invite, status, REASONS.get(status, "Refused"), peer=call.peer, to_tag=call.to_tag, rows=rows or []
        )
        self._end(call)
        return self._respond(call, response, now)

    def refuse_invite(
        self,
        invite: Request,
        peer: Peer,
        status: int,
        now: float,
        *,
        rows: list[tuple[str, str]] | None = None,
        trying: bool = False,
    ) -> list[Output]:
        """Answer an INVITE handed over as ``CallIdInUse`` with a final ``status``, through a transaction of its
        own that absorbs its retransmissions (and, on UDP, takes the ACK). ``trying`` sends ``100 Trying`` first,
        so that a challenge looks like the one to any new INVITE (``100``, then ``401``)."""
        key = transaction_key(invite)
        return self._stateless(invite, peer, now, key, status, rows=rows, invite=True, trying=trying)

    def answer_reoffer(
        self, call_id: str, status: int, now: float, *, sdp: bytes = b"", rows: list[tuple[str, str]] | None = None
    ) -> list[Output]:
        call = self._calls.get(call_id)
        if call is None or call.reoffer is None or call.dialog is None:
            return []
        txn = call.reoffer
        extra = [("Contact", call.dialog.contact), ("Allow", ALLOW), ("Supported", SUPPORTED), *(rows or [])]
        if sdp:
            extra.append(("Content-Type", "application/sdp"))
        response = build_response(txn.request, status, REASONS.get(status, "OK"), peer=call.peer, rows=extra, body=sdp)
        out = [Send(r.to_bytes(), response_target(txn.request, call.peer)) for r in txn.respond(response, now)]
        if isinstance(txn, InviteServerTransaction) and 200 <= status < 300:
            call.reoffer_answer = AnswerRetransmit(response, now=now, timers=self.timers)
        return out

    def hangup(self, call_id: str, now: float) -> list[Output]:
        """End a call from our side: BYE once confirmed (or at once after the ACK timeout); before any final
        response this is a ``reject`` the driver should have chosen, so it answers ``500``."""
        call = self._calls.get(call_id)
        if call is None or call.ended:
            return []
        if call.dialog is None:
            return self.reject(call_id, 500, now)
        if call.answer is not None and not call.answer.acked and not call.answer.gave_up:
            call.bye_pending = True
            return []
        return self._send_bye(call, now)

    def forget(self, call_id: str) -> None:
        """The driver is done with the call (its media stopped), so its Call-ID may name a new call; transactions
        still absorb retransmissions."""
        call = self._calls.get(call_id)
        if call is None:
            return
        call.forgotten = True
        if call.ended:
            del self._calls[call_id]

    # --- time ------------------------------------------------------------------------------------------------

    @property
    def deadline(self) -> float | None:
        times: list[float] = [t.deadline for t, _ in self._txns.values() if t.deadline is not None]
        for call in self._calls.values():
            for answer in (call.answer, call.reoffer_answer):
                if answer is not None and answer.deadline is not None:
                    times.append(answer.deadline)
        times += [min(c.next_at, c.end_at) for c in self._client.values()]
        return min(times) if times else None

    def poll(self, now: float) -> list[Output]:
        out: list[Output] = []
        for key, (txn, peer) in list(self._txns.items()):
            out += [Send(r.to_bytes(), response_target(txn.request, peer)) for r in txn.poll(now)]
            if txn.state is State.TERMINATED:
                del self._txns[key]
        for call_id, call in list(self._calls.items()):
            for answer in (call.answer, call.reoffer_answer):
                if answer is None:
                    continue
                out += [Send(r.to_bytes(), response_target(call.invite, call.peer)) for r in answer.poll(now)]
                if answer is call.answer and answer.gave_up and not call.ended:
                    out.append(AckTimeout(call_id))
                    if call.bye_pending:
                        out += self._send_bye(call, now)
                    answer.acked = True  # report once
        for branch, client in list(self._client.items()):
            if now >= client.end_at:
                del self._client[branch]
            elif now >= client.next_at:
                out.append(Send(client.data, client.to))
                client.interval = min(client.interval * 2, self.timers.t2_s)
                client.next_at = now + client.interval
        return out

    # --- helpers ---------------------------------------------------------------------------------------------

    def _respond(self, call: _Call, response: Response, now: float) -> list[Output]:
        return [Send(r.to_bytes(), response_target(call.invite, call.peer)) for r in call.txn.respond(response, now)]

    def _send(self, request: Request, peer: Peer, response: Response) -> list[Output]:
        return [Send(response.to_bytes(), response_target(request, peer))]

    def _stateless(
        self,
        request: Request,
        peer: Peer,
        now: float,
        key: tuple[str, str, str] | None,
        status: int,
        *,
        rows: list[tuple[str, str]] | None = None,
        to_tag: str | None = None,
        invite: bool = False,
        trying: bool = False,
    ) -> list[Output]:
        """Answer a request with a final response through a fresh server transaction (absorbs retransmissions),
        after a ``100 Trying`` if ``trying`` (INVITE only)."""
        tag = to_tag if to_tag is not None else (None if _to_tag(request) else new_tag())
        response = build_response(request, status, REASONS.get(status, "Error"), peer=peer, to_tag=tag, rows=rows or [])
        txn_cls = InviteServerTransaction if invite else NonInviteServerTransaction
        txn = txn_cls(request, reliable=peer.reliable, now=now, timers=self.timers)
        if key is not None:
            self._txns[key] = (txn, peer)
        sent = txn.respond(build_response(request, 100, REASONS[100], peer=peer), now) if trying else []
        sent += txn.respond(response, now)
        return [Send(r.to_bytes(), response_target(request, peer)) for r in sent]

    def _end(self, call: _Call) -> None:
        """The call is over. One the driver has forgotten already (we hung up before the caller's ACK, so our BYE
        waited for it) goes now: nothing else would remove it, and its Call-ID would be refused for ever."""
        call.ended = True
        if call.forgotten and self._calls.get(call.invite.call_id) is call:
            del self._calls[call.invite.call_id]

    def _send_bye(self, call: _Call, now: float) -> list[Output]:
        dialog = call.dialog
        assert dialog is not None
        self._end(call)
        call.bye_pending = False
        connection = dialog.peer.connection
        connected = connection is not None and self.connected(connection)
        to = dialog.destination(connected=connected, may_send_to=self.may_send_to, udp_reaches=self.udp_reaches)
        refused: list[Output] = []
        if isinstance(to, Refused):
            to_source = to.where and not dialog.peer.reliable  # on UDP the INVITE's source takes it instead
            refused = [RequestNotSent(dialog.call_id, "BYE", to.host, to.reason, to_source=to_source)]
            if not to_source:
                return refused
            to = dialog.peer
        bye = dialog.request("BYE", via_host=self.advertised_host, via_port=self.port, to=to)
        data = bye.to_bytes()
        if not to.reliable:
            via = parse_via(bye.headers.values("Via")[0])
            branch = via.branch if via is not None else ""
            self._client[branch] = _ClientRetransmit(
                data, to, now + self.timers.t1_s, self.timers.t1_s, now + self.timers.give_up_s
            )
        return [*refused, Send(data, to)]


def _offer_awaits_ack(call: _Call) -> bool:
    """Our 200 to a re-INVITE without SDP carried an offer whose answer (the ACK) has not come: another offer now
    (or a re-INVITE asking for one) is glare, answered ``491`` (RFC 3264 §4, RFC 3261 §14.2)."""
    answer = call.reoffer_answer
    return (
        answer is not None
        and not answer.acked
        and not answer.gave_up
        and bool(answer.response.body)
        and call.reoffer is not None
        and not call.reoffer.request.body
    )


def _same_request(request: Request, held: Request) -> bool:
    """RFC 2543 matching (§17.2.3), for a request whose branch lacks the magic cookie: the same From, CSeq and top
    Via as the held INVITE means a retransmission of it."""
    return (
        request.cseq == held.cseq
        and request.headers.get("From") == held.headers.get("From")
        and request.headers.values("Via")[:1] == held.headers.values("Via")[:1]
    )


def _to_tag(request: Request) -> str | None:
    to = parse_name_addr(request.headers.get("To") or "")
    return to.tag if to is not None else None


def _dtmf_relay(request: Request) -> str | None:
    content_type = (request.headers.get("Content-Type") or "").lower()
    if "dtmf" not in content_type:
        return None
    for line in request.body.decode("utf-8", "replace").splitlines():
        name, _, value = line.partition("=")
        if name.strip().lower() == "signal" and value.strip():
            digit = value.strip()[0].upper()
            if digit in "0123456789*#ABCD":
                return digit
    return None
