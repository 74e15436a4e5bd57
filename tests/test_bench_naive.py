"""bench/naive_bridge.py, the capacity baseline, carries a real call: a baseline that fails would make every
ratio bench/capacity.py prints meaningless."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.loadtest import run_load

pytestmark = pytest.mark.timeout(30)

NAIVE = Path(__file__).resolve().parent.parent / "bench" / "naive_bridge.py"
WAV = str(Path(__file__).resolve().parent / "data" / "speech_8k.wav")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def naive_bridge(emulator: ServerThread) -> Iterator[str]:
    port = _free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "SAVANTS_BASE_URL": emulator.http_url,
        "SAVANTS_API_KEY": "test-key",  # the emulator fixture's key
        "SAVANTS_DEVICE_IDS": "naive-1,naive-2",
    }
    process = subprocess.Popen([sys.executable, str(NAIVE)], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert time.monotonic() < deadline, "the naive bridge did not come up"
                time.sleep(0.1)
        yield f"ws://127.0.0.1:{port}/media-stream"
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


async def test_naive_bridge_echoes_the_caller_through_the_ai(naive_bridge: str) -> None:
    async with asyncio.timeout(20):
        result = await run_load(naive_bridge, 2, 2, 2.0, 0.1, None, None, WAV, deadline_s=15)
    assert (len(result.of("served")), result.violations) == (2, 0), [f.reason for f in result.flows]
    assert len(result.first_audio_s) == 2
    # The emulator's echo voice answers 0.2 s late: every round trip includes that, none is absurd.
    assert result.round_trips_s and result.round_trips_s[0] >= 0.2 and result.round_trips_s[-1] < 1.0
