"""Where our in-dialog requests (a BYE) go when not on the connection the dialog lives on, and whether we may send
them there (RFC 3261 §12.2.1.1, §18.1.1; RFC 3263 §4.1 for the transport). Pure.

The next hop is the first route (Record-Route, kept in the order received), else the remote target (the caller's
Contact). Its transport is the URI's: ``sips:`` or ``;transport=tls`` means TLS, which we do not have, so nothing
is sent (a BYE in plaintext to a peer that asked for TLS would leak the dialog); ``;transport=udp`` or ``tcp`` as
written; no parameter, the dialog's own (RFC 3263 §4.1 would say UDP for a numeric host, but a caller that reached
us over TCP is reached again over TCP, as the bridge always did).

Those URIs are written by whoever sent the INVITE, and digest auth lets any source in: an authenticated peer could
make us open TCP connections or send datagrams to internal addresses. So we send only to the address the INVITE
came from or, when that source is itself inside ``sip.allowed_sources`` (the driver's ``may_send_to``), to another
address inside it (a peer let in by digest auth alone must not steer us into the allowed ranges, often internal
ones), and never to a host name: we do not resolve names for this check (a name can be made to point anywhere,
and again between the check and the connection), so routes and Contacts must carry addresses to be used. Nor over
UDP to an address our UDP socket cannot reach (``udp_reaches``: IPv6 from an IPv4 bind), where the datagram would
be lost without a word. On UDP the core sends a request whose hop is refused for where it is (``Refused.where``)
to the INVITE's source instead, which is safe to answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from telephony_bridge.sip.address import parse_name_addr, parse_uri
from telephony_bridge.sip.inet import ip

DEFAULT_PORT = {"udp": 5060, "tcp": 5060, "tls": 5061}


@dataclass(frozen=True, slots=True)
class Hop:
    """A next hop as its URI names it: ``transport`` is ``udp``, ``tcp``, ``tls`` or another value as written."""

    transport: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Refused:
    """A next hop we do not send to, and why (for the driver's log line). ``where``: refused for where it is (a
    host name, an address we may not send to) rather than for how (TLS): on UDP the INVITE's source, a hop we may
    always answer, can take the request instead."""

    host: str
    reason: str
    where: bool = False


def next_hop(route_set: list[str], remote_target: str, default_transport: str) -> Hop | None:
    """The first route's URI, else the remote target's, with its transport; None if it is not a SIP URI."""
    if route_set:
        first = parse_name_addr(route_set[0])
        uri = parse_uri(first.uri) if first is not None else None
    else:
        uri = parse_uri(remote_target)
    if uri is None:
        return None
    transport = "tls" if uri.scheme == "sips" else uri.params.get("transport", default_transport).lower()
    return Hop(transport, uri.host, uri.port or DEFAULT_PORT.get(transport, 5060))


def anywhere(host: str) -> bool:
    """A ``udp_reaches`` for a socket that reaches every address (tests, the core's default)."""
    return True


def check_hop(
    hop: Hop, origin: str, may_send_to: Callable[[str], bool], udp_reaches: Callable[[str], bool] = anywhere
) -> Hop | Refused:
    """``hop`` if we may send there: over UDP or TCP, to ``origin`` (where the INVITE came from) or, if
    ``may_send_to`` allows ``origin`` too, an address it allows; over UDP only if ``udp_reaches`` it."""
    if hop.transport == "tls":
        return Refused(hop.host, "it asks for TLS (sips: or ;transport=tls), which we do not have")
    if hop.transport not in ("udp", "tcp"):
        return Refused(hop.host, f"it asks for transport {hop.transport!r}, which we do not have")
    if ip(hop.host) is None:
        return Refused(hop.host, "it is a host name, which we do not resolve to check where it points", where=True)
    if hop.transport == "udp" and not udp_reaches(hop.host):
        return Refused(hop.host, "our UDP socket cannot reach that address family (see sip.host)", where=True)
    if same_address(hop.host, origin):
        return hop
    if not may_send_to(hop.host):
        return Refused(hop.host, "it is neither where the INVITE came from nor inside sip.allowed_sources", where=True)
    if not may_send_to(origin):
        why = "it is inside sip.allowed_sources, but the INVITE came from outside it (let in by digest auth)"
        return Refused(hop.host, why, where=True)
    return hop


def same_address(host: str, other: str) -> bool:
    """Whether two hosts are the same IP address (an IPv4-mapped IPv6 address equals its IPv4 form); a name is
    never the same as anything."""
    a, b = ip(host), ip(other)
    return a is not None and a == b
