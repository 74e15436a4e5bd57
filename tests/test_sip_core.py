"""The UAS core and its transactions, on literal messages and explicit times (spec §3–§7): no sockets, no loop."""

from __future__ import annotations

from pathlib import Path

from telephony_bridge.sip.address import parse_name_addr, parse_via
from telephony_bridge.sip.core import (
    AckTimeout,
    CallCancelled,
    CallConfirmed,
    CallEnded,
    CallIdInUse,
    IncomingCall,
    InfoDigit,
    Output,
    ReOffer,
    RequestNotSent,
    Send,
    UserAgentCore,
)
from telephony_bridge.sip.dialog import Peer
from telephony_bridge.sip.message import Request, Response, parse_datagram
from telephony_bridge.sip.transaction import AnswerRetransmit, InviteServerTransaction, State, Timers

DATA = Path(__file__).parent / "data" / "sip"
PEER = Peer("udp", "198.51.100.7", 5062)
T0 = 100.0


def invite() -> Request:
    msg = parse_datagram((DATA / "invite.sip").read_bytes())
    assert isinstance(msg, Request)
    return msg


def derived(method: str) -> Request:
    """CANCEL or ACK (for a non-2xx) built from the INVITE the way a UAC does: same branch, CSeq number."""
    inv = invite()
    headers = inv.headers.without("CSeq", "Content-Type", "Content-Length").with_rows(("CSeq", f"101 {method}"))
    again = parse_datagram(Request(method, inv.uri, headers).to_bytes())
    assert isinstance(again, Request)
    return again


def sent(outputs: list[Output]) -> list[Response | Request]:
    out = []
    for o in outputs:
        if isinstance(o, Send):
            msg = parse_datagram(o.data)
            assert isinstance(msg, Response | Request)
            out.append(msg)
    return out


def events(outputs: list[Output]) -> list[object]:
    return [o for o in outputs if not isinstance(o, Send)]


def statuses(outputs: list[Output]) -> list[int]:
    return [m.status for m in sent(outputs) if isinstance(m, Response)]


def another_invite(branch: str) -> Request:
    """A new INVITE under the same Call-ID: its own branch and From tag, no To tag (a forking proxy's second
    copy, a PBX that reuses Call-IDs)."""
    inv = invite()
    via = f"SIP/2.0/UDP 198.51.100.7:5060;branch={branch};rport"
    headers = inv.headers.without("Via", "From").with_rows(("Via", via), ("From", "<sip:other@example.net>;tag=t2"))
    again = parse_datagram(Request("INVITE", inv.uri, headers, inv.body).to_bytes())
    assert isinstance(again, Request)
    return again


def in_dialog(method: str, ok: Response, cseq: int, *, branch: str, body: bytes = b"", rows: str = "") -> Request:
    to = ok.headers.get("To")
    text = (
        f"{method} sip:bridge@203.0.113.5:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 198.51.100.7:5060;branch={branch};rport\r\n"
        f'From: "Caller, The" <sip:+15551230000@carrier.example;user=phone>;tag=caller-tag\r\n'
        f"To: {to}\r\nCall-ID: 3c2a7b1e@198.51.100.7\r\nCSeq: {cseq} {method}\r\n{rows}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    msg = parse_datagram(text)
    assert isinstance(msg, Request)
    return msg


def routed_invite() -> Request:
    """``invite()`` with its Record-Route naming the proxies by address, which our BYE may be sent to."""
    text = (DATA / "invite.sip").read_bytes()
    for n in (1, 2, 3):
        text = text.replace(f"proxy{n}.example.net".encode(), f"192.0.2.{n}".encode())
    msg = parse_datagram(text)
    assert isinstance(msg, Request)
    return msg


def proxies(host: str) -> bool:
    """``may_send_to`` of a bridge whose allow-list is the proxies' 192.0.2.0/24 and the caller's address."""
    return host.startswith("192.0.2.") or host == PEER.host


def digest_only(host: str) -> bool:
    """``may_send_to`` of a bridge whose allow-list holds the proxies but not the caller (let in by digest)."""
    return host.startswith("192.0.2.")


def anything(host: str) -> bool:
    return True


def answered(core: UserAgentCore, request: Request | None = None) -> Response:
    core.receive(request or invite(), PEER, T0)
    out = core.answer("3c2a7b1e@198.51.100.7", b"v=0\r\n", T0 + 0.1)
    (ok,) = sent(out)
    assert isinstance(ok, Response) and ok.status == 200
    return ok


def test_invite_gets_trying_at_once_and_one_call() -> None:
    core = UserAgentCore("203.0.113.5", 5060)
    out = core.receive(invite(), PEER, T0)
    assert statuses(out) == [100]
    (trying,) = sent(out)
    assert isinstance(trying, Response)
    assert parse_name_addr(trying.headers.get("To") or "").tag is None  # a 100 carries no tag  # type: ignore[union-attr]
    assert events(out) == [IncomingCall("3c2a7b1e@198.51.100.7", invite(), PEER)]
    top = parse_via(trying.headers.values("Via")[0])
    assert top is not None and top.params["rport"] == "5062" and top.params["received"] == "198.51.100.7"
    assert [o.to for o in out if isinstance(o, Send)] == [PEER]  # rport: back to the source port


def test_a_received_the_sender_wrote_in_its_via_is_not_where_the_response_goes() -> None:
    """Without rport the response goes to the source's address and the sent-by port (RFC 3261 §18.2.2, with the
    ``received`` we add, §18.2.1); a ``received=`` the sender put in its own Via is overwritten, never followed
    (it would turn the bridge into a reflector at any address)."""
    core = UserAgentCore("203.0.113.5", 5060)
    inv = invite()
    spoofed = f"SIP/2.0/UDP {PEER.host}:5070;branch=z9hG4bK-spoof;received=192.0.2.99"
    request = parse_datagram(
        Request("INVITE", inv.uri, inv.headers.without("Via").with_rows(("Via", spoofed)), inv.body).to_bytes()
    )
    assert isinstance(request, Request)
    out = core.receive(request, PEER, T0)
    assert [o.to for o in out if isinstance(o, Send)] == [Peer("udp", PEER.host, 5070)]
    (trying,) = sent(out)
    top = parse_via(trying.headers.values("Via")[0])
    assert top is not None and top.params["received"] == PEER.host


def test_retransmitted_invite_is_absorbed_never_a_second_call() -> None:
    core = UserAgentCore("203.0.113.5", 5060)
    core.receive(invite(), PEER, T0)
    again = core.receive(invite(), PEER, T0 + 0.5)
    assert statuses(again) == [100] and events(again) == []
    ok = core.answer("3c2a7b1e@198.51.100.7", b"v=0\r\n", T0 + 1)
    assert statuses(ok) == [200]
    assert core.receive(invite(), PEER, T0 + 1.2) == []  # Accepted: the core resends the 2xx, not the txn
    assert core.active_calls == 1


def refused(core: UserAgentCore, branch: str, now: float, status: int = 482, *, trying: bool = False) -> list[int]:
    """A new INVITE under the held Call-ID: handed to the driver unanswered, then answered as the driver would."""
    request = another_invite(branch)
    out = core.receive(request, PEER, now)
    assert out == [CallIdInUse("3c2a7b1e@198.51.100.7", PEER, request)], out
    return statuses(core.refuse_invite(request, PEER, status, now, trying=trying))


def test_new_branch_while_the_first_invite_is_undecided_is_482_and_the_first_goes_on() -> None:
    """A merged request (RFC 3261 §8.2.2.2: a forking proxy's second copy) was absorbed without an answer, so its
    sender retransmitted it for 32 s; it is refused at once, and the first INVITE is still answered."""
    core = UserAgentCore("203.0.113.5", 5060)
    core.receive(invite(), PEER, T0)
    assert refused(core, "z9hG4bK-second", T0 + 0.1) == [482]
    assert core.active_calls == 1
    assert statuses(core.answer("3c2a7b1e@198.51.100.7", b"v=0\r\n", T0 + 0.2)) == [200]


def test_new_invite_under_a_held_call_id_is_482_until_the_driver_forgets_it() -> None:
    core = UserAgentCore("203.0.113.5", 5060)
    ok = answered(core)
    assert refused(core, "z9hG4bK-second", T0 + 1) == [482]
    again = core.receive(another_invite("z9hG4bK-second"), PEER, T0 + 1.01)
    assert statuses(again) == [482] and events(again) == []  # its retransmission: same answer, reported once
    bye = core.receive(in_dialog("BYE", ok, 102, branch="z9hG4bK-bye-1"), PEER, T0 + 2)
    assert statuses(bye) == [200] and events(bye) == [CallEnded("3c2a7b1e@198.51.100.7")]  # the call untouched
    assert refused(core, "z9hG4bK-third", T0 + 2.1) == [482]  # still held
    core.forget("3c2a7b1e@198.51.100.7")
    out = core.receive(another_invite("z9hG4bK-fourth"), PEER, T0 + 3)
    assert statuses(out) == [100] and [type(e) for e in events(out)] == [IncomingCall]


def test_a_challenge_to_an_invite_under_a_held_call_id_looks_like_any_challenge() -> None:
    """The driver challenges such an INVITE from a sender that must authenticate: ``100 Trying`` then ``401``, as
    a new call's INVITE gets them, and its retransmission is answered ``401`` again, not handed over twice."""
    core = UserAgentCore("203.0.113.5", 5060)
    answered(core)
    assert refused(core, "z9hG4bK-second", T0 + 1, 401, trying=True) == [100, 401]
    again = core.receive(another_invite("z9hG4bK-second"), PEER, T0 + 1.01)
    assert statuses(again) == [401] and events(again) == []


def test_answer_has_tag_contact_record_route_in_order() -> None:
    core = UserAgentCore("203.0.113.5", 5060)
    core.receive(invite(), PEER, T0)
    ringing = sent(core.ring("3c2a7b1e@198.51.100.7", T0))[0]
    ok = answered_again(core)
    assert isinstance(ringing, Response)
    tag180 = parse_name_addr(ringing.headers.get("To") or "")
    tag200 = parse_name_addr(ok.headers.get("To") or "")
    assert tag180 is not None and tag200 is not None and tag180.tag == tag200.tag and tag200.tag  # G3
    assert ok.headers.values("Record-Route") == invite().headers.values("Record-Route")
    assert ok.headers.get("Contact") == "<sip:bridge@203.0.113.5:5060>"
    assert ok.headers.get("Content-Type") == "application/sdp" and ok.body == b"v=0\r\n"


def answered_again(core: UserAgentCore) -> Response:
    (ok,) = sent(core.answer("3c2a7b1e@198.51.100.7", b"v=0\r\n", T0 + 0.1))
    assert isinstance(ok, Response)
    return ok


def test_tcp_dialog_contact_says_transport_tcp() -> None:
    core = UserAgentCore("203.0.113.5", 5060)
    tcp = Peer("tcp", "198.51.100.7", 40000, connection=7)
    core.receive(invite(), tcp, T0)
    out = core.answer("3c2a7b1e@198.51.100.7", b"v=0\r\n", T0)
    (ok,) = sent(out)
    assert isinstance(ok, Response) and ok.headers.get("Contact") == "<sip:bridge@203.0.113.5:5060;transport=tcp>"
    assert [o.to for o in out if isinstance(o, Send)] == [tcp]  # the same connection (G9)


def test_2xx_resent_t1_doubling_capped_at_t2_until_ack() -> None:
    core = UserAgentCore("203.0.113.5", 5060)
    ok = answered(core)
    times = []
    now = T0 + 0.1
    for _ in range(400):
        deadline = core.deadline
        assert deadline is not None
        now = deadline
        if statuses(core.poll(now)) == [200]:
            times.append(round(now - T0 - 0.1, 3))
        if len(times) == 8:
            break
    assert times == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5]  # keeps going at T2, never stops at T2 (G4)
    ack = in_dialog("ACK", ok, 101, branch="z9hG4bK-ack-new")
    out = core.receive(ack, PEER, now + 0.1)
    assert [type(e) for e in events(out)] == [CallConfirmed]
    assert statuses(core.poll(now + 10)) == []


def test_an_ipv6_advertised_host_is_bracketed_in_our_contact_and_bye_via() -> None:
    """``sip.advertised_host`` an IPv6 address: written bare, ``sip:bridge@2001:db8::5:5060`` reads as a host
    ``2001`` with a port; in brackets (RFC 3261 §25.1) in the Contact of our 200 and the Via of our BYE."""
    core = UserAgentCore("2001:db8::5", 5060)
    ok = answered(core)
    assert ok.headers.get("Contact") == "<sip:bridge@[2001:db8::5]:5060>"
    core.receive(in_dialog("ACK", ok, 101, branch="z9hG4bK-ack-v6"), PEER, T0 + 0.2)
    (bye,) = [m for m in sent(core.hangup("3c2a7b1e@198.51.100.7", T0 + 1)) if isinstance(m, Request)]
    via = parse_via(bye.headers.values("Via")[0])
    assert via is not None and (via.host, via.port) == ("2001:db8::5", 5060), bye.headers.values("Via")


def test_never_acked_gives_up_after_64_t1_and_bye_goes_then() -> None:
    timers = Timers(t1_s=0.5)
    core = UserAgentCore("203.0.113.5", 5060, timers=timers, may_send_to=proxies)
    answered(core, routed_invite())
    assert core.hangup("3c2a7b1e@198.51.100.7", T0 + 1) == []  # no BYE before the ACK (§4)
    out = core.poll(T0 + 0.1 + 32.0)
    assert [type(e) for e in events(out)] == [AckTimeout]
    byes = [m for m in sent(out) if isinstance(m, Request)]
    assert [b.method for b in byes] == ["BYE"]
    bye = byes[0]
    assert bye.headers.values("Route") == routed_invite().headers.values("Record-Route")  # not reversed (G8)
    assert bye.uri == "sip:+15551230000@198.51.100.7:5060"
    assert parse_name_addr(bye.headers.get("From") or "").tag  # type: ignore[union-attr]
    assert [type(e) for e in events(core.poll(T0 + 40))] == []  # reported once


def test_a_call_forgotten_while_its_bye_waits_for_the_ack_is_dropped_once_the_bye_goes() -> None:
    """We hung up before the caller's ACK, and the driver forgot the call at once: the record stayed for ever (a
    leak per such call) and its Call-ID was refused 482 for ever. It goes when our BYE does."""
    timers = Timers(t1_s=0.5)
    core = UserAgentCore("203.0.113.5", 5060, timers=timers, may_send_to=proxies)
    answered(core, routed_invite())
    assert core.hangup("3c2a7b1e@198.51.100.7", T0 + 1) == []  # the BYE waits for the ACK
    core.forget("3c2a7b1e@198.51.100.7")
    assert refused(core, "z9hG4bK-second", T0 + 2) == [482]  # still held
    byes = [m for m in sent(core.poll(T0 + 0.1 + 32.0)) if isinstance(m, Request)]
    assert [b.method for b in byes] == ["BYE"]
    out = core.receive(another_invite("z9hG4bK-third"), PEER, T0 + 40)
    assert statuses(out) == [100] and [type(e) for e in events(out)] == [IncomingCall]


def test_bye_before_ack_ends_the_call() -> None:
    core = UserAgentCore("203.0.113.5", 5060)
    ok = answered(core)
    out = core.receive(in_dialog("BYE", ok, 102, branch="z9hG4bK-bye-1"), PEER, T0 + 0.2)
    assert statuses(out) == [200] and events(out) == [CallEnded("3c2a7b1e@198.51.100.7")]
    again = core.receive(in_dialog("BYE", ok, 102, branch="z9hG4bK-bye-1"), PEER, T0 + 0.7)
    assert statuses(again) == [200] and events(again) == []  # a retransmitted BYE: same answer, no second end


def test_bye_from_our_side_after_ack_carries_the_route_set() -> None:
    core = UserAgentCore("203.0.113.5", 5060, may_send_to=proxies)
    ok = answered(core, routed_invite())
    core.receive(in_dialog("ACK", ok, 101, branch="z9hG4bK-ack-1"), PEER, T0 + 0.2)
    out = core.hangup("3c2a7b1e@198.51.100.7", T0 + 1)
    (bye,) = sent(out)
    assert isinstance(bye, Request) and bye.method == "BYE"
    to = next(o.to for o in out if isinstance(o, Send))
    assert to == Peer("udp", "192.0.2.1", 5060)  # the first route, loose routing
    assert bye.headers.get("To") == "<sip:+15551230000@carrier.example;user=phone>;tag=caller-tag"
    resent = sent(core.poll(T0 + 1 + 0.5))
    assert [m.method for m in resent if isinstance(m, Request)] == ["BYE"]  # Timer E on UDP
    core.receive(Response(200, "OK", bye.headers), PEER, T0 + 2)
    assert sent(core.poll(T0 + 5)) == []


def test_our_bye_on_udp_goes_to_the_invites_source_for_a_route_we_may_not_send_to() -> None:
    """The route set is the caller's to write: a BYE to a name (which could point anywhere) or to an address that
    is neither the INVITE's source nor allowed does not go there. On UDP it goes where the INVITE came from
    instead (in a proxy's path, the proxy, which may name itself by host name), with the reason for the log."""
    for request, allow_list, host in [
        (invite(), anything, "proxy1.example.net"),  # a name, though the allow-list would take anything
        (routed_invite(), None, "192.0.2.1"),  # an address, but no allow-list: only the INVITE's source
    ]:
        core = UserAgentCore("203.0.113.5", 5060)
        if allow_list is not None:
            core.may_send_to = allow_list
        ok = answered(core, request)
        core.receive(in_dialog("ACK", ok, 101, branch="z9hG4bK-ack-1"), PEER, T0 + 0.2)
        out = core.hangup("3c2a7b1e@198.51.100.7", T0 + 1)
        [refused] = [o for o in out if isinstance(o, RequestNotSent)]
        assert (refused.host, refused.to_source) == (host, True), out
        (send,) = [o for o in out if isinstance(o, Send)]
        (bye,) = sent(out)
        assert (send.to, bye.method) == (PEER, "BYE"), out
        assert core.active_calls == 0


def test_our_bye_for_a_digest_authenticated_caller_goes_to_its_source_not_into_the_allow_list() -> None:
    """A caller outside the allow-list (let in by digest auth) Record-Routes an address inside it: the BYE went
    there, so such a peer could aim our requests at the allowed, often internal, ranges. On UDP it goes to the
    INVITE's source instead."""
    core = UserAgentCore("203.0.113.5", 5060, may_send_to=digest_only)
    ok = answered(core, routed_invite())
    core.receive(in_dialog("ACK", ok, 101, branch="z9hG4bK-ack-1"), PEER, T0 + 0.2)
    out = core.hangup("3c2a7b1e@198.51.100.7", T0 + 1)
    [refused] = [o for o in out if isinstance(o, RequestNotSent)]
    assert (refused.host, refused.to_source) == ("192.0.2.1", True), out
    assert [o.to for o in out if isinstance(o, Send)] == [PEER]


def test_our_bye_on_tcp_goes_nowhere_a_closed_callers_contact_names_by_host_name() -> None:
    """On TCP the INVITE's source is a connection that has closed (its port was the caller's own): nothing is
    sent to a Contact named by host name."""
    out = tcp_dialog_whose_connection_closed("<sip:c@pbx.example.net:5070;transport=tcp>")
    assert [(type(o), getattr(o, "to_source", None)) for o in out] == [(RequestNotSent, False)], out


def tcp_dialog_whose_connection_closed(contact: str) -> list[Output]:
    """A call over TCP (connection 7) from 198.51.100.7 with ``contact`` and no route set, answered and ACKed;
    then the connection closes and we hang up: what the core sends."""
    closed: set[int] = set()
    core = UserAgentCore("203.0.113.5", 5060, connected=lambda connection: connection not in closed)
    tcp = Peer("tcp", "198.51.100.7", 40000, connection=7)
    text = (DATA / "invite.sip").read_bytes().replace(b"Record-Route: ", b"X-Was-Record-Route: ")
    text = text.replace(b"<sip:+15551230000@198.51.100.7:5060>", contact.encode())
    request = parse_datagram(text)
    assert isinstance(request, Request)
    core.receive(request, tcp, T0)
    (ok,) = sent(core.answer("3c2a7b1e@198.51.100.7", b"v=0\r\n", T0 + 0.1))
    assert isinstance(ok, Response)
    core.receive(in_dialog("ACK", ok, 101, branch="z9hG4bK-ack-1"), tcp, T0 + 0.2)
    closed.add(7)
    return core.hangup("3c2a7b1e@198.51.100.7", T0 + 1)


def test_our_bye_when_the_next_hop_is_no_sip_uri() -> None:
    """A first route that does not parse: on UDP the BYE goes where the INVITE came from. A ``tel:`` Contact on a
    TCP call whose connection closed: nothing is sent, with the reason for the driver's WARNING."""
    text = (DATA / "invite.sip").read_bytes().replace(b"<sip:proxy1.example.net;lr>", b"not a route")
    request = parse_datagram(text)
    assert isinstance(request, Request)
    core = UserAgentCore("203.0.113.5", 5060, may_send_to=anything)
    ok = answered(core, request)
    core.receive(in_dialog("ACK", ok, 101, branch="z9hG4bK-ack-1"), PEER, T0 + 0.2)
    out = core.hangup("3c2a7b1e@198.51.100.7", T0 + 1)
    assert [(type(o), getattr(o, "to", None)) for o in out] == [(Send, PEER)], out
    out = tcp_dialog_whose_connection_closed("<tel:+15551230000>")
    assert [(type(o), getattr(o, "reason", None)) for o in out] == [
        (RequestNotSent, "the next hop is not a SIP URI")
    ], out


def test_our_bye_after_the_tcp_connection_closed_goes_the_way_the_contact_says() -> None:
    """RFC 3261 §18.1.1 and RFC 3263 §4.1: a new TCP connection when the Contact names TCP or nothing (as before),
    our UDP socket when it says ``;transport=udp``, with our Via saying which; nothing in plaintext to ``sips:``."""
    for contact, transport in [
        ("<sip:c@198.51.100.7:5070;transport=tcp>", "tcp"),
        ("<sip:c@198.51.100.7:5070>", "tcp"),
        ("<sip:c@198.51.100.7:5070;transport=UDP>", "udp"),
    ]:
        out = tcp_dialog_whose_connection_closed(contact)
        (send,) = [o for o in out if isinstance(o, Send)]
        assert send.to == Peer(transport, "198.51.100.7", 5070), (contact, send.to)  # no connection: a new one
        (bye,) = sent(out)
        assert bye.headers.values("Via")[0].startswith(f"SIP/2.0/{transport.upper()} 203.0.113.5:5060;"), contact
    for contact in ("<sips:c@198.51.100.7:5071>", "<sip:c@198.51.100.7:5071;transport=tls>"):
        out = tcp_dialog_whose_connection_closed(contact)
        assert [type(o) for o in out] == [RequestNotSent], (contact, out)
        assert "TLS" in out[0].reason  # type: ignore[union-attr]


def test_cancel_before_answer_gives_200_and_487_with_the_same_tag() -> None:
    core = UserAgentCore("203.0.113.5", 5060)
    core.receive(invite(), PEER, T0)
    core.ring("3c2a7b1e@198.51.100.7", T0)
    cancel = derived("CANCEL")
    assert isinstance(cancel, Request) and cancel.method == "CANCEL"
    out = core.receive(cancel, PEER, T0 + 1)
    responses = [m for m in sent(out) if isinstance(m, Response)]
    assert [(r.status, r.cseq[1]) for r in responses] == [(200, "CANCEL"), (487, "INVITE")]
    tags = {parse_name_addr(r.headers.get("To") or "").tag for r in responses}  # type: ignore[union-attr]
    assert len(tags) == 1 and None not in tags
    assert events(out) == [CallCancelled("3c2a7b1e@198.51.100.7")]
    assert core.answer("3c2a7b1e@198.51.100.7", b"v=0", T0 + 2) == []  # the race lost: nothing answered
    # the ACK for the 487 reuses the INVITE's branch and confirms the transaction
    ack = derived("ACK")
    assert core.receive(ack, PEER, T0 + 1.1) == []
    assert statuses(core.poll(T0 + 3)) == []  # no 487 resend after the ACK


def test_cancel_without_transaction_is_481() -> None:
    core = UserAgentCore("203.0.113.5", 5060)
    cancel = derived("CANCEL")
    assert statuses(core.receive(cancel, PEER, T0)) == [481]


def test_rejection_is_resent_on_timer_g_until_ack_then_h() -> None:
    core = UserAgentCore("203.0.113.5", 5060)
    core.receive(invite(), PEER, T0)
    assert statuses(core.reject("3c2a7b1e@198.51.100.7", 486, T0)) == [486]
    assert statuses(core.poll(T0 + 0.5)) == [486]
    assert statuses(core.poll(T0 + 1.5)) == [486]
    assert statuses(core.receive(invite(), PEER, T0 + 1.6)) == [486]  # a retransmitted INVITE hears it again
    assert core.poll(T0 + 32.1) == []  # Timer H: gone
    assert core.deadline is None


def test_in_dialog_unknown_is_481_and_lower_cseq_500() -> None:
    core = UserAgentCore("203.0.113.5", 5060)
    ok = answered(core)
    core.receive(in_dialog("ACK", ok, 101, branch="z9hG4bK-ack-1"), PEER, T0 + 0.2)
    assert statuses(core.receive(in_dialog("BYE", ok, 100, branch="z9hG4bK-low"), PEER, T0 + 1)) == [500]
    other = Response(200, "OK", ok.headers.without("To").with_rows(("To", "<sip:ai@x>;tag=not-ours")))
    assert statuses(core.receive(in_dialog("BYE", other, 105, branch="z9hG4bK-x"), PEER, T0 + 1)) == [481]


def test_reinvite_hold_and_second_reinvite_while_open_is_500_retry_after() -> None:
    core = UserAgentCore("203.0.113.5", 5060)
    ok = answered(core)
    core.receive(in_dialog("ACK", ok, 101, branch="z9hG4bK-ack-1"), PEER, T0 + 0.2)
    out = core.receive(in_dialog("INVITE", ok, 102, branch="z9hG4bK-re-1", body=b"v=0\r\n"), PEER, T0 + 1)
    assert statuses(out) == [] and [type(e) for e in events(out)] == [ReOffer]
    second = core.receive(in_dialog("INVITE", ok, 103, branch="z9hG4bK-re-2"), PEER, T0 + 1.1)
    (busy,) = sent(second)
    assert isinstance(busy, Response) and busy.status == 500 and busy.headers.get("Retry-After") == "2"
    answer = sent(core.answer_reoffer("3c2a7b1e@198.51.100.7", 200, T0 + 1.2, sdp=b"v=0\r\n"))
    assert [getattr(m, "status", None) for m in answer] == [200]
    # the re-INVITE's 2xx is resent until its ACK (the 500 too, on Timer G until its own ACK)
    assert statuses(core.poll(T0 + 1.7)) == [500, 200]
    core.receive(in_dialog("ACK", ok, 102, branch="z9hG4bK-ack-2"), PEER, T0 + 1.8)
    assert 200 not in statuses(core.poll(T0 + 3))


def test_options_reports_readiness() -> None:
    core = UserAgentCore("203.0.113.5", 5060)
    options = parse_datagram((DATA / "options_bare_lf.sip").read_bytes())
    out = core.receive(options, PEER, T0)  # type: ignore[arg-type]
    (ok,) = sent(out)
    assert isinstance(ok, Response) and ok.status == 200 and "INVITE" in (ok.headers.get("Allow") or "")
    core.not_ready = "voice stream failing"
    options2 = parse_datagram((DATA / "options_bare_lf.sip").read_bytes().replace(b"options-1\n", b"options-2\n"))
    (busy,) = sent(core.receive(options2, PEER, T0))  # type: ignore[arg-type]
    assert isinstance(busy, Response) and busy.status == 503 and busy.headers.get("Retry-After") == "5"
    assert busy.headers.get("Warning") == '399 telephony-bridge "voice stream failing"'


def test_require_100rel_is_420_and_unknown_methods_405_501() -> None:
    core = UserAgentCore("203.0.113.5", 5060)
    text = (DATA / "invite.sip").read_bytes().replace(b"Supported: timer", b"Require: 100rel")
    (bad,) = sent(core.receive(parse_datagram(text), PEER, T0))  # type: ignore[arg-type]
    assert isinstance(bad, Response) and (bad.status, bad.headers.get("Unsupported")) == (420, "100rel")
    for method, code in (("REFER", 405), ("FOO", 501)):
        req = parse_datagram(
            f"{method} sip:ai@x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK{method}\r\nFrom: <sip:a@b>;tag=1\r\n"
            f"To: <sip:c@d>\r\nCall-ID: m{method}\r\nCSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n".encode()
        )
        (resp,) = sent(core.receive(req, PEER, T0))  # type: ignore[arg-type]
        assert isinstance(resp, Response) and resp.status == code and resp.headers.get("Allow")


def test_malformed_request_gets_400_garbage_nothing() -> None:
    core = UserAgentCore("203.0.113.5", 5060)
    short = parse_datagram((DATA / "invite_short_body.sip").read_bytes())
    assert statuses(core.receive(short, PEER, T0)) == [400]
    assert core.receive(parse_datagram((DATA / "garbage.bin").read_bytes()), PEER, T0) == []
    assert core.active_calls == 0


def test_info_dtmf_relay_is_a_digit() -> None:
    core = UserAgentCore("203.0.113.5", 5060)
    ok = answered(core)
    core.receive(in_dialog("ACK", ok, 101, branch="z9hG4bK-ack-1"), PEER, T0 + 0.2)
    info = in_dialog(
        "INFO",
        ok,
        102,
        branch="z9hG4bK-info",
        body=b"Signal=5\r\nDuration=160\r\n",
        rows="Content-Type: application/dtmf-relay\r\n",
    )
    out = core.receive(info, PEER, T0 + 1)
    assert statuses(out) == [200] and events(out) == [InfoDigit("3c2a7b1e@198.51.100.7", "5")]


def test_invite_transaction_over_tcp_does_not_retransmit() -> None:
    txn = InviteServerTransaction(invite(), reliable=True, now=0.0)
    busy = Response(486, "Busy Here", invite().headers)
    assert txn.respond(busy, 0.0) == [busy]
    assert txn.poll(0.5) == [] and txn.poll(1.5) == []
    txn.on_ack(2.0)
    txn.poll(2.0)
    assert txn.state is State.TERMINATED and not txn.timed_out


def test_answer_retransmit_gives_up_at_64_t1() -> None:
    ok = Response(200, "OK", invite().headers)
    rt = AnswerRetransmit(ok, now=0.0, timers=Timers(t1_s=0.01))
    now, sends = 0.0, 0
    while rt.deadline is not None:
        now = rt.deadline
        sends += len(rt.poll(now))
    assert rt.gave_up and abs(now - 0.64) < 1e-9 and sends == 6  # at 0.01, 0.03, 0.07, 0.15, 0.31, 0.63 s


def test_a_retransmission_from_a_ua_without_rfc3261_branches_is_absorbed_not_refused_482() -> None:
    """A branch without the ``z9hG4bK`` cookie (an RFC 2543 UA) gives no transaction key, so its retransmission of
    the undecided INVITE reaches ``_on_invite``: it must be matched the old way (§17.2.3) and absorbed, not taken
    for a merged request and answered 482, which the caller would take for its INVITE's final answer (review)."""
    inv = invite()
    headers = inv.headers.without("Via").with_rows(("Via", "SIP/2.0/UDP 198.51.100.7:5060;branch=1a2b3c"))
    old_style = parse_datagram(Request("INVITE", inv.uri, headers, inv.body).to_bytes())
    assert isinstance(old_style, Request)
    core = UserAgentCore("203.0.113.5", 5060)
    assert statuses(core.receive(old_style, PEER, T0)) == [100]
    assert core.receive(old_style, PEER, T0 + 0.5) == []  # the same INVITE again
    assert refused(core, "z9hG4bK-second", T0 + 0.6) == [482]  # a new one still is
