"""The token client's HTTP path (``savants/http_post.py`` under ``TokenClient``), on real sockets against small
HTTP/1.1 servers that each misbehave one way: kept-alive connections reused, and dropped whenever their state is in
doubt (closed while idle, ``Connection: close``, a cancelled or oversized or broken response, idle too long), a
request never sent twice on a connection that had begun to answer, HTTPS, and no module searched per request."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.abc
import json
import socket
import ssl
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import ModuleType

import pytest

from telephony_bridge.errors import TokenError
from telephony_bridge.savants import http_post
from telephony_bridge.savants.http_post import JsonPoster
from telephony_bridge.savants.tokens import TOKEN_PATH, TokenClient, endpoint_failed
from tests.support import BENCH, tool

sys.path.insert(0, str(BENCH))
from tls_relay import make_certificate  # bench/ is no package: imported from its folder

pytestmark = pytest.mark.timeout(30)

JWT = "header.payload.signature"
TOKEN_BODY = json.dumps({"token": JWT}).encode()

# What a server does with each request it read: write bytes (and then close, or not), or nothing at all.
Answer = Callable[[int, dict[str, str], bytes], Awaitable[tuple[bytes | None, bool | str]]]
RESET = "reset"  # close with a reset (SO_LINGER 0) rather than a FIN


def ok(body: bytes = TOKEN_BODY, *, extra: bytes = b"") -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    return head + extra + b"\r\n" + body


# What a server may say on a connection it times out while idle, before closing it (RFC 9110 §15.5.9).
IDLE_408 = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


async def keep_alive(n: int, headers: dict[str, str], body: bytes) -> tuple[bytes | None, bool]:
    return ok(), False


async def time_out(n: int, headers: dict[str, str], body: bytes) -> tuple[bytes | None, bool]:
    """Every request answered 408 and its connection closed, as by a server timing each one out."""
    return IDLE_408, True


class Endpoint:
    """An HTTP/1.1 server on 127.0.0.1 that reads whole requests and answers each as ``answer`` says; it counts
    the connections it accepted, the requests it read (each one's head and body) and the EOFs it saw."""

    def __init__(self, answer: Answer = keep_alive) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.eofs = 0
        self._eof = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                request = await self.read_request(reader)
                if request is None:
                    return
                reply, close = await self.answer(len(self.requests), *request)
                if reply is not None:
                    writer.write(reply)
                    await writer.drain()
                if close == RESET:
                    writer.get_extra_info("socket").setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    writer.transport.abort()
                if close:
                    return
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> tuple[dict[str, str], bytes] | None:
        """One whole request, recorded; None at EOF (counted)."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            self.eofs += 1
            self._eof.set()
            return None
        request_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        body = await reader.readexactly(int(headers["content-length"]))
        self.requests.append((request_line, headers, body))
        return headers, body

    async def until_eofs(self, n: int, within_s: float = 2.0) -> None:
        """Returns once this server has seen ``n`` EOFs, or after ``within_s`` (the assert that follows says so):
        what it saw, rather than a guess at how long seeing it takes on a loaded machine."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                while self.eofs < n:
                    self._eof.clear()
                    await self._eof.wait()

    @property
    def bodies(self) -> list[object]:
        return [json.loads(body) for _, _, body in self.requests]


@pytest.fixture
async def start() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """``await start(endpoint, ssl=None)``: serves it on a free port; its base URL."""
    servers: list[asyncio.Server] = []

    async def start_one(endpoint: Endpoint, ssl: ssl.SSLContext | None = None) -> str:
        server = await asyncio.start_server(endpoint.serve, "127.0.0.1", 0, ssl=ssl)
        servers.append(server)
        return f"{'https' if ssl else 'http'}://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start_one
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_tokens_one_connection_serves_request_after_request(start: Callable[..., Awaitable[str]]) -> None:
    served = Endpoint()
    base_url = await start(served)
    async with asyncio.timeout(10), JsonPoster(base_url) as http:
        tokens = TokenClient(http, "the-api-key")
        got = [await tokens.fetch(f"device-{i}") for i in range(5)]
    assert got == [JWT] * 5
    assert served.bodies == [{"apiKey": "the-api-key", "deviceId": f"device-{i}"} for i in range(5)]
    assert served.connections == 1
    request_line, headers, _ = served.requests[0]
    assert request_line == f"POST {TOKEN_PATH} HTTP/1.1"
    assert headers["host"] == base_url.removeprefix("http://")  # not the default port: named
    assert (headers["content-type"], headers["accept"]) == ("application/json", "application/json")


async def test_a_base_path_prefixes_the_token_path(start: Callable[..., Awaitable[str]]) -> None:
    served = Endpoint()
    async with asyncio.timeout(10), JsonPoster(await start(served) + "/savants/") as http:
        assert await TokenClient(http, "k").fetch("device-0") == JWT
    assert served.requests[0][0] == f"POST /savants{TOKEN_PATH} HTTP/1.1"


async def test_a_connection_the_server_closed_while_idle_is_replaced_and_each_request_sent_once(
    start: Callable[..., Awaitable[str]],
) -> None:
    """A server that closes each connection after one answer, without saying so: the next request finds it closed
    (or learns so when it gets no answer) and goes out once on a new connection."""

    async def answer_then_close(n: int, headers: dict[str, str], body: bytes) -> tuple[bytes | None, bool]:
        return ok(), True

    served = Endpoint(answer_then_close)
    async with asyncio.timeout(10), JsonPoster(await start(served)) as http:
        tokens = TokenClient(http, "k")
        for i in range(3):
            assert await tokens.fetch(f"device-{i}") == JWT
            await asyncio.sleep(0.05)  # the close has landed: the kept connection is seen closed
        assert await tokens.fetch("device-3") == JWT
        assert await tokens.fetch("device-4") == JWT  # no pause: it may be sent on the closing one, then again
    assert served.bodies == [{"apiKey": "k", "deviceId": f"device-{i}"} for i in range(5)]
    assert served.connections == 5


@pytest.mark.parametrize(
    ("said", "ending"), [(None, True), (None, RESET), (IDLE_408, True)], ids=["closed", "reset", "timed-out"]
)
async def test_a_kept_connection_the_server_ended_as_the_request_crossed_it_sends_it_again_once(
    start: Callable[..., Awaitable[str]], said: bytes | None, ending: bool | str
) -> None:
    """The race a keep-alive client lives with: the server closes its idle connection as our request goes out.
    Simulated: the second request on the connection is read and the connection closed (a FIN, or a reset)
    without a byte, or after a 408: the same race won by the server's idle timer (RFC 9110 §15.5.9 lets the
    client repeat the request; before, the call's token failed on it)."""

    async def end_second(n: int, headers: dict[str, str], body: bytes) -> tuple[bytes | None, bool | str]:
        return (said, ending) if n == 2 else (ok(), False)

    served = Endpoint(end_second)
    async with asyncio.timeout(10), JsonPoster(await start(served)) as http:
        tokens = TokenClient(http, "k")
        assert [await tokens.fetch(f"device-{i}") for i in range(2)] == [JWT, JWT]
    assert [b["deviceId"] for b in served.bodies] == ["device-0", "device-1", "device-1"]  # type: ignore[index]
    assert served.connections == 2


async def test_a_408_on_a_new_connection_is_the_answer_and_not_sent_again(
    start: Callable[..., Awaitable[str]],
) -> None:
    served = Endpoint(time_out)
    async with asyncio.timeout(10), JsonPoster(await start(served)) as http:
        with pytest.raises(TokenError) as caught:
            await TokenClient(http, "k").fetch("device-0")
    assert (caught.value.status, endpoint_failed(caught.value)) == (408, True)  # retried with backoff, as a 5xx
    assert len(served.requests) == 1


async def test_a_kept_connection_answered_408_is_closed_even_when_the_server_keeps_it_open(
    start: Callable[..., Awaitable[str]],
) -> None:
    """A 408 without ``Connection: close``: the server has still timed that connection out, so it is not kept for
    the next request (the server sees it closed) and the request goes again on a new one."""
    still_open_408 = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n"

    async def time_out_second(n: int, headers: dict[str, str], body: bytes) -> tuple[bytes | None, bool]:
        return (still_open_408 if n == 2 else ok()), False

    served = Endpoint(time_out_second)
    async with asyncio.timeout(10), JsonPoster(await start(served)) as http:
        tokens = TokenClient(http, "k")
        assert [await tokens.fetch(f"device-{i}") for i in range(2)] == [JWT, JWT]
        await served.until_eofs(1)
        assert (served.connections, served.eofs) == (2, 1)  # the 408's connection closed by us, the other kept


async def test_the_token_probe_takes_a_408_as_failing_as_a_token_request_does(
    start: Callable[..., Awaitable[str]],
) -> None:
    async with asyncio.timeout(10), JsonPoster(await start(Endpoint(time_out))) as http:
        assert await TokenClient(http, "k").probe() == "HTTP 408 to a probe"


async def test_a_request_left_unanswered_after_aclose_is_not_sent_again(start: Callable[..., Awaitable[str]]) -> None:
    """``aclose()`` while a request waits on a kept connection that then ends without an answer: it fails, and no
    connection is opened after the close to send it again."""
    http: JsonPoster | None = None

    async def close_client_then_drop(n: int, headers: dict[str, str], body: bytes) -> tuple[bytes | None, bool]:
        if n == 2:
            assert http is not None
            await http.aclose()
            return None, True
        return ok(), False

    served = Endpoint(close_client_then_drop)
    async with asyncio.timeout(10):
        http = JsonPoster(await start(served))
        tokens = TokenClient(http, "k")
        assert await tokens.fetch("device-0") == JWT
        with pytest.raises(TokenError) as caught:
            await tokens.fetch("device-1")
    assert caught.value.code == "UNREACHABLE"
    assert "closed while the request waited" in str(caught.value)
    assert (served.connections, len(served.requests)) == (1, 2)


async def test_a_kept_connection_reset_mid_answer_fails_without_sending_again(
    start: Callable[..., Awaitable[str]],
) -> None:
    async def cut_second(n: int, headers: dict[str, str], body: bytes) -> tuple[bytes | None, bool | str]:
        return (ok()[:-5], RESET) if n == 2 else (ok(), False)

    served = Endpoint(cut_second)
    async with asyncio.timeout(10), JsonPoster(await start(served)) as http:
        tokens = TokenClient(http, "k")
        assert await tokens.fetch("device-0") == JWT
        with pytest.raises(TokenError) as caught:
            await tokens.fetch("device-1")
    assert caught.value.code == "UNREACHABLE"
    assert str(caught.value) == (
        "token endpoint unreachable: HttpFailure: the connection was reset mid-response (Connection reset by peer)"
    )
    assert [b["deviceId"] for b in served.bodies] == ["device-0", "device-1"]  # type: ignore[index]


async def test_a_new_connection_closed_without_an_answer_fails_once_unreachable(
    start: Callable[..., Awaitable[str]],
) -> None:
    async def drop(n: int, headers: dict[str, str], body: bytes) -> tuple[bytes | None, bool]:
        return None, True

    served = Endpoint(drop)
    async with asyncio.timeout(10), JsonPoster(await start(served)) as http:
        with pytest.raises(TokenError) as caught:
            await TokenClient(http, "the-api-key").fetch("device-0")
    assert caught.value.code == "UNREACHABLE"
    assert str(caught.value) == (
        "token endpoint unreachable: HttpFailure: the server closed the connection without answering"
    )
    assert len(served.requests) == 1  # not sent again: a new connection was not stale
    assert "the-api-key" not in str(caught.value)


async def test_a_refused_connection_is_unreachable() -> None:
    async with JsonPoster("http://127.0.0.1:9") as http:  # the discard port: nothing listens
        with pytest.raises(TokenError) as caught:
            await TokenClient(http, "k").fetch("device-0")
    assert caught.value.code == "UNREACHABLE"
    assert str(caught.value).startswith("token endpoint unreachable: ConnectionRefusedError: ")


async def test_connection_close_is_honoured(start: Callable[..., Awaitable[str]]) -> None:
    async def close_after(n: int, headers: dict[str, str], body: bytes) -> tuple[bytes | None, bool]:
        return ok(extra=b"Connection: close\r\n"), False  # says so, then waits for our close

    served = Endpoint(close_after)
    async with asyncio.timeout(10), JsonPoster(await start(served)) as http:
        tokens = TokenClient(http, "k")
        assert [await tokens.fetch(f"device-{i}") for i in range(2)] == [JWT, JWT]
        await served.until_eofs(2)
        assert (served.connections, len(served.requests), served.eofs) == (2, 2, 2)


async def test_bytes_after_an_answer_drop_its_connection(start: Callable[..., Awaitable[str]]) -> None:
    """Bytes past the end of a response answer no request of ours: on a kept connection they would be read as the
    next request's response (here a 408, which would refuse the call's device)."""

    async def more_after_the_first(n: int, headers: dict[str, str], body: bytes) -> tuple[bytes | None, bool]:
        return (ok() + IDLE_408 if n == 1 else ok()), False

    served = Endpoint(more_after_the_first)
    async with asyncio.timeout(10), JsonPoster(await start(served)) as http:
        tokens = TokenClient(http, "k")
        assert [await tokens.fetch(f"device-{i}") for i in range(2)] == [JWT, JWT]
    assert served.connections == 2


class SaysTimeoutWhileIdle(Endpoint):
    """Answers the first request on its first connection, then, once ``idle_over`` is set, says 408 on it and
    closes it, as a server may that times out an idle connection; later connections are served as usual."""

    def __init__(self) -> None:
        super().__init__()
        self.idle_over = asyncio.Event()
        self.said_408 = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections:
            return await super().serve(reader, writer)
        self.connections += 1
        await self.read_request(reader)
        writer.write(ok())
        await writer.drain()
        await self.idle_over.wait()
        writer.write(IDLE_408)
        await writer.drain()
        writer.close()
        self.said_408.set()


async def test_a_kept_connection_the_server_wrote_to_while_idle_is_not_reused(
    start: Callable[..., Awaitable[str]],
) -> None:
    served = SaysTimeoutWhileIdle()
    async with asyncio.timeout(10), JsonPoster(await start(served)) as http:
        tokens = TokenClient(http, "k")
        assert await tokens.fetch("device-0") == JWT
        served.idle_over.set()
        await served.said_408.wait()
        await asyncio.sleep(0.05)  # the 408 has landed in the idle connection's reader
        assert await tokens.fetch("device-1") == JWT
    assert [b["deviceId"] for b in served.bodies] == ["device-0", "device-1"]  # type: ignore[index]
    assert served.connections == 2


async def test_a_chunked_answer_is_read_whole(start: Callable[..., Awaitable[str]]) -> None:
    async def chunked(n: int, headers: dict[str, str], body: bytes) -> tuple[bytes | None, bool]:
        half = len(TOKEN_BODY) // 2
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (TOKEN_BODY[:half], TOKEN_BODY[half:]))
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n", False

    served = Endpoint(chunked)
    async with asyncio.timeout(10), JsonPoster(await start(served)) as http:
        tokens = TokenClient(http, "k")
        assert [await tokens.fetch(f"device-{i}") for i in range(2)] == [JWT, JWT]
    assert served.connections == 1


async def test_a_refusal_keeps_its_status_code_and_retry_after(start: Callable[..., Awaitable[str]]) -> None:
    async def limited(n: int, headers: dict[str, str], body: bytes) -> tuple[bytes | None, bool]:
        error = json.dumps({"error": {"code": "RATE_LIMITED", "message": "slow down", "details": {}}}).encode()
        head = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: %d\r\n\r\n" % len(error)
        return head + error, False

    async with asyncio.timeout(10), JsonPoster(await start(Endpoint(limited))) as http:
        with pytest.raises(TokenError) as caught:
            await TokenClient(http, "k").fetch("device-0")
    assert (caught.value.code, caught.value.status, caught.value.retry_after_s) == ("RATE_LIMITED", 429, 7.0)


@pytest.mark.parametrize(
    ("first_answer", "said"),
    [
        (ok(b"x" * (http_post.MAX_BODY_BYTES + 1)), "over 65536 bytes"),
        (b"SMTP ready\r\n\r\n", "broke HTTP/1.1"),
    ],
    ids=["oversized", "broken"],
)
async def test_an_answer_it_cannot_take_fails_and_its_connection_is_dropped(
    start: Callable[..., Awaitable[str]], first_answer: bytes, said: str
) -> None:
    async def bad_then_ok(n: int, headers: dict[str, str], body: bytes) -> tuple[bytes | None, bool]:
        return (first_answer if n == 1 else ok()), False

    served = Endpoint(bad_then_ok)
    async with asyncio.timeout(10), JsonPoster(await start(served)) as http:
        tokens = TokenClient(http, "k")
        with pytest.raises(TokenError) as caught:
            await tokens.fetch("device-0")
        assert caught.value.code == "UNREACHABLE"
        assert said in str(caught.value)
        assert await tokens.fetch("device-1") == JWT
    assert served.connections == 2


async def test_a_timed_out_request_closes_its_connection(start: Callable[..., Awaitable[str]]) -> None:
    async def silent_first(n: int, headers: dict[str, str], body: bytes) -> tuple[bytes | None, bool]:
        return (None, False) if n == 1 else (ok(), False)

    served = Endpoint(silent_first)
    async with asyncio.timeout(10), JsonPoster(await start(served)) as http:
        tokens = TokenClient(http, "k")  # the default 5 s for the second request: a loaded machine may be slow
        with pytest.raises(TokenError) as caught:
            await tokens.fetch("device-0", timeout_s=0.3)
        assert caught.value.code == "TIMEOUT"
        assert await tokens.fetch("device-1") == JWT
        await served.until_eofs(1)
        assert (served.connections, served.eofs) == (2, 1)  # the silent one was closed by us, not reused


async def test_a_connection_idle_too_long_is_not_reused(start: Callable[..., Awaitable[str]]) -> None:
    now = [100.0]
    served = Endpoint()
    async with asyncio.timeout(10), JsonPoster(await start(served), clock=lambda: now[0]) as http:
        tokens = TokenClient(http, "k")
        await tokens.fetch("device-0")
        now[0] += http_post.IDLE_S - 0.5
        await tokens.fetch("device-1")
        assert served.connections == 1
        now[0] += http_post.IDLE_S
        await tokens.fetch("device-2")
    assert served.connections == 2


async def test_every_idle_connection_past_use_is_closed_not_only_the_first_found(
    start: Callable[..., Awaitable[str]],
) -> None:
    """Two kept connections, the older idle too long and the newer usable: taking the newer closes the older
    too, rather than leave its socket open until the pool reaches it."""
    now = [100.0]
    served = Endpoint()
    async with asyncio.timeout(10), JsonPoster(await start(served), clock=lambda: now[0]) as http:
        tokens = TokenClient(http, "k")
        await asyncio.gather(tokens.fetch("device-0"), tokens.fetch("device-1"))  # two connections, both kept
        assert served.connections == 2
        now[0] += http_post.IDLE_S - 1
        await tokens.fetch("device-2")  # on the newer: its idle clock starts again
        now[0] += 2  # the older has been idle IDLE_S + 1, the newer 2 s
        await tokens.fetch("device-3")
        await served.until_eofs(1)
        assert (served.connections, served.eofs) == (2, 1)


async def test_a_long_complaint_from_h11_is_cut_short(start: Callable[..., Awaitable[str]]) -> None:
    async def rubbish(n: int, headers: dict[str, str], body: bytes) -> tuple[bytes | None, bool]:
        return b"HTTP/1.1 2" + b"0" * 5000 + b" OK\r\n\r\n", False

    async with asyncio.timeout(10), JsonPoster(await start(Endpoint(rubbish))) as http:
        with pytest.raises(TokenError) as caught:
            await TokenClient(http, "k").fetch("device-0")
    assert "broke HTTP/1.1" in str(caught.value)
    assert len(str(caught.value)) < 100 + http_post.MAX_QUOTED


async def test_https_with_the_context_given(
    start: Callable[..., Awaitable[str]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    cert, key = make_certificate(tmp_path_factory.mktemp("tls"), tool("openssl"))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    served = Endpoint()
    base_url = await start(served, ssl=server)
    trusting = ssl.create_default_context(cafile=str(cert))
    async with asyncio.timeout(10), JsonPoster(base_url, ssl_context=trusting) as http:
        tokens = TokenClient(http, "k")
        assert [await tokens.fetch(f"device-{i}") for i in range(2)] == [JWT, JWT]
    assert served.connections == 1
    async with asyncio.timeout(10), JsonPoster(base_url) as untrusting:  # the system's store: not our certificate
        with pytest.raises(TokenError) as caught:
            await TokenClient(untrusting, "k").fetch("device-0")
    assert caught.value.code == "UNREACHABLE"
    assert "SSLCertVerificationError" in str(caught.value)


def test_only_http_urls_are_taken() -> None:
    for url in ("ws://127.0.0.1:1", "127.0.0.1:1", "https://"):
        with pytest.raises(ValueError, match="expected an http:// or https:// URL"):
            JsonPoster(url)


class ImportSearches(importlib.abc.MetaPathFinder):
    """Records each module the import system goes looking for (a module already imported is never searched)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> None:
        self.names.append(fullname)
        return None  # the finders after this one do the finding


async def test_tokens_request_searches_for_no_module(start: Callable[..., Awaitable[str]]) -> None:
    searches = ImportSearches()
    async with asyncio.timeout(10), JsonPoster(await start(Endpoint())) as http:
        tokens = TokenClient(http, "the-api-key")
        await tokens.fetch("device-0")  # whatever the first request imports lazily, once
        sys.meta_path.insert(0, searches)
        try:
            for i in range(3):
                await tokens.fetch(f"device-{i}")
        finally:
            sys.meta_path.remove(searches)
    assert searches.names == []
