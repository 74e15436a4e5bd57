"""The SDP subset a G.711 UAS needs, and RFC 3264 offer/answer (spec §10).

``parse_sdp`` never raises; ``negotiate`` picks the first PCMU (or PCMA) format of the first usable audio
stream and the offer's telephone-event/8000 PT, keeping the offer's PT numbers (G5). ``build_answer`` writes
one ``m=`` line per offered line, refused ones with port 0 (RFC 3264 §6). ``build_offer`` serves the late-offer
case (§10.4) and our own caller.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from telephony_bridge.sip.inet import sdp_address

PCMU = "PCMU"
PCMA = "PCMA"
STATIC_PTS = {0: ("PCMU", 8000), 8: ("PCMA", 8000), 13: ("CN", 8000)}
DEFAULT_TELEPHONE_EVENT_PT = 101


class Direction(enum.Enum):
    SENDRECV = "sendrecv"
    SENDONLY = "sendonly"
    RECVONLY = "recvonly"
    INACTIVE = "inactive"

    def answer(self) -> Direction:
        """Our direction for an offer in this direction (§10.5)."""
        return {
            Direction.SENDONLY: Direction.RECVONLY,
            Direction.RECVONLY: Direction.SENDONLY,
        }.get(self, self)

    @property
    def we_send(self) -> bool:
        return self in (Direction.SENDRECV, Direction.SENDONLY)

    @property
    def we_receive(self) -> bool:
        return self in (Direction.SENDRECV, Direction.RECVONLY)


@dataclass(frozen=True, slots=True)
class Media:
    kind: str
    port: int
    proto: str
    formats: tuple[str, ...]
    connection: str | None = None
    rtpmap: dict[int, tuple[str, int]] = field(default_factory=dict)
    fmtp: dict[int, str] = field(default_factory=dict)
    direction: Direction = Direction.SENDRECV
    ptime_ms: int | None = None

    def encoding(self, pt: int) -> tuple[str, int] | None:
        """(NAME, rate) for a PT: the rtpmap wins, static PTs may lack one."""
        if pt in self.rtpmap:
            name, rate = self.rtpmap[pt]
            return name.upper(), rate
        return STATIC_PTS.get(pt)


@dataclass(frozen=True, slots=True)
class SessionDescription:
    origin: str
    connection: str | None
    media: tuple[Media, ...]
    direction: Direction = Direction.SENDRECV


@dataclass(frozen=True, slots=True)
class SdpError:
    reason: str


def parse_sdp(body: bytes) -> SessionDescription | SdpError:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return SdpError("SDP is not UTF-8")
    origin = ""
    connection: str | None = None
    session_direction = Direction.SENDRECV
    media: list[dict] = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.strip()
        if len(line) < 2 or line[1] != "=":
            continue
        kind, value = line[0], line[2:].strip()
        target = media[-1] if media else None
        if kind == "o":
            origin = value
        elif kind == "c":
            parts = value.split()
            address = parts[2].split("/")[0] if len(parts) >= 3 else None
            if target is None:
                connection = address
            else:
                target["connection"] = address
        elif kind == "m":
            parts = value.split()
            if len(parts) < 4 or not parts[1].split("/")[0].isdigit():
                return SdpError(f"expected 'm=<media> <port> <proto> <fmt>…', got {value[:40]!r}")
            media.append(
                {
                    "kind": parts[0],
                    "port": int(parts[1].split("/")[0]),
                    "proto": parts[2],
                    "formats": tuple(parts[3:]),
                    "rtpmap": {},
                    "fmtp": {},
                }
            )
        elif kind == "a":
            name, _, attr = value.partition(":")
            if name in {d.value for d in Direction}:
                if target is None:
                    session_direction = Direction(name)
                else:
                    target["direction"] = Direction(name)
            elif target is not None and name in ("rtpmap", "fmtp"):
                pt_text, _, rest = attr.partition(" ")
                if not pt_text.isdigit():
                    continue
                if name == "rtpmap":
                    enc = rest.strip().split("/")
                    if len(enc) >= 2 and enc[1].isdigit():
                        target["rtpmap"][int(pt_text)] = (enc[0], int(enc[1]))
                else:
                    target["fmtp"][int(pt_text)] = rest.strip()
            elif target is not None and name == "ptime" and attr.strip().isdigit():
                target["ptime_ms"] = int(attr.strip())
    if not media:
        return SdpError("no m= line")
    parsed = tuple(
        Media(**{"direction": m.pop("direction", session_direction), "connection": m.pop("connection", None), **m})
        for m in media
    )
    return SessionDescription(origin, connection, parsed, session_direction)


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The accepted audio stream: where to send, what to send, what we said."""

    index: int
    remote_host: str
    remote_port: int
    codec: str
    codec_pt: int
    telephone_event_pt: int | None
    direction: Direction  # ours, as written in the answer
    ptime_ms: int | None


def negotiate(offer: SessionDescription, *, allow_pcma: bool = True) -> Negotiated | SdpError:
    """Pick the audio stream and formats (§10.2); an ``SdpError`` is a ``488``."""
    for index, m in enumerate(offer.media):
        if m.kind != "audio" or m.port == 0:
            continue
        if m.proto.upper() != "RTP/AVP":
            continue  # SRTP and WebRTC profiles are not supported (§8.3)
        codec: tuple[str, int] | None = None
        event_pt: int | None = None
        for fmt in m.formats:
            if not fmt.isdigit():
                continue
            pt = int(fmt)
            enc = m.encoding(pt)
            if enc is None:
                continue
            if codec is None and enc in ((PCMU, 8000), (PCMA, 8000)) and (allow_pcma or enc[0] == PCMU):
                codec = (enc[0], pt)
            elif event_pt is None and enc == ("TELEPHONE-EVENT", 8000):
                event_pt = pt
        if codec is None:
            continue
        host = m.connection or offer.connection
        if not host:
            return SdpError("no c= line for the audio stream")
        direction = m.direction
        if host == "0.0.0.0":
            direction = Direction.INACTIVE  # the old way to say hold
        return Negotiated(index, host, m.port, codec[0], codec[1], event_pt, direction.answer(), m.ptime_ms)
    return SdpError("no PCMU/PCMA audio stream over RTP/AVP in the offer")


def _session_lines(session_id: int, version: int, host: str) -> list[str]:
    return [
        "v=0",
        f"o=telephony-bridge {session_id} {version} {sdp_address(host)}",
        "s=-",
        f"c={sdp_address(host)}",
        "t=0 0",
    ]


def _audio_lines(port: int, codecs: list[tuple[int, str]], event_pt: int | None, direction: Direction) -> list[str]:
    pts = [pt for pt, _ in codecs] + ([event_pt] if event_pt is not None else [])
    lines = [f"m=audio {port} RTP/AVP {' '.join(str(p) for p in pts)}"]
    lines += [f"a=rtpmap:{pt} {name}/8000" for pt, name in codecs]
    if event_pt is not None:
        lines += [f"a=rtpmap:{event_pt} telephone-event/8000", f"a=fmtp:{event_pt} 0-16"]
    lines += ["a=ptime:20", f"a={direction.value}"]
    return lines


def build_answer(
    offer: SessionDescription, chosen: Negotiated, *, host: str, port: int, session_id: int, version: int
) -> bytes:
    lines = _session_lines(session_id, version, host)
    for index, m in enumerate(offer.media):
        if index == chosen.index:
            lines += _audio_lines(port, [(chosen.codec_pt, chosen.codec)], chosen.telephone_event_pt, chosen.direction)
        else:
            lines.append(f"m={m.kind} 0 {m.proto} {' '.join(m.formats) or '0'}")
    return ("\r\n".join(lines) + "\r\n").encode()


def build_offer(
    *,
    host: str,
    port: int,
    session_id: int,
    version: int,
    direction: Direction = Direction.SENDRECV,
    allow_pcma: bool = True,
) -> bytes:
    codecs = [(0, PCMU), (8, PCMA)] if allow_pcma else [(0, PCMU)]
    lines = _session_lines(session_id, version, host)
    lines += _audio_lines(port, codecs, DEFAULT_TELEPHONE_EVENT_PT, direction)
    return ("\r\n".join(lines) + "\r\n").encode()


def sending_again(ours: bytes, version: int) -> bytes:
    """Our own last SDP (``build_answer``/``build_offer``'s) offered again with its direction ``sendrecv`` and the
    ``o=`` version ``version``: for a re-INVITE without SDP (a session refresh, a resume from hold), which gets
    our unchanged SDP unless a hold left it ``recvonly``/``inactive`` (§9). Codecs and payload types stay."""
    directions = {f"a={d.value}" for d in Direction}
    lines = ours.decode().split("\r\n")
    for i, line in enumerate(lines):
        if line in directions:
            lines[i] = f"a={Direction.SENDRECV.value}"
        elif line.startswith("o="):
            fields = line.split(" ")
            fields[2] = str(version)
            lines[i] = " ".join(fields)
    return "\r\n".join(lines).encode()
