"""The SIP caller leg on its own (no server, no core): what ``hang_up`` guarantees however it ends."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from dataclasses import replace
from typing import Any, cast

import pytest

from telephony_bridge.audio.codec import ULAW_SILENCE
from telephony_bridge.clock import SystemClock
from telephony_bridge.leg import HungUp, PlayedUpTo
from telephony_bridge.sip.core import Send
from telephony_bridge.sip.dialog import Peer
from telephony_bridge.sip.inet import Stack
from telephony_bridge.sip.leg import RtpProtocol, SipLeg
from telephony_bridge.sip.rtp import RtpSender, parse_rtp
from telephony_bridge.sip.sdp import Direction, Negotiated
from telephony_bridge.sip.server import MEDIA_STOP_S, SipServer, _stopped
from telephony_bridge.sip.wire_clock import WireClock

MEDIA = Negotiated(0, "127.0.0.1", 40000, "PCMU", 0, None, Direction.SENDRECV, None)


class _Wire:
    """A datagram transport that keeps what it was given."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.sent.append(data)

    def close(self) -> None:
        return None


async def _no_bye(outcome: str) -> None:
    return None


def _leg(media: Negotiated, transport: object, **options: Any) -> SipLeg:
    """A leg of call ``call-1`` sending on ``transport``; ``sip.media_sources`` empty and no BYE unless said."""
    options.setdefault("media_sources", [])
    options.setdefault("on_hang_up", _no_bye)
    rtp = cast(asyncio.DatagramTransport, transport)
    return SipLeg("call-1", media, rtp, SystemClock(), media_timeout_s=5.0, **options)


@pytest.mark.parametrize("sources", [["127.0.0.0/8"], ["0.0.0.0/0", "::/0"]], ids=["media-sources", "any"])
def test_sip_leg_sends_nothing_to_a_hold_address_and_says_nothing_of_it(
    caplog: pytest.LogCaptureFixture, sources: list[str]
) -> None:
    """``c=0.0.0.0``, the old way to hold: nothing is sent there (RTCP went to 0.0.0.0, which Linux delivers to
    this host), and it is no address to warn about, whatever ``sip.media_sources`` holds."""
    wire = _Wire()
    held = replace(MEDIA, remote_host="0.0.0.0", direction=Direction.INACTIVE)
    with caplog.at_level(logging.DEBUG, logger="telephony_bridge.sip.leg"):
        leg = _leg(held, wire, media_sources=[ipaddress.ip_network(net) for net in sources])
        leg.attach_rtcp(cast(asyncio.DatagramTransport, wire))
        leg._send_rtcp(b"report")
    assert wire.sent == [] and caplog.records == []


async def test_sip_leg_hang_up_cancelled_while_its_recording_plays_still_stops_media_and_sends_bye() -> None:
    """The drain recording (or the fallback) is playing when the call's task is cancelled: the server's stop
    cancels what is still live 2 s after the drain gave up (``drain.CUT_GRACE_S``), and ``sip.drain_wav`` falls
    back to ``sip.fallback_wav``, whose length nothing bounds. The media task must still stop (``_bridge``
    awaits it, unbounded, in its ``finally``) and the BYE must still go (else the caller is left on a dead line)."""
    byes: list[str] = []

    async def on_hang_up(outcome: str) -> None:
        byes.append(outcome)

    recording = bytes([ULAW_SILENCE ^ 0x55]) * 8000 * 10  # 10 s
    leg = _leg(MEDIA, _Wire(), on_hang_up=on_hang_up, recordings={"drained": recording})
    async with asyncio.timeout(5):
        media = asyncio.create_task(leg.run_media())
        hang_up = asyncio.create_task(leg.hang_up("drained"))
        await asyncio.sleep(0)  # hang_up is now waiting for its recording to go onto the wire
        hang_up.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hang_up
        done, _ = await asyncio.wait([media], timeout=1.0)
        media.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await media
    assert (bool(done), byes) == (True, ["drained"])


async def test_a_media_task_that_does_not_stop_after_the_hang_up_is_cancelled_not_awaited_for_ever() -> None:
    """The server's backstop: a call whose RTP task does not stop (a bug) must not hold the server's stop."""
    stuck = asyncio.create_task(asyncio.sleep(3600))
    async with asyncio.timeout(MEDIA_STOP_S + 3.0):
        await _stopped(stuck)
    assert stuck.cancelled()


async def test_a_call_cancelled_while_the_backstop_waits_for_its_media_task_cancels_that_task_too() -> None:
    """review-46: the server's stop cancels the call tasks 2 s after ending them, which is when ``_stopped`` still
    waits for a media task that does not stop (its own 2 s started later, after the hang-up). ``asyncio.wait``
    does not pass a cancellation on, so the media task was left running, orphaned: the old ``await media`` did
    cancel it. The backstop must not leak the very task it exists to stop."""
    stuck = asyncio.create_task(asyncio.sleep(3600))
    waiter = asyncio.create_task(_stopped(stuck))
    await asyncio.sleep(0)  # one step: the backstop now waits on the stuck task
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    await asyncio.sleep(0)  # a cancellation passed on is delivered at the task's next step
    try:
        assert stuck.cancelled() or stuck.cancelling(), "the media task is still running after its call was cancelled"
    finally:
        stuck.cancel()


async def test_a_bye_to_a_host_name_the_idna_codec_refuses_is_one_warning_not_a_dead_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``SipServer._dial`` (a BYE over a new TCP connection): a Contact host the IDNA codec refuses (``a..b``)
    raised UnicodeError out of the task, with no line naming what was lost (review)."""
    send = Send(b"BYE sip:x@a..b SIP/2.0\r\n\r\n", Peer("tcp", "a..b", 5060, 7))
    with caplog.at_level(logging.WARNING):
        await SipServer._dial(cast(SipServer, object()), send)  # fails before it touches the server
    assert any("for our request failed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("remote", "why"),
    [
        ("::1", "our RTP socket cannot send there"),
        ("media.example.invalid", "a host name, which we do not resolve"),
        ("10.0.0.5", "outside sip.media_sources"),
    ],
    ids=["ipv6-from-an-ipv4-bind", "host-name", "outside-media-sources"],
)
async def test_sip_leg_rtp_to_an_address_it_cannot_use_waits_for_the_latch(
    caplog: pytest.LogCaptureFixture, remote: str, why: str
) -> None:
    """On real sockets: an offer's ``c=`` our IPv4 RTP socket cannot reach (``::1`` from a bind on 127.0.0.1):
    every 20 ms packet went to asyncio's ``error_received``, a DEBUG line naming neither the call nor the address;
    or a host name (RFC 4566 allows one), which each send resolved on the event loop, every 20 ms, blocking every
    call; or an address outside ``sip.media_sources`` (here 127.0.0.0/8), where a caller could aim our RTP at a
    host of its choosing. Now one WARNING, nothing sent, and once the caller's first packet latches it, our RTP
    goes there."""
    loop = asyncio.get_running_loop()
    leg: SipLeg | None = None
    ours, _ = await loop.create_datagram_endpoint(
        lambda: RtpProtocol(lambda data, addr: leg.datagram(data, addr) if leg else None), local_addr=("127.0.0.1", 0)
    )
    heard: asyncio.Queue[bytes] = asyncio.Queue()
    caller, _ = await loop.create_datagram_endpoint(
        lambda: RtpProtocol(lambda data, addr: heard.put_nowait(data)), local_addr=("127.0.0.1", 0)
    )
    leg = _leg(
        replace(MEDIA, remote_host=remote), ours, media_sources=[ipaddress.ip_network("127.0.0.0/8")], stack=Stack.IPV4
    )
    try:
        with caplog.at_level(logging.DEBUG, logger="telephony_bridge.sip.leg"):
            async with asyncio.timeout(5):
                media = asyncio.create_task(leg.run_media())
                await asyncio.sleep(0.1)  # ticks go by before the caller's first packet (none needed to pass)
                caller.sendto(RtpSender().packet(b"\xff" * 160, 0, 0).to_bytes(), ours.get_extra_info("sockname"))
                first = await heard.get()
                await leg.hang_up("completed")
                await media
    finally:
        ours.close()
        caller.close()
    assert parse_rtp(first) is not None and leg.latched_from == caller.get_extra_info("sockname")
    logged = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert logged == [(logging.WARNING, f"no RTP to {remote!r}:40000 ({why}) until the caller's RTP comes")]


async def test_sip_leg_confirms_marks_to_the_cores_handler_and_the_marks_a_clear_drops_through_receive() -> None:
    """``deliver_marks_to``: a mark is confirmed to the handler as the audio before it goes onto the wire (from
    the RTP clock's tick, no task woken), and at once when nothing is queued; the marks a clear drops are echoed
    through ``receive``, after it, as Twilio's are; detached, marks are events again."""
    leg = _leg(MEDIA, _Wire())
    confirmed: list[str] = []
    leg.deliver_marks_to(confirmed.append)
    await leg.send_mark("m1")  # nothing queued before it: heard already
    assert confirmed == ["m1"]
    frame = bytes([ULAW_SILENCE ^ 0x55]) * 160
    leg.send_audio_nowait(frame * 3)  # a spurt's prebuffer (60 ms): it starts at once
    await leg.send_mark("m2")
    leg._send_tick(0)
    leg._send_tick(160)
    assert confirmed == ["m1"]  # a frame is still queued before it
    leg._send_tick(320)
    leg._send_tick(480)
    assert confirmed == ["m1", "m2"]
    leg.send_audio_nowait(frame * 3)
    await leg.send_mark("m3")
    await leg.clear()
    await leg.send_mark("m3b")  # heard at once, but m3 waits unread: it queues behind, in order
    assert confirmed == ["m1", "m2"]
    assert await asyncio.wait_for(leg.receive(), 1) == PlayedUpTo("m3")
    assert await asyncio.wait_for(leg.receive(), 1) == PlayedUpTo("m3b")
    leg.deliver_marks_to(None)
    await leg.send_mark("m4")
    assert await asyncio.wait_for(leg.receive(), 1) == PlayedUpTo("m4")
    assert confirmed == ["m1", "m2"]


class _BrokenWire(_Wire):
    """A transport whose sends fail: no audio can reach the caller any more."""

    def sendto(self, data: bytes, addr: Any = None) -> None:
        raise OSError("network is unreachable")


async def test_sip_leg_whose_rtp_cannot_be_sent_ends_its_call_and_leaves_the_wire_clock(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A tick that raises: the caller would hear nothing more, so the call ends (the caller's side lost, which
    sends the BYE) rather than staying up in silence; the other calls on the clock are the wire clock's tests."""
    wire = WireClock(SystemClock())
    leg = _leg(MEDIA, _BrokenWire(), wire=wire, media_sources=[ipaddress.ip_network("127.0.0.0/8")])
    with caplog.at_level(logging.ERROR, logger="telephony_bridge.sip.leg"):
        async with asyncio.timeout(5):
            media = asyncio.create_task(leg.run_media())
            event = await leg.receive()
            await media  # ends without raising: the call's end comes through ``receive``
    assert event == HungUp("RTP send failed", lost=True) and len(wire) == 0
    assert [r.getMessage() for r in caplog.records] == [
        "RTP to the caller failed, ending the call: OSError('network is unreachable')"
    ]


async def test_sip_leg_media_task_cancelled_leaves_the_wire_clock() -> None:
    wire = WireClock(SystemClock())
    wire_out = _Wire()
    leg = _leg(MEDIA, wire_out, wire=wire, media_sources=[ipaddress.ip_network("127.0.0.0/8")])
    media = asyncio.create_task(leg.run_media())
    await asyncio.sleep(0.1)
    assert len(wire) == 1 and len(wire_out.sent) >= 3  # on the clock, sending
    media.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await media
    sent = len(wire_out.sent)
    await asyncio.sleep(0.1)
    assert len(wire) == 0 and len(wire_out.sent) == sent  # off the clock: nothing more goes out
