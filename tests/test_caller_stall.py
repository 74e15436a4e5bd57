"""A Twilio caller that stops reading, on real sockets: alive at TCP level and still sending media, it takes
nothing we send. The bridge's writes pause, the send waiting on them gives up after ``SEND_STALL_S``, the
connection is dropped and the call ends with a line naming it; nothing is left held, and another call goes on.
(The Savants side of the same fault is in test_savants_client.py.)"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from functools import partial
from urllib.parse import urlsplit

import pytest

from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.caller import new_sid, run_call
from telephony_bridge.twilio import protocol as tw
from telephony_bridge.twilio.outbound_messages import OutMedia, parse_outbound
from telephony_bridge.twilio.stream_socket import SEND_STALL_S
from tests.support import (
    bridge_settings,
    call_form,
    emulator_stats,
    leases,
    post_voice,
    signed_call,
    stream_parameters,
    upgrade_signature,
    wait_until,
)
from tests.test_call_faults import calls_up
from tests.test_savants_client import frame

TEXT = 0x1
# Both ends' kernel buffers kept small (Linux doubles each), so that what the bridge sends fills them in
# seconds: on loopback the bridge's send buffer would otherwise grow to megabytes, minutes of audio.
RECEIVE_BUFFER_BYTES = 4096
SEND_BUFFER_BYTES = 4096
# Then the event loop's own write buffer (64 KiB before it pauses writing) fills at the AI's real-time rate
# (about 13 KB/s of media messages): some 6.5 s, all buffers counted. The bound leaves a margin for a busy box.
FILL_BOUND_S = 9.0
OTHER_CALL_S = 13.0  # from the moment the caller stops reading: past the drop (10-11 s here)
SILENCE = bytes([0xFF]) * 160  # 20 ms of μ-law silence: the caller is there, saying nothing


class RawCaller:
    """A Twilio media stream spoken by hand over a plain socket, which reads only when asked to: so it can stop
    reading and stay open."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._unread = b""

    @classmethod
    async def connect(cls, ws_url: str, headers: dict[str, str]) -> RawCaller:
        url = urlsplit(ws_url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)  # before connect: the window
        sock.setblocking(False)
        caller = cls(sock)
        await caller._loop.sock_connect(sock, (url.hostname, url.port))
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {url.path} HTTP/1.1",
            f"Host: {url.netloc}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        await caller._loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in caller._unread:
            caller._unread += await caller._recv()
        response, caller._unread = caller._unread.split(b"\r\n\r\n", 1)
        assert response.startswith(b"HTTP/1.1 101 "), response
        return caller

    async def send(self, text: str) -> None:
        await self._loop.sock_sendall(self._sock, frame(TEXT, text.encode(), masked=True))

    async def talk(self, stream_sid: str) -> OSError:
        """Media every 20 ms, as Twilio sends even in silence, until the bridge drops the connection: how the
        send failed."""
        started = time.monotonic()
        for sent in range(1_000_000):
            try:
                await self.send(tw.Media(stream_sid, SILENCE, sent * 20, sent + 1, sent + 2).to_json())
            except OSError as exc:
                return exc
            await asyncio.sleep(max(0.0, started + (sent + 1) * 0.02 - time.monotonic()))
        raise AssertionError("the connection was never dropped")

    async def receive_text(self) -> str:
        """The next text message from the bridge (it sends no fragments, and nothing else before its close)."""
        while (frame := self._next_frame()) is None:
            self._unread += await self._recv()
        opcode, payload = frame
        assert opcode == TEXT, f"expected a text frame, got opcode {opcode}"
        return payload.decode()

    def _next_frame(self) -> tuple[int, bytes] | None:
        """A whole server frame (unmasked, RFC 6455 §5.2) off the front of what was read, if there is one."""
        data = self._unread
        if len(data) < 2:
            return None
        length, at = data[1] & 0x7F, 2
        if length == 126:
            if len(data) < 4:
                return None
            (length,), at = struct.unpack("!H", data[2:4]), 4
        elif length == 127:
            if len(data) < 10:
                return None
            (length,), at = struct.unpack("!Q", data[2:10]), 10
        if len(data) < at + length:
            return None
        self._unread = data[at + length :]
        return data[0] & 0x0F, data[at : at + length]

    async def _recv(self) -> bytes:
        data = await self._loop.sock_recv(self._sock, 65536)
        if not data:
            raise ConnectionError("the bridge closed the connection")
        return data

    def close(self) -> None:
        self._sock.close()


def ended_line(caplog: pytest.LogCaptureFixture, call_sid: str) -> logging.LogRecord | None:
    return next(
        (r for r in caplog.records if r.getMessage() == "call ended" and getattr(r, "call_sid", None) == call_sid),
        None,
    )


async def test_caller_that_stops_reading_is_dropped_after_the_send_stall_and_its_call_released(
    start_emulator: Callable[..., ServerThread],
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    emulator = start_emulator(voice="tone")  # talks all the time, whatever the caller says
    bridge = start_bridge(bridge_settings(emulator))
    bridge.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)  # accepted sockets inherit it
    form = call_form()
    params = stream_parameters(post_voice(bridge, form))
    stream_sid = new_sid("MZ")
    caller = await RawCaller.connect(bridge.ws_url + "/media-stream", upgrade_signature())
    try:
        with caplog.at_level(logging.INFO):
            async with asyncio.timeout(OTHER_CALL_S + 10), asyncio.TaskGroup() as tg:
                await caller.send(tw.Connected().to_json())
                start = tw.Start(stream_sid, form["CallSid"], form["AccountSid"], custom_parameters=params)
                await caller.send(start.to_json())
                talking = tg.create_task(caller.talk(stream_sid))
                heard = [parse_outbound(await caller.receive_text(), stream_sid) for _ in range(10)]
                assert any(isinstance(event, OutMedia) for event in heard), heard  # the AI is talking to us
                other = tg.create_task(run_call(signed_call(bridge, seconds=OTHER_CALL_S)))
                stopped_at = time.monotonic()  # from here on nothing is read
                bound_s = SEND_STALL_S + FILL_BOUND_S
                ended = partial(ended_line, caplog, form["CallSid"])
                await asyncio.to_thread(wait_until, lambda: ended() is not None, bound_s, "the stalled call to end")
                ended_after_s = time.monotonic() - stopped_at
                async with asyncio.timeout(2):
                    dropped = await talking  # the bridge let go of the connection: the next sends fail
                healthy = await other
    finally:
        caller.close()
    assert SEND_STALL_S < ended_after_s < bound_s
    assert isinstance(dropped, ConnectionResetError | BrokenPipeError), dropped
    [stalled] = [r for r in caplog.records if "took nothing we sent" in r.getMessage()]
    assert stalled.getMessage() == f"the caller took nothing we sent for {SEND_STALL_S} s; dropping its connection"
    assert getattr(stalled, "call_sid", None) == form["CallSid"]
    # What the core records for CallerGone (bridge.Call._bridge).
    assert (ended().outcome, ended().reason) == (  # type: ignore[union-attr]
        "caller_lost",
        "the caller took nothing we sent for 5.0 s",
    )
    assert healthy.ended_by == "caller" and healthy.violations == [] and healthy.heard_s > OTHER_CALL_S - 1.5
    wait_until(lambda: calls_up(bridge) == 0 and leases(bridge) == 0, what="both calls to be released")
    wait_until(lambda: emulator_stats(emulator)["sessions_active"] == 0, what="the Savants sockets to close")
