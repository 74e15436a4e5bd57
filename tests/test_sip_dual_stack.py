"""A SIP listener bound to ``::`` (one dual-stack socket for IPv6 and IPv4) with IPv4 peers, end to end on real
sockets: such a socket sees an IPv4 peer as ``::ffff:a.b.c.d`` and cannot send to a plain ``a.b.c.d``. The INVITE
from the allow-list was refused ``403``, our BYE to an IPv4 route and our RTP to the offer's ``c=IN IP4`` before
the caller's first packet were lost without a trace, and TCP took IPv6 only. A ``0.0.0.0`` bind is the control.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from telephony_bridge.audio.codec import pcm16_to_ulaw, ulaw_to_pcm16
from telephony_bridge.serving import ServerThread
from telephony_bridge.sip.rtp import RtpSender, parse_rtp
from telephony_bridge.tools.sip_caller import SipCallConfig, place_sip_call
from tests.support import wait_until
from tests.test_end_to_end import speech_band_noise
from tests.test_sip_calls import assert_all_released, start_sip_bridge, status, target
from tests.test_sip_faults import RawUac, udp_socket
from tests.test_sip_signalling_faults import final_answer, header, offer, sdp_port


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def require_ipv6() -> None:
    """A listener on ``::``: skipped where this machine has no IPv6 loopback, but under CI that fails (the
    dual-stack path must be tested)."""
    if _ipv6_loopback():
        return
    if os.environ.get("CI"):
        pytest.fail("CI must test a SIP listener on '::', but this machine has no IPv6 loopback")
    pytest.skip("this machine has no IPv6 loopback to bind :: on")


ON_IPV4_LOOPBACK = {"sip.allowed_sources": ["127.0.0.0/8"], "sip.media_sources": ["127.0.0.0/8"]}


@dataclass
class _Peer:
    """What a UDP caller on 127.0.0.1 saw of its call."""

    answer: str = ""  # the 200 to the INVITE, headers and SDP
    rtp_before_ours: bool = False  # the bridge's RTP reached the offer's c= before the caller sent any
    heard: bytearray = field(default_factory=bytearray)  # the bridge's PCMU payloads, in arrival order
    bye: str | None = None


def _routed_call(sip_port: int, said: bytes, listen_s: float) -> _Peer:
    """A call over UDP from 127.0.0.1 as a proxy in the path places it: ``Record-Route`` names the caller's own
    socket by its IPv4 address, so our BYE goes there (RFC 3261 §12.2.1.1), not simply back to the source. The
    caller waits for the bridge's RTP before sending its own (so only the offer's ``c=IN IP4`` can lead it there),
    then sends ``said`` (μ-law) in real time, silence after it, until the bridge's BYE, which it answers."""
    peer = _Peer()
    with udp_socket() as sip, udp_socket() as rtp:
        local = sip.getsockname()[1]
        uac = RawUac(sip_port, local)
        sip.settimeout(0.2)
        invite = uac.request(
            "INVITE", body=offer(rtp.getsockname()[1]), extra=(f"Record-Route: <sip:127.0.0.1:{local};lr>",)
        )
        sip.sendto(invite, ("127.0.0.1", sip_port))
        peer.answer = final_answer(lambda: sip.recv(65535), "INVITE")
        if not peer.answer.startswith("SIP/2.0 200"):
            return peer
        sip.sendto(uac.request("ACK", to=header(peer.answer, "To")), ("127.0.0.1", sip_port))
        bridge_rtp = ("127.0.0.1", sdp_port(peer.answer))
        rtp.settimeout(2.0)
        try:
            peer.heard += rtp.recv(2048)[12:]
            peer.rtp_before_ours = True
        except TimeoutError:
            pass
        sip.setblocking(False)
        rtp.setblocking(False)
        sender, start = RtpSender(), time.monotonic()
        for tick in range(int(listen_s / 0.02)):
            frame = said[160 * tick : 160 * (tick + 1)].ljust(160, b"\xff")
            rtp.sendto(sender.packet(frame, 0, 160 * tick).to_bytes(), bridge_rtp)
            while (data := _recv(rtp)) is not None:
                packet = parse_rtp(data)
                peer.heard += packet.payload if packet is not None else b""
            message = _recv(sip)
            if message is not None and message.startswith(b"BYE "):
                peer.bye = message.decode(errors="replace")
                rows = [
                    r for r in peer.bye.split("\r\n") if r.split(":")[0] in ("Via", "From", "To", "Call-ID", "CSeq")
                ]
                sip.sendto(
                    ("SIP/2.0 200 OK\r\n" + "\r\n".join(rows) + "\r\nContent-Length: 0\r\n\r\n").encode(),
                    ("127.0.0.1", sip_port),
                )
                break
            time.sleep(max(0.0, start + 0.02 * (tick + 1) - time.monotonic()))
    return peer


def _recv(sock: socket.socket) -> bytes | None:
    try:
        return sock.recv(65535)
    except BlockingIOError:
        return None


def _correlation(said: np.ndarray, heard: np.ndarray) -> float:
    """How much of ``said`` came back in ``heard`` at its best lag (1.0: exactly)."""
    x, y = said.astype(float), heard.astype(float)
    if y.size < x.size:
        return 0.0
    corr = np.correlate(y, x, mode="valid")
    at = int(np.argmax(corr))
    return float(corr[at] / (np.linalg.norm(x) * np.linalg.norm(y[at : at + x.size]) or 1.0))


@pytest.mark.parametrize("host", ["::", "0.0.0.0"])
async def test_sip_dual_stack_bind_ipv4_caller_talks_and_gets_our_bye_at_its_route(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread, caplog: pytest.LogCaptureFixture, host: str
) -> None:
    """``sip.host = ::`` with an IPv4 caller inside the allow-lists (SIP and media): its INVITE is taken, our
    answer names it as IPv4 (``received=127.0.0.1``), our RTP reaches the offer's ``c=IN IP4`` before any of its
    own came in, audio flows both ways, and when the bridge ends the call (``twilio.max_call_s``) our BYE reaches the
    IPv4 ``Record-Route``; the device and the RTP port come back."""
    if host == "::":
        require_ipv6()
    bridge = start_sip_bridge(
        start_bridge,
        emulator,
        **{"sip.host": host, "sip.advertised_host": "127.0.0.1", "twilio.max_call_s": 3.0, **ON_IPV4_LOOPBACK},
    )
    said = speech_band_noise(1.5)
    with caplog.at_level(logging.INFO):
        peer = await asyncio.to_thread(_routed_call, status(bridge)["sip"]["port"], pcm16_to_ulaw(said), 8.0)
        assert peer.answer.startswith("SIP/2.0 200"), peer.answer[:300]
        assert ";received=127.0.0.1" in header(peer.answer, "Via") and "c=IN IP4 127.0.0.1\r" in peer.answer
        assert peer.rtp_before_ours, "no RTP from the bridge to the offer's c= address before the caller's own"
        assert peer.bye is not None, "the bridge's BYE never reached the caller's IPv4 route"
        assert peer.bye.startswith("BYE sip:caller@127.0.0.1:"), peer.bye[:200]
        assert_all_released(bridge, emulator)
        wait_until(lambda: any(r.getMessage() == "call ended" for r in caplog.records), 5.0, "the call ended line")
    assert _correlation(said, ulaw_to_pcm16(bytes(peer.heard))) > 0.8, "the echo of what the caller said"
    [ended] = [r for r in caplog.records if r.getMessage() == "call ended"]
    assert (ended.ingress, ended.outcome, ended.reason) == ("sip", "completed", "time limit reached")  # type: ignore[attr-defined]
    assert ended.rtp_packets_in > 100  # type: ignore[attr-defined]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_sip_dual_stack_bind_takes_an_ipv4_caller_over_tcp(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread
) -> None:
    """The TCP listener on ``::`` takes IPv4 too, as its UDP twin does: asyncio makes every IPv6 listening socket
    IPv6-only, so an IPv4 caller's connection to the SIP port was refused. Our answers name it as IPv4."""
    require_ipv6()
    bridge = start_sip_bridge(
        start_bridge,
        emulator,
        **{"sip.host": "::", "sip.advertised_host": "127.0.0.1", "twilio.max_call_s": 3.0, **ON_IPV4_LOOPBACK},
    )
    port = status(bridge)["sip"]["port"]
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
        sock.sendall(RawUac(port, sock.getsockname()[1], transport="TCP").request("OPTIONS"))
        answer = await asyncio.to_thread(final_answer, lambda: sock.recv(65535), "OPTIONS")
    assert answer.startswith("SIP/2.0 200") and header(answer, "Via").endswith(";received=127.0.0.1"), answer
    said = speech_band_noise(1.5)
    result = await place_sip_call(SipCallConfig(target(bridge), audio_in=said, seconds=8, transport="tcp"))
    assert result.answered and result.ended_by == "bridge", result.summary()
    assert _correlation(said, result.heard_pcm) > 0.8, result.summary()
    assert_all_released(bridge, emulator)
