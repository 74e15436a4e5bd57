"""SIP header values with structure: name-addr (From, To, Contact, Route), Via, URIs (RFC 3261 §19.1, §20, §25).

Pure string functions. The one trap (spec §2): in ``<sip:a@b;x=1>;tag=9`` the ``x`` belongs to the URI and
``tag`` to the header; without brackets every parameter after the URI is a header parameter.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

BRANCH_COOKIE = "z9hG4bK"


def parse_params(text: str) -> dict[str, str]:
    """``;a=1;b;c="x y"`` → ``{'a': '1', 'b': '', 'c': 'x y'}``; names lower-cased."""
    params: dict[str, str] = {}
    for part in split_outside_quotes(text, ";"):
        name, _, value = part.partition("=")
        if name.strip():
            params[name.strip().lower()] = value.strip().strip('"')
    return params


def format_params(params: dict[str, str]) -> str:
    return "".join(f";{k}={v}" if v != "" else f";{k}" for k, v in params.items())


def split_outside_quotes(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes; blank parts dropped."""
    parts: list[str] = []
    quoted = False
    start = 0
    for i, ch in enumerate(text):
        if ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


@dataclass(frozen=True, slots=True)
class Uri:
    """``sip:user@host:port;params``. ``host`` keeps IPv6 brackets off; ``port`` None means the default."""

    scheme: str
    user: str
    host: str
    port: int | None = None
    params: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port is not None else ""
        return f"{self.scheme}:{user}{host}{port}{format_params(self.params)}"

    @property
    def transport(self) -> str:
        return self.params.get("transport", "udp").lower()


def parse_uri(text: str) -> Uri | None:
    """A sip:/sips: URI, or None. Headers after ``?`` are ignored."""
    scheme, sep, rest = text.strip().partition(":")
    if not sep or scheme.lower() not in ("sip", "sips"):
        return None
    rest = rest.split("?", 1)[0]
    user = ""
    if "@" in rest:
        user, _, rest = rest.rpartition("@")
    hostport, _, params = rest.partition(";")
    if hostport.startswith("["):
        host, _, tail = hostport[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_text = hostport.partition(":")
    if not host:
        return None
    port: int | None = None
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return None
        port = int(port_text)
    return Uri(scheme.lower(), user, host, port, parse_params(params))


@dataclass(frozen=True, slots=True)
class NameAddr:
    """``"Display" <uri>;params`` or a bare ``uri;params``; ``uri`` is kept as text, parsed on demand."""

    uri: str
    display: str = ""
    params: dict[str, str] = field(default_factory=dict)

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    def with_tag(self, tag: str) -> NameAddr:
        return NameAddr(self.uri, self.display, {**self.params, "tag": tag})

    def __str__(self) -> str:
        display = f"{self.display} " if self.display else ""
        return f"{display}<{self.uri}>{format_params(self.params)}"


def parse_name_addr(text: str) -> NameAddr | None:
    text = text.strip()
    lt = _find_unquoted(text, "<")
    if lt >= 0:
        gt = text.find(">", lt)
        if gt < 0:
            return None
        return NameAddr(text[lt + 1 : gt].strip(), text[:lt].strip(), parse_params(text[gt + 1 :]))
    uri, _, params = text.partition(";")
    if not uri.strip() or ":" not in uri:
        return None
    return NameAddr(uri.strip(), "", parse_params(params))


def _find_unquoted(text: str, ch: str) -> int:
    quoted = False
    for i, c in enumerate(text):
        if c == '"':
            quoted = not quoted
        elif c == ch and not quoted:
            return i
    return -1


@dataclass(frozen=True, slots=True)
class Via:
    """``SIP/2.0/UDP host:port;branch=z9hG4bK...;rport``."""

    transport: str
    host: str
    port: int | None
    params: dict[str, str] = field(default_factory=dict)

    @property
    def branch(self) -> str:
        return self.params.get("branch", "")

    @property
    def sent_by(self) -> str:
        return f"{self.host}:{self.port or 5060}"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port is not None else ""
        return f"SIP/2.0/{self.transport} {host}{port}{format_params(self.params)}"


def parse_via(text: str) -> Via | None:
    proto, _, rest = text.strip().partition(" ")
    parts = proto.split("/")
    if len(parts) != 3 or parts[0].upper() != "SIP":
        return None
    hostport, _, params = rest.strip().partition(";")
    uri = parse_uri(f"sip:{hostport.strip()}")
    if uri is None:
        return None
    return Via(parts[2].strip().upper(), uri.host, uri.port, parse_params(params))


def new_tag() -> str:
    """A To/From tag: 64 random bits (≥ 32 required, §19.3)."""
    return secrets.token_hex(8)


def new_branch() -> str:
    return BRANCH_COOKIE + secrets.token_hex(10)
