"""Caller audio handed straight to the call core (``leg.CallerLeg.deliver_audio_to``): a Twilio leg on a real
picows stream socket (``StreamSocket``) and a ``websockets`` client on 127.0.0.1. Audio goes to the core from
the socket's read callback, outside any task (no task switch per frame); anything queued for ``receive`` keeps
the audio after it in order; what the core's handler raises comes out of ``receive``. (Whole calls over this
path run throughout the suite: it is the default.)"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from picows import ws_create_server
from websockets.asyncio.client import ClientConnection, connect

from telephony_bridge.clock import SystemClock
from telephony_bridge.errors import CallerGone
from telephony_bridge.leg import CallerAudio, Digit, DirectAudio, PlayedUpTo
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.settings import TwilioSettings
from telephony_bridge.twilio import protocol as tw
from telephony_bridge.twilio.leg import TwilioLeg
from telephony_bridge.twilio.outbound_messages import OutMedia, parse_outbound
from telephony_bridge.twilio.stream_socket import StreamSocket

CALL = contextvars.ContextVar("CALL", default="")
STREAM_SID = "MZ00000000000000000000000000000001"
CALL_SID = "CA00000000000000000000000000000001"


def media(chunk: int) -> str:
    return tw.Media(STREAM_SID, bytes([chunk]) * 160, chunk * 20, chunk, chunk + 2).to_json()


def mark(name: str) -> str:
    return tw.Mark(STREAM_SID, name, sequence_number=99).to_json()


class Queued:
    """A socket with no read callback or synchronous send (Starlette's, under ``server.websocket: uvicorn``)."""

    def __init__(self, frames: list[str]) -> None:
        self.frames = frames

    async def receive(self) -> dict[str, str]:
        return {"type": "websocket.receive", "text": self.frames.pop(0)}

    async def send_text(self, data: str) -> None: ...
    async def close(self, code: int = 1000, reason: str | None = None) -> None: ...


@asynccontextmanager
async def leg_and_caller() -> AsyncIterator[tuple[TwilioLeg, ClientConnection]]:
    """A ``TwilioLeg`` on the server side of a picows stream, and the client (Twilio's side) connected to it."""
    opened: asyncio.Future[StreamSocket] = asyncio.get_running_loop().create_future()
    server = await ws_create_server(lambda _request: StreamSocket(opened.set_result), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with connect(f"ws://127.0.0.1:{port}/media-stream", proxy=None) as caller:
            socket = await asyncio.wait_for(opened, 5)
            leg = TwilioLeg(socket, TwilioSettings(), Metrics(), SystemClock())
            leg.stream_id = STREAM_SID
            yield leg, caller
    finally:
        server.close()


async def test_audio_goes_to_the_core_from_the_read_callback_and_stays_in_order_behind_a_queued_mark() -> None:
    """...and in the context of the task that attached the handler: what the core logs there names the call."""
    handed: asyncio.Queue[tuple[bytes, int | None, bool, str]] = asyncio.Queue()

    def handler(ulaw: bytes, timestamp_ms: int | None) -> None:
        handed.put_nowait((ulaw, timestamp_ms, asyncio.current_task() is None, CALL.get()))

    async with leg_and_caller() as (leg, caller), asyncio.timeout(10):
        token = CALL.set(CALL_SID)
        leg.deliver_audio_to(handler)
        CALL.reset(token)
        await caller.send(media(1))
        await caller.send(media(2))
        assert await handed.get() == (b"\x01" * 160, 20, True, CALL_SID)  # from the read callback: no task
        assert await handed.get() == (b"\x02" * 160, 40, True, CALL_SID)
        # Nobody reads the mark yet: the media after it waits behind it, for ``receive``.
        await caller.send(mark("m1"))
        await caller.send(media(3))
        await (await caller.ping())  # the server read both before it answered (picows reads in order)
        assert handed.empty()
        assert await leg.receive() == PlayedUpTo("m1")
        assert await leg.receive() == CallerAudio(b"\x03" * 160, 60)
        await caller.send(media(4))  # the queue is empty again: straight to the core
        assert await handed.get() == (b"\x04" * 160, 80, True, CALL_SID)


async def test_a_mark_echo_goes_to_the_cores_mark_handler_from_the_read_callback_in_order() -> None:
    """``deliver_marks_to``: a mark echo, read between media, reaches the core from the read callback like the
    audio around it (no task woken for it), in order; what that handler raises comes out of ``receive``."""
    handed: asyncio.Queue[tuple[str, object, bool, str]] = asyncio.Queue()

    def on_audio(ulaw: bytes, timestamp_ms: int | None) -> None:
        handed.put_nowait(("audio", ulaw[0], asyncio.current_task() is None, CALL.get()))

    def on_mark(name: str) -> None:
        if name == "bad":
            raise RuntimeError("a bug in the call core")
        handed.put_nowait(("mark", name, asyncio.current_task() is None, CALL.get()))

    async with leg_and_caller() as (leg, caller), asyncio.timeout(10):
        token = CALL.set(CALL_SID)
        leg.deliver_audio_to(on_audio)
        leg.deliver_marks_to(on_mark)
        CALL.reset(token)
        for message in (media(1), mark("m1"), media(2), mark("m2")):
            await caller.send(message)
        assert [await handed.get() for _ in range(4)] == [
            ("audio", 1, True, CALL_SID),
            ("mark", "m1", True, CALL_SID),
            ("audio", 2, True, CALL_SID),
            ("mark", "m2", True, CALL_SID),
        ]
        await caller.send(mark("bad"))
        with pytest.raises(RuntimeError, match="a bug in the call core"):
            await leg.receive()


async def test_a_mark_echo_comes_through_receive_without_a_mark_handler_or_once_it_is_detached() -> None:
    async with leg_and_caller() as (leg, caller), asyncio.timeout(10):
        leg.deliver_audio_to(lambda ulaw, _ts: None)
        await caller.send(mark("m1"))
        assert await leg.receive() == PlayedUpTo("m1")
        marks: list[str] = []
        leg.deliver_marks_to(marks.append)
        leg.deliver_marks_to(None)
        await caller.send(mark("m2"))
        assert await leg.receive() == PlayedUpTo("m2")
        assert marks == []


async def test_a_mark_echo_read_behind_an_unread_event_waits_behind_it_for_receive() -> None:
    """A keypad digit goes through ``receive``; a mark read while it waits there unread queues behind it, so the
    core sees them in the order Twilio sent them."""
    marks: list[str] = []
    async with leg_and_caller() as (leg, caller), asyncio.timeout(10):
        leg.deliver_audio_to(lambda ulaw, _ts: None)
        leg.deliver_marks_to(marks.append)
        await caller.send(tw.Dtmf(STREAM_SID, "5", sequence_number=7).to_json())
        await caller.send(mark("m1"))
        await (await caller.ping())  # the server read both before it answered
        assert marks == []
        assert await leg.receive() == Digit("5")
        assert await leg.receive() == PlayedUpTo("m1")
        await caller.send(mark("m2"))  # nothing waits now: straight to the handler
        await (await caller.ping())
        assert marks == ["m2"]


async def test_a_leg_without_a_read_callback_delivers_marks_through_receive() -> None:
    leg = TwilioLeg(Queued([mark("m1")]), TwilioSettings(), Metrics(), SystemClock())
    marks: list[str] = []
    leg.deliver_audio_to(lambda ulaw, _ts: None)
    leg.deliver_marks_to(marks.append)
    assert await leg.receive() == PlayedUpTo("m1")
    assert marks == []


async def test_a_detached_handler_gets_nothing_more() -> None:
    """The core detaches its handler when its pump ends (``deliver_audio_to(None)``): a call that has ended
    handles no more audio; what comes after is queued for a ``receive`` nobody makes."""
    handed: list[bytes] = []
    async with leg_and_caller() as (leg, caller), asyncio.timeout(10):
        leg.deliver_audio_to(lambda ulaw, _ts: handed.append(ulaw))
        leg.deliver_audio_to(None)
        await caller.send(media(1))
        assert await leg.receive() == CallerAudio(b"\x01" * 160, 20)
        assert handed == []


async def test_what_the_cores_handler_raises_comes_out_of_receive() -> None:
    def broken(ulaw: bytes, timestamp_ms: int | None) -> None:
        raise RuntimeError("a bug in the call core")

    async with leg_and_caller() as (leg, caller), asyncio.timeout(10):
        leg.deliver_audio_to(broken)
        await caller.send(media(1))
        with pytest.raises(RuntimeError, match="a bug in the call core"):
            await leg.receive()


async def test_a_leg_without_a_read_callback_delivers_audio_through_receive() -> None:
    """Without ``tap_text`` (a Starlette WebSocket under ``server.websocket: uvicorn``) the handler is never
    called: everything comes through ``receive``."""

    leg = TwilioLeg(Queued([media(1)]), TwilioSettings(), Metrics(), SystemClock())
    called: list[bytes] = []
    leg.deliver_audio_to(lambda ulaw, _ts: called.append(ulaw))
    assert await leg.receive() == CallerAudio(b"\x01" * 160, 20)
    assert called == []


def test_direct_audio_reports_what_the_handler_raised_once_it_is_checked() -> None:
    direct = DirectAudio()
    assert direct.deliver(b"\x00", 0) is False  # no handler: the leg queues it
    taken: list[bytes] = []
    direct.attach(lambda ulaw, _ts: taken.append(ulaw))
    assert direct.deliver(b"\x01", 20) is True and taken == [b"\x01"]
    direct.check()  # nothing raised: nothing to report

    def broken(ulaw: bytes, timestamp_ms: int | None) -> None:
        raise ValueError("boom")

    direct.attach(broken)
    assert direct.deliver(b"\x02", 40) is False  # queued: it wakes ``receive``...
    with pytest.raises(ValueError, match="boom"):
        direct.check()  # ...which raises it
    assert direct.deliver(b"\x03", 60) is False  # and from then on everything goes through ``receive``


@pytest.mark.parametrize("checked", [True, False])
def test_an_error_the_handler_raised_leaves_no_cycle_once_checked_or_detached(checked: bool) -> None:
    """The error's traceback holds the handler's frames, which (in a call) hold the call and so this path: the
    call ends by raising it (checked) or ends first and detaches (an AI's audio handler that failed as the caller
    left). Either way nothing may be left for the collector: a whole call's objects would wait in the oldest
    generation for a full collection, which is rare in a serving process."""
    direct = DirectAudio()
    call = {"direct": direct}  # what a real handler's frames reach: the call, which holds its paths

    def broken(ulaw: bytes, timestamp_ms: int | None, held: object = call) -> None:  # its frame holds the call
        raise ValueError("boom")

    gc.collect()
    gc.disable()
    try:
        direct.attach(broken)
        assert direct.deliver(b"\x02", 40) is False
        if checked:
            with pytest.raises(ValueError, match="boom"):
                direct.check()
            direct.check()  # raised once: nothing more to report
        direct.attach(None)  # the call's end
        gone = weakref.ref(direct)
        del direct, call, broken
        assert gone() is None, "the handler's error kept a cycle through the path"
    finally:
        gc.enable()


async def test_the_leg_sends_audio_synchronously_while_its_socket_takes_it() -> None:
    """``can_send_now``/``send_audio_nowait``: what ``Outbound`` uses to send a frame due on arrival from the AI
    leg's read callback. True on an open picows stream (the message reaches Twilio's side); False once the
    stream is closing (a send then raises ``CallerGone``), and on a socket with no such path (Starlette's, under
    ``server.websocket: uvicorn``)."""
    async with leg_and_caller() as (leg, caller), asyncio.timeout(10):
        assert leg.can_send_now()
        leg.send_audio_nowait(b"\x7f" * 320)
        assert parse_outbound(await caller.recv(), STREAM_SID) == OutMedia(b"\x7f" * 320)
        await leg.hang_up("completed")
        assert not leg.can_send_now()
        with pytest.raises(CallerGone):  # sent anyway: refused, no data frame after our close frame
            leg.send_audio_nowait(b"\x7f" * 160)
    assert not TwilioLeg(Queued([]), TwilioSettings(), Metrics(), SystemClock()).can_send_now()
