"""The media stream read a pair of messages at a time (``twilio/read_pairs.py``).

The kernel's part (``SO_RCVLOWAT`` holds a lone message, lets two through, and wakes the reader when the mark is
lowered) on a real TCP socket under epoll, as uvloop waits on it; the pairing's rules on a fake clock; and end to
end, a bridge under uvicorn with the Savants emulator: a steady stream pairs, a lone message after it (a keypad
digit, the client's close frame) is still read within two ticks, and everything is released afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import orjson
import pytest
from websockets.exceptions import ConnectionClosed

from telephony_bridge.clock import FakeClock
from telephony_bridge.serving import ServerThread
from telephony_bridge.twilio.read_pairs import (
    FRAME_HEADER_BYTES,
    MAX_BYTES,
    MIN_BYTES,
    STEADY_RUN,
    TICK_S,
    ReadPairs,
    kernel_lets_go,
)
from tests.support import bridge_settings, metric_values, wait_until
from tests.test_client_quirks import SPEECH, Sender, media, released, sender, webhook

DATA = Path(__file__).parent / "data"
# A pause between two of the feeder's sends long enough for a quiet tick to let its stream go: a paired stream is
# read once a pair, so sends I apart space its reads I + 20 ms apart, and a tick with no read since the last lets go.
FEED_STALL_S = TICK_S - 0.02
# After a let-go, a stream pairs again once STEADY_RUN messages have come in a row, seen by the next tick or two.
REPAIR_S = STEADY_RUN * 0.02 + 2 * TICK_S
MEDIA_BYTES = len(media("MZ" + "0" * 32, SPEECH[:160]))  # a lean client's 20 ms media message


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(sender, receiver): a real TCP connection on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    with client, server:
        yield client, server


def lowat(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


def readable(epoll: select.epoll, wait_s: float) -> bool:
    return bool(epoll.poll(wait_s))


def test_the_kernel_holds_a_lone_message_and_lets_it_go_when_the_mark_drops(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    """What the design stands on, under epoll as uvloop waits: one message under the mark wakes no one, two do,
    and lowering the mark wakes the reader for what is held, without more data."""
    assert kernel_lets_go()  # Linux, as CI: the bridge pairs here
    client, server = tcp_pair
    pairs = ReadPairs(FakeClock())
    pairing = pairs.pairing(server)
    assert pairing is not None
    with select.epoll() as epoll:
        epoll.register(server.fileno(), select.EPOLLIN)
        pairing.set_lowat((MEDIA_BYTES + FRAME_HEADER_BYTES) * 3 // 2)
        client.sendall(b"m" * (MEDIA_BYTES + FRAME_HEADER_BYTES))
        assert not readable(epoll, 0.05)
        client.sendall(b"m" * (MEDIA_BYTES + FRAME_HEADER_BYTES))
        assert readable(epoll, 1.0)
        server.recv(4096)
        client.sendall(b"d" * 100)  # a keypad digit alone
        assert not readable(epoll, 0.05)
        pairing.set_lowat(1)
        assert readable(epoll, 1.0)


async def test_a_stream_pairs_after_a_steady_run_of_media_sized_messages(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    _, server = tcp_pair
    pairs = ReadPairs(FakeClock())
    pairing = pairs.pairing(server)
    assert pairing is not None
    for size in [900, 120] + [MEDIA_BYTES - 20] + [MEDIA_BYTES] * (STEADY_RUN - 2):  # the start, a mark, media
        pairing.heard(size)
    assert not pairing.armed and lowat(server) == 1
    pairing.heard(MEDIA_BYTES + 2)  # sequence numbers grow: like-sized still
    assert pairing.armed and len(pairs) == 1
    assert lowat(server) == (MEDIA_BYTES + 2 + FRAME_HEADER_BYTES) * 3 // 2  # the run's largest
    pairs.close()
    assert not pairing.armed and lowat(server) == 1


def test_twilio_media_messages_pair() -> None:
    """Twilio's own media message (373 bytes at a call's start, 389 after 3 h) is a 20 ms one."""
    size = len((DATA / "twilio" / "media.json").read_bytes().strip())
    assert MIN_BYTES <= size <= MAX_BYTES and MIN_BYTES <= size + 16 <= MAX_BYTES


@pytest.mark.parametrize("size", [120, 590, 1200])  # marks alone; 40 ms or longer messages: never held
async def test_messages_not_the_size_of_a_20_ms_frame_never_pair(
    tcp_pair: tuple[socket.socket, socket.socket], size: int
) -> None:
    _, server = tcp_pair
    pairs = ReadPairs(FakeClock())
    pairing = pairs.pairing(server)
    assert pairing is not None
    for _ in range(5 * STEADY_RUN):
        pairing.heard(size)
    assert not pairing.armed and len(pairs) == 0 and lowat(server) == 1


async def test_a_stream_that_reads_nothing_for_a_tick_is_let_go(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    _, server = tcp_pair
    clock, changes = FakeClock(), []
    pairs = ReadPairs(clock, count=changes.append)
    pairing = pairs.pairing(server)
    assert pairing is not None
    for _ in range(STEADY_RUN):
        pairing.reads += 1
        pairing.heard(MEDIA_BYTES)
    assert pairing.armed
    for _ in range(3):  # a pair every 40 ms: every tick sees reads
        pairing.reads += 1
        clock.advance(TICK_S)
        assert pairing.armed
    clock.advance(TICK_S)  # then nothing for a whole tick
    assert not pairing.armed and lowat(server) == 1 and changes.count("let_go") == 1
    assert len(pairs) == 0 and pairs._timer is None  # nothing paired: no tick either


# --- end to end --------------------------------------------------------------------------------------------------


def changes(bridge: ServerThread) -> dict[str, float]:
    """``bridge_media_paired_reads_total`` by change: streams ``paired``, and ``let_go`` after a quiet tick."""
    return {"paired": 0.0, "let_go": 0.0} | metric_values(bridge, "bridge_media_paired_reads_total", "change")


def read_pairs_of(bridge: ServerThread) -> ReadPairs:
    pairs = bridge.server.config.app.state.read_pairs
    assert isinstance(pairs, ReadPairs)
    return pairs


async def feed(caller: Sender, stop: asyncio.Event, gaps: list[tuple[float, float]] | None = None) -> None:
    """Speech in 20 ms media messages, in real time, until ``stop`` is set (between two messages). ``gaps``: the
    feeder's own stalls, as (when the send after one ended, its length): from the start of one send to the end
    of the next, when over ``FEED_STALL_S``, so a pause inside a send counts too."""
    at = 0
    began = time.monotonic()
    while not stop.is_set():
        await caller.ws.send(media(caller.stream_sid, SPEECH[at : at + 160]))
        ended = time.monotonic()
        if gaps is not None and ended - began > FEED_STALL_S:
            gaps.append((ended, ended - began))
        at = (at + 160) % (len(SPEECH) - 160)
        await asyncio.sleep(0.02)
        began = time.monotonic()


@contextlib.asynccontextmanager
async def paired(caller: Sender, pairs: ReadPairs) -> AsyncIterator[None]:
    """Feed the stream until it is paired; inside, nothing more is sent (and the stream may still be paired)."""
    stop = asyncio.Event()
    feeder = asyncio.create_task(feed(caller, stop))
    try:
        await asyncio.to_thread(wait_until, lambda: len(pairs) == 1, 10.0, "the stream paired")
    finally:
        stop.set()
        await feeder
    yield


async def test_a_lone_message_after_a_paired_stream_is_still_read(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture
) -> None:
    """A keypad digit sent alone once the media stops (nothing to pair it with) is read within the tick's two
    ticks, and so is the client's close frame. The client echoes no marks, so that nothing it sends can make
    the digit's pair. Held for good, neither would be read: the close would wait for the client's 10 s timeout."""
    bridge = start_bridge(bridge_settings(emulator))
    pairs = read_pairs_of(bridge)
    call_sid, params = webhook(bridge)
    with caplog.at_level(logging.INFO):
        async with sender(bridge, call_sid, params, echo_marks=False) as caller:
            async with paired(caller, pairs):
                digit = {
                    "event": "dtmf",
                    "streamSid": caller.stream_sid,
                    "dtmf": {"track": "inbound_track", "digit": "5"},
                }
                await caller.ws.send(orjson.dumps(digit).decode())
                await asyncio.to_thread(
                    wait_until, lambda: any("dtmf key" in r.getMessage() for r in caplog.records), 5.0, "the digit"
                )
            assert changes(bridge)["let_go"] >= 1 and len(pairs) == 0
            async with paired(caller, pairs):
                closing_at = time.monotonic()
        closed_in_s = time.monotonic() - closing_at
    assert closed_in_s < 5.0
    released(bridge, emulator)
    assert len(pairs) == 0
    counted = changes(bridge)
    assert counted["paired"] >= 2 and counted["let_go"] >= 1


async def test_our_close_lets_go_first(emulator: ServerThread, start_bridge: Callable[..., ServerThread]) -> None:
    """The bridge ends a paired call (``twilio.max_call_s``) while the client still sends: its close frame's
    answer is read at once, not after a quiet tick."""
    bridge = start_bridge(bridge_settings(emulator, **{"twilio.max_call_s": 1.5}))
    pairs = read_pairs_of(bridge)
    call_sid, params = webhook(bridge)
    async with sender(bridge, call_sid, params, echo_marks=False) as caller:
        stop = asyncio.Event()
        gaps: list[tuple[float, float]] = []
        feeder = asyncio.create_task(feed(caller, stop, gaps))
        await asyncio.to_thread(wait_until, lambda: len(pairs) == 1, 10.0, "the stream paired")
        async with asyncio.timeout(10):
            await caller.ws.wait_closed()  # the bridge closed it
        closed_at = time.monotonic()
        stop.set()
        with contextlib.suppress(ConnectionClosed):
            await feeder
    released(bridge, emulator)
    # Each pairing but the last ended quietly (the feeder may stall on a loaded machine); the last, by our close.
    # Unless the feeder stalled too near our close to pair again: then a quiet tick let the last one go too.
    counted = changes(bridge)
    assert len(pairs) == 0
    late_stall = any(closed_at - ended < REPAIR_S + length for ended, length in gaps)
    assert counted["let_go"] == counted["paired"] - 1 or (late_stall and counted["let_go"] == counted["paired"]), (
        counted,
        gaps,
        closed_at,
    )


async def test_paired_reads_off(emulator: ServerThread, start_bridge: Callable[..., ServerThread]) -> None:
    bridge = start_bridge(bridge_settings(emulator, **{"twilio.paired_reads": False}))
    assert bridge.server.config.app.state.read_pairs is None
    call_sid, params = webhook(bridge)
    async with sender(bridge, call_sid, params) as caller:
        await caller.send_frames(SPEECH[: 25 * 160])
    released(bridge, emulator)


async def test_no_pairing_when_the_ai_takes_20_ms_messages(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread]
) -> None:
    """With ``audio.upstream_message_ms: 20`` each frame goes as it comes: a held one would be 20 ms late."""
    bridge = start_bridge(bridge_settings(emulator, **{"audio.upstream_message_ms": 20}))
    assert bridge.server.config.app.state.read_pairs is None
