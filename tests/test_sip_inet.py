"""IP addresses on a dual-stack socket (``sip/inet.py``): data in, data out."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from telephony_bridge.sip.inet import Stack, in_networks, is_wildcard, sdp_address, socket_address, unmapped, uri_host
from tests.test_sip_dual_stack import require_ipv6

LOOPBACK_V4 = [ipaddress.ip_network("127.0.0.0/8")]


def test_unmapped_gives_a_v4_mapped_peer_its_ipv4_form_and_leaves_the_rest() -> None:
    hosts = ["::ffff:10.0.0.5", "::FFFF:7f00:1", "10.0.0.5", "2001:db8::1", "::1", "pbx.example.test"]
    assert [unmapped(h) for h in hosts] == [
        "10.0.0.5",
        "127.0.0.1",
        "10.0.0.5",
        "2001:db8::1",
        "::1",
        "pbx.example.test",
    ]


def test_in_networks_takes_an_ipv4_peer_in_either_form_against_either_kind_of_list() -> None:
    mapped_list = [ipaddress.ip_network("::ffff:127.0.0.0/104")]  # a list written for a :: bind before the fix
    assert [
        in_networks("::ffff:127.0.0.1", LOOPBACK_V4),
        in_networks("127.0.0.1", LOOPBACK_V4),
        in_networks("127.0.0.1", mapped_list),
        in_networks("::ffff:127.0.0.1", mapped_list),
        in_networks("::ffff:10.0.0.5", LOOPBACK_V4),
        in_networks("::1", LOOPBACK_V4),
        in_networks("::1", [ipaddress.ip_network("::/0")]),
        in_networks("127.0.0.1", [ipaddress.ip_network("::/0")]),  # every IPv6 address, not every address
        in_networks("::ffff:127.0.0.1", [ipaddress.ip_network("::/0")]),
        in_networks("localhost", LOOPBACK_V4),
        in_networks("127.0.0.1", []),
    ] == [True, True, True, True, False, False, True, False, False, False, False]


def test_socket_address_puts_a_destination_in_the_form_its_socket_sends_to() -> None:
    dual, v4, v6 = Stack.DUAL, Stack.IPV4, Stack.IPV6
    assert [
        socket_address("10.0.0.5", 5060, dual),  # a Contact, a route, an SDP c=IN IP4, from a socket on ::
        socket_address("::ffff:10.0.0.5", 5060, dual),
        socket_address("2001:db8::1", 5060, dual),
        socket_address("10.0.0.5", 5060, v4),  # an IPv4 bind: as it always was
        socket_address("::ffff:10.0.0.5", 5060, v4),
        socket_address("2001:db8::1", 5060, v4),  # unreachable from an IPv4 socket
        socket_address("10.0.0.5", 5060, v6),  # unreachable from a socket on one IPv6 address
        socket_address("2001:db8::1", 5060, v6),
        socket_address("pbx.example.test", 5060, dual),  # a name: never resolved on the loop
        socket_address("a\x00b", 5060, v4),  # sendto would raise TypeError, and asyncio close the transport
    ] == [
        ("::ffff:10.0.0.5", 5060),
        ("::ffff:10.0.0.5", 5060),
        ("2001:db8::1", 5060),
        ("10.0.0.5", 5060),
        ("10.0.0.5", 5060),
        None,
        None,
        ("2001:db8::1", 5060),
        None,
        None,
    ]


def test_a_socket_on_one_ipv6_address_reaches_no_ipv4_and_one_on_the_wildcard_does() -> None:
    """Linux makes a socket bound to a single IPv6 address IPv6-only; one on ``::`` takes IPv4 too (unless
    ``net.ipv6.bindv6only``); an AF_INET one reaches IPv4 alone."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as v4:
        assert Stack.of(v4) is Stack.IPV4
    require_ipv6()
    with (
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as one,
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as anywhere,
    ):
        one.bind(("::1", 0))
        anywhere.bind(("::", 0))
        bindv6only = Path("/proc/sys/net/ipv6/bindv6only").read_text().strip() == "1"
        wildcard = Stack.IPV6 if bindv6only else Stack.DUAL
        assert (Stack.of(one), Stack.of(anywhere)) == (Stack.IPV6, wildcard)


def test_is_wildcard_knows_every_spelling_of_all_interfaces() -> None:
    wildcards = ["", "0.0.0.0", "::", "::0", "0:0:0:0:0:0:0:0", "::ffff:0.0.0.0"]
    others = ["127.0.0.1", "::1", "192.0.2.1", "sip.example.test"]
    assert [is_wildcard(h) for h in wildcards + others] == [True] * len(wildcards) + [False] * len(others)


def test_an_ipv6_host_is_bracketed_in_a_uri_and_ip6_in_sdp() -> None:
    assert [uri_host(h) for h in ("2001:db8::5", "[2001:db8::5]", "192.0.2.7", "sbc.example.net")] == [
        "[2001:db8::5]",
        "[2001:db8::5]",
        "192.0.2.7",
        "sbc.example.net",
    ]
    assert [sdp_address(h) for h in ("2001:db8::5", "[2001:db8::5]", "192.0.2.7", "sbc.example.net")] == [
        "IN IP6 2001:db8::5",
        "IN IP6 2001:db8::5",
        "IN IP4 192.0.2.7",
        "IN IP4 sbc.example.net",
    ]
