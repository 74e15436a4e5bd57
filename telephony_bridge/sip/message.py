"""SIP messages without I/O (spec: sip-rtp.md §1 framing, §2 parsing, §3 responses; RFC 3261 §7, §18, §20).

``parse_datagram`` turns one UDP datagram into a ``Request``, a ``Response``, a ``KeepAlive`` or a
``Malformed(reason)``; ``StreamParser`` does the same for a TCP byte stream, delimited by Content-Length. Neither
ever raises for anything a peer can send. ``Malformed`` keeps the headers it managed to read, so a request with
a bad body can still be answered ``400`` on the right Via.

Headers are kept as ordered rows under their full canonical names (compact forms mapped first, folding undone).
``Headers.values(name)`` splits comma lists outside quotes and angle brackets, except the four authentication
headers, which are never joined or split (§7.3.1).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

MAX_MESSAGE_BYTES = 65536  # spec §2 limits: bigger is the peer's fault
MAX_HEADERS = 256
MAX_LINE_BYTES = 8192

COMPACT_FORMS = {
    "i": "Call-ID",
    "m": "Contact",
    "e": "Content-Encoding",
    "l": "Content-Length",
    "c": "Content-Type",
    "f": "From",
    "s": "Subject",
    "k": "Supported",
    "t": "To",
    "v": "Via",
    "x": "Session-Expires",
    "o": "Event",
    "u": "Allow-Events",
    "r": "Refer-To",
    "b": "Referred-By",
    "a": "Accept-Contact",
    "j": "Reject-Contact",
    "d": "Request-Disposition",
    "y": "Identity",
}
_CANONICAL = {
    name.lower(): name
    for name in (
        *COMPACT_FORMS.values(),
        "Accept",
        "Allow",
        "Authorization",
        "CSeq",
        "Max-Forwards",
        "Min-SE",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Record-Route",
        "Require",
        "Retry-After",
        "Route",
        "Server",
        "Unsupported",
        "User-Agent",
        "Warning",
        "WWW-Authenticate",
    )
}
_UNSPLIT = {"WWW-Authenticate", "Authorization", "Proxy-Authenticate", "Proxy-Authorization"}
MANDATORY_REQUEST_HEADERS = ("To", "From", "CSeq", "Call-ID", "Via")
_TOKEN = re.compile(r"^[A-Za-z0-9.!%*_+`'~-]+$")
_STATUS = re.compile(r"^SIP/2\.0 ([1-6][0-9][0-9]) ?(.*)$")
_REQUEST = re.compile(r"^([A-Za-z0-9.!%*_+`'~-]+) (\S+) SIP/2\.0$")


def canonical_name(name: str) -> str:
    """The full, conventionally capitalised header name for ``name`` (compact forms expanded)."""
    stripped = name.strip()
    if len(stripped) == 1:
        full = COMPACT_FORMS.get(stripped.lower())
        if full is not None:
            return full
    return _CANONICAL.get(stripped.lower(), "-".join(part.capitalize() for part in stripped.split("-")))


def split_list(value: str) -> list[str]:
    """Split a header value on commas outside ``"quoted strings"`` and ``<angle brackets>``; empties dropped."""
    parts: list[str] = []
    depth_angle = False
    quoted = False
    escaped = False
    start = 0
    for i, ch in enumerate(value):
        if escaped:
            escaped = False
        elif quoted:
            if ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            depth_angle = True
        elif ch == ">":
            depth_angle = False
        elif ch == "," and not depth_angle:
            parts.append(value[start:i])
            start = i + 1
    parts.append(value[start:])
    return [p.strip() for p in parts if p.strip()]


@dataclass(frozen=True, slots=True)
class Headers:
    """Ordered header rows, names canonical. Immutable: ``with_*`` methods return a copy."""

    rows: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, rows: Iterable[tuple[str, str]]) -> Headers:
        return cls(tuple((canonical_name(n), v) for n, v in rows))

    def get(self, name: str) -> str | None:
        """The first row's value, or None."""
        key = canonical_name(name)
        for n, v in self.rows:
            if n == key:
                return v
        return None

    def values(self, name: str) -> list[str]:
        """Every value of ``name`` in order: rows split on list commas (never for the auth headers)."""
        key = canonical_name(name)
        found = [v for n, v in self.rows if n == key]
        if key in _UNSPLIT:
            return found
        return [part for v in found for part in split_list(v)]

    def has(self, name: str) -> bool:
        key = canonical_name(name)
        return any(n == key for n, _ in self.rows)

    def tokens(self, name: str) -> set[str]:
        """Lower-cased option tags of a list header such as Supported or Require."""
        return {v.lower() for v in self.values(name)}

    def without(self, *names: str) -> Headers:
        keys = {canonical_name(n) for n in names}
        return Headers(tuple((n, v) for n, v in self.rows if n not in keys))

    def with_rows(self, *rows: tuple[str, str]) -> Headers:
        return Headers(self.rows + tuple((canonical_name(n), v) for n, v in rows))

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.rows)


class _Identified:
    """Call-ID and CSeq, read the same way from requests and responses."""

    __slots__ = ()
    headers: Headers

    @property
    def call_id(self) -> str:
        return self.headers.get("Call-ID") or ""

    @property
    def cseq(self) -> tuple[int, str]:
        return parse_cseq(self.headers.get("CSeq") or "") or (0, "")


@dataclass(frozen=True, slots=True)
class Request(_Identified):
    method: str
    uri: str
    headers: Headers
    body: bytes = b""

    def to_bytes(self) -> bytes:
        return _serialise(f"{self.method} {self.uri} SIP/2.0", self.headers, self.body)


@dataclass(frozen=True, slots=True)
class Response(_Identified):
    status: int
    reason: str
    headers: Headers
    body: bytes = b""

    def to_bytes(self) -> bytes:
        return _serialise(f"SIP/2.0 {self.status} {self.reason}", self.headers, self.body)


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """CRLF keep-alives (RFC 5626 §3.5.1): ``pong`` is True for a CRLFCRLF ping on a stream, answered by CRLF."""

    pong: bool = False


@dataclass(frozen=True, slots=True)
class Malformed:
    """What a peer sent that we cannot use; ``request`` holds the start line and headers when those parsed, so a
    ``400`` can still be sent to the right place; ``fatal`` means a stream lost its framing (close it)."""

    reason: str
    request: Request | None = None
    fatal: bool = False


Message = Request | Response
Parsed = Request | Response | KeepAlive | Malformed


def _serialise(start: str, headers: Headers, body: bytes) -> bytes:
    lines = [start]
    lines.extend(f"{n}: {v}" for n, v in headers.rows if n != "Content-Length")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


def parse_cseq(value: str) -> tuple[int, str] | None:
    parts = value.split()
    if len(parts) != 2 or not parts[0].isdigit() or len(parts[0]) > 10:
        return None
    number = int(parts[0])
    if number >= 2**31 or not _TOKEN.match(parts[1]):
        return None
    return number, parts[1]


def _parse_head(head: str) -> tuple[str, list[tuple[str, str]]] | str:
    """Start line and unfolded header rows, or a reason string."""
    lines = head.replace("\r\n", "\n").split("\n")
    while lines and not lines[0].strip():  # CRLFs before a start line are ignored (§7.5)
        lines.pop(0)
    if not lines:
        return "empty message"
    start = lines[0].strip()
    rows: list[tuple[str, str]] = []
    for line in lines[1:]:
        if len(line) > MAX_LINE_BYTES:
            return f"header line longer than {MAX_LINE_BYTES} bytes"
        if not line.strip():
            continue
        if line[0] in " \t":  # folding: continuation of the previous header (§7.3.1)
            if not rows:
                return "continuation line before any header"
            name, value = rows[-1]
            rows[-1] = (name, f"{value} {line.strip()}".strip())
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or not _TOKEN.match(name.strip()):
            return f"expected 'Name: value', got {line[:40]!r}"
        rows.append((canonical_name(name), value.strip()))
        if len(rows) > MAX_HEADERS:
            return f"more than {MAX_HEADERS} headers"
    return start, rows


def _build(head: str, body: bytes, *, stream: bool) -> Parsed:
    parsed = _parse_head(head)
    if isinstance(parsed, str):
        return Malformed(parsed)
    start, rows = parsed
    headers = Headers(tuple(rows))
    if start.startswith("SIP/"):
        status = _STATUS.match(start)
        if status is None:
            return Malformed(f"expected 'SIP/2.0 code reason', got {start[:40]!r}")
        message: Message = Response(int(status.group(1)), status.group(2), headers)
    else:
        request = _REQUEST.match(start)
        if request is None:
            return Malformed(f"expected 'METHOD uri SIP/2.0', got {start[:40]!r}")
        message = Request(request.group(1), request.group(2), headers)
    return _with_body(message, body, stream=stream)


def _with_body(message: Message, body: bytes, *, stream: bool) -> Parsed:
    partial = message if isinstance(message, Request) else None
    length_text = message.headers.get("Content-Length")
    if length_text is None:
        if stream:
            return Malformed("Content-Length is mandatory on a stream", partial, fatal=True)
        length = len(body)  # UDP: the datagram ends the body
    elif not length_text.isdigit():
        return Malformed(f"expected a number in Content-Length, got {length_text[:20]!r}", partial, fatal=stream)
    else:
        length = int(length_text)
    if length > len(body):
        return Malformed(f"Content-Length {length} exceeds the {len(body)} body bytes", partial)
    if isinstance(message, Request):
        missing = [h for h in MANDATORY_REQUEST_HEADERS if not message.headers.has(h)]
        if missing:
            return Malformed(f"missing mandatory header(s) {', '.join(missing)}", partial)
        cseq = parse_cseq(message.headers.get("CSeq") or "")
        if cseq is None:
            return Malformed(f"expected 'number METHOD' in CSeq, got {message.headers.get('CSeq')!r}", partial)
        if cseq[1] != message.method and message.method not in ("ACK", "CANCEL"):
            return Malformed(f"CSeq method {cseq[1]!r} differs from {message.method!r}", partial)
        return Request(message.method, message.uri, message.headers, body[:length])
    return Response(message.status, message.reason, message.headers, body[:length])


def _split_head(data: bytes) -> tuple[bytes, bytes] | None:
    """Head and rest at the first blank line (CRLFCRLF, or bare LFs from hand-made tools)."""
    crlf = data.find(b"\r\n\r\n")
    lf = data.find(b"\n\n")
    if crlf < 0 and lf < 0:
        return None
    if lf < 0 or (0 <= crlf < lf):
        return data[:crlf], data[crlf + 4 :]
    return data[:lf], data[lf + 2 :]


def _decode(head: bytes) -> str | None:
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError:
        return None


def parse_datagram(data: bytes) -> Parsed:
    """One UDP datagram: bytes beyond Content-Length are dropped; a short body is ``Malformed`` (§18.3)."""
    if len(data) > MAX_MESSAGE_BYTES:
        return Malformed(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    if not data.strip(b"\r\n\x00 \t"):
        return KeepAlive()
    split = _split_head(data.lstrip(b"\r\n"))
    if split is None:
        # Headers with no blank line: accept a message whose last header ends the datagram.
        split = (data.lstrip(b"\r\n").rstrip(b"\r\n"), b"")
    head, body = split
    text = _decode(head)
    if text is None:
        return Malformed("header bytes are not UTF-8")
    return _build(text, body, stream=False)


@dataclass
class StreamParser:
    """Messages out of a TCP byte stream, delimited by Content-Length (§18.3). After a ``fatal`` Malformed
    the stream cannot be resynchronised: the driver closes the connection."""

    _buffer: bytearray = field(default_factory=bytearray)
    _broken: bool = False

    def feed(self, data: bytes) -> list[Parsed]:
        if self._broken:
            return []
        self._buffer += data
        out: list[Parsed] = []
        while True:
            item = self._next()
            if item is None:
                break
            out.append(item)
            if isinstance(item, Malformed) and item.fatal:
                self._broken = True
                self._buffer.clear()
                break
        return out

    def _next(self) -> Parsed | None:
        buf = self._buffer
        if buf.startswith(b"\r\n\r\n"):
            del buf[:4]
            return KeepAlive(pong=True)
        while buf.startswith(b"\r\n") and len(buf) >= 4:
            del buf[:2]
        if buf in (b"\r\n", b"\n"):
            return None
        split = _split_head(bytes(buf))
        if split is None:
            if len(buf) > MAX_MESSAGE_BYTES:
                return Malformed(f"no end of headers within {MAX_MESSAGE_BYTES} bytes", fatal=True)
            return None
        head, rest = split
        text = _decode(head)
        if text is None:
            return Malformed("header bytes are not UTF-8", fatal=True)
        head_only = _build(text, b"", stream=True)
        if isinstance(head_only, Malformed) and head_only.fatal:
            return head_only
        length_text = _header_in(text, "Content-Length")
        length = int(length_text) if length_text and length_text.isdigit() else 0
        if len(head) + length > MAX_MESSAGE_BYTES:
            return Malformed(f"Content-Length {length} exceeds {MAX_MESSAGE_BYTES}", fatal=True)
        if len(rest) < length:
            return None
        consumed = len(buf) - len(rest) + length
        message = _build(text, rest[:length], stream=True)
        del buf[:consumed]
        return message


def _header_in(head: str, name: str) -> str | None:
    parsed = _parse_head(head)
    if isinstance(parsed, str):
        return None
    return Headers(tuple(parsed[1])).get(name)
