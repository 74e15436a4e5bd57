"""Real servers on 127.0.0.1 free ports: the Savants emulator and the bridge, each under uvicorn."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from telephony_bridge.app import create_app
from telephony_bridge.serving import ServerThread
from telephony_bridge.settings import Settings, load_settings
from telephony_bridge.tools.emulator import STATS_PATH, EmulatorConfig, create_emulator_app

DEVICE_IDS = ["device-a", "device-b"]


@pytest.fixture
def start_emulator() -> Iterator[Callable[..., ServerThread]]:
    servers: list[ServerThread] = []

    def start(**config: Any) -> ServerThread:
        config.setdefault("api_key", "test-key")
        server = ServerThread(create_emulator_app(EmulatorConfig(**config)))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def emulator(start_emulator: Callable[..., ServerThread]) -> ServerThread:
    return start_emulator(voice="echo")


def bridge_settings(emulator: ServerThread, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "savants.base_url": emulator.http_url,
        "savants.api_key": "test-key",
        "savants.device_ids": DEVICE_IDS,
        "server.host": "127.0.0.1",
        "server.port": 0,
    }
    values.update(overrides)
    return load_settings(env={}, **values)


@pytest.fixture
def start_bridge() -> Iterator[Callable[..., ServerThread]]:
    servers: list[ServerThread] = []

    def start(settings: Settings, **deps: Any) -> ServerThread:
        server = ServerThread(create_app(settings, **deps))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def bridge(emulator: ServerThread, start_bridge: Callable[..., ServerThread]) -> ServerThread:
    return start_bridge(bridge_settings(emulator))


def emulator_stats(emulator: ServerThread) -> dict[str, Any]:
    return httpx.get(emulator.http_url + STATS_PATH, timeout=5).json()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition") -> None:
    """Poll a condition another process or thread will make true; fail with ``what`` if it never does."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)
