"""The picows voice-stream client against a raw WebSocket peer on a real 127.0.0.1 socket: what the emulator
cannot be made to do. A peer that never answers our close, one that stops answering pings or reading, a
fragmented message, an upgrade answered after the opener gave up. (The emulator-driven faults, closes and
refusals are in test_reconnect_call.py, test_call_faults.py, test_admission.py and the end-to-end tests.)"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import gc
import hashlib
import socket
import ssl
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from telephony_bridge.errors import SessionError
from telephony_bridge.savants.client import (
    CLOSE_TIMEOUT_S,
    SavantsConnection,
    open_voice_session,
    probe_voice_stream,
    tls_context,
)
from telephony_bridge.savants.protocol import Audio, Notice
from tests.support import BENCH, collector_off, tool

sys.path.insert(0, str(BENCH))
from tls_relay import make_certificate  # bench/ is no package: imported from its folder

CONFIRMED = b'{"type":"savant_voice_connected","sessionId":"sess_raw"}'
TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0


def frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = False) -> bytes:
    """A server-to-client frame (unmasked, RFC 6455 §5.2); ``masked``: a client's, under the all-zero mask,
    which leaves the payload as it is (§5.3)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    mask_bit, mask = (0x80, bytes(4)) if masked else (0, b"")
    if len(payload) < 126:
        return head + bytes([mask_bit | len(payload)]) + mask + payload
    if len(payload) < 65536:
        return head + bytes([mask_bit | 126]) + struct.pack("!H", len(payload)) + mask + payload
    return head + bytes([mask_bit | 127]) + struct.pack("!Q", len(payload)) + mask + payload


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One client-to-server frame, unmasked: (opcode, payload)."""
    first, second = await reader.readexactly(2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    mask = await reader.readexactly(4)
    data = await reader.readexactly(length)
    return first & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(data))


async def upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    answer_upgrade(writer, await read_upgrade(reader))


async def read_upgrade(reader: asyncio.StreamReader) -> str:
    """The client's upgrade request: its Sec-WebSocket-Key."""
    request = (await reader.readuntil(b"\r\n\r\n")).decode()
    return next(
        v.strip()
        for k, v in (line.split(":", 1) for line in request.split("\r\n")[1:] if ":" in line)
        if k.strip().lower() == "sec-websocket-key"
    )


def answer_upgrade(writer: asyncio.StreamWriter, key: str) -> None:
    accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


async def confirm(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """The upgrade, the JWT frame (returned), the confirmation."""
    await upgrade(reader, writer)
    opcode, token = await read_frame(reader)
    assert opcode == TEXT
    writer.write(frame(TEXT, CONFIRMED))
    return token


Peer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_peer(peer: Peer, **server: Any) -> AsyncIterator[str]:
    """A WebSocket server of our own on 127.0.0.1: ``peer`` plays it out; yields its ws:// URL."""
    ended: list[asyncio.Task[None]] = []
    failures: list[BaseException] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ended.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await peer(reader, writer)
        except (asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or the test is over (a cancelled handler makes asyncio log an error)
        except Exception as exc:  # an assertion of the peer's: the test fails with it (below)
            failures.append(exc)
        finally:
            writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0, **server)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield f"ws://127.0.0.1:{port}/voice-stream"
    finally:
        listener.close()
        for task in ended:
            task.cancel()
        await asyncio.gather(*ended, return_exceptions=True)
        await listener.wait_closed()
    if failures:
        raise failures[0]


async def test_client_close_returns_within_the_close_timeout_when_the_peer_never_answers() -> None:
    seen_eof = asyncio.Event()
    close_frames: list[bytes] = []

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await confirm(reader, writer)
        opcode, payload = await read_frame(reader)  # our close 1000, never answered
        close_frames.append(bytes([opcode]) + payload)
        assert await reader.read() == b""  # then we cut the connection
        seen_eof.set()

    async with raw_peer(deaf) as url, asyncio.timeout(20):
        connection = await open_voice_session(url, "a.b.c", 5.0)
        assert connection.session_id == "sess_raw"
        started = time.monotonic()
        await connection.close()
        took = time.monotonic() - started
        await seen_eof.wait()
        await connection.close()  # idempotent, the peer gone
        assert close_frames == [bytes([CLOSE]) + struct.pack("!H", 1000)]
        assert CLOSE_TIMEOUT_S * 0.9 <= took < CLOSE_TIMEOUT_S + 2.0
        assert await connection.send_audio(b"\x00" * 640) is False  # closed by us: nothing more goes out


async def test_client_stalled_peer_is_reported_as_stalled_after_the_stall_timeout() -> None:
    pings: list[int] = []

    async def hung(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await confirm(reader, writer)
        writer.write(frame(BINARY, b"\x01\x00" * 320))
        pings.append((await read_frame(reader))[0])  # read our ping, never answer it; then read nothing
        await asyncio.Event().wait()

    async with raw_peer(hung) as url, asyncio.timeout(20):
        connection = await open_voice_session(url, "a.b.c", 5.0, stall_timeout_s=1.0)
        assert await connection.receive() == Audio(b"\x01\x00" * 320)
        started = time.monotonic()
        with pytest.raises(SessionError) as raised:
            await connection.receive()
        took = time.monotonic() - started
        assert (raised.value.code, raised.value.close_code) == ("STALLED", None)
        assert pings == [PING]
        assert 0.5 <= took < 1.0 + 2.0  # a ping after 0.5 s quiet, 0.5 s for its pong; the bound is generous
        with pytest.raises(SessionError, match="stalled"):
            await connection.send_audio(b"\x00" * 640)  # no close frame came: a send reports it too
        await connection.close()


async def test_client_peer_answering_pings_is_kept_however_long_it_is_quiet() -> None:
    async def quiet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await confirm(reader, writer)
        while True:
            opcode, payload = await read_frame(reader)
            if opcode == PING:
                writer.write(frame(PONG, payload))
            if opcode == CLOSE:
                writer.write(frame(CLOSE, payload))
                return

    async with raw_peer(quiet) as url, asyncio.timeout(20):
        connection = await open_voice_session(url, "a.b.c", 5.0, stall_timeout_s=1.0)
        receiving = asyncio.create_task(connection.receive())
        await asyncio.sleep(3.0)  # three stall timeouts of silence, each ended by a ping and its pong
        assert not receiving.done()
        assert await connection.send_audio(b"\x00" * 640) is True
        receiving.cancel()
        await connection.close()


async def test_client_send_waits_while_the_peer_reads_slowly_and_resumes_when_it_drains() -> None:
    drain = asyncio.Event()
    received: asyncio.Queue[int] = asyncio.Queue()

    peer: list[asyncio.StreamWriter] = []

    async def slow_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await confirm(reader, writer)
        peer.append(writer)
        # A receive buffer of fixed size too: the kernel would otherwise grow it (autotuning) as data comes.
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        await drain.wait()
        while True:
            opcode, payload = await read_frame(reader)
            if opcode == PING:
                writer.write(frame(PONG, payload))
            elif opcode == BINARY:
                received.put_nowait(len(payload))

    async with raw_peer(slow_reader, limit=2**16) as url, asyncio.timeout(30):
        connection = await open_voice_session(url, "a.b.c", 5.0, stall_timeout_s=10.0)
        assert connection.can_send_now()
        fix_send_buffer(connection)
        sent = 0
        # Fill every buffer on the way until writing pauses for good: the peer's reader takes data until its own
        # buffer is full (2 * limit) and stops reading; then the two sockets' buffers (of fixed size) fill, and
        # once writing has stayed paused for a while nothing is left to take what we send.
        while True:
            while not sending_blocked(connection):
                assert await connection.send_audio(b"\x00" * 8192) is True
                sent += 1
                assert sent < 100_000, "writing never paused"
            await asyncio.sleep(0.1)
            if sending_blocked(connection) and not peer[0].transport.is_reading():
                break
        assert not connection.can_send_now()  # so Inbound leaves this send to ``run``, which waits
        blocked = asyncio.create_task(connection.send_audio(b"\x00" * 8192))
        await asyncio.sleep(0.2)
        assert not blocked.done()  # waits for the buffer to drain rather than grow it
        drain.set()
        assert await blocked is True
        assert connection.can_send_now()
        connection.send_audio_nowait(b"\x00" * 1280)  # from a callback: no wait, no task
        assert [await received.get() for _ in range(sent + 2)] == [8192] * (sent + 1) + [1280]  # every frame, whole
        await connection.close()
        assert not connection.can_send_now()


async def test_client_peer_that_stops_reading_what_we_send_is_stalled() -> None:
    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await confirm(reader, writer)
        while True:  # keeps talking, so no keepalive ping is due; reads nothing
            writer.write(frame(BINARY, b"\x00\x00" * 320))
            await asyncio.sleep(0.02)

    async with raw_peer(never_reads, limit=2**16) as url, asyncio.timeout(30):
        connection = await open_voice_session(url, "a.b.c", 5.0, stall_timeout_s=1.0)
        with pytest.raises(SessionError) as raised:
            for _ in range(100_000):
                await connection.send_audio(b"\x00" * 8192)
        assert raised.value.code == "STALLED"
        with pytest.raises(SessionError, match="stalled"):
            while True:
                await connection.receive()  # the audio that came first, then the same end
        await connection.close()


def sending_blocked(connection: SavantsConnection) -> bool:
    return connection._writable is not None


def fix_send_buffer(connection: SavantsConnection) -> None:
    """Give the client's socket a send buffer of fixed size: left to itself the kernel grows it while the peer
    does not read (TCP autotuning), so writes paused once could drain into it a moment later and resume."""
    assert connection._transport is not None
    sock = connection._transport.underlying_transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)


async def test_client_fragmented_messages_are_put_together() -> None:
    async def fragmenting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await confirm(reader, writer)
        writer.write(frame(BINARY, b"\x01" * 300, fin=False))
        writer.write(frame(PING, b"p"))  # a control frame may come between fragments
        writer.write(frame(CONTINUATION, b"\x02" * 340))
        writer.write(frame(TEXT, b'{"type":"sta', fin=False) + frame(CONTINUATION, b'tus"}'))
        writer.write(frame(CLOSE, struct.pack("!H", 1000)))
        await read_frame(reader)  # the pong
        assert await read_frame(reader) == (CLOSE, struct.pack("!H", 1000))  # our echo of the close

    async with raw_peer(fragmenting) as url, asyncio.timeout(20):
        connection = await open_voice_session(url, "a.b.c", 5.0)
        assert await connection.receive() == Audio(b"\x01" * 300 + b"\x02" * 340)
        assert await connection.receive() == Notice("status")
        assert await connection.receive() is None  # 1000: the AI's goodbye
        assert await connection.send_audio(b"\x00" * 640) is False
        await connection.close()


@pytest.mark.parametrize(
    "garbage",
    [frame(CONTINUATION, b"\x01\x02"), frame(TEXT, b'{"type":"\xff"}')],
    ids=["continuation-without-a-message", "invalid-utf8-text"],
)
async def test_client_broken_framing_is_a_protocol_failure(garbage: bytes) -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await confirm(reader, writer)
        writer.write(garbage)
        await asyncio.Event().wait()

    async with raw_peer(broken) as url, asyncio.timeout(20):
        connection = await open_voice_session(url, "a.b.c", 5.0)
        with pytest.raises(SessionError) as raised:
            await connection.receive()
        assert raised.value.code == "PROTOCOL"
        await connection.close()


@pytest.mark.parametrize(
    ("code", "expected", "echo"), [(1001, 1001, 1001), (4500, 4500, 4500), (None, 1005, 1000), (1006, 1006, 1000)]
)
async def test_client_close_other_than_1000_is_a_drop_with_its_code(code: int | None, expected: int, echo: int) -> None:
    """... and the close is echoed with the peer's code when that may be sent, else 1000 (never 1005, 1006, 0)."""

    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await confirm(reader, writer)
        writer.write(frame(CLOSE, b"" if code is None else struct.pack("!H", code)))
        assert await read_frame(reader) == (CLOSE, struct.pack("!H", echo))

    async with raw_peer(closing) as url, asyncio.timeout(20):
        connection = await open_voice_session(url, "a.b.c", 5.0)
        with pytest.raises(SessionError) as raised:
            await connection.receive()
        assert (raised.value.code, raised.value.close_code) == ("DROPPED", expected)
        assert await connection.send_audio(b"\x00" * 640) is False  # a close frame came: receive reports it
        await connection.close()  # safe with the peer gone


async def test_client_upgrade_answered_after_the_opener_gave_up_is_closed_at_once() -> None:
    asked = asyncio.Event()
    answer = asyncio.Event()
    outcome: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        key = await read_upgrade(reader)
        asked.set()
        await answer.wait()
        answer_upgrade(writer, key)
        outcome.set_result(await reader.read())  # no JWT, no frames: the connection is simply cut

    async with raw_peer(late) as url, asyncio.timeout(20):
        opening = asyncio.create_task(open_voice_session(url, "a.b.c", 5.0))
        await asked.wait()
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        answer.set()
        assert await outcome == b""


async def test_a_session_that_fails_to_open_or_is_cancelled_leaves_no_cycle() -> None:
    """The error raised out of ``open_voice_session`` and ``probe_voice_stream`` must not be held by their own
    frames, which its traceback holds: the cycle kept the frame's JWT, session and socket until a full
    collection, rare in a serving process. Refused (the error translated) and cancelled (raised as it is)."""

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nobody = f"ws://127.0.0.1:{unused.getsockname()[1]}/voice-stream"
    async with raw_peer(never_answers) as url, asyncio.timeout(20):
        with collector_off() as left:
            with pytest.raises(SessionError, match="unreachable"):
                await open_voice_session(nobody, "a.b.c", 5.0)
            for attempt in (open_voice_session(url, "a.b.c", 5.0), probe_voice_stream(url, 5.0)):
                task = asyncio.create_task(attempt)
                await asyncio.sleep(0.2)  # connected, waiting for the upgrade's answer
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                del task
        assert not left, left


async def test_client_frame_over_the_size_limit_is_a_drop_and_leaves_nothing_unretrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def oversized(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await confirm(reader, writer)
        assert (await read_frame(reader))[0] == BINARY  # once the client is confirmed and talking
        writer.write(frame(BINARY, b"\x00" * (2**20 + 2)))
        assert (await read_frame(reader))[0] == CLOSE  # picows' 1009
        await asyncio.Event().wait()

    async with raw_peer(oversized) as url, asyncio.timeout(20):
        connection = await open_voice_session(url, "a.b.c", 5.0)
        assert await connection.send_audio(b"\x00" * 640) is True
        with pytest.raises(SessionError) as raised:
            await connection.receive()  # the frame's rest, parsed by picows after its 1009, is not audio
        assert (raised.value.code, raised.value.close_code) == ("DROPPED", None)
        await connection.close()
    del connection, raised  # the traceback holds the connection too
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_client_hands_audio_to_its_handler_as_it_is_read_and_keeps_it_behind_an_unread_notice() -> None:
    """``deliver_audio_to``: the AI's audio goes to the handler from picows' callback (outside any task: no task
    switch per frame), except while a notice waits unread, when it queues behind it for ``receive``."""
    handler_set, go_on = asyncio.Event(), asyncio.Event()

    async def speaking(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await confirm(reader, writer)
        await handler_set.wait()
        writer.write(frame(BINARY, b"\x01" * 640) + frame(BINARY, b"\x02" * 640))
        await go_on.wait()
        writer.write(frame(TEXT, b'{"type":"status"}') + frame(BINARY, b"\x03" * 640))
        writer.write(frame(CLOSE, struct.pack("!H", 1000)))
        assert await read_frame(reader) == (CLOSE, struct.pack("!H", 1000))

    handed: asyncio.Queue[tuple[bytes, bool, str]] = asyncio.Queue()
    call = contextvars.ContextVar("call", default="")

    def handler(pcm: bytes) -> None:  # in the context it was attached in, so its log lines name the call
        handed.put_nowait((pcm, asyncio.current_task() is None, call.get()))

    async with raw_peer(speaking) as url, asyncio.timeout(20):
        connection = await open_voice_session(url, "a.b.c", 5.0)
        token = call.set("CA1")
        connection.deliver_audio_to(handler)
        call.reset(token)
        handler_set.set()
        assert await handed.get() == (b"\x01" * 640, True, "CA1")  # from picows' read callback: no task
        assert await handed.get() == (b"\x02" * 640, True, "CA1")
        go_on.set()
        assert await connection.receive() == Notice("status")
        assert await connection.receive() == Audio(b"\x03" * 640)  # read while the notice was unread
        assert await connection.receive() is None
        assert handed.empty()
        await connection.close()


async def test_client_an_audio_handler_that_raises_makes_receive_raise_it() -> None:
    """A callback has nobody to raise to: what the handler raised comes out of ``receive`` (the call then ends
    with an error, rather than its audio silently stopping)."""
    handler_set = asyncio.Event()

    async def speaking(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await confirm(reader, writer)
        await handler_set.wait()
        writer.write(frame(BINARY, b"\x01" * 640))
        await read_frame(reader)  # our close

    def broken(pcm: bytes) -> None:
        raise RuntimeError("a bug in the call core")

    async with raw_peer(speaking) as url, asyncio.timeout(20):
        connection = await open_voice_session(url, "a.b.c", 5.0)
        connection.deliver_audio_to(broken)
        handler_set.set()
        with pytest.raises(RuntimeError, match="a bug in the call core"):
            await connection.receive()
        await connection.close()


# --- wss://: one TLS context for every connection ------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl's command line): (certificate, key). Without openssl, skip
    locally but fail under CI (the wss:// path must be tested)."""
    return make_certificate(tmp_path_factory.mktemp("tls"), tool("openssl"))


def test_client_tls_context_is_the_default_one_and_only_for_wss() -> None:
    context = tls_context("wss://api.savants.example/voice-stream")
    assert context is not None
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert tls_context("ws://127.0.0.1:8000/voice-stream") is None


async def test_client_wss_connects_with_the_context_it_is_given(certificate: tuple[Path, Path]) -> None:
    """Given a context that trusts the peer, the session opens; without one, a default context is built for the
    connection, which does not trust the test's certificate: so the context given is the one used."""
    cert, key = certificate
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    tokens: list[bytes] = []

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tokens.append(await confirm(reader, writer))
        await reader.read()

    async with raw_peer(peer, ssl=server) as url, asyncio.timeout(10):
        secure = url.replace("ws://", "wss://")
        connection = await open_voice_session(secure, "a.b.c", 5.0, ssl_context=trusting)
        await connection.close()
        with pytest.raises(SessionError) as refused:
            await open_voice_session(secure, "a.b.c", 5.0)
    assert (tokens, refused.value.code) == ([b"a.b.c"], "CONNECT_FAILED")
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)


async def test_probe_upgrades_and_closes_with_1000_before_any_token() -> None:
    """The readiness probe (savants/health.py): an upgrade, then a close frame with 1000 and nothing else."""
    seen: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upgrade(reader, writer)
        seen.set_result(await read_frame(reader))

    async with raw_peer(peer) as url, asyncio.timeout(10):
        assert await probe_voice_stream(url, 5.0) is None
        assert await seen == (CLOSE, struct.pack("!H", 1000))


async def test_probe_names_what_went_wrong() -> None:
    """A server that hangs up before answering the upgrade (a dead backend behind a TCP proxy) fails the probe as
    it fails every session: it must not pass for a working endpoint. So do a refused upgrade and no listener."""

    async def hangs_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")

    async def refuses(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()

    async with asyncio.timeout(20):
        async with raw_peer(hangs_up) as url:
            assert (await probe_voice_stream(url, 5.0) or "").startswith("CONNECT_FAILED")
        async with raw_peer(refuses) as url:
            assert (await probe_voice_stream(url, 5.0) or "").startswith("HTTP_503")
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]
        assert (await probe_voice_stream(f"ws://127.0.0.1:{port}/voice-stream", 5.0) or "").startswith("CONNECT_FAILED")
