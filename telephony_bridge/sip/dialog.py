"""Responses and dialogs of a UAS (spec §1 where responses go, §3 responses, §5 dialog state; RFC 3261 §8.2.6,
§12, §18.2.2, RFC 3581). Pure.

``Peer`` is where a message came from (transport, address, and an opaque connection id on TCP).
``build_response`` copies Via/From/To/Call-ID/CSeq, fills ``received``/``rport`` into the top Via, and adds our
To tag. ``response_target`` applies the table of §1. ``Dialog`` keeps the UAS dialog state and builds our
in-dialog requests (BYE, refresh re-INVITE) with the route set in the order received (G8), sent where
``destination`` says (``hop`` when that is a next hop of the caller's naming).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from telephony_bridge.sip.address import NameAddr, Uri, Via, new_branch, parse_name_addr, parse_uri, parse_via
from telephony_bridge.sip.hop import Hop, Refused, check_hop, next_hop
from telephony_bridge.sip.inet import uri_host
from telephony_bridge.sip.message import Headers, Request, Response

ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS, UPDATE, INFO"
SUPPORTED = "timer"
USER_AGENT = "telephony-bridge"


@dataclass(frozen=True, slots=True)
class Peer:
    transport: str  # "udp" or "tcp"
    host: str
    port: int
    connection: int | None = None  # the driver's id of the TCP connection the message came on

    @property
    def reliable(self) -> bool:
        return self.transport != "udp"


def build_response(
    request: Request,
    status: int,
    reason: str,
    *,
    peer: Peer | None = None,
    to_tag: str | None = None,
    rows: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> Response:
    out: list[tuple[str, str]] = []
    for index, via_text in enumerate(request.headers.values("Via")):
        if index == 0 and peer is not None:
            via_text = _stamp_via(via_text, peer)
        out.append(("Via", via_text))
    for name in ("From", "Call-ID", "CSeq"):
        value = request.headers.get(name)
        if value is not None:
            out.append((name, value))
    to = request.headers.get("To") or ""
    if to_tag is not None and status > 100:
        parsed = parse_name_addr(to)
        if parsed is not None and parsed.tag is None:
            to = str(parsed.with_tag(to_tag))
    out.append(("To", to))
    out.extend(rows)
    out.append(("Server", USER_AGENT))
    return Response(status, reason, Headers.of(out), body)


def _stamp_via(via_text: str, peer: Peer) -> str:
    via = parse_via(via_text)
    if via is None:
        return via_text
    params = dict(via.params)
    if "rport" in params:
        params["rport"] = str(peer.port)
        params["received"] = peer.host
    elif via.host != peer.host or "received" in params:  # a received= the sender wrote is not where it is
        params["received"] = peer.host
    else:
        return via_text
    return str(Via(via.transport, via.host, via.port, params))


def response_target(request: Request, peer: Peer) -> Peer:
    """Where the response goes (§1): the same connection on TCP; on UDP the source with rport, else the source's
    address (the ``received`` we add, §18.2.1) and the sent-by port. Never a ``received`` the sender wrote in its
    own Via: that would let any source point our responses (a 401 to anyone, with ``sip.users``) at another host."""
    if peer.reliable:
        return peer
    vias = request.headers.values("Via")
    via = parse_via(vias[0]) if vias else None
    if via is None or "rport" in via.params:
        return peer
    return Peer("udp", peer.host, via.port or 5060)


@dataclass
class Dialog:
    """UAS dialog state (§5), created when we answer an INVITE."""

    call_id: str
    local_tag: str
    remote_tag: str
    local_uri: str
    remote_uri: str
    remote_target: str
    route_set: list[str]
    remote_cseq: int
    peer: Peer
    contact: str  # our Contact value, with ;transport=tcp on TCP (G9)
    local_cseq: int = field(default_factory=lambda: secrets.randbelow(2**30) + 1)

    @classmethod
    def from_invite(cls, invite: Request, *, local_tag: str, peer: Peer, contact: str) -> Dialog:
        from_ = parse_name_addr(invite.headers.get("From") or "") or NameAddr("")
        to = parse_name_addr(invite.headers.get("To") or "") or NameAddr("")
        contacts = invite.headers.values("Contact")
        target = parse_name_addr(contacts[0]) if contacts else None
        return cls(
            call_id=invite.call_id,
            local_tag=local_tag,
            remote_tag=from_.tag or "",
            local_uri=to.uri,
            remote_uri=from_.uri,
            remote_target=target.uri if target is not None else from_.uri,
            route_set=invite.headers.values("Record-Route"),  # in order received: the UAS does not reverse (G8)
            remote_cseq=invite.cseq[0],
            peer=peer,
            contact=contact,
        )

    def matches(self, request: Request) -> bool:
        from_ = parse_name_addr(request.headers.get("From") or "")
        to = parse_name_addr(request.headers.get("To") or "")
        return (
            request.call_id == self.call_id
            and from_ is not None
            and from_.tag == self.remote_tag
            and to is not None
            and to.tag == self.local_tag
        )

    def accept_cseq(self, request: Request) -> bool:
        """In-dialog requests must climb (§12.2.2); ACK and CANCEL carry the INVITE's number."""
        number = request.cseq[0]
        if number <= self.remote_cseq:
            return False
        self.remote_cseq = number
        return True

    def request(
        self,
        method: str,
        *,
        via_host: str,
        via_port: int,
        to: Peer,
        rows: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> Request:
        """An in-dialog request of ours (§12.2.1.1) going to ``to`` (``destination``), whose transport our Via
        names; loose routing, a strict first route honoured too."""
        self.local_cseq += 1
        uri = self.remote_target
        routes = list(self.route_set)
        if routes:
            first = parse_name_addr(routes[0])
            if first is not None and "lr" not in (parse_uri(first.uri) or Uri("sip", "", "x")).params:
                uri = first.uri
                routes = [*routes[1:], f"<{self.remote_target}>"]
        headers = [
            ("Via", f"SIP/2.0/{to.transport.upper()} {uri_host(via_host)}:{via_port};branch={new_branch()};rport"),
            ("Max-Forwards", "70"),
            *[("Route", r) for r in routes],
            ("From", f"<{self.local_uri}>;tag={self.local_tag}"),
            ("To", f"<{self.remote_uri}>;tag={self.remote_tag}"),
            ("Call-ID", self.call_id),
            ("CSeq", f"{self.local_cseq} {method}"),
            ("Contact", self.contact),
            ("User-Agent", USER_AGENT),
            *rows,
        ]
        return Request(method, uri, Headers.of(headers), body)

    def destination(
        self, *, connected: bool, may_send_to: Callable[[str], bool], udp_reaches: Callable[[str], bool]
    ) -> Peer | Refused:
        """Where our in-dialog requests go: the TCP connection the dialog lives on while it is ``connected``; on
        UDP without a route set, where the INVITE came from (reachable even when the Contact is a private address
        behind NAT, as Asterisk's force_rport/rewrite_contact do, spec §13); otherwise the next hop, a new TCP
        connection (RFC 3261 §18.1.1) or a datagram as its URI says, if ``hop.check_hop`` lets us send there."""
        if self.peer.reliable and connected:
            return self.peer
        if not self.peer.reliable and not self.route_set:
            return self.peer
        hop = next_hop(self.route_set, self.remote_target, self.peer.transport)
        if hop is None:  # on UDP, the INVITE's source is still worth a try
            return self.peer if not self.peer.reliable else Refused("", "the next hop is not a SIP URI")
        checked = check_hop(hop, self.peer.host, may_send_to, udp_reaches)
        return Peer(checked.transport, checked.host, checked.port) if isinstance(checked, Hop) else checked
