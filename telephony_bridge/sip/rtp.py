"""RTP packets and the two per-call streams (spec §11; RFC 3550, RFC 3551).

``parse_rtp``/``RtpPacket.to_bytes`` are the header codec (padding, extension and CSRCs skipped on input).
``RtpSender`` stamps our outbound 20 ms frames: random SSRC/sequence/timestamp, continuous across pauses and AI
reconnects, marker on the first packet after a pause (G6). ``RtpReceiver`` orders the peer's packets by
extended sequence in a small reorder buffer, fills gaps by *timestamp* (so 10/20/30 ms packets work, G14),
resets on an SSRC change or a timestamp jump, and keeps RFC 3550 jitter, loss and late counts. Pure: the
arrival time is passed in, never read.
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass

RTP_VERSION = 2
RTP_HEADER = struct.Struct("!BBHII")
CLOCK_HZ = 8000
FRAME_SAMPLES = 160  # 20 ms at 8 kHz
MAX_DROPOUT = 3000  # RFC 3550 A.1
MAX_MISORDER = 100
MAX_FILL_SAMPLES = CLOCK_HZ  # a gap beyond 1 s is a jump, not loss: reset instead of playing a second of silence


@dataclass(frozen=True, slots=True)
class RtpPacket:
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes
    marker: bool = False

    def to_bytes(self) -> bytes:
        return (
            RTP_HEADER.pack(
                RTP_VERSION << 6,
                (0x80 if self.marker else 0) | (self.payload_type & 0x7F),
                self.sequence & 0xFFFF,
                self.timestamp & 0xFFFFFFFF,
                self.ssrc & 0xFFFFFFFF,
            )
            + self.payload
        )


def parse_rtp(data: bytes) -> RtpPacket | None:
    """An RTP packet, or None for anything that is not one (RTCP, garbage, a short datagram)."""
    if len(data) < RTP_HEADER.size:
        return None
    b0, b1, seq, ts, ssrc = RTP_HEADER.unpack_from(data)
    if b0 >> 6 != RTP_VERSION:
        return None
    pt = b1 & 0x7F
    if 72 <= pt <= 76:  # RTCP SR/RR/SDES/BYE/APP on a muxed port
        return None
    offset = RTP_HEADER.size + 4 * (b0 & 0x0F)
    end = len(data)
    if b0 & 0x20:  # padding: the last byte counts it
        if end == 0 or data[-1] == 0 or data[-1] > end - offset:
            return None
        end -= data[-1]
    if b0 & 0x10:  # extension: 4-byte header then 4·length bytes
        if end < offset + 4:
            return None
        (length,) = struct.unpack_from("!H", data, offset + 2)
        offset += 4 + 4 * length
    if offset > end:
        return None
    return RtpPacket(pt, seq, ts, ssrc, data[offset:end], bool(b1 & 0x80))


class RtpSender:
    """Stamps outbound packets. ``packet(payload, pt, at_samples)`` takes the media time of the payload on our
    own 8 kHz timeline, so a pause (hold, nothing to send) advances the timestamp by the time that passed."""

    def __init__(self, *, ssrc: int | None = None, sequence: int | None = None, timestamp: int | None = None) -> None:
        self.ssrc = ssrc if ssrc is not None else secrets.randbits(32)
        self._sequence = sequence if sequence is not None else secrets.randbits(16)
        self._base_ts = timestamp if timestamp is not None else secrets.randbits(32)
        self._next_samples: int | None = None
        self.packets = 0
        self.octets = 0

    def packet(self, payload: bytes, payload_type: int, at_samples: int) -> RtpPacket:
        marker = self._next_samples is None or at_samples != self._next_samples
        pkt = RtpPacket(
            payload_type, self._sequence, (self._base_ts + at_samples) & 0xFFFFFFFF, self.ssrc, payload, marker
        )
        self._sequence = (self._sequence + 1) & 0xFFFF
        self._next_samples = at_samples + len(payload)
        self.packets += 1
        self.octets += len(payload)
        return pkt

    def event(self, payload: bytes, payload_type: int, event_start_samples: int, *, marker: bool) -> RtpPacket:
        """An RFC 4733 packet: the event's start timestamp, its own marker; the audio timeline is untouched."""
        pkt = RtpPacket(
            payload_type, self._sequence, (self._base_ts + event_start_samples) & 0xFFFFFFFF, self.ssrc, payload, marker
        )
        self._sequence = (self._sequence + 1) & 0xFFFF
        self.packets += 1
        self.octets += len(payload)
        self._next_samples = None  # audio after an event starts a new talkspurt
        return pkt

    def timestamp_at(self, at_samples: int) -> int:
        return (self._base_ts + at_samples) & 0xFFFFFFFF


@dataclass
class ReceiverStats:
    received: int = 0
    lost: int = 0  # packets never seen by the time the playout point passed them
    late: int = 0  # arrived after their place was played, or duplicates
    resets: int = 0  # SSRC changes and timestamp/sequence jumps
    filled_samples: int = 0
    jitter_samples: float = 0.0  # RFC 3550 A.8, in timestamp units

    @property
    def jitter_ms(self) -> float:
        return self.jitter_samples / (CLOCK_HZ / 1000)


class RtpReceiver:
    """One audio stream in, bytes out in timestamp order. ``push`` returns the payload bytes now due (possibly
    preceded by ``silence`` for lost packets); ``depth`` packets are held to absorb reordering."""

    def __init__(self, *, silence: int = 0xFF, depth: int = 3) -> None:
        self._silence = silence
        self._depth = depth
        self.stats = ReceiverStats()
        self._reset_stream(None)

    def _reset_stream(self, ssrc: int | None) -> None:
        self._ssrc = ssrc
        self._max_ext: int | None = None  # highest extended sequence seen
        self._played_ext: int | None = None  # extended sequence of the last packet played
        self._next_ts: int | None = None  # timestamp expected for the next sample played
        self._pending: dict[int, RtpPacket] = {}
        self._transit: float | None = None

    def _extend(self, seq: int) -> int | None:
        """Extended sequence for ``seq``, or None for a restart (RFC 3550 A.1, simplified)."""
        if self._max_ext is None:
            return seq
        delta = (seq - self._max_ext) & 0xFFFF
        if delta < MAX_DROPOUT:
            return self._max_ext + delta
        back = (self._max_ext - seq) & 0xFFFF
        if back <= MAX_MISORDER:
            return self._max_ext - back
        return None

    def push(self, packet: RtpPacket, arrival_s: float) -> bytes:
        if packet.ssrc != self._ssrc:
            if self._ssrc is not None:
                self.stats.resets += 1
            out = self.flush()
            self._reset_stream(packet.ssrc)
            return out + self._accept(packet, arrival_s)
        return self._accept(packet, arrival_s)

    def _accept(self, packet: RtpPacket, arrival_s: float) -> bytes:
        ext = self._extend(packet.sequence)
        if ext is None:  # a jump: the peer restarted its sequence
            self.stats.resets += 1
            out = self.flush()
            self._reset_stream(packet.ssrc)
            return out + self._accept(packet, arrival_s)
        if (self._played_ext is not None and ext <= self._played_ext) or ext in self._pending:
            self.stats.late += 1
            return b""
        self.stats.received += 1
        self._update_jitter(packet.timestamp, arrival_s)
        self._max_ext = ext if self._max_ext is None else max(self._max_ext, ext)
        self._pending[ext] = packet
        out = bytearray()
        while len(self._pending) > self._depth:
            out += self._play(min(self._pending))
        return bytes(out)

    @property
    def ssrc(self) -> int | None:
        return self._ssrc

    @property
    def pending(self) -> bool:
        """Packets are held waiting for a missing one."""
        return bool(self._pending)

    def flush(self) -> bytes:
        """Everything held, in order (end of call, or before a reset)."""
        out = bytearray()
        while self._pending:
            out += self._play(min(self._pending))
        return bytes(out)

    def _play(self, ext: int) -> bytes:
        packet = self._pending.pop(ext)
        if self._played_ext is not None:
            self.stats.lost += max(0, ext - self._played_ext - 1)
        self._played_ext = ext
        out = b""
        if self._next_ts is not None:
            gap = (packet.timestamp - self._next_ts) & 0xFFFFFFFF
            if gap >= 0x80000000:  # behind the playout point: keep only the new tail
                overlap = 0x100000000 - gap
                payload = packet.payload[overlap:]
                self._next_ts = (self._next_ts + len(payload)) & 0xFFFFFFFF
                return payload
            if gap > MAX_FILL_SAMPLES:  # a timestamp jump: restart the timeline, do not play seconds of silence
                self.stats.resets += 1
            elif gap:
                out = bytes([self._silence]) * gap
                self.stats.filled_samples += gap
        self._next_ts = (packet.timestamp + len(packet.payload)) & 0xFFFFFFFF
        return out + packet.payload

    def _update_jitter(self, timestamp: int, arrival_s: float) -> None:
        transit = arrival_s * CLOCK_HZ - timestamp
        if self._transit is not None:
            d = abs(transit - self._transit)
            if d < 0x80000000:  # ignore wraps and jumps
                self.stats.jitter_samples += (d - self.stats.jitter_samples) / 16
        self._transit = transit
