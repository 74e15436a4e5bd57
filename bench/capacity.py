"""What a call costs the bridge: CPU per call, against a bare WebSocket echo server under the same load.

    .venv/bin/python bench/capacity.py [--calls 20 50] [--seconds 12]

Three processes on 127.0.0.1: the Savants emulator (voice ``echo``), the server under test, and the simulated
callers (``loadtest``: Twilio's full flow, 20 ms media each way in real time). The server under test is
``telephony-bridge serve`` (the real thing: μ-law, resampling, pacing, marks, VAD, a Savants socket per call),
then the naive floor: a Starlette app that answers ``/voice`` and echoes each media frame straight back (no
codec, no AI socket). The bridge process's CPU time is read from /proc over the steady middle of each run, so
what the callers and the emulator spend on the other core does not count. Per call per 20 ms is the figure
to compare between versions of the bridge.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from telephony_bridge.tools.loadtest import run_load

ROOT = Path(__file__).resolve().parent.parent
AUTH_TOKEN = "bench-auth-token-0123456789abcdef"
PUBLIC_URL = "https://bridge.bench.test"
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def wait_for(url: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def start(args: list[str], env: dict[str, str], health: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(args, env={**os.environ, **env}, stderr=subprocess.DEVNULL)
    wait_for(health)
    return process


def measure(pid: int, url: str, calls: int, seconds: float) -> tuple[float, str]:
    """Bridge CPU µs per call per 20 ms over the steady middle of a run, and the callers' verdict."""
    ramp_s = 2.0

    async def run() -> tuple[float, object]:
        wav = str(ROOT / "tests" / "data" / "speech_8k.wav")
        load = asyncio.create_task(run_load(url, calls, calls, seconds, ramp_s, AUTH_TOKEN, PUBLIC_URL, wav=wav))
        await asyncio.sleep(ramp_s + 1.5)
        window_s = seconds - 3.0
        before = cpu_s(pid)
        await asyncio.sleep(window_s)
        used = cpu_s(pid) - before
        result = await load
        return used / window_s, result

    cpu_fraction, result = asyncio.run(run())
    per_call = 1e6 * cpu_fraction / calls * 0.020
    served = len(result.of("served"))  # type: ignore[attr-defined]
    verdict = f"{served}/{calls} served, {result.underruns} underruns, {result.violations} violations"  # type: ignore[attr-defined]
    return per_call, f"{100 * cpu_fraction:5.1f} % CPU  {per_call:5.1f} µs/call/20 ms  ({verdict})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--seconds", type=float, default=12.0)
    args = parser.parse_args()
    python = sys.executable
    emulator_port = free_port()
    emulator = start(
        [python, "-m", "telephony_bridge", "emulator", "--port", str(emulator_port), "--api-key", "bench-key"],
        {},
        f"http://127.0.0.1:{emulator_port}/_emulator/stats",
    )
    try:
        for label, command, env in servers(python, emulator_port):
            port = free_port()
            server = start(command, {**env, "PORT": str(port)}, f"http://127.0.0.1:{port}/healthz")
            try:
                for calls in args.calls:
                    _, line = measure(server.pid, f"ws://127.0.0.1:{port}/media-stream", calls, args.seconds)
                    print(f"{label:34} {calls:4} calls: {line}", flush=True)
            finally:
                server.terminate()
                server.wait()
    finally:
        emulator.terminate()
        emulator.wait()
    return 0


def servers(python: str, emulator_port: int) -> list[tuple[str, list[str], dict[str, str]]]:
    bridge_env = {
        "SAVANTS_BASE_URL": f"http://127.0.0.1:{emulator_port}",
        "SAVANTS_API_KEY": "bench-key",
        "SAVANTS_DEVICE_IDS": ",".join(f"bench-{i}" for i in range(20)),
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "PUBLIC_URL": PUBLIC_URL,
        "HOST": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
    }
    echo = [python, str(Path(__file__).resolve().parent / "echo_server.py")]
    return [
        ("telephony-bridge serve", [python, "-m", "telephony_bridge", "serve"], bridge_env),
        ("naive floor: bare WebSocket echo", echo, {}),
    ]


if __name__ == "__main__":
    raise SystemExit(main())
