"""SDP offer/answer, RTP send/receive, RFC 4733 DTMF and RTCP, all pure (spec §10–§12)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from telephony_bridge.audio.alaw import ALAW_SILENCE, alaw_to_pcm16, alaw_to_ulaw, ulaw_to_alaw
from telephony_bridge.sip import rtcp
from telephony_bridge.sip.dtmf import DtmfReceiver, event_payloads, parse_event
from telephony_bridge.sip.message import Request, parse_datagram
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
from tests.test_codec import _audioop

DATA = Path(__file__).parent / "data" / "sip"


def offer_from_invite() -> SessionDescription:
    msg = parse_datagram((DATA / "invite.sip").read_bytes())
    assert isinstance(msg, Request)
    sdp = parse_sdp(msg.body)
    assert isinstance(sdp, SessionDescription)
    return sdp


def test_negotiate_pcmu_and_the_offers_event_pt() -> None:
    chosen = negotiate(offer_from_invite())
    assert not isinstance(chosen, SdpError)
    assert (chosen.codec, chosen.codec_pt, chosen.telephone_event_pt) == ("PCMU", 0, 101)
    assert (chosen.remote_host, chosen.remote_port, chosen.direction) == ("198.51.100.7", 30000, Direction.SENDRECV)


def test_answer_keeps_m_lines_refuses_video_and_picks_event_at_8000() -> None:
    offer = parse_sdp((DATA / "offer_video_first.sdp").read_bytes())
    assert isinstance(offer, SessionDescription)
    chosen = negotiate(offer)
    assert not isinstance(chosen, SdpError)
    # G.729 (18) skipped, telephone-event/48000 (96) ignored, the 8000 one (100) taken (G5); media-level c= wins
    assert (chosen.index, chosen.codec_pt, chosen.telephone_event_pt) == (1, 0, 100)
    assert chosen.remote_host == "198.51.100.70" and chosen.ptime_ms == 30
    assert chosen.direction is Direction.RECVONLY  # the peer is sendonly (holding us)
    answer = build_answer(offer, chosen, host="203.0.113.5", port=20000, session_id=42, version=1).decode()
    lines = answer.split("\r\n")
    assert lines[5] == "m=video 0 RTP/AVP 96"
    assert "m=audio 20000 RTP/AVP 0 100" in lines and "a=rtpmap:100 telephone-event/8000" in lines
    assert "a=recvonly" in lines and "c=IN IP4 203.0.113.5" in lines
    again = parse_sdp(answer.encode())
    assert isinstance(again, SessionDescription) and [m.port for m in again.media] == [0, 20000]
    over_ipv6 = build_answer(offer, chosen, host="2001:db8::5", port=20000, session_id=42, version=1).decode()
    assert "c=IN IP6 2001:db8::5" in over_ipv6.split("\r\n") and " IN IP6 2001:db8::5\r\n" in over_ipv6  # o= too


def test_srtp_only_offer_is_refused_for_a_488() -> None:
    offer = parse_sdp((DATA / "invite_srtp_only.sdp").read_bytes())
    assert isinstance(offer, SessionDescription)
    assert isinstance(negotiate(offer), SdpError)


def test_pcma_only_when_allowed_and_hold_address() -> None:
    body = b"v=0\r\nc=IN IP4 0.0.0.0\r\nm=audio 4000 RTP/AVP 8\r\n"
    offer = parse_sdp(body)
    assert isinstance(offer, SessionDescription)
    assert isinstance(negotiate(offer, allow_pcma=False), SdpError)
    chosen = negotiate(offer)
    assert not isinstance(chosen, SdpError)
    assert (chosen.codec, chosen.direction) == ("PCMA", Direction.INACTIVE)


def test_bad_sdp_is_a_value() -> None:
    assert isinstance(parse_sdp(b"\xff\xfe"), SdpError)
    assert isinstance(parse_sdp(b"v=0\r\n"), SdpError)
    assert isinstance(parse_sdp(b"v=0\r\nm=audio x RTP/AVP 0\r\n"), SdpError)
    no_c = parse_sdp(b"v=0\r\nm=audio 5 RTP/AVP 0\r\n")
    assert isinstance(no_c, SessionDescription) and isinstance(negotiate(no_c), SdpError)


def test_offer_round_trips_through_negotiate() -> None:
    offer = parse_sdp(build_offer(host="127.0.0.1", port=30000, session_id=1, version=1))
    assert isinstance(offer, SessionDescription)
    chosen = negotiate(offer)
    assert not isinstance(chosen, SdpError) and (chosen.codec_pt, chosen.telephone_event_pt) == (0, 101)


def test_rtp_packet_round_trip_and_skips_csrc_extension_padding() -> None:
    pkt = RtpPacket(0, 65535, 2**32 - 1, 0xDEADBEEF, b"\x01" * 160, marker=True)
    assert parse_rtp(pkt.to_bytes()) == pkt
    header = bytes([0x80 | 0x20 | 0x10 | 0x01, 0x00]) + pkt.to_bytes()[2:12]
    raw = header + b"CSRC" + b"\xbe\xde\x00\x01" + b"EXT!" + b"\x02" * 160 + b"\x00\x00\x03"
    parsed = parse_rtp(raw)
    assert parsed is not None and parsed.payload == b"\x02" * 160
    assert parse_rtp(b"\x80") is None and parse_rtp(b"\x00" * 20) is None
    assert parse_rtp(rtcp.goodbye(1)) is None  # RTCP on a muxed port is not audio


def test_sender_is_continuous_with_marker_after_pause() -> None:
    sender = RtpSender(ssrc=7, sequence=65534, timestamp=2**32 - 160)
    a = sender.packet(b"\xff" * 160, 0, 0)
    b = sender.packet(b"\xff" * 160, 0, 160)
    c = sender.packet(b"\xff" * 160, 0, 800)  # 80 ms pause (hold, or the AI reconnecting)
    assert [(p.sequence, p.timestamp, p.marker, p.ssrc) for p in (a, b, c)] == [
        (65534, 2**32 - 160, True, 7),
        (65535, 0, False, 7),
        (0, 640, True, 7),
    ]


def packets(ptime_samples: int, count: int, *, ssrc: int = 1, seq: int = 100, ts: int = 5000) -> list[RtpPacket]:
    return [
        RtpPacket(0, (seq + i) & 0xFFFF, ts + i * ptime_samples, ssrc, bytes([i % 200]) * ptime_samples)
        for i in range(count)
    ]


def run(receiver: RtpReceiver, pkts: list[RtpPacket]) -> bytes:
    out = b"".join(receiver.push(p, 0.02 * i) for i, p in enumerate(pkts))
    return out + receiver.flush()


def test_receiver_in_order_equals_payloads_for_10_20_30_ms() -> None:
    for samples in (80, 160, 240):
        pkts = packets(samples, 20)
        assert run(RtpReceiver(), pkts) == b"".join(p.payload for p in pkts)


def test_receiver_reorders_within_the_buffer() -> None:
    pkts = packets(160, 10)
    shuffled = [pkts[0], pkts[2], pkts[1], pkts[3], pkts[5], pkts[4], *pkts[6:]]
    receiver = RtpReceiver()
    assert run(receiver, shuffled) == b"".join(p.payload for p in pkts)
    assert receiver.stats.lost == 0 and receiver.stats.late == 0


def test_receiver_fills_loss_by_timestamp_and_counts() -> None:
    pkts = packets(240, 10)
    kept = pkts[:3] + pkts[5:]
    receiver = RtpReceiver()
    out = run(receiver, kept)
    assert len(out) == 240 * 10
    assert out[720:1200] == b"\xff" * 480
    assert receiver.stats.lost == 2 and receiver.stats.filled_samples == 480


def test_receiver_drops_late_and_duplicates() -> None:
    pkts = packets(160, 10)
    receiver = RtpReceiver(depth=1)
    out = run(receiver, [*pkts[:6], pkts[1], pkts[5], *pkts[6:]])
    assert out == b"".join(p.payload for p in pkts)
    assert receiver.stats.late == 2


def test_receiver_resets_on_ssrc_change_and_timestamp_jump() -> None:
    first = packets(160, 5, ssrc=1)
    second = packets(160, 5, ssrc=2, seq=40000, ts=9_000_000)  # new SSRC, unrelated seq and ts (G6)
    receiver = RtpReceiver()
    out = run(receiver, first + second)
    assert out == b"".join(p.payload for p in first + second)  # no stall, no seconds of silence
    assert receiver.stats.resets == 1
    jump = packets(160, 3, ssrc=1) + packets(160, 3, ssrc=1, seq=103, ts=5000 + 8000 * 60)
    receiver = RtpReceiver()
    assert len(run(receiver, jump)) == 160 * 6 and receiver.stats.resets == 1


def test_receiver_sequence_wrap_is_not_a_reset() -> None:
    pkts = packets(160, 10, seq=65530)
    receiver = RtpReceiver()
    assert run(receiver, pkts) == b"".join(p.payload for p in pkts) and receiver.stats.resets == 0


def test_receiver_jitter_is_zero_for_a_steady_stream_and_grows_with_wobble() -> None:
    steady = RtpReceiver()
    for i, p in enumerate(packets(160, 50)):
        steady.push(p, 1.0 + 0.02 * i)
    assert steady.stats.jitter_ms < 0.01
    wobbly = RtpReceiver()
    for i, p in enumerate(packets(160, 50)):
        wobbly.push(p, 1.0 + 0.02 * i + (0.01 if i % 2 else 0.0))
    assert 5 < wobbly.stats.jitter_ms <= 10


def test_dtmf_one_digit_per_event_from_any_ssrc() -> None:
    receiver = DtmfReceiver()
    digits = []
    for ts, digit, ssrc in ((1000, "1", 5), (3000, "#", 99)):  # the second from a replayed capture's SSRC (G13)
        for payload in event_payloads(digit):
            got = receiver.push(ssrc, ts, payload)
            if got:
                digits.append(got)
    assert digits == ["1", "#"] and receiver.digits == 2


def test_dtmf_payloads_follow_rfc4733() -> None:
    payloads = [parse_event(p) for p in event_payloads("5", duration_samples=640)]
    assert [(e.event, e.end, e.duration) for e in payloads if e] == [
        (5, False, 160),
        (5, False, 320),
        (5, False, 480),
        (5, True, 640),
        (5, True, 640),
        (5, True, 640),
    ]
    assert parse_event(b"\x01") is None


def test_rtcp_compound_and_bye_parse() -> None:
    report = rtcp.compound_report(7, "bridge@host", wall_s=1_700_000_000.5, rtp_timestamp=1, packets=2, octets=320)
    parsed = rtcp.parse_rtcp(report)
    assert parsed is not None and [p.packet_type for p in parsed] == [rtcp.SR, rtcp.SDES]
    assert len(report) % 4 == 0
    bye = rtcp.parse_rtcp(rtcp.goodbye(7))
    assert bye is not None and bye[0].packet_type == rtcp.BYE
    assert rtcp.parse_rtcp(RtpPacket(0, 1, 1, 1, b"x" * 160).to_bytes()) is None


def test_alaw_matches_the_stdlib_reference_and_transcodes_to_ulaw() -> None:
    audioop = _audioop()
    every = bytes(range(256))
    assert alaw_to_pcm16(every).astype("<i2").tobytes() == audioop.alaw2lin(every, 2)
    pcm = np.arange(-32768, 32768, 3, dtype=np.int32).astype("<i2").tobytes()
    ulaw = audioop.lin2ulaw(pcm, 2)
    assert ulaw_to_alaw(ulaw) == audioop.lin2alaw(audioop.ulaw2lin(ulaw, 2), 2)
    assert alaw_to_ulaw(bytes([ALAW_SILENCE])) in (b"\xff", b"\xfe")  # near-zero either way


def test_receiver_takes_empty_event_placeholders_without_loss_or_audio() -> None:
    pkts = packets(160, 6)
    events = [RtpPacket(101, p.sequence, p.timestamp, p.ssrc, b"") for p in pkts[2:4]]
    receiver = RtpReceiver()
    out = run(receiver, [*pkts[:2], *events, *pkts[4:]])
    assert receiver.stats.lost == 0
    assert out == pkts[0].payload + pkts[1].payload + b"\xff" * 320 + pkts[4].payload + pkts[5].payload
