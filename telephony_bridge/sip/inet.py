"""IP addresses on a dual-stack socket. Pure.

Bound to ``::``, one AF_INET6 socket takes IPv6 and IPv4 alike, but it names an IPv4 peer ``::ffff:a.b.c.d``
and sends to IPv4 only in that form: a plain ``a.b.c.d`` (a Contact, a Record-Route, an SDP ``c=IN IP4``) fails
with "address family not supported", which asyncio hands to ``error_received`` alone, so the datagram is lost
without a word. So a peer is compared, checked against CIDRs and logged as the IPv4 address it is
(``unmapped``, ``in_networks``), and a destination takes the sending socket's form only as it is sent
(``socket_address``). And our own address as SIP and SDP write an IPv6 one (``uri_host``, ``sdp_address``).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Networks = Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")  # RFC 3261 §25.1 hostname, and "_"


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


def in_networks(host: str, networks: Networks) -> bool:
    """Whether ``host`` lies in one of ``networks``, an IPv4 address and its ``::ffff:`` form alike (a list
    written for either form keeps working); a host name never does."""
    address = ip(host)
    if address is None:
        return False
    forms: tuple[Address, ...] = (address,)
    if isinstance(address, ipaddress.IPv4Address):
        forms += (ipaddress.IPv6Address(f"::ffff:{address}"),)
    return any(form in net for form in forms for net in networks)


def socket_address(host: str, port: int, family: int) -> tuple[str, int] | None:
    """``(host, port)`` as a socket of ``family`` sends to it: IPv4 as ``::ffff:a.b.c.d`` from AF_INET6, a mapped
    address as plain IPv4 from AF_INET; None when that socket cannot reach it (IPv6 from AF_INET). A host name
    goes as it is: the socket resolves it, as it always did. Anything else is None: ``sendto`` raises TypeError
    on a NUL or a name IDNA cannot encode, and asyncio closes the whole transport on it."""
    address = ip(host)
    if address is None:
        return (host, port) if HOST_NAME.fullmatch(host) else None
    if family == socket.AF_INET6:
        return (f"::ffff:{address}" if address.version == 4 else host), port
    return (str(address), port) if address.version == 4 else None


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
