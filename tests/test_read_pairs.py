"""The media stream read a pair of messages at a time (``twilio/read_pairs.py``).

The kernel's part (``SO_RCVLOWAT`` holds a lone message, lets two through, and wakes the reader when the mark is
lowered) on a real TCP socket under epoll, as uvloop waits on it; the pairing's rules on a fake clock; and end to
end, a bridge under uvicorn with the Savants emulator: a steady stream pairs, a lone message after it (a keypad
digit, the client's close frame) is still read within two ticks, and everything is released afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import time
from collections.abc import Callable, Iterator

import orjson
import pytest

from telephony_bridge.clock import FakeClock
from telephony_bridge.serving import ServerThread
from telephony_bridge.twilio.read_pairs import FRAME_HEADER_BYTES, STEADY_RUN, TICK_S, ReadPairs
from tests.support import bridge_settings, wait_until
from tests.test_client_quirks import SPEECH, media, released, sender, webhook

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


def readable(sock: socket.socket, epoll: select.epoll) -> bool:
    return bool(epoll.poll(0.05))


def test_the_kernel_holds_a_lone_message_and_lets_it_go_when_the_mark_drops(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    """What the design stands on, under epoll as uvloop waits: one message under the mark wakes no one, two do,
    and lowering the mark wakes the reader for what is held, without more data."""
    client, server = tcp_pair
    pairs = ReadPairs(FakeClock())
    pairing = pairs.pairing(server)
    assert pairing is not None
    with select.epoll() as epoll:
        epoll.register(server.fileno(), select.EPOLLIN)
        pairing.set_lowat((MEDIA_BYTES + FRAME_HEADER_BYTES) * 3 // 2)
        client.sendall(b"m" * (MEDIA_BYTES + FRAME_HEADER_BYTES))
        time.sleep(0.02)
        assert not readable(server, epoll)
        client.sendall(b"m" * (MEDIA_BYTES + FRAME_HEADER_BYTES))
        assert readable(server, epoll)
        server.recv(4096)
        client.sendall(b"d" * 100)  # a keypad digit alone
        time.sleep(0.02)
        assert not readable(server, epoll)
        pairing.set_lowat(1)
        assert readable(server, epoll)


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


@pytest.mark.parametrize("size", [120, 520, 1200])  # marks alone; 40 ms or longer messages: never held
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
    clock = FakeClock()
    pairs = ReadPairs(clock)
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
    assert not pairing.armed and lowat(server) == 1 and pairs.let_go_quiet == 1
    assert len(pairs) == 0 and pairs._timer is None  # nothing paired: no tick either


# --- end to end --------------------------------------------------------------------------------------------------


def read_pairs_of(bridge: ServerThread) -> ReadPairs:
    pairs = bridge.server.config.app.state.read_pairs
    assert isinstance(pairs, ReadPairs)
    return pairs


async def test_a_steady_stream_pairs_and_a_lone_message_after_it_is_still_read(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture
) -> None:
    """Speech in real time pairs the stream; a keypad digit sent alone afterwards (nothing to pair it with) is read
    within the watchdog's two ticks, and so is the client's close frame once the stream has paired again. The
    client echoes no marks, so that nothing it sends can make the digit's pair."""
    bridge = start_bridge(bridge_settings(emulator))
    pairs = read_pairs_of(bridge)
    call_sid, params = webhook(bridge)
    with caplog.at_level(logging.INFO):
        async with sender(bridge, call_sid, params, echo_marks=False) as caller:
            await caller.send_frames(SPEECH[: 50 * 160])  # 1 s
            await asyncio.to_thread(wait_until, lambda: len(pairs) == 1, 5.0, "the stream paired")
            digit = {"event": "dtmf", "streamSid": caller.stream_sid, "dtmf": {"track": "inbound_track", "digit": "5"}}
            await caller.ws.send(orjson.dumps(digit).decode())
            sent_at = time.monotonic()
            await asyncio.to_thread(
                wait_until, lambda: any("dtmf key" in r.getMessage() for r in caplog.records), 5.0, "the digit read"
            )
            assert time.monotonic() - sent_at < 1.0  # two ticks are 0.1 s; held for good, it would never come
            assert pairs.let_go_quiet == 1 and len(pairs) == 0
            await caller.send_frames(SPEECH[: 25 * 160])  # paired again
            await asyncio.to_thread(wait_until, lambda: len(pairs) == 1, 5.0, "the stream paired again")
            closing_at = time.monotonic()
        closed_in_s = time.monotonic() - closing_at  # the client's close, answered (its timeout is 10 s)
    assert closed_in_s < 2.0 and pairs.let_go_quiet == 2
    released(bridge, emulator)
    assert len(pairs) == 0


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
