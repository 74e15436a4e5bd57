"""Soak: thousands of short calls with a mix of faults, and whether the bridge holds on to anything afterwards.

    .venv/bin/python bench/soak.py [--calls 2000] [--concurrency 8] [--seconds 1.5] [--deadline 1800]
        [--scenario NAME ...] [--no-faults] [--tracemalloc N] [--bridge-log FILE]

Two processes on 127.0.0.1: the Savants emulator (``telephony-bridge emulator``, voice ``echo``) with fault
switches armed at random per session and per token request (closes with 1000/1001/1011/1012, ``error``
messages, TCP resets, stalls, handshakes never confirmed, garbage; token 503s and slow answers; none with
``--no-faults``), and the bridge (``telephony-bridge serve``, production mode: signed webhooks, stream
tokens). This process plays Twilio: each call is one scenario (mostly a normal call; some hang up by
dropping TCP, send garbage, present a wrong stream token, never open their stream, or go silent;
``--scenario`` keeps only the named ones), ``--concurrency`` at a time. The 16 warm-up calls always run the
whole mix.

Printed: what the bridge holds when idle, after a warm-up, and at the end (once its calls and reservations
have settled): calls, leases, reservations, AI sessions open at the emulator, asyncio tasks, open file
descriptors (and how many are idle keep-alive connections to the token endpoint), resident memory, Python's
allocated blocks (before and after a full collection), gc objects, and glibc's C heap in use and free; the
same memory figures every ``--sample-every`` calls during the run, so a level is told from a slope; the
cyclic garbage waiting for the collector at the end, by type; and the calls by scenario and outcome.
A run that fails on something held prints each held call's ``/status`` entry and where each of the bridge's
tasks waits (``GET /debug/tasks``); ``--bridge-log FILE`` keeps the bridge's log to follow the call in.
``--tracemalloc N`` runs the bridge under tracemalloc (much more memory and CPU) and adds the traced heap and
the allocation sites that grew from the warm-up to the end (``GET /debug/heap``). The run fails (exit 1) if
anything is still held at the end: a call, a lease, a reservation, an AI session, more tasks than after the
warm-up, or descriptors other than the token client's keep-alive pool; or if resident memory ends more than
MAX_RSS_GROWTH_MB above the warm-up, or (in a run longer than LEVEL_AFTER_CALLS) has not levelled off after it.
The bridge counts each call's /voice answers for ``twilio.connect_window_s``, set to a minute here (see
``start_processes``): with the default 4 h that memory grows with every call of a run by design.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import numpy as np
import numpy.typing as npt
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from telephony_bridge.tools.caller import new_sid
from telephony_bridge.tools.commands import read_wav
from telephony_bridge.tools.twilio_flow import FlowError, place_call, run_flow, sign
from telephony_bridge.twilio import protocol as tw

ROOT = Path(__file__).resolve().parent.parent
WAV = str(ROOT / "tests" / "data" / "speech_8k.wav")
AUTH_TOKEN = "soak-auth-token-0123456789abcdef"
PUBLIC_URL = "https://bridge.soak.test"
API_KEY = "soak-key"
SETTLE_S = 30.0  # after the last call: reservations lapse (10 s), stalled sessions end, calls close
WARM_UP_CALLS = 16
GARBAGE_TYPES = 200  # the cyclic garbage's types asked of /debug/heap: room for each frame by where it ran
OURS_IN_GARBAGE = ("telephony_bridge.", "picows.", "builtins.frame")
# Memory: resident memory climbs over the first ~750 calls (the working set of --concurrency calls in flight and the
# allocators' high water), then stays level (README, Operations: soak; the runs in docs/performance.md, "Soak, 4 and
# 5 Dec"). With the collector's young threshold at 50,000 it climbed for ~12 minutes and 20 MB, each call's cyclic
# garbage piling up between collections; ops/gc_tuning.py says why it is CPython's 700 now. Runs longer than
# LEVEL_AFTER_CALLS must show the level; every run must stay within MAX_RSS_GROWTH_MB of the warm-up.
LEVEL_AFTER_CALLS = 1000
MAX_LEVEL_GROWTH_MB = 2.0  # RSS growth allowed across the samples after LEVEL_AFTER_CALLS
MAX_RSS_GROWTH_MB = 10.0  # end less after the warm-up, whatever the length of the run

# Each AI session and token request meets at most one fault: the first armed one whose draw hits.
SESSION_FAULTS = [
    "kind=close,close_code=1011,after_s=0.8,probability=0.04",
    "kind=close,close_code=1001,after_s=0.8,probability=0.03",
    "kind=close,close_code=1012,after_s=0.6,probability=0.03",
    "kind=close,close_code=1000,after_s=1.0,probability=0.03",
    "kind=error,error_code=SERVER_ERROR,after_s=0.7,probability=0.03",
    "kind=reset,after_s=0.8,probability=0.03",
    "kind=stall,after_s=0.5,stall_s=4,probability=0.02",
    "kind=no_confirm,probability=0.01",
    "kind=garbage,after_s=0.5,probability=0.02",
]
TOKEN_FAULTS = ["status=503,probability=0.03", "delay_s=1.5,probability=0.01"]

# What the caller (this process, as Twilio) does, with weights.
SCENARIOS = {
    "normal": 80,
    "caller_drops_tcp": 5,
    "caller_garbage": 5,
    "wrong_stream_token": 3,
    "stream_never_opens": 4,
    "twilio_goes_silent": 3,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise SystemExit(f"soak: {url} did not answer within {timeout_s} s")


def start_processes(
    devices: int, seed: int, tracemalloc_frames: int, inject_faults: bool = True, bridge_log: str | None = None
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], str, str]:
    emulator_port, bridge_port = free_port(), free_port()
    python = [sys.executable, "-m", "telephony_bridge"]
    faults: list[str] = []
    if inject_faults:
        faults += [a for spec in SESSION_FAULTS for a in ("--session-fault", spec)]
        faults += [a for spec in TOKEN_FAULTS for a in ("--token-fault", spec)]
    emulator = subprocess.Popen(
        [*python, "emulator", "--port", str(emulator_port), "--api-key", API_KEY, "--voice", "echo", "--log-level",
         "WARNING", "--fault-seed", str(seed), *faults],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    emulator_url = f"http://127.0.0.1:{emulator_port}"
    wait_for(emulator_url + "/_emulator/stats")
    env = {
        **os.environ,
        "SAVANTS_BASE_URL": emulator_url,
        "SAVANTS_API_KEY": API_KEY,
        "SAVANTS_DEVICE_IDS": ",".join(f"soak-device-{i}" for i in range(devices)),
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "PUBLIC_URL": PUBLIC_URL,
        "HOST": "127.0.0.1",
        "PORT": str(bridge_port),
        "LOG_LEVEL": "INFO" if bridge_log else "ERROR",
        # Each call's /voice answers are counted for twilio.connect_window_s (4 h) by design, in this process's
        # memory without Redis (~0.3 KB a call): a minute here, so that what grows over a run is what leaks.
        "BRIDGE__TWILIO__CONNECT_WINDOW_S": "60",
    }
    if tracemalloc_frames:
        env["PYTHONTRACEMALLOC"] = str(tracemalloc_frames)
    with open(bridge_log or os.devnull, "wb") as log:  # the child keeps its own descriptor
        bridge = subprocess.Popen([*python, "serve"], env=env, stderr=log)
    bridge_url = f"http://127.0.0.1:{bridge_port}"
    wait_for(bridge_url + "/healthz")
    return emulator, bridge, bridge_url, emulator_url


# --- what the bridge holds --------------------------------------------------------------------------------


def held(bridge_url: str) -> dict[str, Any]:
    status = httpx.get(bridge_url + "/status", timeout=10).json()
    devices = status["accounting"]["devices"].values()
    process = status["process"]
    traced = process["python_traced_bytes"]
    return {
        "calls": len(status["calls"]),
        "held_calls": status["calls"],
        "leases": sum(d["leases"] for d in devices),
        "reservations": sum(d["reservations"] for d in devices),
        "pid": process["pid"],
        "asyncio_tasks": process["asyncio_tasks"],
        "open_fds": process["open_fds"],
        "rss_mb": round(process["rss_bytes"] / 2**20, 1),
        "py_blocks_k": round(process["python_allocated_blocks"] / 1000),
        "malloc_used_mb": round(process["malloc"]["in_use_bytes"] / 2**20, 1) if process["malloc"] else None,
        "malloc_free_mb": round(process["malloc"]["free_bytes"] / 2**20, 1) if process["malloc"] else None,
        "traced_mb": None if traced is None else round(traced / 2**20, 1),
    }


def heap(bridge_url: str, by: str = "lineno") -> dict[str, Any]:
    """``/debug/heap``: gc objects after a full collection and, under tracemalloc, the traced heap and what grew
    since the previous call."""
    return httpx.get(bridge_url + "/debug/heap", params={"by": by, "top": GARBAGE_TYPES}, timeout=120).json()


def settle(bridge_url: str, emulator_url: str, timeout_s: float) -> dict[str, Any]:
    """What the bridge holds once nothing is left to end (or ``timeout_s`` has passed), with its sockets to
    the emulator (``savants_fds``) and the emulator's sessions still open (``ai_sessions``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = held(bridge_url)
        sessions = httpx.get(emulator_url + "/_emulator/stats", timeout=10).json()["sessions_active"]
        # The emulator's count too: it ends a session of its own later than the bridge does (a stalled one
        # only when its stall is over), so one checked once, as the bridge's calls end, may still be open.
        if (now["calls"], now["leases"], now["reservations"], sessions) == (0, 0, 0, 0) or time.monotonic() > deadline:
            time.sleep(1.0)  # sockets finish closing
            now = held(bridge_url)
            emulated = httpx.get(emulator_url + "/_emulator/stats", timeout=10).json()
            now["ai_sessions"] = emulated["sessions_active"]
            now["savants_fds"] = sockets_to(now["pid"], int(emulator_url.rsplit(":", 1)[1]))
            return now
        time.sleep(0.5)


def sockets_to(pid: int, port: int) -> int:
    """How many of ``pid``'s descriptors are TCP connections to 127.0.0.1:``port`` (Linux /proc). With no AI
    session open, those are the token client's idle keep-alive connections (httpx keeps up to 20)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    remote = f"0100007F:{port:04X}"
    lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[2] == remote and line.split()[9] in inodes)


def calls_by_outcome(bridge_url: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    metrics = httpx.get(bridge_url + "/metrics", timeout=10).text
    for match in re.finditer(r"^bridge_calls_total\{([^}]*)\} ([0-9.e+]+)$", metrics, re.MULTILINE):
        outcome = re.search(r'outcome="([^"]*)"', match.group(1))
        if outcome:
            counts[outcome.group(1)] += int(float(match.group(2)))
    return counts


# --- the callers --------------------------------------------------------------------------------------------


class Soak:
    def __init__(self, bridge_url: str, seconds: float, audio: npt.NDArray[np.int16], rng: random.Random) -> None:
        self.bridge_url = bridge_url
        self.ws_url = bridge_url.replace("http://", "ws://") + "/media-stream"
        self.seconds = seconds
        self.audio = audio
        self.rng = rng
        self.outcomes: Counter[tuple[str, str]] = Counter()

    async def call(self, http: httpx.AsyncClient, scenario: str) -> None:
        run: Callable[[httpx.AsyncClient], Awaitable[str]] = getattr(self, scenario)
        try:
            outcome = await asyncio.wait_for(run(http), self.seconds + 30)
        except (FlowError, OSError, TimeoutError, WebSocketException, httpx.HTTPError) as exc:
            outcome = f"error: {type(exc).__name__}"
        self.outcomes[(scenario, outcome)] += 1

    async def normal(self, http: httpx.AsyncClient) -> str:
        flow = await run_flow(
            self.bridge_url, http=http, audio_in=self.audio, seconds=self.seconds, auth_token=AUTH_TOKEN,
            public_url=PUBLIC_URL,
        )  # fmt: skip
        if flow.outcome == "failed" and flow.call is not None and flow.after is not None:
            return "ended by the bridge, then the apology"
        if flow.outcome == "served" and flow.call is not None and flow.call.ended_by == "bridge":
            return "ended by the bridge, then hang-up"
        return {"served": "served", "busy": "turned away (busy/unavailable)"}.get(flow.outcome, flow.reason[:60])

    async def _stream(self, http: httpx.AsyncClient, token: str | None) -> tuple[Any, str, str] | str:
        placed = await place_call(self.bridge_url, http=http, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN)
        if placed.twiml.connect is None:
            return "turned away (busy/unavailable)"
        params = dict(placed.twiml.connect.parameters)
        if token is not None:
            params["token"] = token
        headers = {"X-Twilio-Signature": sign(AUTH_TOKEN, PUBLIC_URL.replace("https", "wss") + "/media-stream", {})}
        ws = await connect(self.ws_url, proxy=None, compression=None, additional_headers=headers, open_timeout=10)
        stream_sid = new_sid("MZ")
        await ws.send(tw.Connected().to_json())
        await ws.send(tw.Start(stream_sid, placed.call_sid, placed.account_sid, custom_parameters=params).to_json())
        return ws, stream_sid, placed.call_sid

    async def _media(self, ws: Any, stream_sid: str, frames: int) -> None:
        for i in range(frames):
            chunk = bytes([0xFF]) * 160
            await ws.send(
                tw.Media(stream_sid, chunk, timestamp_ms=20 * i, chunk=i + 1, sequence_number=i + 3).to_json()
            )
            await asyncio.sleep(0.02)

    async def caller_drops_tcp(self, http: httpx.AsyncClient) -> str:
        opened = await self._stream(http, None)
        if isinstance(opened, str):
            return opened
        ws, stream_sid, _ = opened
        await self._media(ws, stream_sid, int(self.rng.uniform(0.3, 1.0) * self.seconds / 0.02))
        ws.transport.abort()  # no stop, no close frame: the caller's network died
        return "dropped"

    async def caller_garbage(self, http: httpx.AsyncClient) -> str:
        opened = await self._stream(http, None)
        if isinstance(opened, str):
            return opened
        ws, stream_sid, _ = opened
        await self._media(ws, stream_sid, 10)
        for junk in ("not json", "[1,2]", '{"event": "media", "media": {"payload": "%%%"}}', '{"event": 7}', b"\x00"):
            await ws.send(junk)
        await self._media(ws, stream_sid, 10)
        await ws.send(tw.Stop(stream_sid, "", "", sequence_number=30).to_json())
        await ws.close()
        return "sent garbage, then stop"

    async def wrong_stream_token(self, http: httpx.AsyncClient) -> str:
        opened = await self._stream(http, "not-the-token")
        if isinstance(opened, str):
            return opened
        ws, _, _ = opened
        with contextlib.suppress(WebSocketException):
            await asyncio.wait_for(ws.wait_closed(), 10)
        return f"refused at start ({ws.close_code})"

    async def stream_never_opens(self, http: httpx.AsyncClient) -> str:
        placed = await place_call(self.bridge_url, http=http, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN)
        if placed.twiml.connect is None:
            return "turned away (busy/unavailable)"
        if self.rng.random() < 0.5:
            return "left to lapse"
        form = {"CallSid": placed.call_sid, "AccountSid": placed.account_sid, "StreamSid": new_sid("MZ"),
                "StreamEvent": "stream-error", "StreamError": "could not connect"}  # fmt: skip
        headers = {"X-Twilio-Signature": sign(AUTH_TOKEN, PUBLIC_URL + "/stream-status", form)}
        await http.post(self.bridge_url + "/stream-status", data=form, headers=headers)
        return "stream-error callback"

    async def twilio_goes_silent(self, http: httpx.AsyncClient) -> str:
        opened = await self._stream(http, None)
        if isinstance(opened, str):
            return opened
        ws, stream_sid, _ = opened
        await self._media(ws, stream_sid, 10)
        try:  # nothing more from "Twilio": the bridge should end the call on its own
            async with asyncio.timeout(12):
                while True:
                    await ws.recv()
        except TimeoutError:
            await ws.close()
            return "still open after 12 s of silence (closed by us)"
        except WebSocketException:
            return f"ended by the bridge ({ws.close_code})"


async def run_calls(
    soak: Soak,
    calls: int,
    concurrency: int,
    deadline_s: float,
    sample_every: int = 0,
    scenarios: dict[str, int] | None = None,
) -> tuple[float, list[tuple[int, float, dict[str, Any]]]]:
    """Run the calls; every ``sample_every`` calls ended, note what the bridge holds (calls still in progress)."""
    names, weights = zip(*(scenarios or SCENARIOS).items(), strict=True)
    plan = soak.rng.choices(names, weights, k=calls)
    gate = asyncio.Semaphore(concurrency)
    started = time.monotonic()
    samples: list[tuple[int, float, dict[str, Any]]] = []
    ended = 0
    async with httpx.AsyncClient(trust_env=False, timeout=20) as http:

        async def one(scenario: str) -> None:
            nonlocal ended
            async with gate:
                if time.monotonic() - started < deadline_s:
                    await soak.call(http, scenario)
                else:
                    soak.outcomes[(scenario, "not run: deadline")] += 1
            ended += 1
            if sample_every and ended % sample_every == 0:
                samples.append((ended, time.monotonic() - started, await asyncio.to_thread(held, soak.bridge_url)))

        await asyncio.gather(*(one(s) for s in plan))
    return time.monotonic() - started, samples


def memory_verdict(
    warm: dict[str, Any], end: dict[str, Any], samples: list[tuple[int, float, dict[str, Any]]]
) -> tuple[bool, str]:
    """Within MAX_RSS_GROWTH_MB of the warm-up at the end and, when the run outlasted LEVEL_AFTER_CALLS, level
    (within MAX_LEVEL_GROWTH_MB) across the samples taken from it on."""
    growth = end["rss_mb"] - warm["rss_mb"]
    ok = growth <= MAX_RSS_GROWTH_MB
    verdict = f"RSS {growth:+.1f} MB since the warm-up (bound {MAX_RSS_GROWTH_MB:g} MB)"
    late = [s["rss_mb"] for n, _, s in samples if n >= LEVEL_AFTER_CALLS]
    if len(late) >= 2:
        slope = max(late) - late[0]
        ok = ok and slope <= MAX_LEVEL_GROWTH_MB
        verdict += f"; {slope:+.1f} MB across the {len(late)} samples from call {LEVEL_AFTER_CALLS} on"
        verdict += f" (bound {MAX_LEVEL_GROWTH_MB:g} MB)"
    else:
        verdict += f"; the run was too short to show the level (it comes after {LEVEL_AFTER_CALLS} calls)"
    return ok, verdict


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=1.5, help="length of a normal call")
    parser.add_argument("--devices", type=int, default=20, help="device pool (60 tokens a minute each)")
    parser.add_argument("--deadline", type=float, default=1800.0, help="stop starting calls after this long")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sample-every", type=int, default=250, help="note the bridge's memory every N calls")
    parser.add_argument(
        "--tracemalloc", type=int, default=0, metavar="FRAMES",
        help="run the bridge under tracemalloc with this many frames per site (slower) and print what grew",
    )  # fmt: skip
    parser.add_argument("--heap-by", choices=["lineno", "traceback"], default="lineno", help="group growth by")
    parser.add_argument(
        "--scenario", action="append", choices=sorted(SCENARIOS), default=None,
        help="run only this caller scenario (repeat for several; their weights are kept), to find what a level costs",
    )  # fmt: skip
    parser.add_argument("--no-faults", action="store_true", help="arm no emulator faults (Savants behaves)")
    parser.add_argument(
        "--bridge-log",
        metavar="FILE",
        help="write the bridge's log here, to trace a call still held (at INFO: dearer than the default ERROR)",
    )
    args = parser.parse_args()
    scenarios = {name: SCENARIOS[name] for name in args.scenario} if args.scenario else SCENARIOS

    emulator, bridge, bridge_url, emulator_url = start_processes(
        args.devices, args.seed, args.tracemalloc, inject_faults=not args.no_faults, bridge_log=args.bridge_log
    )
    try:
        audio = read_wav(WAV)
        soak = Soak(bridge_url, args.seconds, audio, random.Random(args.seed))
        idle, idle_heap = held(bridge_url), heap(bridge_url, args.heap_by)
        asyncio.run(run_calls(Soak(bridge_url, args.seconds, audio, random.Random(0)), WARM_UP_CALLS, 4, 120))
        warm, warm_heap = settle(bridge_url, emulator_url, SETTLE_S), heap(bridge_url, args.heap_by)
        outcomes_before = calls_by_outcome(bridge_url)
        elapsed_s, samples = asyncio.run(
            run_calls(soak, args.calls, args.concurrency, args.deadline, args.sample_every, scenarios)
        )
        end, end_heap = settle(bridge_url, emulator_url, SETTLE_S), heap(bridge_url, args.heap_by)
        end_tasks = httpx.get(bridge_url + "/debug/tasks", timeout=10).json()
        outcomes = calls_by_outcome(bridge_url) - outcomes_before
        emulated = httpx.get(emulator_url + "/_emulator/stats", timeout=10).json()
    finally:
        for process in (bridge, emulator):
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
            if process.poll() is None:
                process.kill()

    for moment, figures in ((idle, idle_heap), (warm, warm_heap), (end, end_heap)):
        moment["gc_objects_k"] = round(figures["gc_objects"] / 1000)
        moment["py_blocks_after_gc_k"] = round(figures["allocated_blocks"] / 1000)
        if figures["tracing"]:
            moment["heap_after_gc_mb"] = round(figures["traced_bytes"] / 2**20, 2)
    keys = ["calls", "leases", "reservations", "ai_sessions", "asyncio_tasks", "open_fds", "savants_fds", "rss_mb"]
    keys += ["py_blocks_k", "py_blocks_after_gc_k", "gc_objects_k", "malloc_used_mb", "malloc_free_mb"]
    keys += ["traced_mb", "heap_after_gc_mb"] if args.tracemalloc else []
    print(f"soak: {args.calls} calls, {args.concurrency} at a time, {args.seconds:g} s each, in {elapsed_s:.0f} s")
    print()
    moments = (("idle", idle), (f"after {WARM_UP_CALLS} warm-up calls", warm), ("end", end))
    print(table([("", *keys), *[(name, *(str(s.get(k, "-")) for k in keys)) for name, s in moments]]))
    if samples:
        print()
        print(f"during the run (every {args.sample_every} calls, {args.concurrency} calls in progress):")
        trend = ["calls", "rss_mb", "py_blocks_k", "malloc_used_mb", "malloc_free_mb"]
        trend += ["traced_mb"] if args.tracemalloc else []
        rows = [("calls ended", "s", *trend[1:])]
        rows += [(str(n), f"{t:.0f}", *(str(s[k]) for k in trend[1:])) for n, t, s in samples]
        print(table(rows))
    if end_heap.get("growth"):
        print()
        print("Python heap growth from the warm-up to the end, by allocation site (after a full gc):")
        rows = [("site", "bytes", "+bytes", "blocks", "+blocks")]
        rows += [
            (g["site"], str(g["bytes"]), f"{g['bytes_diff']:+d}", str(g["blocks"]), f"{g['blocks_diff']:+d}")
            for g in end_heap["growth"][:15]  # /debug/heap was asked for GARBAGE_TYPES entries of each
        ]
        print(table(rows))
    garbage = end_heap.get("cyclic_garbage")
    if garbage:
        print()
        print(f"cyclic garbage waiting for the collector at the end: {garbage['objects']} objects;", end=" ")
        print(", ".join(f"{name} {count}" for name, count in garbage["top_types"][:15]))
        ours = [(name, count) for name, count in garbage["top_types"] if name.startswith(OURS_IN_GARBAGE)]
        if ours:  # a frame holds all its locals; ours should leave nothing (tests/test_task_group.py)
            print("  of it the bridge's own, and frames by where they ran:", end=" ")
            print(", ".join(f"{name} {count}" for name, count in ours))
    print()
    rows = [("scenario", "outcome (caller's view)", "calls")]
    rows += [(s, o, str(n)) for (s, o), n in sorted(soak.outcomes.items())]
    print(table(rows))
    print()
    print("bridge_calls_total by outcome:", dict(sorted(outcomes.items())))
    print("emulator: faults injected", emulated["faults"]["injected"])
    print(f"emulator: {emulated['sessions_opened']} sessions, limit violations {len(emulated['violations'])}")
    memory = memory_verdict(warm, end, samples)
    print(f"soak: memory: {memory[1]}")
    leaked = [k for k in ("calls", "leases", "reservations", "ai_sessions") if end[k]]
    leaked += ["asyncio_tasks"] if end["asyncio_tasks"] > warm["asyncio_tasks"] + 2 else []
    # Idle keep-alive connections to the token endpoint are the HTTP client's pool, not a leak (none are AI
    # sessions: the emulator has none open); any other descriptor is.
    leaked += ["open_fds"] if end["open_fds"] - end["savants_fds"] > warm["open_fds"] - warm["savants_fds"] + 2 else []
    if leaked:
        for call in end["held_calls"]:
            print("soak: a call still held at the end (/status):", call)
        print(f"soak: the bridge's {end_tasks['count']} tasks at the end, and where each waits (/debug/tasks):")
        for task in end_tasks["tasks"]:
            print(f"  {task['name']}: {' > '.join(task['awaiting'])}")
        print(f"soak: FAILED: still held at the end: {', '.join(leaked)}")
        return 1
    if not memory[0]:
        print("soak: FAILED: memory")
        return 1
    print("soak: nothing held at the end, memory within its bounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
