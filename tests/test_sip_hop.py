"""The next hop of our in-dialog requests and whether we may send there (``sip/hop.py``): data in, data out."""

from __future__ import annotations

from telephony_bridge.sip.hop import Hop, Refused, check_hop, next_hop, same_address

SOURCE = "198.51.100.7"  # where the INVITE came from


def nowhere(host: str) -> bool:
    return False


def test_next_hop_takes_the_first_route_else_the_contact_with_the_transport_its_uri_names() -> None:
    contact = "sip:c@198.51.100.7:5070"
    assert [
        next_hop([], contact, "tcp"),
        next_hop([], contact + ";transport=UDP", "tcp"),
        next_hop([], "sips:c@198.51.100.7", "tcp"),
        next_hop([], "sip:c@198.51.100.7;transport=tls", "udp"),
        next_hop(["<sip:192.0.2.1;lr>", "<sip:192.0.2.2;lr>"], contact, "udp"),
        next_hop(["<sip:192.0.2.1:5080;transport=tcp;lr>"], contact, "udp"),
        next_hop([], "tel:+15551230000", "tcp"),
    ] == [
        Hop("tcp", "198.51.100.7", 5070),  # no parameter: the dialog's own transport
        Hop("udp", "198.51.100.7", 5070),
        Hop("tls", "198.51.100.7", 5061),
        Hop("tls", "198.51.100.7", 5061),
        Hop("udp", "192.0.2.1", 5060),
        Hop("tcp", "192.0.2.1", 5080),
        None,
    ]


def test_check_hop_sends_only_over_udp_or_tcp() -> None:
    hops = [Hop("tcp", SOURCE, 5070), Hop("udp", SOURCE, 5060), Hop("tls", SOURCE, 5061)]
    assert [check_hop(hop, SOURCE, nowhere) for hop in [*hops, Hop("sctp", SOURCE, 5060)]] == [
        hops[0],
        hops[1],
        Refused(SOURCE, "it asks for TLS (sips: or ;transport=tls), which we do not have"),
        Refused(SOURCE, "it asks for transport 'sctp', which we do not have"),
    ]


def test_check_hop_sends_only_to_the_invites_source_or_an_allowed_address_never_to_a_name() -> None:
    def proxy(host: str) -> bool:  # an allow-list holding the proxy and the INVITE's source
        return host in ("192.0.2.1", SOURCE)

    hosts = ["::ffff:198.51.100.7", "192.0.2.1", "10.0.0.5", "pbx.example.net"]
    assert [check_hop(Hop("tcp", host, 5060), SOURCE, proxy) for host in hosts] == [
        Hop("tcp", "::ffff:198.51.100.7", 5060),  # the source, however spelt
        Hop("tcp", "192.0.2.1", 5060),
        Refused("10.0.0.5", "it is neither where the INVITE came from nor inside sip.allowed_sources", where=True),
        Refused("pbx.example.net", "it is a host name, which we do not resolve to check where it points", where=True),
    ]
    assert isinstance(check_hop(Hop("tcp", "pbx.example.net", 5060), SOURCE, lambda host: True), Refused)


def test_same_address_compares_addresses_not_spellings() -> None:
    assert same_address("::ffff:198.51.100.7", "198.51.100.7")
    assert same_address("2001:db8::1", "2001:db8:0::1")
    assert not same_address("198.51.100.7", "198.51.100.8")
    assert not same_address("localhost", "localhost")


def test_check_hop_sends_into_the_allow_list_only_for_an_invite_from_inside_it() -> None:
    """A peer let in by digest auth alone wrote a route to an address the allow-list holds (an internal PBX's, a
    Redis port): we dialled it. Only an INVITE from inside the allow-list may name another address in it."""

    def internal(host: str) -> bool:
        return host.startswith("10.")

    why = "it is inside sip.allowed_sources, but the INVITE came from outside it (let in by digest auth)"
    assert check_hop(Hop("tcp", "10.0.0.5", 6379), SOURCE, internal) == Refused("10.0.0.5", why, where=True)
    assert check_hop(Hop("tcp", "10.0.0.5", 5060), "10.0.0.9", internal) == Hop("tcp", "10.0.0.5", 5060)
    assert check_hop(Hop("udp", SOURCE, 5070), SOURCE, internal) == Hop("udp", SOURCE, 5070)  # its own, always


def test_check_hop_sends_over_udp_only_where_our_udp_socket_reaches() -> None:
    """An IPv4 bind cannot send to an IPv6 next hop: the datagram was lost with a DEBUG line naming neither the
    call nor the address. It is refused for where it is, so the core sends to the INVITE's source instead;
    over TCP (a new connection of any family) it is taken."""

    def ipv4_only(host: str) -> bool:
        return ":" not in host

    def everywhere(host: str) -> bool:
        return True

    why = "our UDP socket cannot reach that address family (see sip.host)"
    assert [check_hop(Hop(t, "2001:db8::1", 5060), SOURCE, everywhere, ipv4_only) for t in ("udp", "tcp")] == [
        Refused("2001:db8::1", why, where=True),
        Hop("tcp", "2001:db8::1", 5060),
    ]
    assert check_hop(Hop("udp", SOURCE, 5070), SOURCE, nowhere, ipv4_only) == Hop("udp", SOURCE, 5070)
