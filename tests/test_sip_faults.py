"""SIP faults on the raw wire, end to end on real sockets: requests our simulated caller never sends (a second
INVITE reusing a live call's Call-ID, a CANCEL racing admission), hand-written by a ``RawUac``. Accounting must
return to zero, and only answers really sent are logged and counted."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import httpx
import pytest

from telephony_bridge.serving import ServerThread
from telephony_bridge.sip.auth import authorization_header, ha1
from telephony_bridge.tools.sip_caller import SipCallConfig, place_sip_call
from tests.support import leases, token_requests, wait_until
from tests.test_end_to_end import speech_band_noise
from tests.test_sip_calls import assert_all_released, start_sip_bridge, status, target

OFFER = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
)
G729_OFFER = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 18\r\n"


@dataclass
class RawUac:
    """One UAC's requests, written by hand: its own Call-ID, branch and From tag unless given."""

    port: int  # the bridge's SIP port
    local: int  # ours
    call_id: str = field(default_factory=lambda: secrets.token_hex(8) + "@127.0.0.1")
    branch: str = field(default_factory=lambda: "z9hG4bK" + secrets.token_hex(6))
    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    transport: str = "UDP"

    def request(
        self,
        method: str,
        *,
        to: str = "",
        body: str = "",
        cseq: int = 1,
        branch: str = "",
        contact: str = "",
        extra: tuple[str, ...] = (),
    ) -> bytes:
        """``cseq``, ``branch`` and ``contact`` (a URI) for in-dialog requests; the UAC's own by default. ``extra``:
        more header rows, written as they go on the wire."""
        rows = [
            f"{method} sip:ai@127.0.0.1:{self.port} SIP/2.0",
            f"Via: SIP/2.0/{self.transport} 127.0.0.1:{self.local};branch={branch or self.branch};rport",
            "Max-Forwards: 70",
            f"From: <sip:caller@127.0.0.1>;tag={self.tag}",
            f"To: {to or f'<sip:ai@127.0.0.1:{self.port}>'}",
            f"Call-ID: {self.call_id}",
            f"CSeq: {cseq} {method}",
            f"Contact: <{contact or f'sip:caller@127.0.0.1:{self.local}'}>",
            *extra,
            *(["Content-Type: application/sdp"] if body else []),
            f"Content-Length: {len(body)}",
        ]
        return ("\r\n".join(rows) + "\r\n\r\n" + body).encode()


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def converse(sock: socket.socket, uac: RawUac, listen_s: float) -> list[str]:
    """The first lines of what the bridge sends for ``listen_s``, answered as a UAC must (``exchange``)."""
    return [message.split("\r\n", 1)[0] for message in exchange(sock, uac, listen_s)]


def exchange(sock: socket.socket, uac: RawUac, listen_s: float) -> list[str]:
    """What the bridge sends for ``listen_s``, whole messages, answered as a UAC must: a final answer to the
    INVITE is ACKed (the 2xx's ACK on the same branch too: the core matches that one by dialog)."""
    seen: list[str] = []
    end = time.monotonic() + listen_s
    while (left_s := end - time.monotonic()) > 0:
        sock.settimeout(min(left_s, 0.2))
        try:
            data = sock.recv(65535)
        except TimeoutError:
            continue
        seen.append(data.decode(errors="replace"))
        lines = seen[-1].split("\r\n")
        final = lines[0].startswith("SIP/2.0 ") and not lines[0].startswith("SIP/2.0 1")
        if final and any(x.startswith("CSeq:") and x.endswith("INVITE") for x in lines):
            to = next(x for x in lines if x.lower().startswith("to:")).split(":", 1)[1].strip()
            sock.sendto(uac.request("ACK", to=to), ("127.0.0.1", uac.port))
    return seen


def _invite_reusing(port: int, call_id: str, listen_s: float, copies: int = 3) -> list[str]:
    """A new INVITE (own From tag and branch, no To tag) under ``call_id``, as a forking proxy's second copy or a
    PBX that reuses Call-IDs sends it, sent twice (a retransmission), then ``copies - 1`` more on branches of their
    own (new requests, as a flood would be); the first lines of what comes back."""
    sock = udp_socket()
    uac = RawUac(port, sock.getsockname()[1], call_id=call_id)
    try:
        sock.sendto(uac.request("INVITE", body=OFFER), ("127.0.0.1", port))
        for n in range(copies):
            sock.sendto(uac.request("INVITE", body=OFFER, branch=f"z9hG4bKcopy{n}" if n else ""), ("127.0.0.1", port))
        return converse(sock, uac, listen_s)
    finally:
        sock.close()


async def test_sip_second_invite_reusing_a_live_call_id_is_482_and_the_call_goes_on(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by a fault-injection pass: the second INVITE was answered 200 and took the call's records over (its
    caller's BYE then went unanswered, and the call ended caller_lost on the media timeout)."""
    bridge = start_sip_bridge(start_bridge, emulator, **{"sip.media_timeout_s": 3.0})
    port = status(bridge)["sip"]["port"]
    with caplog.at_level(logging.INFO):
        first = asyncio.create_task(
            place_sip_call(SipCallConfig(target(bridge), audio_in=speech_band_noise(), seconds=6))
        )
        await asyncio.to_thread(wait_until, lambda: len(status(bridge)["calls"]) == 1, 10.0, "the first call")
        call_id = status(bridge)["calls"][0]["call_sid"]
        seen = await asyncio.to_thread(_invite_reusing, port, call_id, 1.5)
        # Refused before any other answer, the retransmission by its transaction with the same answer ...
        assert len(seen) >= 2 and set(seen) == {"SIP/2.0 482 Loop Detected"}, seen
        assert status(bridge)["sip"]["calls"] == 1, status(bridge)["sip"]
        result = await first
        # ... while the live call's BYE is answered 200 (not 481), so it ends when its caller hangs up ...
        assert result.ended_by == "caller" and result.violations == [], result.summary()
        assert_all_released(bridge, emulator)
        wait_until(lambda: any(r.getMessage() == "call ended" for r in caplog.records), 5.0, "the call ended line")
    ended = [r for r in caplog.records if r.getMessage() == "call ended"]
    # ... with outcome completed, not caller_lost by a media timeout after the 481.
    assert [r.outcome for r in ended] == ["completed"], [(r.reason, r.outcome) for r in ended]  # type: ignore[attr-defined]
    # One WARNING for the call, however many such INVITEs (a flood would otherwise flood the log); each counted.
    [warning] = [r for r in caplog.records if "refused with 482" in r.getMessage()]
    assert (warning.levelno, getattr(warning, "call_sid", None)) == (logging.WARNING, call_id)
    metrics = httpx.get(bridge.http_url + "/metrics", timeout=5).text
    assert 'bridge_sip_refused_total{code="482"} 3.0' in metrics


def _invite_reusing_without_then_with_credentials(port: int, call_id: str) -> tuple[list[str], list[str]]:
    """A new INVITE under ``call_id`` without credentials, then on a branch of its own with the answer to the
    challenge it got (as a UAC retries after a 401); the first lines of what comes back to each."""
    sock = udp_socket()
    uac = RawUac(port, sock.getsockname()[1], call_id=call_id)
    try:
        sock.sendto(uac.request("INVITE", body=OFFER), ("127.0.0.1", port))
        first = exchange(sock, uac, 1.0)
        rows = [row for m in first if m.startswith("SIP/2.0 401") for row in m.split("\r\n")]
        challenge = next((row.split(":", 1)[1] for row in rows if row.lower().startswith("www-authenticate:")), "")
        uri = f"sip:ai@127.0.0.1:{port}"
        answer = authorization_header(challenge.strip(), user="pbx", password="s3cret", method="INVITE", uri=uri)
        retry = replace(uac, branch="z9hG4bK" + secrets.token_hex(6))
        credentials = (f"Authorization: {answer}",) if answer else ()
        sock.sendto(retry.request("INVITE", body=OFFER, cseq=2, extra=credentials), ("127.0.0.1", port))
        second = converse(sock, retry, 1.0)
        return [m.split("\r\n", 1)[0] for m in first], second
    finally:
        sock.close()


async def test_sip_invite_reusing_a_live_call_id_is_challenged_before_it_is_refused_482(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """review: the 482 for a reused Call-ID came before digest auth, so a peer without credentials learnt which
    Call-IDs were live (482) and which were not (401). With digest on, such an INVITE is challenged like any
    other (100, then 401); only an authenticated one hears 482, counted and said once for the call as before."""
    users = {"pbx": {"SHA-256": ha1("SHA-256", "pbx", "telephony-bridge", "s3cret")}}
    overrides = {"sip.allowed_sources": ["192.0.2.0/24"], "sip.users": users, "sip.media_timeout_s": 3.0}
    bridge = start_sip_bridge(start_bridge, emulator, **overrides)
    port = status(bridge)["sip"]["port"]
    with caplog.at_level(logging.INFO):
        config = SipCallConfig(target(bridge), audio_in=speech_band_noise(), seconds=5, user="pbx", password="s3cret")
        first = asyncio.create_task(place_sip_call(config))
        await asyncio.to_thread(wait_until, lambda: len(status(bridge)["calls"]) == 1, 10.0, "the first call")
        call_id = status(bridge)["calls"][0]["call_sid"]
        unauthenticated, authenticated = await asyncio.to_thread(
            _invite_reusing_without_then_with_credentials, port, call_id
        )
        result = await first
        assert result.ended_by == "caller" and result.violations == [], result.summary()
        assert_all_released(bridge, emulator)
    # What any new INVITE without credentials gets (the 401 resent until our ACK reached it) ...
    assert unauthenticated[:2] == ["SIP/2.0 100 Trying", "SIP/2.0 401 Unauthorized"], unauthenticated
    assert set(unauthenticated) == {"SIP/2.0 100 Trying", "SIP/2.0 401 Unauthorized"}, unauthenticated
    # ... and once authenticated, the refusal as before: 482, one WARNING naming the call, counted.
    assert authenticated and set(authenticated) == {"SIP/2.0 482 Loop Detected"}, authenticated
    [warning] = [r for r in caplog.records if "refused with 482" in r.getMessage()]
    assert (warning.levelno, getattr(warning, "call_sid", None)) == (logging.WARNING, call_id)
    metrics = httpx.get(bridge.http_url + "/metrics", timeout=5).text
    assert 'bridge_sip_refused_total{code="482"} 1.0' in metrics


def _cancel_during_admission(bridge: ServerThread, listen_s: float) -> tuple[str, list[str]]:
    """A raw UDP INVITE, its CANCEL once admission holds a device for it; its Call-ID and the first lines of what
    the bridge sends."""
    port = status(bridge)["sip"]["port"]
    sock = udp_socket()
    uac = RawUac(port, sock.getsockname()[1])
    try:
        sock.sendto(uac.request("INVITE", body=OFFER), ("127.0.0.1", port))
        wait_until(lambda: leases(bridge) == 1, 5.0, "admission to reserve a device")
        sock.sendto(uac.request("CANCEL"), ("127.0.0.1", port))
        return uac.call_id, converse(sock, uac, listen_s)
    finally:
        sock.close()


async def test_sip_invite_cancelled_while_admission_runs_is_logged_as_cancelled_not_refused(
    start_emulator: Callable[..., ServerThread],
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The caller cancels while the token endpoint is failing slowly: it gets its 487 and one INFO line says so
    under its Call-ID; no 503 is sent, counted or logged for an INVITE that is already over (found by a
    fault-injection pass)."""
    emulator = start_emulator(voice="echo")
    faults = f"{emulator.http_url}/_emulator/faults/token"
    httpx.post(faults, json={"status": 503, "delay_s": 0.5}, timeout=5).raise_for_status()
    bridge = start_sip_bridge(start_bridge, emulator)
    with caplog.at_level(logging.INFO):
        call_id, seen = await asyncio.to_thread(_cancel_during_admission, bridge, 4.0)
        assert any(line.startswith("SIP/2.0 487") for line in seen), seen
        assert_all_released(bridge, emulator)
    assert not any(line.startswith("SIP/2.0 503") for line in seen), seen  # the SIP core's part: no answer after 487
    cancelled = [r for r in caplog.records if "cancelled by the caller" in r.getMessage()]
    assert [(r.levelno, r.getMessage(), getattr(r, "call_sid", None)) for r in cancelled] == [
        (logging.INFO, "SIP INVITE from 127.0.0.1 cancelled by the caller before the answer", call_id)
    ]
    assert not any("refused with" in r.getMessage() for r in caplog.records)
    metrics = httpx.get(bridge.http_url + "/metrics", timeout=5).text
    assert "bridge_sip_refused_total{" not in metrics


async def test_sip_cancel_cuts_admission_short_and_the_device_goes_back_at_once(
    start_emulator: Callable[..., ServerThread],
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The token endpoint hangs and admission may take 6 s: the caller's CANCEL ends admission, and the device it
    had reserved is free at once, not when admission would have given up."""
    emulator = start_emulator(voice="echo")
    faults = f"{emulator.http_url}/_emulator/faults/token"
    httpx.post(faults, json={"status": 503, "delay_s": 4.0}, timeout=5).raise_for_status()
    bridge = start_sip_bridge(start_bridge, emulator, **{"savants.token_deadline_s": 6.0})
    with caplog.at_level(logging.INFO):
        _, seen = await asyncio.to_thread(_cancel_during_admission, bridge, 0.3)
        assert "SIP/2.0 487 Request Terminated" in seen, seen
        # back well before the token endpoint's answer (4 s), with room for a slow machine
        wait_until(lambda: (leases(bridge), status(bridge)["sip"]["calls"]) == (0, 0), 2.5, "the device to go back")
        assert_all_released(bridge, emulator)
    assert not any(line.startswith("SIP/2.0 503") for line in seen), seen
    assert not any("refused with" in r.getMessage() for r in caplog.records)


def _invite_and_cancel_in_one_tcp_segment(port: int, offer: str, listen_s: float) -> list[str]:
    """An INVITE and its CANCEL in one TCP write: the bridge reads both before the call's task first runs, so
    the CANCEL is in before any decision. The status lines of what comes back."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        uac = RawUac(port, sock.getsockname()[1], transport="TCP")
        sock.sendall(uac.request("INVITE", body=offer) + uac.request("CANCEL"))
        received = b""
        end = time.monotonic() + listen_s
        while (left_s := end - time.monotonic()) > 0:
            sock.settimeout(left_s)
            with contextlib.suppress(TimeoutError):
                received += sock.recv(65535)
    return [line for line in received.decode(errors="replace").split("\r\n") if line.startswith("SIP/2.0 ")]


async def test_sip_invite_cancelled_before_its_refusal_is_not_logged_as_refused(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """A G.729-only offer would be refused 488, but the caller cancelled first: its 487 is the only final
    answer, and no "refused with 488" line is logged for an answer never sent (each refusal shares that path)."""
    bridge = start_sip_bridge(start_bridge, emulator)
    port = status(bridge)["sip"]["port"]
    with caplog.at_level(logging.INFO):
        seen = await asyncio.to_thread(_invite_and_cancel_in_one_tcp_segment, port, G729_OFFER, 1.0)
        assert_all_released(bridge, emulator)
    assert [line for line in seen if not line.startswith("SIP/2.0 1")] == [
        "SIP/2.0 200 OK",  # to the CANCEL
        "SIP/2.0 487 Request Terminated",
    ], seen
    assert [r.getMessage() for r in caplog.records if "refused with" in r.getMessage()] == []
    metrics = httpx.get(bridge.http_url + "/metrics", timeout=5).text
    assert "bridge_sip_refused_total{" not in metrics


async def test_sip_invite_cancelled_before_admission_starts_spends_no_token(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread
) -> None:
    """review-45: the CANCEL is in before the call's task first runs (both in one TCP segment), so
    ``live.admission`` is still None when ``_call_event`` looks and nothing cuts admission short: it runs to the
    end for an INVITE already answered 487, spending a token request of the device's budget (60 a minute)."""
    bridge = start_sip_bridge(start_bridge, emulator)
    port = status(bridge)["sip"]["port"]
    before = token_requests(emulator)
    seen = await asyncio.to_thread(_invite_and_cancel_in_one_tcp_segment, port, OFFER, 1.0)
    assert "SIP/2.0 487 Request Terminated" in seen, seen
    assert_all_released(bridge, emulator)
    assert token_requests(emulator) - before == 0


def _answers_to_a_refresh_without_sdp(port: int) -> tuple[str, str]:
    """A raw call (early offer, PCMU only), then a session-refresh re-INVITE that carries no SDP, as RFC 4028
    refreshers often send it; the SDP of our 200 to each. The refresh's offer is answered in the ACK with what
    the call already has; then BYE."""
    sock = udp_socket()
    uac = RawUac(port, sock.getsockname()[1])
    bodies: list[str] = []
    to = ""

    def final_for(cseq: str) -> str:
        nonlocal to
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            sock.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                head, _, body = sock.recv(65535).decode(errors="replace").partition("\r\n\r\n")
                lines = head.split("\r\n")
                if lines[0].startswith("SIP/2.0 2") and f"CSeq: {cseq}" in lines:
                    to = next(x for x in lines if x.lower().startswith("to:")).split(":", 1)[1].strip()
                    return body
        raise AssertionError(f"no 2xx to CSeq {cseq}")

    def send(method: str, cseq: int, body: str = "") -> None:
        request = replace(uac, branch="z9hG4bK" + secrets.token_hex(6)).request(method, to=to, body=body)
        sock.sendto(
            request.replace(f"CSeq: 1 {method}".encode(), f"CSeq: {cseq} {method}".encode()), ("127.0.0.1", port)
        )

    try:
        sock.sendto(uac.request("INVITE", body=OFFER), ("127.0.0.1", port))
        bodies.append(final_for("1 INVITE"))
        send("ACK", 1)
        send("INVITE", 2)  # the refresh: no SDP
        bodies.append(final_for("2 INVITE"))
        send("ACK", 2, body=OFFER.replace("o=- 1 1", "o=- 1 2"))
        send("BYE", 3)
        final_for("3 BYE")
        return bodies[0], bodies[1]
    finally:
        sock.close()


def _sdp_lines(body: str, prefix: str) -> list[str]:
    return [line for line in body.split("\r\n") if line.startswith(prefix)]


async def test_sip_session_refresh_reinvite_without_sdp_offers_our_unchanged_sdp(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread
) -> None:
    """review-46: sip-rtp.md §9: 'always answer refresh re-INVITEs/UPDATEs with 200 and our unchanged SDP (same o=
    version)'. Since c80dd52 a re-INVITE without SDP gets ``build_offer``: PCMU, PCMA and telephone-event 101,
    version up by one. So the first refresh of every early-offer call (about 15 minutes in, with a 1800 s
    interval) changes our SDP and renegotiates codec and event payload type mid-call, needlessly; the hold
    fix needs only the direction to be sendrecv again."""
    bridge = start_sip_bridge(start_bridge, emulator, **{"sip.media_timeout_s": 5.0})
    first, refreshed = await asyncio.to_thread(_answers_to_a_refresh_without_sdp, status(bridge)["sip"]["port"])
    assert (_sdp_lines(refreshed, "o="), _sdp_lines(refreshed, "m=")) == (
        _sdp_lines(first, "o="),
        _sdp_lines(first, "m="),
    ), (first, refreshed)
    assert_all_released(bridge, emulator)


async def test_sip_offer_in_a_200_to_a_reinvite_without_sdp_leaves_out_pcma_when_it_is_not_allowed(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread
) -> None:
    """review-46: with ``sip.allow_pcma: false`` our offer (a re-INVITE without SDP; the late-offer 200 too) still
    lists PCMA (``sdp.build_offer`` always does). A peer that prefers A-law answers PCMA; ``_reoffer_answer`` then
    refuses that answer (negotiated with allow_pcma off) and keeps the old media, while the peer switches to PCMA:
    its packets (PT 8) are ignored and our PCMU is played to it as A-law."""
    bridge = start_sip_bridge(start_bridge, emulator, **{"sip.media_timeout_s": 5.0, "sip.allow_pcma": False})
    _, refreshed = await asyncio.to_thread(_answers_to_a_refresh_without_sdp, status(bridge)["sip"]["port"])
    [m_line] = _sdp_lines(refreshed, "m=audio")
    assert "8" not in m_line.split()[3:] and not _sdp_lines(refreshed, "a=rtpmap:8 "), refreshed
    assert_all_released(bridge, emulator)


@pytest.mark.parametrize("received", ["192.0.2.99", "::1", "a\x00b", "\u00e4" * 70])
async def test_sip_response_goes_to_the_source_never_to_a_received_the_sender_wrote(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread, received: str
) -> None:
    """A request whose top ``Via`` (no ``rport``) carries a ``received`` of its own: its response went there, to
    another host (a reflector at any address, for anyone once ``sip.users`` is set), or for a NUL or a name IDNA
    cannot encode to ``sendto``, which raised TypeError and made asyncio close the SIP UDP socket: every later
    request went unanswered. The response goes to the source at the sent-by port, and the bridge goes on
    answering."""
    bridge = start_sip_bridge(start_bridge, emulator)
    port = status(bridge)["sip"]["port"]
    with udp_socket() as sock:
        uac = RawUac(port, sock.getsockname()[1])
        sock.sendto(
            uac.request("OPTIONS").replace(b";rport\r\n", f";received={received}\r\n".encode(), 1), ("127.0.0.1", port)
        )
        sock.settimeout(5.0)
        answer = sock.recv(65535).decode(errors="replace")
        assert answer.startswith("SIP/2.0 200 OK\r\n") and ";received=127.0.0.1\r\n" in answer, answer
        sock.sendto(uac.request("OPTIONS", branch="z9hG4bKagain"), ("127.0.0.1", port))
        assert sock.recv(65535).startswith(b"SIP/2.0 200 OK\r\n")
