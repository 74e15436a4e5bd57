"""The SIP/RTP caller leg: one answered dialog's media as a ``leg.CallerLeg`` (spec §10.5, §11, §12).

Inbound RTP goes through ``RtpReceiver`` (reorder, loss fill by timestamp, resets) and ``DtmfReceiver`` and comes
out of ``receive()`` as 8 kHz μ-law and digits. Outbound, ``run_media`` joins the call to the wire clock
(``wire_clock.WireClock``, one for every call on the loop): exactly one 20 ms packet per tick, from the frames the
core queued (``Outbound`` keeps that queue within its lead) or comfort silence, with one SSRC and continuous
sequence/timestamp for the whole call (G6). A mark is confirmed once the audio before it has gone onto the wire
(SIP has no playback echo). RTCP SR+SDES every 5 s and a BYE at the end. While the caller holds us
(a=sendonly/inactive, §10.5) nothing goes onto the wire, so nothing is taken off the queue either: the queued
audio and its marks wait for the resume, and ``send_audio`` waits too (backpressure), so the core counts as sent
and played only what the caller could hear, and keeps the AI's audio meanwhile within its own bound
(``audio.max_ai_ahead_s``). SIP has no ``<Connect action>``: when the call ends on our side with a failure or at
the drain deadline, the leg itself plays what the caller hears (``outcome_recordings``) before the BYE.

Symmetric RTP (§11.4): we send to the SDP address until the first valid packet arrives from an allowed
media source, then latch to that source once; later sources are ignored (RTP Bleed, G12). The SDP address
is put in the form our RTP socket sends to (``inet.socket_address``: a socket on ``::`` reaches ``c=IN IP4``
only as ``::ffff:a.b.c.d``); one it cannot reach gets nothing until the caller's RTP is latched. The
signalling side (``sip/server.py``) feeds peer events in with ``peer_hung_up``/``digit``/``update_media`` and
learns our hang-up through ``on_hang_up``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any, Literal

from telephony_bridge.audio.alaw import ALAW_SILENCE, alaw_to_ulaw, ulaw_to_alaw
from telephony_bridge.audio.codec import TWILIO_FRAME_BYTES, ULAW_SILENCE
from telephony_bridge.clock import Clock
from telephony_bridge.drain import DRAINED
from telephony_bridge.errors import CallerGone
from telephony_bridge.leg import (
    AudioHandler,
    CallerAudio,
    Digit,
    DirectAudio,
    HungUp,
    LegEvent,
    MarkHandler,
    PlayedUpTo,
    Watchdog,
)
from telephony_bridge.sip import rtcp
from telephony_bridge.sip.dtmf import DtmfReceiver
from telephony_bridge.sip.inet import Networks, Stack, in_networks, ip, socket_address
from telephony_bridge.sip.rtp import CLOCK_HZ, FRAME_SAMPLES, RtpReceiver, RtpSender, parse_rtp
from telephony_bridge.sip.sdp import Negotiated
from telephony_bridge.sip.wire_clock import TICK_S, WireClock

log = logging.getLogger(__name__)

FLUSH_AFTER_S = 0.06  # the reorder buffer gives up waiting for a missing packet after this long
SPURT_PREBUFFER_S = 0.06
FAILED_OUTCOMES = frozenset({"ai_unavailable", "error", "no_capacity"})


def outcome_recordings(fallback_ulaw: bytes, drain_ulaw: bytes) -> dict[str, bytes]:
    """What a caller hears before our BYE, by the call's outcome (what Twilio's ``/stream-ended`` answers on that
    ingress): the fallback when the call failed on our side; at the drain deadline the drain recording, else the
    fallback (a "please call again" beats a bare BYE); nothing after a call that ended normally."""
    return {**dict.fromkeys(FAILED_OUTCOMES, fallback_ulaw), DRAINED: drain_ulaw or fallback_ulaw}


class RtpProtocol(asyncio.DatagramProtocol):
    """Hands every datagram on an RTP (or RTCP) port to one callback."""

    def __init__(self, on_datagram: Callable[[bytes, tuple[str, int]], None]) -> None:
        self._on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: tuple[str, Any]) -> None:
        self._on_datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable from a peer that went away
        log.debug("rtp socket error: %s", exc)


class SipLeg:
    """One SIP call's RTP as a caller leg."""

    ingress: Literal["sip"] = "sip"
    frame_bytes: int | None = None  # the jitter buffer's output: any length (packet times, gaps, DTMF events)
    requests_after_end = False  # what the caller hears last, this leg plays before its BYE

    def __init__(
        self,
        call_id: str,
        media: Negotiated,
        rtp: asyncio.DatagramTransport,
        clock: Clock,
        *,
        media_timeout_s: float,
        media_sources: Networks,
        on_hang_up: Callable[[str], Awaitable[None]],
        recordings: Mapping[str, bytes] | None = None,
        cname: str = "telephony-bridge",
        stack: Stack = Stack.IPV4,
        wire: WireClock | None = None,
    ) -> None:
        """``stack``: what the ``rtp`` socket reaches (``Stack.of`` it: DUAL when bound to ``::``); ``wire``: the
        RTP clock the server's calls share (None: one of its own)."""
        self.call_id = call_id
        self.stream_id = ""
        self._rtp = rtp
        self._stack = stack
        self._rtcp: asyncio.DatagramTransport | None = None
        self._clock = clock
        self._media_sources = media_sources
        self._on_hang_up = on_hang_up
        self._recordings = recordings or {}  # outcome -> μ-law (``outcome_recordings``)
        self._cname = cname
        self._events: asyncio.Queue[LegEvent] = asyncio.Queue()
        self._direct: DirectAudio[[bytes, int | None]] = DirectAudio()
        self._marks: DirectAudio[[str]] = DirectAudio()
        self._queue: deque[bytes | str] = deque()  # 160-byte μ-law frames and mark names, in order
        self._drained = asyncio.Event()
        self._listening = asyncio.Event()  # the caller hears what we send (not on hold): ``update_media`` sets it
        self._sender = RtpSender()
        self._dtmf = DtmfReceiver()
        self.watchdog = Watchdog(clock, media_timeout_s)
        self._gone = False  # the peer ended the dialog: nothing can be sent any more
        self._hung_up = False
        self._stopped = asyncio.Event()
        self._wire = wire if wire is not None else WireClock(clock)
        self._next_report = 0.0
        self._last_rx = clock.monotonic()
        self._at_samples = 0
        self._rx_samples = 0
        self._idle = True
        self._spurt_waiting_since: float | None = None
        self.latched_from: tuple[str, int] | None = None
        self.ignored_packets = 0
        self.sent_frames = 0
        self.update_media(media)

    # --- signalling side -----------------------------------------------------------------------------------

    def update_media(self, media: Negotiated) -> None:
        """Answer or re-INVITE: where to send, what, and which direction; a move resets latch and buffer."""
        old = getattr(self, "media", None)
        self.media = media
        self._pcma = media.codec == "PCMA"
        if old is None or old.codec != media.codec:  # gaps are filled with the codec's own silence
            self._receiver = RtpReceiver(silence=ALAW_SILENCE if self._pcma else ULAW_SILENCE)
        if old is None or (old.remote_host, old.remote_port) != (media.remote_host, media.remote_port):
            self._remote = self._sendable(media.remote_host, media.remote_port)
            self.latched_from = None  # a new SSRC from the new place resets the receiver itself
        if not media.direction.we_receive:
            self.watchdog.alive()
        if media.direction.we_send:
            self._listening.set()
        else:  # held (or a late offer not yet answered): sends wait, the queue stays as it is
            self._listening.clear()

    def _sendable(self, host: str, port: int) -> tuple[str, int] | None:
        """The SDP address as our RTP socket sends to it; None (and one WARNING) if it is a host name (``sendto``
        would resolve it on the event loop, every 20 ms, stalling every call), if our socket cannot reach it, or
        if it lies outside ``sip.media_sources``: we take no RTP from there, and the caller writes ``c=``, so
        it must not aim 50 packets a second at an address of its choosing (as ``hop`` refuses for our BYE)."""
        address, parsed = socket_address(host, port, self._stack), ip(host)
        if parsed is not None and parsed.is_unspecified:
            return None  # the old way to hold (c=0.0.0.0): nothing goes there, RTCP included
        if parsed is None:
            why = "a host name, which we do not resolve"
        elif address is None:
            why = "our RTP socket cannot send there"
        elif not in_networks(host, self._media_sources):
            why = "outside sip.media_sources"
        else:
            return address
        log.warning("no RTP to %r:%d (%s) until the caller's RTP comes", host, port, why)
        return None

    def peer_hung_up(self, reason: str) -> None:
        """The peer ended the dialog (BYE, CANCEL): nothing more goes to it, no BYE from us."""
        self._gone = True
        self._events.put_nowait(HungUp(reason))

    def end(self, reason: str, *, lost: bool = False) -> None:
        """The dialog must end from our side (no ACK, session expired, shutting down): the core winds the call
        down and ``hang_up`` sends our BYE. ``lost``: the dialog failed (the caller's side is lost, not done)."""
        self._events.put_nowait(HungUp(reason, lost=lost))

    def digit(self, digit: str) -> None:
        self._events.put_nowait(Digit(digit))

    def attach_rtcp(self, transport: asyncio.DatagramTransport) -> None:
        self._rtcp = transport

    # --- inbound RTP ---------------------------------------------------------------------------------------

    def datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        packet = parse_rtp(data)
        media = self.media
        if packet is None or packet.payload_type not in (media.codec_pt, media.telephone_event_pt):
            self.ignored_packets += 1
            return
        if self.latched_from is None:
            if not in_networks(addr[0], self._media_sources):
                self.ignored_packets += 1
                return
            self.latched_from = addr
            self._remote = addr  # symmetric RTP: answer where the media comes from (§11.4)
        elif addr != self.latched_from:
            self.ignored_packets += 1  # latch once: a second source is not allowed to take over (G12)
            return
        now = self._clock.monotonic()
        self.watchdog.alive()
        self._last_rx = now
        if packet.payload_type == media.telephone_event_pt:
            digit = self._dtmf.push(packet.ssrc, packet.timestamp, packet.payload)
            if digit is not None:
                self._events.put_nowait(Digit(digit))
            if packet.ssrc == self._receiver.ssrc:  # same stream: its sequence numbers are not lost audio
                self._deliver(self._receiver.push(replace(packet, payload=b""), now))
            return  # another SSRC (a replayed capture, G13) never touches the audio stream's state
        self._deliver(self._receiver.push(packet, now))

    def _deliver(self, payload: bytes) -> None:
        """The receiver's output is already continuous (gaps filled by timestamp), so its place on the caller's
        timeline is simply how much came before it."""
        if payload:
            at_ms = self._rx_samples // (CLOCK_HZ // 1000)
            self._rx_samples += len(payload)
            ulaw = alaw_to_ulaw(payload) if self._pcma else payload
            if not self._events.empty() or not self._direct.deliver(ulaw, at_ms):
                self._events.put_nowait(CallerAudio(ulaw, at_ms))

    # --- leg.CallerLeg -------------------------------------------------------------------------------------

    def deliver_audio_to(self, handler: AudioHandler | None) -> None:
        self._direct.attach(handler)

    def deliver_marks_to(self, handler: MarkHandler | None) -> None:
        self._marks.attach(handler)

    async def receive(self) -> LegEvent:
        event = await self._events.get()
        self._direct.check()  # what the core's audio handler raised (the audio it failed on was queued)
        self._marks.check()  # ...or its mark handler
        return event

    async def send_audio(self, ulaw: bytes) -> None:
        """Queued for the RTP clock; while the caller holds us, it waits for the resume (a hang-up meanwhile ends
        the call, which cancels the wait)."""
        await self._listening.wait()
        self.send_audio_nowait(ulaw)

    def can_send_now(self) -> bool:
        return self._listening.is_set() and not self._gone

    def send_audio_nowait(self, ulaw: bytes) -> None:
        if self._gone:
            raise CallerGone("the SIP dialog has ended")
        for start in range(0, len(ulaw), TWILIO_FRAME_BYTES):
            frame = ulaw[start : start + TWILIO_FRAME_BYTES]
            self._queue.append(frame.ljust(TWILIO_FRAME_BYTES, bytes([ULAW_SILENCE])))
        self._drained.clear()

    async def send_mark(self, name: str) -> None:
        if self._gone:
            raise CallerGone("the SIP dialog has ended")
        if not any(isinstance(item, bytes) for item in self._queue):
            self._played_up_to(name)
        else:
            self._queue.append(name)

    async def clear(self) -> None:
        marks = [item for item in self._queue if isinstance(item, str)]
        self._queue.clear()
        self._drained.set()
        # Like Twilio, a clear echoes the marks of the audio it dropped, after it: through ``receive``, never the
        # handler, which would count them as heard before the core has counted what the clear dropped.
        for name in marks:
            self._events.put_nowait(PlayedUpTo(name))

    async def hang_up(self, outcome: str) -> None:
        if self._hung_up:
            return
        self._hung_up = True
        recording = self._recordings.get(outcome, b"")
        try:
            if recording and not self._gone and self._listening.is_set():  # a caller holding us would not hear it
                await self._play(recording, outcome)
        finally:  # cancelled mid-recording too (the server's stop): the media stops and the BYE goes
            self._stopped.set()
            if not self._gone:
                self._gone = True
                await self._on_hang_up(outcome)

    async def _play(self, recording: bytes, outcome: str) -> None:
        """Play ``recording`` instead of whatever was queued, and wait (a little longer than it lasts) until it
        has gone onto the wire."""
        await self.clear()
        self.send_audio_nowait(recording)  # the caller listens (``hang_up`` looked): no wait for a resume
        try:
            async with asyncio.timeout(len(recording) / CLOCK_HZ + 2.0):
                await self._drained.wait()
        except TimeoutError:
            log.warning("the recording for outcome %s did not finish playing before the BYE", outcome)

    async def inactive(self) -> str:
        while True:
            silent_s = await self.watchdog.expired()
            if self.media.direction.we_receive:
                return f"no RTP for {silent_s:.1f} s (media timeout)"
            self.watchdog.alive()  # on hold: silence from the peer is expected (§10.5)

    def figures(self) -> dict[str, Any]:
        stats = self._receiver.stats
        return {
            "codec": self.media.codec,
            "rtp_packets_in": stats.received,
            "rtp_packets_out": self._sender.packets,
            "rtp_lost": stats.lost,
            "rtp_late": stats.late,
            "rtp_resets": stats.resets,
            "rtp_ignored": self.ignored_packets,
            "jitter_ms": round(stats.jitter_ms, 2),
            "rfc4733_digits": self._dtmf.digits,
        }

    # --- outbound wire clock -------------------------------------------------------------------------------

    async def run_media(self) -> None:
        """Send one packet every 20 ms until hang-up: queued audio, else comfort silence (§11.2). The packets go
        from the wire clock's ticks (``tick``); this task only waits for the end, then says goodbye in RTCP."""
        self._next_report = self._clock.monotonic() + secrets.randbelow(1000) / 1000 + 1.0
        self._wire.join(self)
        try:
            await self._stopped.wait()
        finally:
            self._wire.leave(self)
        self._send_rtcp(self._report(self._clock.monotonic()) + rtcp.goodbye(self._sender.ssrc))

    def tick(self, ticks: int, now: float) -> None:
        """The wire clock's tick (``wire_clock.Ticked``): this call's packet, ``ticks`` since it joined."""
        self._send_tick(ticks * FRAME_SAMPLES)
        if self._receiver_waiting(now):
            self._deliver(self._receiver.flush())
        if now >= self._next_report:
            self._next_report = now + rtcp.INTERVAL_S
            self._send_rtcp(self._report(now))

    def tick_failed(self, error: Exception) -> None:
        """A tick raised, or the wire clock stopped: no more audio can reach the caller, so the call ends (its
        side lost) and the BYE goes, rather than the caller hearing nothing until they hang up."""
        log.error("RTP to the caller failed, ending the call: %r", error)
        self._stopped.set()
        self.end("RTP send failed", lost=True)

    def _receiver_waiting(self, now: float) -> bool:
        return now - self._last_rx > FLUSH_AFTER_S and self._receiver.pending

    def _spurt_ready(self, now: float) -> bool:
        """A talk spurt starts only with ``SPURT_PREBUFFER_S`` queued (or after waiting that long): the AI's
        audio reaches us with network and scheduling jitter, and a hole mid-spurt is worse than 60 ms delay."""
        if not self._idle:
            return True
        frames = sum(1 for item in self._queue if isinstance(item, bytes))
        if frames == 0:
            self._spurt_waiting_since = None
            return False
        if self._spurt_waiting_since is None:
            self._spurt_waiting_since = now
        return frames * TICK_S >= SPURT_PREBUFFER_S or now - self._spurt_waiting_since >= SPURT_PREBUFFER_S

    def _send_tick(self, at_samples: int) -> None:
        self._at_samples = at_samples
        while self._queue and isinstance(self._queue[0], str):  # marks behind audio already on the wire
            self._played_up_to(self._queue.popleft())  # type: ignore[arg-type]
        held = not self.media.direction.we_send or self._gone
        frame = None if held else self._next_frame()
        self._idle = frame is None
        if not self._queue:
            self._drained.set()
        if held:
            return  # the timestamp keeps advancing, the next packet after resume carries the marker
        if frame is None:
            frame = bytes([ULAW_SILENCE]) * TWILIO_FRAME_BYTES
        else:
            self.sent_frames += 1
        payload = ulaw_to_alaw(frame) if self._pcma else frame
        packet = self._sender.packet(payload, self.media.codec_pt, at_samples)
        if self._remote is not None:
            self._rtp.sendto(packet.to_bytes(), self._remote)

    def _played_up_to(self, name: str) -> None:
        """A mark confirmed: to the core's handler at once while nothing waits unread, else queued in order."""
        if not self._events.empty() or not self._marks.deliver(name):
            self._events.put_nowait(PlayedUpTo(name))

    def _next_frame(self) -> bytes | None:
        """The queued frame this tick sends (confirming the marks before it), or None: comfort silence."""
        if not self._spurt_ready(self._clock.monotonic()):
            return None
        while self._queue:
            item = self._queue.popleft()
            if isinstance(item, bytes):
                return item
            self._played_up_to(item)
        return None

    def _report(self, now: float) -> bytes:
        sender = self._sender
        return rtcp.compound_report(
            sender.ssrc,
            self._cname,
            wall_s=self._clock.wall(),
            rtp_timestamp=sender.timestamp_at(self._at_samples),
            packets=sender.packets,
            octets=sender.octets,
        )

    def _send_rtcp(self, data: bytes) -> None:
        if self._rtcp is not None and self._remote is not None:
            host, port = self._remote
            self._rtcp.sendto(data, (host, port + 1))
