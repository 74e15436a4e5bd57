"""Small JSON POSTs to one origin over kept-alive HTTP/1.1 connections: h11 for the protocol, asyncio streams.

Why not httpx: every call fetches a token at set-up (spec §4: one per connection), and on the bench machine
httpx's client, pool and anyio layers spent ~0.66 ms of CPU a request where this spends ~0.18 (``python
bench/setup_cost.py --rounds 0 --parts 2000``): a fifth of what a call cost once. The token endpoint needs
none of what httpx adds (redirects, cookies, auth flows, HTTP/2, proxies: the bridge never took them from the
environment). h11 does the parsing and framing, as it does beneath httpcore.

Connections are kept for the next request and dropped when the server says ``Connection: close``, when a
response was not read to its end (cancelled, too large, malformed), when bytes came after it (with it or while
idle: they would be taken for the next request's response) and when one has been idle ``IDLE_S``. A
request on a kept connection that gets no response byte at all is sent again, once, on a new connection: that is
how a close the server made while the connection was idle shows (the request crossed it unread). A server that
read the request and then closed without a byte of answer gets it twice. So does one that answers a request on a
kept connection with 408 Request Timeout: that is the same race, won by the server's idle timer, and RFC 9110
§15.5.9 lets a client repeat the request. A 408 on a new connection is the answer. A connection that answered
408 is never kept: the server meant to close it.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11

# A server's answer when it times out a connection that sent no (whole) request: on a kept connection, the idle
# timeout our request crossed (RFC 9110 §15.5.9: the client may send it again).
REQUEST_TIMEOUT = 408
MAX_BODY_BYTES = 64 * 1024  # a token response is ~300 bytes; a wrong URL's page is not read to its end
MAX_IDLE = 32  # kept connections beyond this are closed: tokens are fetched one per call set-up
MAX_QUOTED = 200  # characters of h11's complaint kept in an error (it may quote the server's bytes)
IDLE_S = 30.0  # a connection idle this long is closed rather than reused (servers time theirs out at 5-120 s)


class HttpFailure(OSError):
    """No usable response: the connection failed, or the server broke HTTP/1.1. The message says which."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole response. ``headers``: names in lower case; a repeated header keeps its last value."""

    status: int
    headers: dict[str, str] = field(repr=False)
    body: bytes = field(repr=False)

    def json(self) -> object:
        """The body as JSON; ``ValueError`` if it is not."""
        return json.loads(self.body)


@dataclass(slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    h11: h11.Connection
    idle_since: float = 0.0

    def usable(self, now: float) -> bool:
        """Open, not idle too long, and sent nothing while idle: bytes there answer no request of ours (a server
        may say 408 on an idle connection before closing it, RFC 9110 §15.5.9) and would be read as the next
        request's response. asyncio offers no public look at a reader's buffer."""
        if self.reader.at_eof() or self.reader._buffer or self.writer.is_closing():  # type: ignore[attr-defined]
            return False
        return now - self.idle_since < IDLE_S

    def close(self) -> None:
        self.writer.close()  # no wait: nothing more is read or written on it


class JsonPoster:
    """POSTs to paths under ``base_url`` (``http://`` or ``https://``; ``ssl_context`` for the latter, else the
    system's default). Bound its requests with ``asyncio.timeout``: a cancelled request's connection is closed."""

    def __init__(
        self, base_url: str, *, ssl_context: ssl.SSLContext | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock  # when a connection went idle, and whether it has been too long
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {base_url!r}")
        self._tls = (ssl_context or ssl.create_default_context()) if parts.scheme == "https" else None
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        default_port = self._port == (443 if self._tls else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = host if default_port else f"{host}:{self._port}"
        self._prefix = parts.path.rstrip("/")
        self._idle: list[_Connection] = []
        self._closed = False

    async def post(self, path: str, payload: object) -> Reply:
        """``payload`` as a JSON body to ``path``; raises ``HttpFailure`` (an ``OSError``) when no response came."""
        if self._closed:
            raise HttpFailure("the HTTP client is closed")
        body = json.dumps(payload, separators=(",", ":")).encode()
        request = h11.Request(
            method="POST",
            target=self._prefix + path,
            headers=[
                ("Host", self._host_header),
                ("Accept", "application/json"),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
            ],
        )
        kept = self._kept()
        if kept is not None:
            try:
                reply = await self._exchange(kept, request, body)
                if reply.status != REQUEST_TIMEOUT:
                    return reply
                raise _Unanswered("the server timed the kept connection out as the request crossed it")
            except _Unanswered:
                if self._closed:  # closed by us meanwhile: no new connection after aclose()
                    raise HttpFailure("the HTTP client was closed while the request waited for an answer") from None
                # closed by the server while idle, or timed out as the request came: once more, on a new connection
        try:
            return await self._exchange(await self._connect(), request, body)
        except _Unanswered as exc:
            raise HttpFailure(str(exc)) from None

    async def __aenter__(self) -> JsonPoster:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes the kept connections; a request in flight keeps its own until it ends, and opens no other."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _kept(self) -> _Connection | None:
        """The most recently used connection still usable; every unusable one is closed on the way (a
        connection the server closed holds its socket until then)."""
        now = self._clock()
        usable = []
        for connection in self._idle:
            if connection.usable(now):
                usable.append(connection)
            else:
                connection.close()
        self._idle = usable
        return self._idle.pop() if self._idle else None

    async def _connect(self) -> _Connection:
        reader, writer = await asyncio.open_connection(
            self._host,
            self._port,
            ssl=self._tls,
            server_hostname=self._host if self._tls else None,
            limit=MAX_BODY_BYTES,
        )
        return _Connection(reader, writer, h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_BODY_BYTES))

    async def _exchange(self, connection: _Connection, request: h11.Request, body: bytes) -> Reply:
        try:
            reply = await self._send_and_read(connection, request, body)
        except BaseException:  # failed or cancelled part-way: its state is unknown
            connection.close()
            raise
        if reply.status == REQUEST_TIMEOUT:  # the server timed the connection out, whatever its headers say
            connection.close()
        else:
            self._keep(connection)
        return reply

    async def _send_and_read(self, connection: _Connection, request: h11.Request, body: bytes) -> Reply:
        conn = connection.h11
        heard = False  # any byte of a response
        try:
            connection.writer.write(conn.send(request) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            await connection.writer.drain()
            status, headers, chunks, size = 0, {}, [], 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await connection.reader.read(65536)
                    if not data and not heard:
                        raise _Unanswered("the server closed the connection without answering")
                    heard = True
                    conn.receive_data(data)
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in event.headers}
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > MAX_BODY_BYTES:
                        raise HttpFailure(f"response body over {MAX_BODY_BYTES} bytes (HTTP {status})")
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    return Reply(status, headers, b"".join(chunks))
                elif isinstance(event, h11.ConnectionClosed):
                    raise HttpFailure("the server closed the connection mid-response")
                # h11.InformationalResponse (100 Continue): read on
        except (ConnectionResetError, BrokenPipeError) as exc:
            if not heard:  # as a close while idle
                raise _Unanswered(f"the connection was reset before any answer ({exc.strerror})") from None
            raise HttpFailure(f"the connection was reset mid-response ({exc.strerror})") from None
        except h11.RemoteProtocolError as exc:
            # h11 quotes what it could not parse: a wrong URL's page, up to 64 KB, goes no further than this
            raise HttpFailure(f"the server broke HTTP/1.1: {str(exc)[:MAX_QUOTED]}") from None

    def _keep(self, connection: _Connection) -> None:
        conn = connection.h11
        if self._closed or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            connection.close()  # Connection: close, or HTTP/1.0
            return
        if conn.trailing_data != (b"", False):  # bytes past the response, or its end was the server's close
            connection.close()
            return
        conn.start_next_cycle()
        if len(self._idle) >= MAX_IDLE:
            connection.close()
            return
        connection.idle_since = self._clock()
        self._idle.append(connection)


class _Unanswered(Exception):
    """The request got no byte of a response: on a kept connection, the server had closed it."""
