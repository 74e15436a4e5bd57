"""The next hop of our in-dialog requests and whether we may send there (``sip/hop.py``): data in, data out."""

from __future__ import annotations

from telephony_bridge.sip.hop import Hop, Refused, check_hop, next_hop


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
    hops = [Hop("tcp", "198.51.100.7", 5070), Hop("udp", "192.0.2.1", 5060), Hop("tls", "192.0.2.1", 5061)]
    assert [check_hop(hop) for hop in [*hops, Hop("sctp", "192.0.2.1", 5060)]] == [
        hops[0],
        hops[1],
        Refused("192.0.2.1", "it asks for TLS (sips: or ;transport=tls), which we do not have"),
        Refused("192.0.2.1", "it asks for transport 'sctp', which we do not have"),
    ]
