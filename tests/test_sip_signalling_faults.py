"""SIP signalling failure paths found by a fault-injection pass (helper-47), end to end on real sockets: a TCP
caller whose connection dropped mid-call, glare on a re-INVITE, and an UPDATE between our offer and its answer.
Each test failed when written.

The replica faults behaved (webhook on one replica, stream on the other; either killed or drained; Redis emptied
mid-call; one CallSid streamed on both at once; replays to either): their tests are in tests/test_replicas.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Callable

import pytest

from telephony_bridge.serving import ServerThread
from telephony_bridge.sip.rtp import RtpSender
from tests.test_sip_calls import assert_all_released, start_sip_bridge, status
from tests.test_sip_faults import OFFER, RawUac, udp_socket

SILENCE = b"\xff" * 160  # 20 ms of PCMU


def offer(rtp_port: int) -> str:
    return OFFER.replace("m=audio 40000", f"m=audio {rtp_port}")


def final_answer(read: Callable[[], bytes], method: str, listen_s: float = 5.0) -> str:
    """The first final answer to ``method`` among what ``read`` returns (whole messages on UDP, a TCP stream's
    chunks otherwise); everything up to the end of its headers, plus its body."""
    buffer = ""
    end = time.monotonic() + listen_s
    while time.monotonic() < end:
        with contextlib.suppress(TimeoutError):
            buffer += read().decode(errors="replace")
        for match in re.finditer(r"SIP/2\.0 [2-6]\d\d [^\r]*\r\n(.*?)\r\n\r\n", buffer, re.S):
            head = match.group(0)
            if re.search(rf"^CSeq: *\d+ {method}\r$", head, re.M):
                length = re.search(r"^(?:Content-Length|l): *(\d+)\r$", head, re.M | re.I)
                body = buffer[match.end() : match.end() + int(length.group(1) if length else 0)]
                return head + body
    raise AssertionError(f"no final answer to {method} within {listen_s} s: {buffer[:400]!r}")


def header(message: str, name: str) -> str:
    found = re.search(rf"^{name}: *([^\r]*)\r$", message, re.M | re.I)
    assert found is not None, message
    return found.group(1)


def sdp_port(message: str) -> int:
    found = re.search(r"^m=audio (\d+)", message, re.M)
    assert found is not None, message
    return int(found.group(1))


class RtpStream:
    """The caller's RTP: 20 ms of PCMU silence every 20 ms to the bridge, from one socket, until ``stop``."""

    def __init__(self) -> None:
        self.sock = udp_socket()
        self.port = self.sock.getsockname()[1]
        self.target: tuple[str, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send, daemon=True)
        self._thread.start()

    def _send(self) -> None:
        sender, at = RtpSender(), 0
        while not self._stop.wait(0.02):
            if self.target is not None:
                self.sock.sendto(sender.packet(SILENCE, 0, at).to_bytes(), self.target)
                at += 160

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def _tcp_call_then_drop(sip_port: int, contact: socket.socket, rtp: RtpStream) -> str:
    """INVITE over TCP (Contact: ``contact``'s port, ;transport=tcp), ACK, then close that connection with no
    BYE, the RTP going on; what reaches the Contact afterwards (the bridge's BYE, if it comes)."""
    with socket.create_connection(("127.0.0.1", sip_port)) as sock:
        sock.settimeout(0.2)
        uac = RawUac(sip_port, sock.getsockname()[1], transport="TCP")
        where = f"sip:caller@127.0.0.1:{contact.getsockname()[1]};transport=tcp"
        sock.sendall(uac.request("INVITE", body=offer(rtp.port), contact=where))
        ok = final_answer(lambda: sock.recv(65535), "INVITE")
        assert ok.startswith("SIP/2.0 200"), ok
        rtp.target = ("127.0.0.1", sdp_port(ok))
        sock.sendall(uac.request("ACK", to=header(ok, "To"), contact=where))
        time.sleep(0.5)  # the call is up; then the TCP connection goes (a NAT or a proxy dropped it)
    contact.settimeout(8.0)
    try:
        connection, _ = contact.accept()
    except TimeoutError:
        return ""
    with connection:
        connection.settimeout(2.0)
        with contextlib.suppress(TimeoutError):
            return connection.recv(65535).decode(errors="replace")
    return ""


async def test_sip_tcp_connection_dropped_mid_call_the_bridge_bye_still_reaches_the_caller(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """A TCP caller whose signalling connection dropped mid-call (no BYE; its RTP goes on) stays in the call; when
    the bridge ends it (here twilio.max_call_s), its BYE must reach the caller: RFC 3261 §18.1.1 opens a new
    connection to the remote target (the Contact, ;transport=tcp). The bridge sent it to the dead connection
    (``Dialog.destination`` names the INVITE's connection, ``SipServer._send`` drops it with a DEBUG line), so the
    caller heard dead air for the rest of its call while the bridge counted the call completed."""
    bridge = start_sip_bridge(start_bridge, emulator, **{"twilio.max_call_s": 3.0})
    contact = socket.create_server(("127.0.0.1", 0))
    rtp = RtpStream()
    try:
        with caplog.at_level(logging.INFO):
            received = await asyncio.to_thread(_tcp_call_then_drop, status(bridge)["sip"]["port"], contact, rtp)
            assert_all_released(bridge, emulator)
    finally:
        rtp.stop()
        contact.close()
    assert len([r for r in caplog.records if r.getMessage() == "call ended"]) == 1
    assert received.startswith("BYE sip:caller@127.0.0.1:"), received[:200]


def _reinvite_twice_before_the_ack(sip_port: int, rtp: RtpStream) -> tuple[str, str]:
    """A call over UDP; a re-INVITE without SDP (our 200 carries an offer, the ACK must answer it); before that
    ACK, a second re-INVITE with an offer of its own. The status lines of the two final answers; then the first's
    ACK with the answer, and BYE."""
    sock = udp_socket()
    uac = RawUac(sip_port, sock.getsockname()[1])
    sock.settimeout(0.2)
    try:
        sock.sendto(uac.request("INVITE", body=offer(rtp.port)), ("127.0.0.1", sip_port))
        ok = final_answer(lambda: sock.recv(65535), "INVITE")
        to = header(ok, "To")
        rtp.target = ("127.0.0.1", sdp_port(ok))
        sock.sendto(uac.request("ACK", to=to), ("127.0.0.1", sip_port))
        time.sleep(0.3)
        sock.sendto(uac.request("INVITE", to=to, cseq=2, branch="z9hG4bKreinvite2"), ("127.0.0.1", sip_port))
        first = final_answer(lambda: sock.recv(65535), "INVITE")
        assert first.startswith("SIP/2.0 200") and "m=audio" in first, first  # our offer, awaiting the ACK
        second_request = uac.request("INVITE", to=to, body=offer(rtp.port), cseq=3, branch="z9hG4bKreinvite3")
        sock.sendto(second_request, ("127.0.0.1", sip_port))
        second = final_answer(lambda: sock.recv(65535), "INVITE")
        refused = not second.startswith("SIP/2.0 2")  # the ACK of a refusal is on the INVITE's branch
        ack_second = uac.request("ACK", to=to, cseq=3, branch="z9hG4bKreinvite3" if refused else "")
        sock.sendto(uac.request("ACK", to=to, body=offer(rtp.port), cseq=2), ("127.0.0.1", sip_port))
        sock.sendto(ack_second, ("127.0.0.1", sip_port))
        time.sleep(0.3)
        sock.sendto(uac.request("BYE", to=to, cseq=4, branch="z9hG4bKbye4"), ("127.0.0.1", sip_port))
        final_answer(lambda: sock.recv(65535), "BYE")
        return first.split("\r\n", 1)[0], second.split("\r\n", 1)[0]
    finally:
        sock.close()


async def test_sip_second_reinvite_while_our_offer_awaits_its_ack_is_491_request_pending(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """A re-INVITE without SDP is answered with our offer; the caller's answer comes in the ACK. A new offer (a
    second re-INVITE) before that ACK is glare (RFC 3264 §4: one offer at a time; RFC 3261 §14.2 answers it 491
    Request Pending). The bridge answered it 200 and replaced the first re-INVITE's answer state in the core
    (``_Call.reoffer_answer``, core.py ``_in_dialog``): the first ACK, which carries the caller's answer, was then
    matched to nothing, and the second ACK (no SDP: it answered nothing) was taken for the answer to our offer,
    logging a WARNING that the caller's ACK carried no usable answer."""
    bridge = start_sip_bridge(start_bridge, emulator)
    rtp = RtpStream()
    try:
        with caplog.at_level(logging.INFO):
            first, second = await asyncio.to_thread(_reinvite_twice_before_the_ack, status(bridge)["sip"]["port"], rtp)
            assert_all_released(bridge, emulator)
    finally:
        rtp.stop()
    blamed = [r.getMessage() for r in caplog.records if "no usable SDP answer" in r.getMessage()]
    assert (first, second, blamed) == ("SIP/2.0 200 OK", "SIP/2.0 491 Request Pending", [])


def _resume_with_an_update_before_the_ack(sip_port: int, rtp: RtpStream) -> int:
    """A call over UDP; a hold (re-INVITE, sendonly); a resume by a re-INVITE without SDP, whose 200 carries our
    offer; an UPDATE without SDP (a session refresh) before the resume's ACK; then that ACK, with the answer. The
    bridge's RTP packets in the second after the ACK."""
    sock = udp_socket()
    uac = RawUac(sip_port, sock.getsockname()[1])
    sock.settimeout(0.2)
    rtp.sock.settimeout(0.2)

    def exchange(method: str, cseq: int, body: str = "") -> str:
        sock.sendto(uac.request(method, to=to, body=body, cseq=cseq, branch=f"z9hG4bK{method}{cseq}"), target)
        return final_answer(lambda: sock.recv(65535), method)

    def ack(cseq: int, body: str = "") -> None:
        sock.sendto(uac.request("ACK", to=to, body=body, cseq=cseq, branch=f"z9hG4bKack{cseq}"), target)

    target = ("127.0.0.1", sip_port)
    try:
        sock.sendto(uac.request("INVITE", body=offer(rtp.port)), target)
        ok = final_answer(lambda: sock.recv(65535), "INVITE")
        to = header(ok, "To")
        rtp.target = ("127.0.0.1", sdp_port(ok))
        ack(1)
        time.sleep(0.3)
        assert exchange("INVITE", 2, offer(rtp.port).replace("a=sendrecv", "a=sendonly")).startswith("SIP/2.0 200")
        ack(2)
        time.sleep(0.3)
        resumed = exchange("INVITE", 3)
        assert resumed.startswith("SIP/2.0 200") and "a=sendrecv" in resumed, resumed  # our offer
        assert exchange("UPDATE", 4).startswith("SIP/2.0 200")  # a refresh, no SDP, before the resume's ACK
        rtp.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while rtp.sock.recv(2048):  # what the bridge sent before the hold: not the resume's doing
                pass
        rtp.sock.settimeout(0.2)
        ack(3, offer(rtp.port))  # the answer to our offer
        packets, end = 0, time.monotonic() + 1.0
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                rtp.sock.recv(2048)
                packets += 1
        assert exchange("BYE", 5).startswith("SIP/2.0 200")
        return packets
    finally:
        sock.close()


async def test_sip_update_without_sdp_before_the_ack_of_our_offer_does_not_lose_the_answer(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread
) -> None:
    """Our 200 to a re-INVITE without SDP carries an offer, answered in its ACK. An UPDATE without SDP (a refresh)
    in between cleared the server's note that an answer was due, so the ACK's answer was ignored and a caller
    resuming from hold this way stayed muted (found by a review)."""
    bridge = start_sip_bridge(start_bridge, emulator, **{"sip.media_timeout_s": 5.0})
    rtp = RtpStream()
    try:
        packets = await asyncio.to_thread(_resume_with_an_update_before_the_ack, status(bridge)["sip"]["port"], rtp)
    finally:
        rtp.stop()
    assert packets > 25, packets  # the bridge sends again (50 a second)
    assert_all_released(bridge, emulator)


def _late_offer_answered_with_garbage(sip_port: int) -> str:
    """An INVITE without SDP; our 200 carries the offer; the ACK answers it with a body that is no SDP. The first
    request the bridge sends after that (its BYE, as for an ACK without an answer)."""
    sock = udp_socket()
    uac = RawUac(sip_port, sock.getsockname()[1])
    sock.settimeout(0.2)
    target = ("127.0.0.1", sip_port)
    try:
        sock.sendto(uac.request("INVITE"), target)
        ok = final_answer(lambda: sock.recv(65535), "INVITE")
        assert "m=audio" in ok, ok  # our offer
        sock.sendto(uac.request("ACK", to=header(ok, "To"), body="garbage", branch="z9hG4bKack1"), target)
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                message = sock.recv(65535).decode(errors="replace")
                if not message.startswith("SIP/2.0"):
                    return message
        return ""
    finally:
        sock.close()


async def test_sip_ack_answering_our_late_offer_with_no_sdp_at_all_ends_the_call_with_bye(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread
) -> None:
    """An ACK whose body does not parse as SDP was handed to ``sdp.negotiate`` as the parser's error, which raised
    AttributeError in the signalling path: no BYE, and the call went on without media until its timeout (found by
    the final review). It is an ACK without a usable answer: BYE."""
    bridge = start_sip_bridge(start_bridge, emulator, **{"sip.media_timeout_s": 10.0})
    request = await asyncio.to_thread(_late_offer_answered_with_garbage, status(bridge)["sip"]["port"])
    assert request.startswith("BYE "), request[:200]
    assert_all_released(bridge, emulator)
