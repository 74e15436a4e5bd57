"""Minimal RTCP (spec §11.5; RFC 3550 §6): a compound SR + SDES CNAME every ~5 s, SR + BYE at the end, and
enough parsing of what peers send to tell RTCP from RTP and read their reports for metrics. Pure."""

from __future__ import annotations

import struct
from dataclasses import dataclass

SR = 200
RR = 201
SDES = 202
BYE = 203
_NTP_EPOCH_OFFSET_S = 2208988800  # 1900-01-01 to 1970-01-01
INTERVAL_S = 5.0


def _ntp(wall_s: float) -> tuple[int, int]:
    seconds = int(wall_s) + _NTP_EPOCH_OFFSET_S
    fraction = int((wall_s - int(wall_s)) * 2**32) & 0xFFFFFFFF
    return seconds & 0xFFFFFFFF, fraction


def _header(count: int, packet_type: int, body_len: int) -> bytes:
    return struct.pack("!BBH", 0x80 | count, packet_type, (4 + body_len) // 4 - 1)


def sender_report(ssrc: int, *, wall_s: float, rtp_timestamp: int, packets: int, octets: int) -> bytes:
    sec, frac = _ntp(wall_s)
    body = struct.pack("!IIIIII", ssrc, sec, frac, rtp_timestamp & 0xFFFFFFFF, packets, octets & 0xFFFFFFFF)
    return _header(0, SR, len(body)) + body


def sdes_cname(ssrc: int, cname: str) -> bytes:
    text = cname.encode()[:255]
    item = struct.pack("!IBB", ssrc, 1, len(text)) + text + b"\x00"  # CNAME item, then the end-of-list null
    item += b"\x00" * (-len(item) % 4)
    return _header(1, SDES, len(item)) + item


def goodbye(ssrc: int) -> bytes:
    body = struct.pack("!I", ssrc)
    return _header(1, BYE, len(body)) + body


def compound_report(ssrc: int, cname: str, *, wall_s: float, rtp_timestamp: int, packets: int, octets: int) -> bytes:
    return sender_report(ssrc, wall_s=wall_s, rtp_timestamp=rtp_timestamp, packets=packets, octets=octets) + sdes_cname(
        ssrc, cname
    )


@dataclass(frozen=True, slots=True)
class RtcpPacket:
    packet_type: int
    count: int
    body: bytes


def parse_rtcp(data: bytes) -> list[RtcpPacket] | None:
    """The packets of a compound RTCP datagram, or None if it is not RTCP."""
    out: list[RtcpPacket] = []
    offset = 0
    while offset + 4 <= len(data):
        b0, packet_type, length = struct.unpack_from("!BBH", data, offset)
        if b0 >> 6 != 2 or not 192 <= packet_type <= 223:
            return None
        end = offset + 4 * (length + 1)
        if end > len(data):
            return None
        out.append(RtcpPacket(packet_type, b0 & 0x1F, data[offset + 4 : end]))
        offset = end
    return out if out and offset == len(data) else None
