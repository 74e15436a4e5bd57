"""The SIP ingress driver: UDP and TCP on one port, the UAS core's timers, and one task per answered call.

Wire bytes go through ``message`` into ``core.UserAgentCore``; what comes out is sent, and its events drive
calls. An INVITE is decided here, cheapest refusals first and before anything is allocated (spec §7, §8):
source allow-list or digest (``403``/``401``), draining (``503``), session interval (``422``), codecs
(``488``), RTP ports (``503``), then admission on the shared device pool (``486`` busy, ``503`` when the AI
cannot be reached). An admitted call is answered (``180``, ``200`` + SDP) and handed to the ingress-neutral
call core (``bridge.Call``) through a ``SipLeg``: its identity for accounting and logs is the SIP Call-ID.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import secrets
import socket
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from telephony_bridge.audio.codec import pcm16_to_ulaw
from telephony_bridge.bridge import Call, CallDeps
from telephony_bridge.drain import CUT_GRACE_S, DRAINED
from telephony_bridge.errors import AdmissionError, ConfigError, SavantsError
from telephony_bridge.ops import logging as oplog
from telephony_bridge.ops.readiness import DRAINING, Readiness
from telephony_bridge.serving import host_port, warn_if_ipv6_only
from telephony_bridge.settings import Settings
from telephony_bridge.sip import sdp
from telephony_bridge.sip.address import parse_name_addr, parse_uri
from telephony_bridge.sip.auth import DigestAuthenticator
from telephony_bridge.sip.core import (
    AckTimeout,
    CallCancelled,
    CallConfirmed,
    CallEnded,
    CallIdInUse,
    IncomingCall,
    InfoDigit,
    Output,
    ReOffer,
    ReOfferConfirmed,
    RequestNotSent,
    Send,
    UserAgentCore,
)
from telephony_bridge.sip.dialog import Peer, build_response
from telephony_bridge.sip.inet import Networks, Stack, in_networks, is_wildcard, socket_address, unmapped, uri_host
from telephony_bridge.sip.leg import RtpProtocol, SipLeg, outcome_recordings
from telephony_bridge.sip.message import Malformed, Request, StreamParser, parse_datagram
from telephony_bridge.sip.timers import SessionTimer, TooSmall, negotiate_session_timer
from telephony_bridge.sip.transaction import Timers
from telephony_bridge.sip.wire_clock import WireClock
from telephony_bridge.store import StoreUnavailable

log = logging.getLogger(__name__)

DEV_SOURCES = ("127.0.0.0/8",)
# Media of a call whose INVITE had no SDP, until the ACK brings the answer: nothing is sent anywhere.
DIAL_TIMEOUT_S = 5.0  # a new TCP connection for our request (the caller's closed): give up after this long
MEDIA_STOP_S = 2.0  # after our hang-up, how long the RTP task may take to stop before it is cancelled
LATE_OFFER_PENDING = sdp.Negotiated(0, "0.0.0.0", 9, sdp.PCMU, 0, None, sdp.Direction.INACTIVE, None)
# OPTIONS' reasons of SIP's own, beside /readyz's (ops/readiness.py): before the first check, and when it raised.
STARTING = "starting"
CHECK_FAILED = "readiness check failed"


def require_sip_security(settings: Settings) -> None:
    """Production with SIP on: a trunk must be secured, and peers must be told a reachable address."""
    sip = settings.sip
    if sip.port is None:
        return
    if settings.server.workers > 1:
        raise ConfigError(
            f"config key 'sip.port' (environment variable SIP_PORT) cannot be used with server.workers = "
            f"{settings.server.workers}: the SIP ingress keeps its transactions in one process; run one worker per "
            "replica and spread calls with a SIP proxy (deploy/kamailio)"
        )
    if settings.dev_mode:
        return
    if not sip.allowed_sources and not sip.users:
        raise ConfigError(
            "config key 'sip.allowed_sources' (environment variable SIP_ALLOWED_SOURCES) or 'sip.users' must be "
            "set when SIP is on in production: otherwise anyone who finds the port can call the AI"
        )
    host = sip.host or settings.listen_host
    if is_wildcard(host) and not sip.advertised_host:
        raise ConfigError(
            "config key 'sip.advertised_host' (environment variable SIP_ADVERTISED_HOST) must be set when SIP "
            f"listens on the wildcard address {host!r}: peers need the address to send ACK, BYE and RTP to"
        )


class RtpPorts:
    """Even RTP ports with the odd RTCP port after each (RFC 3550 §11), handed out round robin."""

    def __init__(self, first: int, last: int) -> None:
        self._ports = list(range(first + first % 2, last, 2))
        self._next = itertools.cycle(range(len(self._ports))) if self._ports else iter(())
        self.in_use: set[int] = set()

    async def bind(
        self, host: str, on_rtp: Callable[[bytes, tuple[str, int]], None]
    ) -> tuple[int, asyncio.DatagramTransport, asyncio.DatagramTransport] | None:
        """Bind a free pair (another process may hold some ports: those are skipped), or None."""
        loop = asyncio.get_running_loop()
        for _ in range(len(self._ports)):
            port = self._ports[next(self._next)]
            if port in self.in_use:
                continue
            try:
                rtp, _ = await loop.create_datagram_endpoint(lambda: RtpProtocol(on_rtp), local_addr=(host, port))
            except OSError:
                continue
            try:
                rtcp, _ = await loop.create_datagram_endpoint(
                    lambda: RtpProtocol(lambda d, a: None), local_addr=(host, port + 1)
                )
            except OSError:
                rtp.close()
                continue
            self.in_use.add(port)
            return port, rtp, rtcp  # type: ignore[return-value]
        return None

    def release(self, port: int) -> None:
        self.in_use.discard(port)


@dataclass
class _Live:
    """One INVITE from admission to cleanup."""

    call_id: str
    invite: Request
    peer: Peer
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    admission: asyncio.Timeout | None = None  # while admission runs; the caller's CANCEL expires it at once
    offered_in_reoffer: bool = False  # our 200 to a re-INVITE without SDP carried an offer: the ACK answers it
    reused_call_id_logged: bool = False  # a new INVITE under this call's Call-ID got 482: said once per call
    leg: SipLeg | None = None
    session_id: int = field(default_factory=lambda: secrets.randbelow(2**31))
    version: int = 1
    port: int = 0
    timer: SessionTimer | None = None
    refreshed_at: float = 0.0
    answer_sdp: bytes = b""
    received_at: float = 0.0


class SipServer:
    """UDP + TCP listener on ``sip.port`` feeding the UAS core; one task per INVITE."""

    def __init__(
        self,
        deps: CallDeps,
        *,
        draining: Callable[[], bool],
        readiness: Readiness | None = None,
        timers: Timers | None = None,
    ) -> None:
        """``readiness``: what ``/readyz`` answers, which OPTIONS then answers too (``_watch_readiness``); None:
        OPTIONS follows the drain alone."""
        require_sip_security(deps.settings)
        self._deps = deps
        sip = deps.settings.sip
        self._settings = sip
        self._clock = deps.clock
        self._wire = WireClock(deps.clock)  # every call's RTP on one 20 ms tick
        self._draining = draining
        self._readiness = readiness
        self._not_ready = None if readiness is None else STARTING  # the latest check's reason, for OPTIONS
        self.host = sip.host or deps.settings.listen_host
        sources = sip.allowed_sources or (DEV_SOURCES if deps.settings.dev_mode and not sip.users else ())
        self._sources: Networks = [ipaddress.ip_network(s, strict=False) for s in sources]
        media = sip.media_sources or ("0.0.0.0/0", "::/0")  # latched once either way (spec §11.4)
        self._media_sources: Networks = [ipaddress.ip_network(s, strict=False) for s in media]
        self._auth = DigestAuthenticator(sip.realm, sip.users, nonce_ttl_s=sip.nonce_ttl_s) if sip.users else None
        self._ports = RtpPorts(*sip.rtp_range)
        self._timers = timers or Timers(t1_s=sip.t1_ms / 1000)
        self.core: UserAgentCore | None = None
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._udp_stack = Stack.IPV4  # what the UDP socket reaches: DUAL on ``::``, IPV6 on one IPv6 address
        self._tcp: asyncio.Server | None = None
        self._connections: dict[int, asyncio.StreamWriter] = {}
        self._conn_ids = itertools.count(1)
        self._live: dict[str, _Live] = {}
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._recordings = outcome_recordings(
            _load_recording("sip.fallback_wav", sip.fallback_wav), _load_recording("sip.drain_wav", sip.drain_wav)
        )
        _warn_if_cut_short(self._recordings[DRAINED], "sip.drain_wav" if sip.drain_wav else "sip.fallback_wav")
        self.refused = 0

    # --- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for attempt in range(20):  # port 0: UDP picks a free port, which TCP may find taken; try another
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(self.host, self._settings.port or 0)
            )
            port = transport.get_extra_info("sockname")[1]
            udp = transport.get_extra_info("socket")
            try:
                self._tcp = await _tcp_server(self._serve_tcp, self.host, port, udp)
            except OSError:
                transport.close()
                if self._settings.port or attempt == 19:
                    raise
                continue
            self._udp, self.port, self._udp_stack = transport, port, Stack.of(udp)  # type: ignore[assignment]
            break
        advertised = self._settings.advertised_host or ("127.0.0.1" if is_wildcard(self.host) else self.host)
        self.core = UserAgentCore(
            advertised,
            self.port,
            timers=self._timers,
            connected=self._connected,
            may_send_to=self._trusted_host,
            udp_reaches=self._udp_reaches,
        )
        self._spawn(self._timer_loop(), "sip-timers")
        if self._readiness is not None:
            self._spawn(self._watch_readiness(self._readiness), "sip-readiness")
        log.info(
            "SIP ingress listening on %s (UDP and TCP), advertised as %s", host_port(self.host, self.port), advertised
        )
        warn_if_ipv6_only(
            self._udp.get_extra_info("socket"), self.host, "SIP ingress", "IPv4 trunks and PBXs", "sip.host"
        )

    async def stop(self) -> None:
        """Hang up what is still live (BYE), then close the sockets."""
        for live in list(self._live.values()):
            if live.leg is not None:
                live.leg.end("bridge shutting down")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                while self._live:  # noqa: ASYNC110 — calls end on their own tasks
                    await asyncio.sleep(0.02)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._wire.aclose()  # ends by itself with the last call; this is for one that outlived the wait
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            for writer in self._connections.values():
                writer.close()
            await self._tcp.wait_closed()

    def status(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "calls": len(self._live),
            "rtp_ports_in_use": len(self._ports.in_use),
            "refused": self.refused,
        }

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- wire in -------------------------------------------------------------------------------------------

    def datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        self._input(parse_datagram(data), Peer("udp", unmapped(addr[0]), addr[1]))

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._read_connection(reader, writer, next(self._conn_ids))

    async def _read_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        """One TCP connection, accepted or opened by us, read until it closes."""
        self._connections[conn] = writer
        host, port = writer.get_extra_info("peername")[:2]
        host = unmapped(host)
        peer = Peer("tcp", host, port, conn)
        parser = StreamParser()
        try:
            while data := await reader.read(65536):
                for item in parser.feed(data):
                    if isinstance(item, Malformed) and item.fatal:
                        log.info("closing SIP TCP connection from %s: %s", host, item.reason)
                        return
                    if getattr(item, "pong", False):
                        writer.write(b"\r\n")  # RFC 5626 keep-alive pong
                        continue
                    self._input(item, peer)
        except (ConnectionError, OSError):
            pass
        finally:
            self._connections.pop(conn, None)
            writer.close()

    def _input(self, parsed: Any, peer: Peer) -> None:
        assert self.core is not None
        # What a dispatcher's OPTIONS ping hears; the drain is known at once.
        self.core.not_ready = DRAINING if self._draining() else self._not_ready
        if isinstance(parsed, Request) and not self._trusted(peer) and self._auth is None:
            self._refuse_source(parsed, peer)
            return
        self._dispatch(self.core.receive(parsed, peer, self._clock.monotonic()))

    async def _dial(self, send: Send) -> None:
        """Send a request of ours over a new TCP connection to the next hop the core chose (``hop``): the caller's
        connection closed (it may still be in the call, its RTP flowing), or a route of a UDP call says TCP. Read
        the answer on it; closed after 64*T1 however long the peer would keep it. One WARNING if the next hop
        cannot be reached."""
        to = send.to
        try:
            async with asyncio.timeout(DIAL_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(to.host, to.port)
        except (OSError, TimeoutError, ValueError) as exc:  # ValueError: a host name the IDNA codec refuses
            log.warning("SIP TCP connection to %s:%d for our request failed (%s); it is lost", to.host, to.port, exc)
            return
        log.info("SIP TCP connection to %s:%d opened for our request (to the next hop)", to.host, to.port)
        writer.write(send.data)
        with contextlib.suppress(TimeoutError):  # the answer comes within 64*T1; a peer may keep the socket open
            async with asyncio.timeout(self._timers.give_up_s):
                await self._read_connection(reader, writer, next(self._conn_ids))
        writer.close()

    def _trusted(self, peer: Peer) -> bool:
        return self._trusted_host(peer.host)

    def _trusted_host(self, host: str) -> bool:
        return in_networks(host, self._sources)

    def _udp_reaches(self, host: str) -> bool:
        return socket_address(host, 0, self._udp_stack) is not None

    def _connected(self, connection: int) -> bool:
        writer = self._connections.get(connection)
        return writer is not None and not writer.is_closing()

    def _challenge(self, invite: Request, peer: Peer) -> tuple[list[tuple[str, str]], str] | None:
        """The ``WWW-Authenticate`` rows for an INVITE that must be challenged, and why: a source outside the
        allow-list without valid digest credentials (without ``sip.users`` such sources never get this far)."""
        if self._trusted(peer):
            return None
        assert self._auth is not None
        now_wall = self._clock.wall()
        authorizations = invite.headers.values("Authorization")
        verdict = self._auth.verify(authorizations, method="INVITE", uri=invite.uri, now_wall=now_wall)
        if verdict.ok:
            return None
        rows = [("WWW-Authenticate", c) for c in self._auth.challenges(now_wall, stale=verdict.stale)]
        return rows, f"digest challenge, {verdict.reason}"

    def _refuse_source(self, request: Request, peer: Peer) -> None:
        """A source outside the allow-list: 403 at once, nothing allocated, a DEBUG line (scanners, §8.5)."""
        self.refused += 1
        self._deps.metrics.sip_refused.labels(code="403").inc()
        log.debug("SIP %s from %s refused: source not allowed", request.method, peer.host)
        if request.method != "ACK":
            response = build_response(request, 403, "Forbidden", peer=peer, to_tag="refused")
            self._send(Send(response.to_bytes(), peer))

    # --- wire out ------------------------------------------------------------------------------------------

    def _dispatch(self, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, Send):
                self._send(out)
            else:
                self._event(out)
        self._wake.set()

    def _send(self, send: Send) -> None:
        """Peers are known by their IPv4 form (``datagram``); our socket on ``::`` sends to it as
        ``::ffff:a.b.c.d`` (``inet.socket_address``), else the datagram would be lost without a word."""
        to = send.to
        if not to.reliable:
            address = socket_address(to.host, to.port, self._udp_stack)
            if address is None:
                self._unsendable(send)
            elif self._udp is not None:
                self._udp.sendto(send.data, address)
        elif to.connection is None:  # a request of ours (a BYE) to a next hop the core chose: a new connection
            self._spawn(self._dial(send), f"sip-tcp-to-{to.host}:{to.port}")
        elif self._connected(to.connection):
            self._connections[to.connection].write(send.data)
        else:  # a response goes on the request's connection only (we do not reopen one: §18.2.2's SHOULD)
            log.debug("SIP TCP connection %s is gone; dropping a response for %s", to.connection, to.host)

    def _unsendable(self, send: Send) -> None:
        """A datagram our UDP socket cannot carry (an IPv6 address from an IPv4 bind, a "host" with a NUL in it),
        which asyncio would drop with a DEBUG line naming neither the call nor the address (or, for the NUL, close
        the socket). Nothing should get here: responses go to the source they came from (``response_target``) and
        ``hop`` refuses such a next hop for our requests (the core sends them elsewhere, saying so). Should
        something, one WARNING naming the call."""
        parsed = parse_datagram(send.data)
        what = parsed.method if isinstance(parsed, Request) else "response"
        with oplog.call_context(call_sid=getattr(parsed, "call_id", None)):
            log.warning(
                "SIP %s not sent to %r:%d: our UDP socket on %s cannot send there",
                what,
                send.to.host,
                send.to.port,
                self.host,
            )

    async def _watch_readiness(self, readiness: Readiness) -> None:
        """Keep the reason OPTIONS answers 503 with as ``/readyz`` would give it (None: 200), refreshed every
        ``accounting.readiness_cache_s`` (at most every 0.2 s): a dispatcher that pings with OPTIONS (Kamailio,
        OpenSIPS, an SBC) takes a replica that cannot take calls out of rotation as a load balancer does on
        ``/readyz``. The check is the same object's, so the accounting read is shared with ``/readyz``'s. A full
        device pool does not count here: the pool is shared, so every replica is full together, and a trunk
        handles our 486 Busy Here better than the dispatcher's own 503 for no replica left."""
        every_s = max(self._deps.settings.accounting.readiness_cache_s, 0.2)
        while True:
            try:
                self._not_ready = (await readiness.check(draining=False, capacity=False)).reason
            except Exception as exc:  # an unknown state is not ready; the loop goes on, and says so once
                if self._not_ready != CHECK_FAILED:
                    log.warning("SIP readiness check failed, OPTIONS answers 503: %s: %s", type(exc).__name__, exc)
                self._not_ready = CHECK_FAILED
            await self._clock.sleep_until(self._clock.monotonic() + every_s)

    async def _timer_loop(self) -> None:
        assert self.core is not None
        while True:
            deadline = self.core.deadline
            self._wake.clear()
            await self._clock.wait_until(self._wake, deadline if deadline is not None else self._clock.monotonic() + 1)
            self._dispatch(self.core.poll(self._clock.monotonic()))

    # --- events --------------------------------------------------------------------------------------------

    def _event(self, event: Output) -> None:
        if isinstance(event, IncomingCall):
            live = _Live(event.call_id, event.invite, event.peer, received_at=self._clock.monotonic())
            self._live[event.call_id] = live
            self._spawn(self._run_call(live), f"sip-call-{event.call_id[:16]}")
            return
        if isinstance(event, CallIdInUse):
            self._call_id_in_use(event)
            return
        if isinstance(event, RequestNotSent):  # the call may be over here already (a BYE held for the ACK)
            with oplog.call_context(call_sid=event.call_id):
                if event.to_source:
                    log.info(
                        "SIP %s for this call sent where the INVITE came from, not to %r: %s",
                        event.method,
                        event.host,
                        event.reason,
                    )
                else:
                    log.warning("SIP %s for this call not sent to %r: %s", event.method, event.host, event.reason)
            return
        live = self._live.get(event.call_id)  # type: ignore[union-attr]
        if live is None:
            return
        with oplog.call_context(call_sid=live.call_id):  # signalling runs outside the call's task: name it
            self._call_event(live, event)

    def _call_id_in_use(self, event: CallIdInUse) -> None:
        """A new INVITE under a live call's Call-ID. A sender that must authenticate and has not is challenged,
        as any INVITE would be (a ``482`` would tell it which Call-IDs are live); otherwise ``482``, the live call
        left alone: counted, and said under that call's name once for the call (an authenticated peer, or one in
        the allow-list, could still send such INVITEs as fast as it likes)."""
        assert self.core is not None
        now = self._clock.monotonic()
        challenge = self._challenge(event.invite, event.peer)
        if challenge is not None:
            rows, why = challenge
            with oplog.call_context(call_sid=event.call_id):
                self._count_refusal(event.peer, 401, why)
            self._dispatch(self.core.refuse_invite(event.invite, event.peer, 401, now, rows=rows, trying=True))
            return
        self._dispatch(self.core.refuse_invite(event.invite, event.peer, 482, now))
        self._deps.metrics.sip_refused.labels(code="482").inc()
        live = self._live.get(event.call_id)
        if live is not None:
            if live.reused_call_id_logged:
                return
            live.reused_call_id_logged = True
        with oplog.call_context(call_sid=event.call_id):
            log.warning("SIP INVITE from %s refused with 482: it reuses the Call-ID of a live call", event.peer.host)

    def _call_event(self, live: _Live, event: Output) -> None:
        if isinstance(event, CallCancelled):
            log.info("SIP INVITE from %s cancelled by the caller before the answer", live.peer.host)
            live.cancelled.set()
            if live.admission is not None:
                live.admission.reschedule(asyncio.get_running_loop().time())
            if live.leg is not None:
                live.leg.peer_hung_up("caller cancelled")
        elif isinstance(event, CallEnded) and live.leg is not None:
            live.leg.peer_hung_up("caller hung up")
        elif isinstance(event, AckTimeout) and live.leg is not None:
            log.warning("no ACK for our 200 OK within 64*T1 (%.0f s): ending the call", self._timers.give_up_s)
            live.leg.end("no ACK", lost=True)
        elif isinstance(event, InfoDigit) and live.leg is not None:
            live.leg.digit(event.digit)
        elif isinstance(event, ReOffer):
            self._reoffer(live, event.request)
        elif isinstance(event, CallConfirmed) and live.leg is not None and live.leg.media is LATE_OFFER_PENDING:
            self._late_answer(live, event.ack.body)
        elif isinstance(event, ReOfferConfirmed) and live.offered_in_reoffer and live.leg is not None:
            live.offered_in_reoffer = False
            self._reoffer_answer(live, event.ack.body)

    def _late_answer(self, live: _Live, body: bytes) -> None:
        """The ACK's SDP answers the offer our 200 carried; without a usable one there is no session: BYE."""
        assert live.leg is not None
        chosen = self._answer_in_ack(body)
        if chosen is None:
            log.warning("SIP late offer: the ACK carries no usable SDP answer; ending the call")
            live.leg.end("no SDP answer in the ACK", lost=True)
            return
        live.leg.update_media(chosen)

    def _reoffer_answer(self, live: _Live, body: bytes) -> None:
        """The ACK's SDP answers the offer our 200 to a re-INVITE without SDP carried (a resume after a hold,
        a media refresh); an unusable one leaves the media as it was."""
        assert live.leg is not None
        chosen = self._answer_in_ack(body)
        if chosen is None:
            log.warning("SIP re-INVITE: the ACK carries no usable SDP answer to our offer; media unchanged")
            return
        live.leg.update_media(chosen)

    def _answer_in_ack(self, body: bytes) -> sdp.Negotiated | None:
        """What an ACK's SDP answer gives us, or None: no body, one that does not parse, or nothing usable."""
        answer = sdp.parse_sdp(body) if body else sdp.SdpError("empty")
        if isinstance(answer, sdp.SdpError):
            return None
        chosen = sdp.negotiate(answer, allow_pcma=self._settings.allow_pcma)
        return None if isinstance(chosen, sdp.SdpError) else chosen

    def _reoffer(self, live: _Live, request: Request) -> None:
        """re-INVITE/UPDATE: hold, resume, a media move, or a session refresh (§9, §10.5)."""
        assert self.core is not None
        now = self._clock.monotonic()
        live.refreshed_at = now
        if not request.body:
            body = self._fresh_offer(live) if request.method == "INVITE" else b""
            if body:  # (an UPDATE without SDP meanwhile, a refresh, leaves a pending offer pending)
                live.offered_in_reoffer = True
            self._dispatch(self.core.answer_reoffer(live.call_id, 200, now, sdp=body, rows=self._timer_rows(live)))
            return
        negotiated = self._negotiate(request.body)
        if isinstance(negotiated, str):
            log.info("SIP %s offer refused with 488: %s", request.method, negotiated)
        if isinstance(negotiated, str) or live.leg is None:
            self._dispatch(self.core.answer_reoffer(live.call_id, 488, now))
            return
        offer, chosen = negotiated
        body = self._answer(live, offer, chosen)
        if body != live.answer_sdp:  # RFC 3264 §8: the version goes up only when our SDP changes
            live.version += 1
            body = self._answer(live, offer, chosen)
        live.answer_sdp = body
        live.leg.update_media(chosen)
        self._dispatch(self.core.answer_reoffer(live.call_id, 200, now, sdp=body, rows=self._timer_rows(live)))

    def _fresh_offer(self, live: _Live) -> bytes:
        """Our offer for a re-INVITE without SDP (a session refresh, a resume from hold some PBXs send): our last
        SDP, unchanged (§9), but ``sendrecv`` again if a hold left it ``recvonly``, so that the caller is heard and
        hears us again; the version goes up only when it changes (RFC 3264 §8)."""
        offer = sdp.sending_again(live.answer_sdp, live.version)
        if offer != live.answer_sdp:
            live.version += 1
            offer = sdp.sending_again(live.answer_sdp, live.version)
        live.answer_sdp = offer
        return offer

    def _negotiate(self, body: bytes) -> tuple[sdp.SessionDescription, sdp.Negotiated] | str:
        """The offer and what we take from it, or why it gets a ``488``."""
        offer = sdp.parse_sdp(body)
        if isinstance(offer, sdp.SdpError):
            return offer.reason
        chosen = sdp.negotiate(offer, allow_pcma=self._settings.allow_pcma)
        if isinstance(chosen, sdp.SdpError):
            return chosen.reason
        return offer, chosen

    def _answer(self, live: _Live, offer: sdp.SessionDescription, chosen: sdp.Negotiated) -> bytes:
        assert self.core is not None
        host = self.core.advertised_host
        return sdp.build_answer(
            offer, chosen, host=host, port=live.port, session_id=live.session_id, version=live.version
        )

    def _timer_rows(self, live: _Live) -> list[tuple[str, str]]:
        if live.timer is None:
            return []
        rows = [("Session-Expires", live.timer.header())]
        return [*rows, ("Require", "timer")] if live.timer.require else rows

    # --- one call ------------------------------------------------------------------------------------------

    async def _run_call(self, live: _Live) -> None:
        with oplog.call_context(call_sid=live.call_id):
            try:
                await self._admit_and_bridge(live)
            except Exception:  # a bug of ours: this call ends, every other call goes on
                log.exception("SIP call failed on an internal error")
                self._reject(live, 500, "internal error")
            finally:
                self._live.pop(live.call_id, None)
                assert self.core is not None
                self.core.forget(live.call_id)

    def _reject(
        self,
        live: _Live,
        status: int,
        why: str,
        rows: list[tuple[str, str]] | None = None,
        *,
        level: int = logging.INFO,
    ) -> None:
        """Answer the INVITE ``status``, logged with ``why`` and counted; not once the caller has cancelled it (it
        has had its 487, so nothing was refused), however late the decision came."""
        assert self.core is not None
        if live.cancelled.is_set():
            return
        self._count_refusal(live.peer, status, why, level)
        self._dispatch(self.core.reject(live.call_id, status, self._clock.monotonic(), rows=rows))

    def _count_refusal(self, peer: Peer, status: int, why: str, level: int = logging.INFO) -> None:
        log.log(level, "SIP INVITE from %s refused with %d: %s", peer.host, status, why)
        self._deps.metrics.sip_refused.labels(code=str(status)).inc()

    async def _admit_and_bridge(self, live: _Live) -> None:
        assert self.core is not None
        invite, settings = live.invite, self._settings
        challenge = self._challenge(invite, live.peer)
        if challenge is not None:
            self._reject(live, 401, challenge[1], challenge[0])
            return
        retry = [("Retry-After", str(settings.retry_after_s))]
        if self._draining():
            self._reject(live, 503, "draining", retry)
            return
        timer = negotiate_session_timer(invite.headers, min_se_s=settings.min_session_expires_s)
        if isinstance(timer, TooSmall):
            self._reject(live, 422, f"Session-Expires below {timer.min_se_s} s", [("Min-SE", str(timer.min_se_s))])
            return
        live.timer = timer
        offer: sdp.SessionDescription | None
        if invite.body:
            negotiated = self._negotiate(invite.body)
            if isinstance(negotiated, str):
                warning = f'305 {uri_host(self.core.advertised_host)} "no usable PCMU/PCMA audio"'
                self._reject(live, 488, negotiated, [("Warning", warning)])
                return
            offer, chosen = negotiated
        else:  # late offer (spec §10.4): our 200 carries the offer, the ACK the answer; no media until then
            offer, chosen = None, LATE_OFFER_PENDING
        try:
            if not await self._admit(live):
                return
        except AdmissionError as exc:
            self._reject(live, 486, str(exc))
            return
        except (SavantsError, StoreUnavailable) as exc:
            self._reject(live, 503, f"the AI cannot be reached: {exc}", retry, level=logging.WARNING)
            return
        if self._draining():  # began while admission ran: the drain did not count this call, so it must not start
            await self._deps.admission.forget(live.call_id)
            self._reject(live, 503, "draining (since the INVITE came)", retry)
            return
        bound = None
        try:
            bound = await self._ports.bind(self.host, lambda d, a: live.leg.datagram(d, a) if live.leg else None)
            if bound is None or live.cancelled.is_set():
                if bound is None:
                    self._reject(live, 503, f"no free RTP port in {settings.rtp_ports}", retry, level=logging.WARNING)
                await self._deps.admission.forget(live.call_id)  # the reservation and the warm token go back
                return
            live.port, rtp, rtcp_transport = bound
            await self._bridge(live, chosen, offer, rtp, rtcp_transport)
        finally:
            if bound is not None:
                bound[1].close()
                bound[2].close()
                self._ports.release(bound[0])

    async def _admit(self, live: _Live) -> bool:
        """Admission on the shared device pool; False if the caller cancelled meanwhile. The CANCEL cuts it short
        (``_call_event`` expires its scope), so a slow token endpoint does not hold the device until the token
        deadline: what admission had reserved goes back at once."""
        if live.cancelled.is_set():  # before this task first ran (the CANCEL read with its INVITE): spend nothing
            return False
        try:
            async with asyncio.timeout(None) as live.admission:
                await self._deps.admission.admit(live.call_id, _caller_number(live.invite))
        except TimeoutError:
            if not live.cancelled.is_set():
                raise
        finally:
            live.admission = None
        if live.cancelled.is_set():
            await self._deps.admission.forget(live.call_id)  # admitted as the CANCEL came, or cut short
            return False
        return True

    async def _bridge(
        self,
        live: _Live,
        chosen: sdp.Negotiated,
        offer: sdp.SessionDescription | None,
        rtp: asyncio.DatagramTransport,
        rtcp_transport: asyncio.DatagramTransport,
    ) -> None:
        assert self.core is not None
        core, call_id = self.core, live.call_id

        async def hang_up(outcome: str) -> None:  # not through ``live``, which holds the leg: no cycle
            self._dispatch(core.hangup(call_id, self._clock.monotonic()))

        leg = SipLeg(
            live.call_id,
            chosen,
            rtp,
            self._clock,
            media_timeout_s=self._settings.media_timeout_s,
            media_sources=self._media_sources,
            on_hang_up=hang_up,
            recordings=self._recordings,
            cname=f"bridge@{core.advertised_host}",
            stack=Stack.of(rtp.get_extra_info("socket")),
            wire=self._wire,
        )
        leg.attach_rtcp(rtcp_transport)
        live.leg = leg
        if offer is None:
            host = core.advertised_host
            live.answer_sdp = sdp.build_offer(
                host=host, port=live.port, session_id=live.session_id, version=1, allow_pcma=self._settings.allow_pcma
            )
        else:
            live.answer_sdp = self._answer(live, offer, chosen)
        now = self._clock.monotonic()
        self._dispatch(core.ring(live.call_id, now))
        self._dispatch(core.answer(live.call_id, live.answer_sdp, now, rows=self._timer_rows(live)))
        self._deps.metrics.sip_setup.observe(now - live.received_at)
        live.refreshed_at = now
        media = asyncio.get_running_loop().create_task(leg.run_media(), name="sip-media")
        expiry = asyncio.get_running_loop().create_task(self._session_expiry(live), name="sip-session-expiry")
        try:
            await Call(leg, self._deps, caller=_caller_number(live.invite)).run()
        finally:
            expiry.cancel()
            await leg.hang_up("completed")  # no-op when the core already hung the leg up
            await _stopped(media)
            with contextlib.suppress(asyncio.CancelledError):
                await expiry
            self._count_media(leg)

    def _count_media(self, leg: SipLeg) -> None:
        figures, metrics = leg.figures(), self._deps.metrics
        metrics.sip_rtp_packets.labels(fate="received").inc(figures["rtp_packets_in"])
        metrics.sip_rtp_packets.labels(fate="lost").inc(figures["rtp_lost"])
        metrics.sip_rtp_packets.labels(fate="late").inc(figures["rtp_late"])
        metrics.sip_jitter.observe(figures["jitter_ms"] / 1000)

    async def _session_expiry(self, live: _Live) -> None:
        """RFC 4028: without a refresh within the interval, the non-refresher ends the call (G7). When we are the
        refresher (a proxy inserted Session-Expires without ``Supported: timer``) we do not send refreshes yet,
        so we do not expire the call either."""
        if live.timer is None or live.timer.refresher == "uas":
            return
        while True:
            due = live.refreshed_at + live.timer.expiry_s
            if self._clock.monotonic() >= due:
                if live.leg is not None:
                    live.leg.end("session timer expired", lost=True)
                return
            await self._clock.sleep_until(due)


async def _tcp_server(
    serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any], host: str, port: int, udp: socket.socket
) -> asyncio.Server:
    """The TCP listener beside the UDP socket ``udp`` on ``host``:``port``. asyncio makes every IPv6 listening
    socket IPv6-only, so on ``::`` TCP refused the IPv4 callers its UDP twin takes: on an IPv6 address the socket
    is made here, dual-stack exactly when the UDP one is."""
    if udp.family != socket.AF_INET6 or ":" not in host:  # an IPv4 address or a host name: as it always was
        return await asyncio.start_server(serve, host, port)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio sets it on its own listeners
        v6only = udp.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        sock.bind(udp.getsockname())
        return await asyncio.start_server(serve, sock=sock)
    except BaseException:
        sock.close()
        raise


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: SipServer) -> None:
        self._server = server

    def datagram_received(self, data: bytes, addr: tuple[str, Any]) -> None:
        self._server.datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        log.debug("SIP UDP socket error: %s", exc)


def _caller_number(invite: Request) -> str | None:
    from_ = parse_name_addr(invite.headers.get("From") or "")
    uri = parse_uri(from_.uri) if from_ is not None else None
    return uri.user or None if uri is not None else None


def _load_recording(key: str, path: str) -> bytes:
    """A recording (``sip.fallback_wav``, ``sip.drain_wav``) as μ-law at 8 kHz, read once at start-up; a bad file
    is a configuration error naming ``key``."""
    if not path:
        return b""
    from telephony_bridge.tools.commands import read_wav  # the simulated callers' reader: 8 or 16 kHz mono

    try:
        return pcm16_to_ulaw(read_wav(path))
    except (OSError, EOFError, wave.Error, ValueError) as exc:
        raise ConfigError(f"config key {key!r} has value {path!r}, which is not usable: {exc}") from exc


async def _stopped(media: asyncio.Task[None]) -> None:
    """Wait for the RTP task after our hang-up, at most ``MEDIA_STOP_S``: a task that does not stop (a bug)
    must not hold the call, and with it the server's stop, for ever."""
    try:
        done, _ = await asyncio.wait({media}, timeout=MEDIA_STOP_S)
    except asyncio.CancelledError:  # the call was cancelled (the server's stop): asyncio.wait does not pass it on
        media.cancel()
        raise
    if not done:
        log.error("the SIP media task did not stop within %s s of the hang-up; cancelling it", MEDIA_STOP_S)
        media.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await media


def _warn_if_cut_short(recording: bytes, key: str) -> None:
    """The drain gives a call it cut ``CUT_GRACE_S`` to end; a longer recording before the BYE is cut off."""
    seconds = len(recording) / 8000
    if seconds > CUT_GRACE_S - 1.0:
        log.warning(
            "%s lasts %.1f s: a SIP call cut by the drain has %s s to end, so the caller would not hear it to the end",
            key,
            seconds,
            CUT_GRACE_S,
        )
