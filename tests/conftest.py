"""Real servers on 127.0.0.1 free ports: the Savants emulator, the scripted fake Savants (tests/fake_savants.py)
and the bridge, each under uvicorn; the bench's baselines in child processes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from telephony_bridge.app import create_app
from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.emulator import EmulatorConfig, create_emulator_app
from tests.fake_savants import FakeSavants
from tests.redis_server import RedisServer, RedisServerMissing, running_redis
from tests.support import bench_server, bridge_settings


@contextlib.contextmanager
def _servers(make_app: Callable[..., Any]) -> Iterator[Callable[..., ServerThread]]:
    """A factory of servers under uvicorn on free ports, all stopped when the test ends."""
    started: list[ServerThread] = []

    def start(*args: Any, **kwargs: Any) -> ServerThread:
        server = ServerThread(make_app(*args, **kwargs))
        server.start()
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


def _emulator_app(**config: Any) -> Any:
    config.setdefault("api_key", "test-key")
    return create_emulator_app(EmulatorConfig(**config))


@pytest.fixture
def start_emulator() -> Iterator[Callable[..., ServerThread]]:
    """``start_emulator(**EmulatorConfig fields)``; the API key defaults to the one bridge_settings uses."""
    with _servers(_emulator_app) as start:
        yield start


@pytest.fixture
def emulator(start_emulator: Callable[..., ServerThread]) -> ServerThread:
    return start_emulator(voice="echo")


@pytest.fixture
def start_bridge() -> Iterator[Callable[..., ServerThread]]:
    """``start_bridge(settings, **create_app dependencies)``."""
    with _servers(create_app) as start:
        yield start


@pytest.fixture
def start_bench_server(emulator: ServerThread) -> Iterator[Callable[[str, str], str]]:
    """``start_bench_server(script, device_ids)``: ``bench/<script>`` against ``emulator``, up; its media-stream
    URL. Stopped when the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda script, device_ids: stack.enter_context(bench_server(script, emulator, device_ids))


@pytest.fixture
def bridge(emulator: ServerThread, start_bridge: Callable[..., ServerThread]) -> ServerThread:
    return start_bridge(bridge_settings(emulator))


def redis_or_skip() -> Iterator[RedisServer]:
    """A real redis-server; without one, skip locally but fail under CI (the Redis backend must be tested)."""
    try:
        with running_redis() as server:
            yield server
    except RedisServerMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must test the Redis backend: {exc}")
        pytest.skip(f"Redis backend untested here: {exc}")


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from redis_or_skip()


@pytest.fixture
def own_redis_server() -> Iterator[RedisServer]:
    """A server of this test's own, which it may stop."""
    yield from redis_or_skip()


@pytest.fixture
def start_fake() -> Iterator[Callable[..., FakeSavants]]:
    """``start_fake(token=..., session=...)``: a scripted fake Savants (tests/fake_savants.py), up."""
    started: list[FakeSavants] = []

    def start(**kwargs: object) -> FakeSavants:
        fake = FakeSavants(**kwargs)  # type: ignore[arg-type]
        fake.server.start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.server.stop()
