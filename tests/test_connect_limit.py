"""How many /voice answers a call gets (``Admission.within_connect_limit``), on a real ``redis-server``: one
counter per call shared by the replicas, one command per answer however many the call has had."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest
import redis.asyncio as aioredis

from telephony_bridge.accounting.memory import MemoryAccounting
from telephony_bridge.admission import Admission, VoiceEndpoint
from telephony_bridge.clock import FakeClock, SystemClock
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.savants.client import open_voice_session
from telephony_bridge.savants.http_post import JsonPoster
from telephony_bridge.savants.tokens import TokenClient
from telephony_bridge.settings import TwilioSettings
from telephony_bridge.store import COUNT, MemoryStore, RedisStore, Store
from tests.redis_server import RedisServer, free_port

pytestmark = pytest.mark.timeout(30)

UNUSED_URL = "http://127.0.0.1:9"  # the answer count asks nothing of Savants
WINDOW_S = TwilioSettings().connect_window_s  # twilio.connect_window_s: 4 h by default

Replica = tuple[Admission, aioredis.Redis]
T = TypeVar("T")


@pytest.fixture
async def replica() -> AsyncIterator[Callable[[str], Replica]]:
    """``replica(redis_url)``: an ``Admission`` over a ``RedisStore`` with its own client, as each replica has."""
    made: list[aioredis.Redis] = []
    async with JsonPoster(UNUSED_URL) as http:

        def make(url: str) -> Replica:
            client = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=10)
            made.append(client)
            return _admission(RedisStore(client), http), client

        yield make
    for client in made:
        await client.aclose()


def _admission(store: Store, http: JsonPoster) -> Admission:
    clock = SystemClock()
    tokens = TokenClient(http, "test-key")
    voice = VoiceEndpoint(open_voice_session, UNUSED_URL, 1.0)
    return Admission(MemoryAccounting(("device-a",)), tokens, voice, store, Metrics(), clock)


async def test_connect_limit_is_one_count_shared_by_the_replicas(
    redis_server: RedisServer, replica: Callable[[str], Replica]
) -> None:
    (a, client), (b, _) = replica(redis_server.url), replica(redis_server.url)
    await client.flushdb()
    answered = [await admission.within_connect_limit("CA1", 3, WINDOW_S) for admission in (a, b, b, a, b)]
    other_call = await b.within_connect_limit("CA2", 3, WINDOW_S)
    keys = sorted(await client.keys("*"))
    ttl_s = await client.pttl("tb:kv:voice-answers:CA1") / 1000
    assert (answered, other_call, keys) == (
        [True, True, True, False, False],
        True,
        ["tb:kv:voice-answers:CA1", "tb:kv:voice-answers:CA2"],
    )
    assert WINDOW_S == 4 * 3600 and WINDOW_S - 60 < ttl_s <= WINDOW_S


async def test_connect_limit_costs_one_redis_command_per_answer_even_the_thousandth(
    redis_server: RedisServer, replica: Callable[[str], Replica]
) -> None:
    """It cost one ``SET NX`` per answer the call had already had: the 1000th answer, 1000 round trips."""
    (a, client), (b, b_client) = replica(redis_server.url), replica(redis_server.url)
    await client.flushdb()
    await b_client.ping()  # connected before MONITOR starts: a new connection introduces itself with commands
    for _ in range(998):  # also loads the script: its first run after Redis starts costs a SCRIPT LOAD
        await a.within_connect_limit("CA1", 1000, WINDOW_S)

    async def last_answers() -> list[bool]:
        return [await admission.within_connect_limit("CA1", 1000, WINDOW_S) for admission in (b, a, b)]

    answered, commands = await _monitored(redis_server.port, client, last_answers)
    key, sha = "tb:kv:voice-answers:CA1", hashlib.sha1(COUNT.encode()).hexdigest()
    ttl_ms = str(int(WINDOW_S * 1000))
    assert answered == [True, True, False]  # the 999th, the 1000th and the 1001st answer
    sent = [args for source, args in commands if source == "client"]
    scripted = [args for source, args in commands if source == "lua"]  # in whichever order Redis prints the two
    assert (sent, scripted) == ([["evalsha", sha, "1", key, ttl_ms]] * 3, [["incr", key]] * 3)


async def test_connect_limit_gives_way_when_redis_does_not_answer(replica: Callable[[str], Replica]) -> None:
    admission, _ = replica(f"redis://127.0.0.1:{free_port()}/0")
    assert await admission.within_connect_limit("CA1", 1, WINDOW_S) is True
    assert await admission.within_connect_limit("CA1", 1, WINDOW_S) is True


MONITOR_LINE = re.compile(r"^\+[\d.]+ \[\d+ (?P<source>[^\]]+)\] (?P<command>.*)$")
MONITOR_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')
SENTINEL = "end-of-monitored"


async def _monitored(
    port: int, client: aioredis.Redis, run: Callable[[], Awaitable[T]]
) -> tuple[T, list[tuple[str, list[str]]]]:
    """What ``run`` returned, and every command Redis executed meanwhile, as ``("client", args)`` for one a
    client sent or ``("lua", args)`` for one a script ran (the command's name in lower case)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"MONITOR\r\n")
        assert await reader.readline() == b"+OK\r\n"
        result = await run()
        await client.echo(SENTINEL)  # executed after everything ``run`` awaited, so printed after it too
        commands: list[tuple[str, list[str]]] = []
        while True:
            line = (await asyncio.wait_for(reader.readline(), 5)).decode().rstrip("\r\n")
            match = MONITOR_LINE.match(line)
            assert match is not None, line
            name, *args = MONITOR_ARG.findall(match["command"])
            if [name.lower(), *args] == ["echo", SENTINEL]:
                return result, commands
            commands.append(("lua" if match["source"] == "lua" else "client", [name.lower(), *args]))
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_calls_answers_are_counted_for_the_window_and_then_forgotten() -> None:
    """``twilio.connect_window_s``: past the limit within the window, refused; once the window from the call's
    first answer has passed, its counter is gone (in one process without Redis: the memory it held with it)."""
    clock = FakeClock()
    store = MemoryStore(clock)
    async with JsonPoster(UNUSED_URL) as http:
        admission = _admission(store, http)
        first = [await admission.within_connect_limit("CA1", 2, 60.0) for _ in range(3)]
        clock.advance(59.0)
        still = await admission.within_connect_limit("CA1", 2, 60.0)
        clock.advance(1.0)
        await store.put("unrelated", "x", 1.0)  # a later write sweeps what has expired (store.SWEEP_EVERY_S)
        clock.advance(10.0)
        await store.put("unrelated", "x", 1.0)
        held_after = len(store)
        again = await admission.within_connect_limit("CA1", 2, 60.0)
    assert (first, still, again) == ([True, True, False], False, True)
    assert held_after == 1  # only "unrelated": the call's counter was swept
