"""The simulated SIP caller: places one call the way a trunk would, built on the same sans-I/O SIP code.

INVITE with an SDP offer (PCMU, PCMA, telephone-event 101) over UDP or TCP, answering a digest challenge if
credentials are given; ACK; real-time 20 ms PCMU RTP from the caller's audio (silence after it), RFC 4733
digits at the times asked; BYE after ``seconds`` (or answer the bridge's BYE). What the bridge sent is placed
on the RTP timeline (reorder, loss fill) and kept as what the caller heard. The bridge's RTP is checked as a
trunk would: one SSRC, sequence +1, timestamp +160 per packet unless a marker opens a talk spurt, 160-byte
PCMU; anything else is a ``violation``. Fault switches (``never_ack``, ``rtp_stop_after_s``) serve the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from telephony_bridge.audio.codec import TWILIO_FRAME_BYTES, ULAW_SILENCE, pcm16_to_ulaw, ulaw_to_pcm16
from telephony_bridge.sip.address import new_branch, new_tag, parse_name_addr, parse_uri
from telephony_bridge.sip.auth import authorization_header
from telephony_bridge.sip.dtmf import event_payloads
from telephony_bridge.sip.message import Headers, Request, Response, StreamParser, parse_datagram
from telephony_bridge.sip.rtp import RtpPacket, RtpReceiver, RtpSender, parse_rtp
from telephony_bridge.sip.sdp import (
    Direction,
    SdpError,
    SessionDescription,
    build_answer,
    build_offer,
    negotiate,
    parse_sdp,
)

FRAME_S = 0.020
T1_S = 0.5


@dataclass(frozen=True, eq=False)
class SipCallConfig:
    target: str  # sip:ai@host:port
    audio_in: npt.NDArray[np.int16] | None = None  # 8 kHz int16; silence after it
    seconds: float = 5.0
    transport: str = "udp"
    dtmf: Sequence[tuple[float, str]] = ()  # (seconds after answer, digit)
    user: str = ""
    password: str = ""
    local_host: str = "127.0.0.1"
    answer_timeout_s: float = 15.0
    never_ack: bool = False  # fault: the bridge must give up after 64*T1 and BYE
    rtp_stop_after_s: float | None = None  # fault: stop sending RTP (media timeout)
    auth_delay_s: float = 0.0  # fault: answer a digest challenge this late (a stale nonce)
    extra_headers: Sequence[tuple[str, str]] = ()
    offer_sdp: bytes | None = None  # replaces our PCMU/PCMA offer (a test sends what some trunk would)
    late_offer: bool = False  # INVITE without SDP: the 200 carries the bridge's offer, our ACK the answer
    hold_at_s: float | None = None  # re-INVITE with a=sendonly this long after answer (the caller holds)...
    resume_at_s: float | None = None  # ...and a=sendrecv again at this time
    resume_without_sdp: bool = False  # the resume's re-INVITE carries no SDP: the 200 offers, our ACK answers


@dataclass
class SipCallResult:
    call_id: str
    status: int = 0  # the INVITE's final status (0: none arrived)
    setup_s: float | None = None  # INVITE sent -> 200 OK received
    heard: bytes = b""  # μ-law, 8 kHz, on the RTP timeline
    packets_in: int = 0
    ended_by: str = ""  # "caller" (our BYE), "bridge" (its BYE), "refused", "timeout"
    digits_sent: str = ""
    challenges: list[str] = field(default_factory=list)  # "401" or "401 stale" for each challenge answered
    reinvites: list[int] = field(default_factory=list)  # status of each re-INVITE's final answer
    answered_at: float = 0.0  # monotonic time of the 200 OK
    jitter_ms: float = 0.0  # RFC 3550 interarrival jitter of the bridge's RTP as this caller received it
    arrivals: list[float] = field(default_factory=list)  # monotonic arrival time of each RTP packet from the bridge

    def packets_between(self, start_s: float, end_s: float) -> int:
        """RTP packets that arrived between these times after the answer."""
        return sum(1 for t in self.arrivals if start_s <= t - self.answered_at < end_s)

    violations: list[str] = field(default_factory=list)
    reason: str = ""

    @property
    def heard_pcm(self) -> npt.NDArray[np.int16]:
        return ulaw_to_pcm16(self.heard)

    @property
    def answered(self) -> bool:
        return self.status == 200

    def summary(self) -> str:
        setup = f"{1000 * self.setup_s:.0f} ms" if self.setup_s is not None else "-"
        heard_s = len(self.heard) / 8000
        return (
            f"sip call {self.call_id}: {self.status or 'no answer'} in {setup}, heard {heard_s:.1f} s "
            f"({self.packets_in} RTP packets, jitter {self.jitter_ms:.2f} ms), ended by {self.ended_by or '-'}, "
            f"digits sent {len(self.digits_sent)}, "
            f"violations {len(self.violations)}" + (f", {self.reason}" if self.reason else "")
        )


class _Signalling:
    """One UDP socket or TCP connection to the bridge; parsed messages arrive on ``inbox``."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[Request | Response] = asyncio.Queue()
        self._udp: asyncio.DatagramTransport | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self.local: tuple[str, int] = ("", 0)
        self.remote: tuple[str, int] = ("", 0)

    async def open(self, transport: str, host: str, port: int, local_host: str) -> None:
        self.remote = (host, port)
        loop = asyncio.get_running_loop()
        if transport == "tcp":
            reader, self._writer = await asyncio.open_connection(host, port)
            self.local = self._writer.get_extra_info("sockname")[:2]
            self._reader_task = loop.create_task(self._read_tcp(reader))
        else:
            inbox = self.inbox

            class _Proto(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: Any) -> None:
                    msg = parse_datagram(data)
                    if isinstance(msg, Request | Response):
                        inbox.put_nowait(msg)

            udp, _ = await loop.create_datagram_endpoint(_Proto, local_addr=(local_host, 0))
            self._udp = udp  # type: ignore[assignment]
            self.local = udp.get_extra_info("sockname")[:2]

    async def _read_tcp(self, reader: asyncio.StreamReader) -> None:
        parser = StreamParser()
        while data := await reader.read(65536):
            for msg in parser.feed(data):
                if isinstance(msg, Request | Response):
                    self.inbox.put_nowait(msg)

    def send(self, data: bytes) -> None:
        if self._writer is not None:
            self._writer.write(data)
        elif self._udp is not None:
            self._udp.sendto(data, self.remote)

    @property
    def reliable(self) -> bool:
        return self._writer is not None

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        if self._writer is not None:
            self._writer.close()
        if self._udp is not None:
            self._udp.close()


class _Media(asyncio.DatagramProtocol):
    """Our RTP socket: what the bridge sends, checked and placed on its timeline."""

    def __init__(self, result: SipCallResult) -> None:
        self.result = result
        self.receiver = RtpReceiver(depth=3)
        self.heard = bytearray()
        self._last: RtpPacket | None = None
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        packet = parse_rtp(data)
        if packet is None:
            return  # RTCP
        self.result.packets_in += 1
        self.result.arrivals.append(time.monotonic())
        self._check(packet)
        self.heard += self.receiver.push(packet, time.monotonic())

    def _check(self, packet: RtpPacket) -> None:
        problems = self.result.violations
        if len(packet.payload) != TWILIO_FRAME_BYTES:
            problems.append(f"payload of {len(packet.payload)} bytes, expected 160")
        last = self._last
        if last is not None:
            if packet.ssrc != last.ssrc:
                problems.append(f"SSRC changed from {last.ssrc:#x} to {packet.ssrc:#x}")
            elif packet.sequence != (last.sequence + 1) & 0xFFFF:
                problems.append(f"sequence jumped from {last.sequence} to {packet.sequence}")
            elif not packet.marker and packet.timestamp != (last.timestamp + 160) & 0xFFFFFFFF:
                problems.append(f"timestamp jumped by {(packet.timestamp - last.timestamp) & 0xFFFFFFFF} unmarked")
        self._last = packet


async def place_sip_call(config: SipCallConfig) -> SipCallResult:
    uri = parse_uri(config.target)
    if uri is None:
        raise ValueError(f"expected a sip: URI such as sip:ai@127.0.0.1:5060, got {config.target!r}")
    call_id = f"{secrets.token_hex(12)}@{config.local_host}"
    result = SipCallResult(call_id)
    sig = _Signalling()
    await sig.open(config.transport, uri.host, uri.port or 5060, config.local_host)
    loop = asyncio.get_running_loop()
    media_transport, media = await loop.create_datagram_endpoint(
        lambda: _Media(result), local_addr=(config.local_host, 0)
    )
    rtp_port = media_transport.get_extra_info("sockname")[1]
    try:
        await _call(config, sig, media, media_transport, rtp_port, result)
    finally:
        media_transport.close()
        await sig.close()
    result.heard = bytes(media.heard) + media.receiver.flush()
    result.jitter_ms = media.receiver.stats.jitter_ms
    return result


async def _call(
    config: SipCallConfig,
    sig: _Signalling,
    media: _Media,
    rtp: asyncio.DatagramTransport,
    rtp_port: int,
    result: SipCallResult,
) -> None:
    proto = "TCP" if sig.reliable else "UDP"
    local_host, local_port = sig.local
    tag = new_tag()
    contact = f"<sip:caller@{local_host}:{local_port}{';transport=tcp' if sig.reliable else ''}>"
    session_id = secrets.randbelow(2**31)
    offer = config.offer_sdp or build_offer(host=config.local_host, port=rtp_port, session_id=session_id, version=1)
    if config.late_offer:
        offer = b""
    cseq = 1
    auth_rows: list[tuple[str, str]] = []
    started = time.monotonic()
    while True:
        branch = new_branch()
        invite = Request(
            "INVITE",
            config.target,
            Headers.of(
                [
                    ("Via", f"SIP/2.0/{proto} {local_host}:{local_port};branch={branch};rport"),
                    ("Max-Forwards", "70"),
                    ("From", f"<sip:caller@{local_host}>;tag={tag}"),
                    ("To", f"<{config.target}>"),
                    ("Call-ID", result.call_id),
                    ("CSeq", f"{cseq} INVITE"),
                    ("Contact", contact),
                    ("Supported", "timer"),
                    *auth_rows,
                    *config.extra_headers,
                    *([("Content-Type", "application/sdp")] if offer else []),
                ]
            ),
            offer,
        )
        final = await _transact(sig, invite, config.answer_timeout_s)
        if final is None:
            result.ended_by, result.reason = "timeout", "no final response to the INVITE"
            return
        result.status = final.status
        if final.status >= 300:
            sig.send(_ack(invite, final, branch=branch).to_bytes())  # the ACK of a non-2xx: same branch
            challenge = final.headers.values("WWW-Authenticate")
            stale = bool(challenge) and "stale=true" in challenge[0]
            if final.status == 401 and challenge and config.user and (not auth_rows or stale):
                result.challenges.append("401 stale" if stale else "401")
                await asyncio.sleep(config.auth_delay_s if not stale else 0.0)
                value = authorization_header(
                    challenge[0], user=config.user, password=config.password, method="INVITE", uri=config.target
                )
                auth_rows = [("Authorization", value or "")]
                cseq += 1
                continue
            result.ended_by, result.reason = "refused", f"{final.status} {final.reason}"
            return
        break
    result.answered_at = time.monotonic()
    result.setup_s = result.answered_at - started
    answer = parse_sdp(final.body)
    chosen = negotiate(answer) if isinstance(answer, SessionDescription) else answer
    if isinstance(chosen, SdpError):
        result.reason = f"unusable SDP in the 200: {chosen.reason}"
        return
    ack_body = b""
    if config.late_offer:  # the 200 carried the offer: answer it in the ACK (RFC 3261 §13.2.2.4)
        assert isinstance(answer, SessionDescription)
        ack_body = build_answer(answer, chosen, host=config.local_host, port=rtp_port, session_id=session_id, version=1)
    to_value = final.headers.get("To") or ""
    remote_target = parse_name_addr(final.headers.get("Contact") or "") or parse_name_addr(to_value)
    routes = list(reversed(final.headers.values("Record-Route")))  # the UAC reverses (RFC 3261 §12.1.2)
    ack = _ack(invite, final, branch=new_branch(), uri=remote_target.uri if remote_target else config.target)
    ack_rows = [("Route", r) for r in routes] + ([("Content-Type", "application/sdp")] if ack_body else [])
    ack = Request(ack.method, ack.uri, ack.headers.with_rows(*ack_rows), ack_body)
    if not config.never_ack:
        sig.send(ack.to_bytes())
    remote = (chosen.remote_host, chosen.remote_port)
    bye_from_bridge = asyncio.Event()
    pending: dict[int, asyncio.Future[Response]] = {}
    loop = asyncio.get_running_loop()
    responder = loop.create_task(_answer_requests(sig, final, ack, config, bye_from_bridge, pending))

    async def reinvite(direction: Direction, at_s: float, *, with_sdp: bool = True) -> None:
        """A re-INVITE in the dialog (hold or resume), ACKed on its 200 (RFC 3264 §8.4); without SDP, the 200
        carries the bridge's offer and the ACK our answer (§13.2.2.4)."""
        nonlocal cseq
        await asyncio.sleep(at_s)
        cseq += 1
        body = b""
        if with_sdp:
            body = build_offer(
                host=config.local_host, port=rtp_port, session_id=session_id, version=cseq, direction=direction
            )
        rows = [
            ("Via", f"SIP/2.0/{proto} {local_host}:{local_port};branch={new_branch()};rport"),
            ("Max-Forwards", "70"),
            *[("Route", r) for r in routes],
            ("From", invite.headers.get("From") or ""),
            ("To", to_value),
            ("Call-ID", result.call_id),
            ("CSeq", f"{cseq} INVITE"),
            ("Contact", contact),
            *([("Content-Type", "application/sdp")] if body else []),
        ]
        waiter = pending[cseq] = loop.create_future()
        sig.send(Request("INVITE", ack.uri, Headers.of(rows), body).to_bytes())
        try:
            answer = await asyncio.wait_for(waiter, 5.0)
        finally:
            pending.pop(cseq, None)
        result.reinvites.append(answer.status)
        ack_rows = [r for r in rows if r[0] not in ("CSeq", "Content-Type", "Contact")]
        ack_rows[0] = ("Via", f"SIP/2.0/{proto} {local_host}:{local_port};branch={new_branch()};rport")
        ack_rows.append(("CSeq", f"{cseq} ACK"))
        ack_body = b""
        offered = parse_sdp(answer.body) if not with_sdp and answer.body else None
        if isinstance(offered, SessionDescription):
            picked = negotiate(offered)
            if not isinstance(picked, SdpError):
                ack_body = build_answer(
                    offered, picked, host=config.local_host, port=rtp_port, session_id=session_id, version=cseq
                )
                ack_rows.append(("Content-Type", "application/sdp"))
        sig.send(Request("ACK", ack.uri, Headers.of(ack_rows), ack_body).to_bytes())

    moves = []
    if config.hold_at_s is not None:
        moves.append(loop.create_task(reinvite(Direction.SENDONLY, config.hold_at_s)))
    if config.resume_at_s is not None:
        resume = reinvite(Direction.SENDRECV, config.resume_at_s, with_sdp=not config.resume_without_sdp)
        moves.append(loop.create_task(resume))
    try:
        await _media_loop(config, media, rtp, remote, chosen.telephone_event_pt, bye_from_bridge, result)
        for move in moves:
            await move
        if bye_from_bridge.is_set():
            result.ended_by = "bridge"
            return
        bye = Request(
            "BYE",
            ack.uri,
            Headers.of(
                [
                    ("Via", f"SIP/2.0/{proto} {local_host}:{local_port};branch={new_branch()};rport"),
                    ("Max-Forwards", "70"),
                    *[("Route", r) for r in routes],
                    ("From", invite.headers.get("From") or ""),
                    ("To", to_value),
                    ("Call-ID", result.call_id),
                    ("CSeq", f"{cseq + 1} BYE"),
                ]
            ),
        )
        result.ended_by = "caller"
        responder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await responder
        ok = await _transact(sig, bye, 10.0)  # CSeq above every re-INVITE: cseq + 1
        if ok is None or ok.status != 200:
            result.violations.append(f"BYE answered {ok.status if ok else 'never'}")
    finally:
        for task in (responder, *moves):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await task


def _ack(invite: Request, final: Response, *, branch: str, uri: str | None = None) -> Request:
    via = invite.headers.values("Via")[0].split(";branch=")[0] + f";branch={branch};rport"
    return Request(
        "ACK",
        uri or invite.uri,
        Headers.of(
            [
                ("Via", via),
                ("Max-Forwards", "70"),
                ("From", invite.headers.get("From") or ""),
                ("To", final.headers.get("To") or ""),
                ("Call-ID", invite.call_id),
                ("CSeq", f"{invite.cseq[0]} ACK"),
            ]
        ),
    )


async def _transact(sig: _Signalling, request: Request, timeout_s: float) -> Response | None:
    """Send ``request`` (resent on Timer A/E over UDP until any answer) and return its final response."""
    data = request.to_bytes()
    sig.send(data)
    interval = T1_S
    provisional = False
    deadline = time.monotonic() + timeout_s
    resend_at = time.monotonic() + interval
    while (now := time.monotonic()) < deadline:
        try:
            msg = await asyncio.wait_for(
                sig.inbox.get(), min(deadline, resend_at) - now if not provisional else deadline - now
            )
        except TimeoutError:
            if not sig.reliable and not provisional:
                sig.send(data)
                interval = min(interval * 2, 4.0)
                resend_at = time.monotonic() + interval
            continue
        if not isinstance(msg, Response) or msg.cseq != request.cseq:
            continue
        if msg.status < 200:
            provisional = True
            continue
        return msg
    return None


async def _answer_requests(
    sig: _Signalling,
    final: Response,
    ack: Request,
    config: SipCallConfig,
    bye: asyncio.Event,
    pending: dict[int, asyncio.Future[Response]],
) -> None:
    """The bridge's requests in the dialog: BYE answered 200; a retransmitted 200 re-ACKed (unless a fault);
    final answers to our re-INVITEs handed to whoever waits for them."""
    while True:
        msg = await sig.inbox.get()
        if isinstance(msg, Response):
            if msg.status == 200 and msg.cseq == final.cseq and not config.never_ack:
                sig.send(ack.to_bytes())
            waiter = pending.get(msg.cseq[0])
            if msg.status >= 200 and msg.cseq[1] == "INVITE" and waiter is not None and not waiter.done():
                waiter.set_result(msg)
            continue
        if msg.method in ("BYE", "OPTIONS", "INFO", "UPDATE", "INVITE"):
            headers = [(n, v) for n, v in msg.headers if n in ("Via", "From", "To", "Call-ID", "CSeq")]
            sig.send(Response(200, "OK", Headers.of(headers)).to_bytes())
            if msg.method == "BYE":
                bye.set()


async def _media_loop(
    config: SipCallConfig,
    media: _Media,
    rtp: asyncio.DatagramTransport,
    remote: tuple[str, int],
    event_pt: int | None,
    bye: asyncio.Event,
    result: SipCallResult,
) -> None:
    audio = pcm16_to_ulaw(config.audio_in) if config.audio_in is not None else b""
    sender = RtpSender()
    digits = sorted(config.dtmf)
    start = time.monotonic()
    tick = 0
    pending_events: list[tuple[int, bytes, bool]] = []  # (event start in samples, payload, marker)
    while (elapsed := time.monotonic() - start) < config.seconds and not bye.is_set():
        at = tick * TWILIO_FRAME_BYTES
        while digits and digits[0][0] <= elapsed and event_pt is not None:
            _, digit = digits.pop(0)
            result.digits_sent += digit
            payloads = event_payloads(digit)
            pending_events += [(at, p, i == 0) for i, p in enumerate(payloads)]
        stopped = config.rtp_stop_after_s is not None and elapsed >= config.rtp_stop_after_s
        if not stopped:
            if pending_events and event_pt is not None:
                ev_at, payload, marker = pending_events.pop(0)
                rtp.sendto(sender.event(payload, event_pt, ev_at, marker=marker).to_bytes(), remote)
            else:
                frame = audio[at : at + TWILIO_FRAME_BYTES].ljust(TWILIO_FRAME_BYTES, bytes([ULAW_SILENCE]))
                rtp.sendto(sender.packet(frame, 0, at).to_bytes(), remote)
        tick += 1
        delay = start + tick * FRAME_S - time.monotonic()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(bye.wait(), delay)


# --- commands ----------------------------------------------------------------------------------------------


def dtmf_schedule(digits: str, *, first_s: float = 1.0, every_s: float = 0.5) -> list[tuple[float, str]]:
    """``12#`` → one key press every ``every_s`` from ``first_s`` after answer."""
    return [(first_s + i * every_s, d) for i, d in enumerate(digits)]


async def sipcall_command(
    target: str,
    wav: str | None,
    out: str | None,
    seconds: float,
    *,
    transport: str = "udp",
    dtmf: str = "",
    user: str = "",
    password: str = "",
) -> int:
    """One call, the summary on stdout. Exit codes: 0 answered and ended cleanly; 1 the bridge's RTP or BYE
    broke the rules; 2 refused, unanswered or unusable; 3 bad arguments."""
    from telephony_bridge.tools.commands import load_caller_audio, write_wav

    try:
        audio = load_caller_audio(wav)
        for digit in dtmf:
            event_payloads(digit)
        config = SipCallConfig(
            target,
            audio_in=audio,
            seconds=seconds,
            transport=transport,
            dtmf=dtmf_schedule(dtmf),
            user=user,
            password=password,
        )
        result = await place_sip_call(config)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 3
    except OSError as exc:
        print(f"could not reach {target}: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    if out:
        write_wav(out, result.heard_pcm)
    if not result.answered:
        return 2
    return 1 if result.violations else 0


async def sip_load(
    target: str,
    calls: int,
    concurrency: int,
    seconds: float,
    ramp_s: float,
    audio: npt.NDArray[np.int16] | None,
    *,
    transport: str = "udp",
) -> list[SipCallResult]:
    """``calls`` SIP calls, at most ``concurrency`` at once, started evenly over ``ramp_s``."""
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> SipCallResult:
        await asyncio.sleep(ramp_s * i / max(1, calls))
        async with gate:
            return await place_sip_call(SipCallConfig(target, audio_in=audio, seconds=seconds, transport=transport))

    return list(await asyncio.gather(*(one(i) for i in range(calls))))


def load_summary(results: list[SipCallResult]) -> str:
    answered = [r for r in results if r.answered]
    setups = sorted(1000 * r.setup_s for r in answered if r.setup_s is not None)
    refused: dict[str, int] = {}
    for r in results:
        if not r.answered:
            key = str(r.status or r.reason or "no answer")
            refused[key] = refused.get(key, 0) + 1
    violations = sum(len(r.violations) for r in results)
    jitter = sorted(r.jitter_ms for r in answered)

    def pct(p: float) -> str:
        return f"{setups[min(len(setups) - 1, int(p / 100 * len(setups)))]:.1f}" if setups else "-"

    return (
        f"sip loadtest: {len(answered)}/{len(results)} answered, refused {refused or 'none'}, "
        f"INVITE->200 p50 {pct(50)} ms p99 {pct(99)} ms, "
        f"bridge RTP jitter max {jitter[-1] if jitter else 0:.2f} ms, RTP violations {violations}"
    )


async def sip_loadtest_command(
    target: str, calls: int, concurrency: int, seconds: float, ramp_s: float, wav: str | None, transport: str
) -> int:
    from telephony_bridge.tools.commands import load_caller_audio

    try:
        audio = load_caller_audio(wav)
        results = await sip_load(target, calls, concurrency, seconds, ramp_s, audio, transport=transport)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 3
    print(load_summary(results))
    failed = [r for r in results if not r.answered or r.violations]
    return 1 if failed else 0
