"""Inbound on real Savants connections whose send fails under it: a message ``run`` took while it waited for a
full send buffer, and did not send (cancelled, the session closing, a stall), goes to the next session first,
so the caller's words survive the reconnect; past the reconnect buffer the oldest go, counted."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

import pytest

from telephony_bridge.clock import FakeClock
from telephony_bridge.errors import SessionError
from telephony_bridge.inbound import Inbound
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.savants.client import SavantsConnection, open_voice_session
from telephony_bridge.settings import AudioSettings, BargeInSettings
from tests.test_inbound import NumberedCaller, frame_marks, sending, settle
from tests.test_savants_client import BINARY, CLOSE, PING, PONG, confirm, frame, raw_peer, read_frame, sending_blocked


class Blocked:
    """``Inbound.run`` on a real connection whose peer reads nothing after the handshake: its send buffer is full,
    so the first message ``run`` takes waits in ``send_audio``. ``close_with_1011`` makes the peer close."""

    def __init__(self, inbound: Inbound, connection: SavantsConnection, close_with_1011: asyncio.Event) -> None:
        self.connection = connection
        self.close_with_1011 = close_with_1011
        self.task = asyncio.create_task(inbound.run(connection))


@contextlib.asynccontextmanager
async def blocked_then_reconnected(
    inbound: Inbound, clock: FakeClock, *, stall_timeout_s: float = 10.0
) -> AsyncIterator[tuple[Blocked, list[bytes]]]:
    """A first session whose send buffer is full (``Blocked``), and, after the block, a second that reads: the
    block's end sends ``run`` to the second session until the queue is empty, then closes it; the list holds
    the second peer's binary payloads by then."""
    close_with_1011 = asyncio.Event()
    received: list[bytes] = []

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await confirm(reader, writer)
        await close_with_1011.wait()
        writer.write(frame(CLOSE, struct.pack("!H", 1011)))  # Savants restarting, say
        await asyncio.Event().wait()

    async def reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await confirm(reader, writer)
        while True:
            opcode, payload = await read_frame(reader)
            if opcode == BINARY:
                received.append(payload)
            elif opcode == PING:
                writer.write(frame(PONG, payload))
            elif opcode == CLOSE:
                writer.write(frame(CLOSE, payload))
                return

    async with raw_peer(deaf, limit=2**16) as first_url, raw_peer(reads) as second_url, asyncio.timeout(30):
        first = await open_voice_session(first_url, "a.b.c", 5.0, stall_timeout_s=stall_timeout_s)
        while not sending_blocked(first):  # fill the socket buffers until picows pauses writing
            assert await first.send_audio(b"\x00" * 8192) is True
        blocked = Blocked(inbound, first, close_with_1011)
        try:
            yield blocked, received
        finally:
            blocked.task.cancel()
            await asyncio.gather(blocked.task, return_exceptions=True)
            close_with_1011.set()  # so closing does not wait out the close timeout
            await first.close()
        second = await open_voice_session(second_url, "a.b.c", 5.0)
        async with sending(inbound, second):  # type: ignore[arg-type]
            while inbound._queue:
                await settle()
                clock.advance(0.01)
        await second.close()  # the peer reads all that went before our close frame


@pytest.mark.parametrize("ending", ["cancelled", "closed", "stalled"])
async def test_inbound_frames_taken_for_a_send_that_never_went_go_first_to_the_next_session(ending: str) -> None:
    """``run`` took a message and waits in ``send_audio`` for a full send buffer while the caller talks on; the
    send then ends without sending: ``run`` is cancelled (the session dropped under it), or Savants closes the
    session (``send_audio`` says False) or it stalls (``send_audio`` raises). The next session gets every
    numbered frame exactly once, in order, the taken ones first."""
    clock = FakeClock(start=1000.0)
    inbound = Inbound(AudioSettings(upstream_message_ms=40), BargeInSettings(enabled=False), Metrics(), clock)
    caller = NumberedCaller(inbound, clock)
    failures: list[BaseException] = []
    returned = False
    async with blocked_then_reconnected(inbound, clock, stall_timeout_s=1.0 if ending == "stalled" else 10.0) as (
        blocked,
        received,
    ):
        caller.push(2)
        await settle()
        assert (len(inbound._queue), blocked.task.done()) == (0, False)  # taken: ``run`` waits to send it
        for _ in range(9):  # the caller talks on meanwhile
            clock.advance(0.02)
            caller.push(1)
            await settle()
        if ending == "closed":
            blocked.close_with_1011.set()
            with pytest.raises(SessionError):
                await blocked.connection.receive()  # as the call's receiving side sees it end
            await settle()
            returned = blocked.task.done()
        elif ending == "stalled":
            failures += await asyncio.gather(blocked.task, return_exceptions=True)
    assert frame_marks(b"".join(received)) == caller.marks()
    assert (inbound.frames_to_ai, inbound.dropped_overflow) == (caller.pushed, 0) == (11, 0)
    if ending == "closed":
        assert returned  # at the False, rather than taking message after message for a closed session
    if ending == "stalled":
        assert [type(f) for f in failures] == [SessionError]  # ``run`` reports the stall: the call reconnects


async def test_inbound_frames_put_back_past_the_reconnect_buffer_are_dropped_oldest_first_and_counted() -> None:
    """The message ``run`` took goes back to the head of the queue: if the caller filled the reconnect buffer
    meanwhile, it is the oldest audio and goes first, counted as overflow like any."""
    clock = FakeClock(start=1000.0)
    audio = AudioSettings(upstream_message_ms=40, reconnect_buffer_ms=100)
    inbound = Inbound(audio, BargeInSettings(enabled=False), Metrics(), clock)
    inbound.limit_backlog(audio.reconnect_buffer_ms)  # 5 frames
    caller = NumberedCaller(inbound, clock)
    async with blocked_then_reconnected(inbound, clock) as (blocked, received):
        for _ in range(8):  # frames 0 and 1 taken; 2 dropped by ``push`` to keep 3..7
            caller.push(1)
            await settle()
            clock.advance(0.02)
        assert (len(inbound._queue), inbound.dropped_overflow, blocked.task.done()) == (5, 1, False)
    assert frame_marks(b"".join(received)) == caller.marks(3)
    assert (inbound.frames_to_ai, inbound.dropped_overflow) == (5, 3)
