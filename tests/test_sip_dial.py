"""Where our BYE goes when the call's own way back is gone or named by the caller, end to end on real sockets:
a TCP caller whose connection closed is reached again as its Contact says (a new TCP connection, a datagram for
``;transport=udp``, nothing in plaintext for ``sips:``), only at the INVITE's source or an allowed address (UDP
routes too), and a connection we opened is closed after 64*T1. Each test failed when written (review).

The bridges here allow 127.0.0.1 only; 127.0.0.2 and 127.0.0.3 (loopback all the same) stand for an internal
address a caller names and for another allowed one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from functools import partial

import pytest

from telephony_bridge.serving import ServerThread
from tests.test_sip_calls import assert_all_released, start_sip_bridge, status
from tests.test_sip_faults import RawUac, udp_socket
from tests.test_sip_signalling_faults import RtpStream, final_answer, header, offer, sdp_port

T1_S = 0.05  # start_sip_bridge's sip.t1_ms
ALLOWED = ["127.0.0.1/32", "127.0.0.3/32"]


def _tcp_call_then_drop(sip_port: int, rtp: RtpStream, contact: str) -> str:
    """INVITE over TCP with ``contact`` (a URI), ACK, then the connection closes with no BYE, the RTP going on (a
    NAT or a proxy dropped it, or a UA that used TCP only for a large INVITE, RFC 3261 §18.1.1). The Call-ID."""
    with socket.create_connection(("127.0.0.1", sip_port)) as sock:
        sock.settimeout(0.2)
        uac = RawUac(sip_port, sock.getsockname()[1], transport="TCP")
        sock.sendall(uac.request("INVITE", body=offer(rtp.port), contact=contact))
        ok = final_answer(lambda: sock.recv(65535), "INVITE")
        assert ok.startswith("SIP/2.0 200"), ok
        rtp.target = ("127.0.0.1", sdp_port(ok))
        sock.sendall(uac.request("ACK", to=header(ok, "To"), contact=contact))
        time.sleep(0.5)  # the call is up; then the TCP connection goes
    return uac.call_id


def _udp_call_routed_by(sip_port: int, rtp: RtpStream, route: str, sock: socket.socket | None = None) -> str:
    """A call over UDP whose INVITE carries ``Record-Route: route`` (as a proxy in the path writes it), from
    ``sock`` (left open) or a socket of its own (closed once the call is up); the Call-ID. Our BYE goes to that
    route."""
    own = sock is None
    sock = udp_socket() if sock is None else sock
    uac = RawUac(sip_port, sock.getsockname()[1])
    sock.settimeout(0.2)
    try:
        invite = uac.request("INVITE", body=offer(rtp.port), extra=(f"Record-Route: {route}",))
        sock.sendto(invite, ("127.0.0.1", sip_port))
        ok = final_answer(lambda: sock.recv(65535), "INVITE")
        assert ok.startswith("SIP/2.0 200"), ok
        rtp.target = ("127.0.0.1", sdp_port(ok))
        sock.sendto(uac.request("ACK", to=header(ok, "To")), ("127.0.0.1", sip_port))
        return uac.call_id
    finally:
        if own:
            sock.close()


def _accepted(listener: socket.socket, wait_s: float) -> str | None:
    """What the first connection to ``listener`` within ``wait_s`` sends first; None if none came."""
    listener.settimeout(wait_s)
    try:
        connection, _ = listener.accept()
    except TimeoutError:
        return None
    with connection:
        connection.settimeout(2.0)
        with contextlib.suppress(TimeoutError):
            return connection.recv(65535).decode(errors="replace")
    return ""


def _datagram(sock: socket.socket, wait_s: float) -> str | None:
    sock.settimeout(wait_s)
    try:
        return sock.recv(65535).decode(errors="replace")
    except TimeoutError:
        return None


def _bye(sock: socket.socket, wait_s: float) -> str | None:
    """The first BYE to arrive at ``sock`` within ``wait_s``; None if none came."""
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0:
        message = _datagram(sock, left)
        if message is None or message.startswith("BYE "):
            return message
    return None


def _logged(caplog: pytest.LogCaptureFixture, words: str) -> list[tuple[int, str | None, str]]:
    return [
        (r.levelno, getattr(r, "call_sid", None), r.getMessage()) for r in caplog.records if words in r.getMessage()
    ]


def _not_sent(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str | None, str]]:
    return _logged(caplog, "not sent to")


def _to_source(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str | None, str]]:
    return _logged(caplog, "sent where the INVITE came from, not to")


def _assert_not_sent(caplog: pytest.LogCaptureFixture, call_id: str, received: str | None, why: str) -> None:
    """Nothing arrived; one WARNING naming the call says why."""
    assert received is None, received
    [(level, named, message)] = _not_sent(caplog)
    assert (level, named) == (logging.WARNING, call_id) and why in message, message


async def _bye_after(
    start_bridge: Callable[..., ServerThread],
    emulator: ServerThread,
    place: Callable[[int, RtpStream], str],
    receive: Callable[[], str | None],
    **settings: object,
) -> tuple[str, str | None]:
    """A bridge whose calls end after 3 s; a call placed by ``place`` (the bridge's SIP port, the caller's RTP),
    which the bridge ends; then ``receive`` where its BYE should, or should not, have arrived. The Call-ID and
    what arrived."""
    bridge = start_sip_bridge(start_bridge, emulator, **{"twilio.max_call_s": 3.0, **settings})
    rtp = RtpStream()
    try:
        call_id = await asyncio.to_thread(place, status(bridge)["sip"]["port"], rtp)
        assert_all_released(bridge, emulator)
        return call_id, await asyncio.to_thread(receive)
    finally:
        rtp.stop()


async def _bye_after_drop(
    start_bridge: Callable[..., ServerThread],
    emulator: ServerThread,
    contact: str,
    receive: Callable[[], str | None],
) -> tuple[str, str | None]:
    """``_bye_after`` for a TCP caller with ``contact`` whose connection drops once the call is up."""
    return await _bye_after(start_bridge, emulator, partial(_tcp_call_then_drop, contact=contact), receive)


@pytest.mark.parametrize("host", ["127.0.0.2", "127.0.0.3"])
@pytest.mark.parametrize("transport", ["tcp", "udp"])
async def test_sip_bye_goes_only_to_the_invites_source_or_an_allowed_address(
    start_bridge: Callable[..., ServerThread],
    emulator: ServerThread,
    caplog: pytest.LogCaptureFixture,
    transport: str,
    host: str,
) -> None:
    """Where our BYE goes is the caller's to write, and digest auth lets any source in. TCP: the caller's
    connection closed and its Contact names ``host``; we dialled whatever it named, so an authenticated peer could
    make us open TCP connections to internal addresses and ports. UDP: a Record-Route names ``host``; we sent the
    BYE there, and its retransmissions for 64*T1, partly in words the caller chose. Only the INVITE's source or an
    allowed address gets it; otherwise one WARNING naming the call."""
    tcp = transport == "tcp"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as target:
        target.bind((host, 0))
        port = target.getsockname()[1]
        if tcp:
            target.listen()
        dropped = partial(_tcp_call_then_drop, contact=f"sip:caller@{host}:{port};transport=tcp")
        place = dropped if tcp else partial(_udp_call_routed_by, route=f"<sip:{host}:{port};lr>")
        receive = _accepted if tcp else _datagram
        with caplog.at_level(logging.INFO):
            call_id, received = await _bye_after(
                start_bridge,
                emulator,
                place,
                lambda: receive(target, 1.0 if host == "127.0.0.2" else 5.0),
                **{"sip.allowed_sources": ALLOWED},
            )
    if host == "127.0.0.2" and tcp:  # neither the source (127.0.0.1) nor allowed
        _assert_not_sent(caplog, call_id, received, "not sent to '127.0.0.2': it is neither where the INVITE came")
    elif host == "127.0.0.2":  # on UDP it goes to the INVITE's source instead (the next test)
        assert received is None, received
        [(level, named, message)] = _to_source(caplog)
        assert (level, named) == (logging.INFO, call_id) and "'127.0.0.2': it is neither" in message, message
    else:  # to the Contact on TCP (at 127.0.0.3), through the route on UDP (the Contact at 127.0.0.1)
        assert received is not None and received.startswith(f"BYE sip:caller@{'127.0.0.3' if tcp else '127.0.0.1'}:")
        assert _not_sent(caplog) == []


@pytest.mark.parametrize(
    ("route", "allowed", "why"),
    [
        ("<sip:proxy.invalid;lr>", ["127.0.0.0/8"], "'proxy.invalid': it is a host name"),
        ("<sip:[::1]:5099;lr>", ["127.0.0.0/8", "::1/128"], "'::1': our UDP socket cannot reach"),
    ],
    ids=["host-name", "ipv6-from-an-ipv4-bind"],
)
async def test_sip_bye_over_udp_to_a_route_we_cannot_use_goes_where_the_invite_came_from(
    start_bridge: Callable[..., ServerThread],
    emulator: ServerThread,
    caplog: pytest.LogCaptureFixture,
    route: str,
    allowed: list[str],
    why: str,
) -> None:
    """A route we do not send to over UDP: a proxy that names itself by host name in Record-Route (we do not
    resolve the name: it could point anywhere), or an address our IPv4 UDP socket cannot reach (IPv6, allowed),
    whose BYE and retransmissions went to asyncio's ``error_received``, a DEBUG line naming neither the call nor
    the address. Either way the BYE went nowhere and the caller's side of the call was left up. On UDP it goes
    where the INVITE came from, in a proxy's path the proxy itself, with its Route header as the route set says;
    one INFO line."""
    with udp_socket() as caller, caplog.at_level(logging.INFO):
        call_id, received = await _bye_after(
            start_bridge,
            emulator,
            partial(_udp_call_routed_by, route=route, sock=caller),
            lambda: _bye(caller, 5.0),
            **{"sip.allowed_sources": allowed},
        )
    assert received is not None and header(received, "Route") == route, received
    assert header(received, "Call-ID") == call_id
    [(level, named, message)] = _to_source(caplog)
    assert (level, named) == (logging.INFO, call_id) and why in message, message
    assert _not_sent(caplog) == []


async def test_sip_bye_to_a_contact_saying_transport_udp_goes_as_a_datagram(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread
) -> None:
    """A UA that used TCP for its (large) INVITE only, its Contact saying ``;transport=udp``, closed that
    connection: our BYE must go over UDP (RFC 3263 §4.1), with our Via saying so. We dialled TCP to the port,
    where nothing listens, and the BYE was lost."""
    with udp_socket() as target:
        contact = f"sip:caller@127.0.0.1:{target.getsockname()[1]};transport=udp"
        _, received = await _bye_after_drop(start_bridge, emulator, contact, lambda: _datagram(target, 5.0))
    assert received is not None and received.startswith("BYE sip:caller@127.0.0.1:"), received
    assert header(received, "Via").startswith("SIP/2.0/UDP "), received


async def test_sip_bye_to_a_sips_contact_is_not_sent_in_plaintext(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``sips:`` Contact asks for TLS, which we do not have: we dialled plain TCP and sent the BYE (the dialog's
    identifiers) in clear. Nothing is sent; one WARNING says why."""
    with socket.create_server(("127.0.0.1", 0)) as listener, caplog.at_level(logging.INFO):
        contact = f"sips:caller@127.0.0.1:{listener.getsockname()[1]}"
        call_id, received = await _bye_after_drop(start_bridge, emulator, contact, lambda: _accepted(listener, 1.0))
    _assert_not_sent(caplog, call_id, received, "it asks for TLS")


def _held_open(listener: socket.socket) -> tuple[str, float | None]:
    """Accept the bridge's connection, read its BYE, answer nothing and keep the connection open: the BYE and
    how long the bridge kept it (None: still open after 10 s)."""
    listener.settimeout(8.0)
    connection, _ = listener.accept()
    opened = time.monotonic()
    with connection:
        connection.settimeout(0.2)
        received = b""
        end = opened + 10.0
        while time.monotonic() < end:
            try:
                data = connection.recv(65535)
            except TimeoutError:
                continue
            except ConnectionError:
                return received.decode(errors="replace"), time.monotonic() - opened
            if not data:  # the bridge closed it
                return received.decode(errors="replace"), time.monotonic() - opened
            received += data
    return received.decode(errors="replace"), None


async def test_sip_connection_dialled_for_our_bye_is_closed_after_64_t1(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread
) -> None:
    """A peer that accepts the connection we opened for our BYE and keeps it open, answering nothing: the bridge
    closes it after 64*T1 (3.2 s with these timers) rather than holding a socket and a task for as long as the
    peer likes (the timeout in ``SipServer._dial`` had no test)."""
    bridge = start_sip_bridge(start_bridge, emulator, **{"twilio.max_call_s": 3.0})
    listener = socket.create_server(("127.0.0.1", 0))
    contact = f"sip:caller@127.0.0.1:{listener.getsockname()[1]};transport=tcp"
    rtp = RtpStream()
    try:
        held = asyncio.create_task(asyncio.to_thread(_held_open, listener))
        await asyncio.to_thread(_tcp_call_then_drop, status(bridge)["sip"]["port"], rtp, contact)
        received, kept_s = await asyncio.wait_for(held, 20.0)
        assert_all_released(bridge, emulator)
    finally:
        rtp.stop()
        listener.close()
    assert received.startswith("BYE sip:caller@127.0.0.1:"), received[:200]
    assert kept_s is not None and 64 * T1_S * 0.8 < kept_s < 64 * T1_S + 3.0, kept_s
