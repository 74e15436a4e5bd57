"""IP addresses on a dual-stack socket. Pure, but for ``Stack.of``, which reads a socket's option.

Bound to ``::``, one AF_INET6 socket takes IPv6 and IPv4 alike, but it names an IPv4 peer ``::ffff:a.b.c.d``
and sends to IPv4 only in that form: a plain ``a.b.c.d`` (a Contact, a Record-Route, an SDP ``c=IN IP4``) fails
with "address family not supported", which asyncio hands to ``error_received`` alone, so the datagram is lost
without a word. So a peer is compared, checked against CIDRs and logged as the IPv4 address it is
(``unmapped``, ``in_networks``), and a destination takes the sending socket's form only as it is sent
(``socket_address``, by the socket's ``Stack``: one bound to a single IPv6 address reaches no IPv4 at all). And
our own address as SIP and SDP write an IPv6 one (``uri_host``, ``sdp_address``).
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from collections.abc import Sequence

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Networks = Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]


def unmapped(host: str) -> str:
    """``::ffff:a.b.c.d`` as ``a.b.c.d``; anything else (IPv4, IPv6, a host name) as it is."""
    if ":" not in host:
        return host
    address = ip(host)
    return str(address) if isinstance(address, ipaddress.IPv4Address) else host


def ip(host: str) -> Address | None:
    """The address ``host`` is, an IPv4-mapped IPv6 address as its IPv4 form; None for a host name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")  # where an IPv4 address lives in IPv6 (RFC 4291 §2.5.5.2)


def in_networks(host: str, networks: Networks) -> bool:
    """Whether ``host`` lies in one of ``networks``: an IPv4 address in an IPv4 network, or in an IPv6 one written
    in the ``::ffff:`` form (a list written for a ``::`` bind keeps working), but not in a wider IPv6 one (``::/0``
    means every IPv6 address, not every address); a host name never does."""
    address = ip(host)
    if address is None:
        return False
    mapped = ipaddress.IPv6Address(f"::ffff:{address}") if address.version == 4 else None
    return any(
        address in net or (mapped is not None and net.version == 6 and net.subnet_of(MAPPED) and mapped in net)  # type: ignore[arg-type]
        for net in networks
    )


class Stack(enum.Enum):
    """What a datagram socket can send to (``Stack.of``): IPv4 alone (AF_INET); IPv6 and IPv4, the latter as
    ``::ffff:a.b.c.d`` (AF_INET6 bound to ``::``); or IPv6 alone (AF_INET6 bound to one IPv6 address, which Linux
    makes IPv6-only, or on ``::`` under ``net.ipv6.bindv6only``)."""

    IPV4 = "ipv4"
    DUAL = "dual"
    IPV6 = "ipv6"

    @classmethod
    def of(cls, sock: socket.socket) -> Stack:
        if sock.family != socket.AF_INET6:
            return cls.IPV4
        return cls.IPV6 if sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) else cls.DUAL


def socket_address(host: str, port: int, stack: Stack) -> tuple[str, int] | None:
    """``(host, port)`` as a socket of ``stack`` sends to it (IPv4 as ``::ffff:a.b.c.d`` from a dual-stack one),
    or None when it cannot: an address of a family it does not reach, or not an address at all. We never send to a
    host name: ``sendto`` would resolve it on the event loop (or raise TypeError on a NUL, on which asyncio closes
    the whole transport), and a name can be made to point anywhere."""
    address = ip(host)
    if address is None:
        return None
    if address.version == 4:
        if stack is Stack.IPV6:
            return None
        return (f"::ffff:{address}" if stack is Stack.DUAL else str(address)), port
    return None if stack is Stack.IPV4 else (str(address), port)


def uri_host(host: str) -> str:
    """``host`` as a SIP URI or Via writes it: an IPv6 address in brackets (RFC 3261 §25.1), else as it is."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def sdp_address(host: str) -> str:
    """``host`` as an SDP ``o=``/``c=`` line ends (RFC 4566 §5.7): ``IN IP6`` for an IPv6 address, else ``IN IP4``
    (an address or a name, as our advertised host always was)."""
    return f"IN {'IP6' if ':' in host else 'IP4'} {host.strip('[]')}"


def is_wildcard(host: str) -> bool:
    """A bind on every interface (``0.0.0.0``, ``::`` or an empty host), in any spelling: no address peers
    can be told."""
    address = ip(host) if host else None
    return not host or (address is not None and address.is_unspecified)
