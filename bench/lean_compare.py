"""The ``--compare`` drivers of bench/lean_ai.py and bench/lean_callers.py: the same calls with the full tool and
with the lean one, each side's CPU and the calls' figures side by side, a table a round (the rounds alternate the
two, since this machine's speed drifts between runs). Small runs' comparisons, not capacity figures.

- ``compare_ai`` (``lean_ai.py --compare``): a real bridge (``telephony-bridge serve``) with its voice streams on
  the emulator, then on the lean echo, measured by capacity.py's ``measure`` with the AI's process in the place of
  the server's (its own CPU, from /proc). The emulator gives the tokens in both runs; in the lean run its CPU
  (tokens only) is counted with the echo's in the AI side's whole-run figure. Every process is unpinned.
- ``compare_callers`` (``lean_callers.py --compare``): one server, the calls placed by the full callers, then by
  the lean ones, each load in a process of its own that measures its own CPU (``getrusage``).
"""

from __future__ import annotations

import asyncio
import os
import resource
import secrets
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import capacity  # bench/, beside this script
from capacity import RAMP_S, WARM_UP_S, cpu_s, free_port, start, start_emulator, start_lean_ai, whole_cpu

from telephony_bridge.cli import EMULATOR_JWT_SECRET_ENV
from telephony_bridge.tools.caller import FRAME_S
from telephony_bridge.tools.loadtest import LoadResult, percentile, run_load

GOAL = 1 / 3  # the lean echo's CPU per call at most a third of the emulator's
Figures = dict[str, Any]  # one run's figures, by the keys of a table's rows


def side_by_side(columns: dict[str, Figures], rows: Sequence[tuple[str, str]], width: int = 16) -> list[str]:
    """A table's lines: a header of the columns' names, then a line per ``(label, key)`` of ``rows``."""

    def shown(value: object) -> str:
        if isinstance(value, tuple):
            return "/".join(shown(v) for v in value)
        return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)

    lines = [f"{'':44}" + "".join(f"{name:>{width}}" for name in columns)]
    lines += [f"{label:44}" + "".join(f"{shown(f[key]):>{width}}" for f in columns.values()) for label, key in rows]
    return lines


# --- lean_ai.py --compare: the emulator's and the lean echo's CPU behind a real bridge -----------------------------


def compare_ai(calls: int, seconds: float, load_procs: int, rounds: int = 1) -> int:
    """``rounds`` alternating runs of each: a table a round."""
    token_key = {EMULATOR_JWT_SECRET_ENV: secrets.token_urlsafe(32)}
    emulator, emulator_port = start_emulator(token_key)
    lean: subprocess.Popen[bytes] | None = None
    tables: list[str] = []
    try:
        lean, lean_port = start_lean_ai(token_key)
        command, env = capacity.servers(sys.executable, emulator_port, 1)["bridge"]
        voice_env = {"emulator": {}, "lean": {"SAVANTS_WS_URL": f"ws://127.0.0.1:{lean_port}/voice-stream"}}
        with ProcessPoolExecutor(max_workers=load_procs) as pool:
            for _ in range(rounds):
                rows = {}
                for ai, process in (("emulator", emulator), ("lean", lean)):
                    bridge = (command, {**env, **voice_env[ai]})
                    rows[ai] = _run_ai(pool, load_procs, bridge, process.pid, emulator.pid, calls, seconds)
                    time.sleep(2.0)
                tables.append(ai_table(rows, calls, seconds))
                print(tables[-1], flush=True)
    finally:
        for process in (lean, emulator):
            if process is not None:
                process.terminate()
                process.wait()
    if rounds > 1:
        print("\n".join(t.splitlines()[-1] for t in tables))
    return 0


def _run_ai(
    pool: ProcessPoolExecutor,
    procs: int,
    serve: tuple[list[str], dict[str, str]],
    ai_pid: int,
    emulator_pid: int,
    calls: int,
    seconds: float,
) -> Figures:
    """A bridge (``serve``: its command and environment) whose voice streams reach the process ``ai_pid``: a
    warm-up, then the measured calls; capacity.py's figures of that process, and the bridge's and the emulator's
    whole-run CPU."""
    command, env = serve
    port = free_port()
    bridge = start(command, {**env, "PORT": str(port)}, f"http://127.0.0.1:{port}/healthz")
    try:
        url = f"ws://127.0.0.1:{port}/media-stream"
        capacity.measure(pool, procs, ai_pid, url, calls, WARM_UP_S)  # not reported: see capacity.WARM_UP_S
        time.sleep(1.0)
        pids = {"emulator": emulator_pid, "bridge": bridge.pid}
        before = {name: cpu_s(pid) for name, pid in pids.items()}
        figures = capacity.measure(pool, procs, ai_pid, url, calls, seconds)
        used = {name: cpu_s(pid) - before[name] for name, pid in pids.items()}
    finally:
        bridge.terminate()
        bridge.wait()
    served = figures["served"]
    tokens = (
        0.0 if ai_pid == emulator_pid else whole_cpu(used["emulator"], served, seconds)["whole_us_per_call_per_20ms"]
    )
    return {
        **figures,
        "tokens_us": tokens,
        "ai_side_us": figures["whole_us_per_call_per_20ms"] + tokens,
        "bridge_us": whole_cpu(used["bridge"], served, seconds)["whole_us_per_call_per_20ms"],
    }


AI_ROWS = (
    ("voice streams' process, steady (µs)", "steady_us_per_call_per_20ms"),
    ("  its kernel share (%)", "steady_kernel_pct"),
    ("voice streams' process, whole run (µs)", "whole_us_per_call_per_20ms"),
    ("emulator's tokens, whole run (µs)", "tokens_us"),
    ("AI side in all, whole run (µs)", "ai_side_us"),
    ("bridge, whole run (µs)", "bridge_us"),
    ("served", "served"),
    ("violations", "violations"),
    ("round trip p50 (ms)", "round_trip_p50_ms"),
    ("round trip p99 (ms)", "round_trip_p99_ms"),
    ("added p99 (ms)", "added_p99_ms"),
    ("heard added p99 (ms)", "heard_added_p99_ms"),
    ("underruns per call, max", "underruns_per_call_max"),
    ("calls with underruns", "calls_with_underruns"),
    ("first audio p99 (ms)", "first_audio_p99_ms"),
)


def ai_table(rows: dict[str, Figures], calls: int, seconds: float) -> str:
    """The two runs side by side, and the lean echo's CPU as a share of the emulator's."""
    lines = [f"{calls} calls of {seconds:g} s through a real bridge; CPU from /proc, per call per 20 ms (µs)"]
    lines += side_by_side(rows, AI_ROWS, width=12)
    emulator, lean = rows["emulator"], rows["lean"]
    steady = lean["steady_us_per_call_per_20ms"] / emulator["steady_us_per_call_per_20ms"]
    whole = lean["ai_side_us"] / emulator["ai_side_us"]
    verdict = "met" if max(steady, whole) <= GOAL else "not met"
    lines.append(f"lean / emulator: steady {steady:.2f}x, whole AI side {whole:.2f}x (goal <= {GOAL:.2f}: {verdict})")
    return "\n".join(lines)


# --- lean_callers.py --compare: the full and the lean callers against the same server, each load's own CPU ---------


def compare_callers(
    server: str, calls: int, seconds: float, phases: int, rounds: int = 2, server_cpus: str | None = None
) -> int:
    """Start the emulator and ``server`` as capacity.py does; ``rounds`` times, run the calls with the full
    callers and then the lean ones (on ``phases`` phases of the beat), each in a fresh process; print each
    round's figures side by side, then the ratio of the loads' CPU per round. ``server_cpus``: as capacity.py's
    ``--server-cpus`` (the server there, the emulator and the loads elsewhere). Each load is one process, which
    with the lean callers bunches the server's arrivals more than capacity.py's runs do (``LOAD_PROCS`` in
    bench/lean_callers.py): the server's row flatters the lean run; the loads' CPU is what this compares."""
    pinning = capacity.Pinning.parse(server_cpus) if server_cpus else None
    if pinning:
        os.sched_setaffinity(0, pinning.load)  # and so every process started from here but the server
    emulator, emulator_port = start_emulator()
    process: subprocess.Popen[bytes] | None = None
    ratios: list[tuple[float, float]] = []
    try:
        command, env = capacity.servers(sys.executable, emulator_port, 1)[server]
        port = free_port()
        health = f"http://127.0.0.1:{port}/healthz"
        process = start(command, {**env, "PORT": str(port)}, health, pinning.server if pinning else None)
        url = f"ws://127.0.0.1:{port}/media-stream"
        print(
            f"{calls} calls of {seconds:g} s against {server} (speech both ways, the emulator's echo voice); the lean "
            f"calls on {phases} phases of the 20 ms beat"
            + (f"; the server on CPUs {sorted(pinning.server)}, the rest on {sorted(pinning.load)}" if pinning else "")
        )
        for round_ in range(1, rounds + 1):
            figures = {
                callers: _round(callers, url, calls, seconds, phases, process.pid) for callers in ("full", "lean")
            }
            full, lean = figures["full"], figures["lean"]
            ratios.append(
                (lean["load_whole_us"] / full["load_whole_us"], lean["load_steady_us"] / full["load_steady_us"])
            )
            print(f"round {round_}\n" + "\n".join(side_by_side(figures, CALLERS_ROWS)), flush=True)
    finally:
        for running in (process, emulator):
            if running is not None:
                running.terminate()
                running.wait()
    shown = ", ".join(f"{whole:.2f}/{steady:.2f}" for whole, steady in ratios)
    print(f"lean / full load CPU, whole run/steady, per round: {shown}")
    return 0


def _round(callers: str, url: str, calls: int, seconds: float, phases: int, server_pid: int) -> Figures:
    """One load in a process of its own, with the server's CPU over the same steady window."""
    with ProcessPoolExecutor(max_workers=1) as pool:
        start_at = time.monotonic() + 1.5  # the load process is up and waiting by then
        future = pool.submit(_measured_load, callers, url, calls, seconds, start_at, phases)
        window = (start_at + RAMP_S + 1.0, start_at + seconds - 0.5)
        time.sleep(max(0.0, window[0] - time.monotonic()))
        server_before = cpu_s(server_pid)
        time.sleep(max(0.0, window[1] - time.monotonic()))
        server_used = cpu_s(server_pid) - server_before
        figures = future.result()
    time.sleep(2.0)  # the server closes its side and settles
    return {**figures, "server_steady_us": 1e6 * server_used / (window[1] - window[0]) / calls * FRAME_S}


def _measured_load(callers: str, url: str, calls: int, seconds: float, start_at: float, phases: int) -> Figures:
    """In a load process of its own: ``calls`` calls by ``callers``, and this process's CPU over the whole run
    and over its steady window (every call up); the figures only (``heard`` dropped)."""
    window = (start_at + RAMP_S + 1.0, start_at + seconds - 0.5)

    async def steady() -> tuple[float, float]:
        await asyncio.sleep(max(0.0, window[0] - time.monotonic()))
        before = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.sleep(max(0.0, window[1] - time.monotonic()))
        after = resource.getrusage(resource.RUSAGE_SELF)
        return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, after.ru_stime - before.ru_stime

    async def run() -> tuple[LoadResult, tuple[float, float]]:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        steady_task = asyncio.create_task(steady())
        stream = capacity.stream_runner(callers, phases)
        result = await run_load(
            url,
            calls,
            calls,
            seconds,
            RAMP_S,
            capacity.AUTH_TOKEN,
            capacity.PUBLIC_URL,
            capacity.WAV,
            run_stream=stream,
        )
        return result, await steady_task

    before = time.process_time()
    result, (steady_s, kernel_s) = asyncio.run(run())
    whole_s = time.process_time() - before
    served = len(result.of("served"))
    calls_s = [f.call for f in result.flows if f.call is not None]
    return {
        "served": served,
        "failed": len(result.of("failed")),
        "violations": result.violations,
        "underruns": result.underruns,
        "round_trip_ms": _p50_p99(result.round_trips_s),
        "added_ms": _p50_p99(result.added_s),
        "heard_added_ms": _p50_p99(result.heard_added_s),
        "first_audio_p99_ms": _p50_p99(result.first_audio_s)[1],
        "marks_echoed": sum(len(c.marks_echoed) for c in calls_s),
        "clears": sum(c.clears for c in calls_s),
        "media_sent": sum(c.media_sent for c in calls_s),
        "load_whole_us": 1e6 * whole_s / max(1e-9, served * seconds / FRAME_S),
        "load_steady_us": 1e6 * steady_s / (window[1] - window[0]) / calls * FRAME_S,
        "load_kernel_pct": 100 * kernel_s / max(1e-9, steady_s),
    }


def _p50_p99(values_s: list[float]) -> tuple[float | None, float | None]:
    ms = sorted(v * 1000 for v in values_s)
    return (percentile(ms, 50), percentile(ms, 99)) if ms else (None, None)


CALLERS_ROWS = (
    ("served", "served"),
    ("failed", "failed"),
    ("violations", "violations"),
    ("underruns", "underruns"),
    ("round trip p50/p99 ms", "round_trip_ms"),
    ("added p50/p99 ms", "added_ms"),
    ("heard added p50/p99 ms", "heard_added_ms"),
    ("first audio p99 ms", "first_audio_p99_ms"),
    ("marks echoed", "marks_echoed"),
    ("clears", "clears"),
    ("media sent", "media_sent"),
    ("load CPU, whole run, µs per call per 20 ms", "load_whole_us"),
    ("load CPU, steady, µs per call per 20 ms", "load_steady_us"),
    ("  of which the kernel's, %", "load_kernel_pct"),
    ("server CPU, steady, µs per call per 20 ms", "server_steady_us"),
)
