"""``bench/lean_ai.py --compare``: the same calls through a real bridge (``telephony-bridge serve``), once with its
voice streams on the emulator and once on the lean echo, measured by capacity.py's ``measure`` with the AI's
process in the place of the server's: each AI process's own CPU (from /proc) and the calls' figures side by side.

The emulator gives the tokens in both runs; in the lean run its CPU (tokens only) is counted with the echo's in
the AI side's whole-run figure. Every process shares the machine's cores, unpinned: a small run's comparison,
not a capacity figure.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import capacity  # bench/, beside this script
from capacity import BENCH, WARM_UP_S, cpu_s, free_port, start, whole_cpu

from telephony_bridge.cli import EMULATOR_JWT_SECRET_ENV

GOAL = 1 / 3  # the lean echo's CPU per call at most a third of the emulator's


def compare(calls: int, seconds: float, load_procs: int, rounds: int = 1) -> int:
    """``rounds`` alternating runs of each (this machine is shared and noisy): a table a round."""
    python = sys.executable
    token_key = {EMULATOR_JWT_SECRET_ENV: secrets.token_urlsafe(32)}
    emulator_port, lean_port = free_port(), free_port()
    emulator_command = [python, "-m", "telephony_bridge", "emulator", "--port", str(emulator_port), "--api-key"]
    emulator = start([*emulator_command, "bench-key"], token_key, f"http://127.0.0.1:{emulator_port}/_emulator/stats")
    lean: subprocess.Popen[bytes] | None = None
    tables: list[str] = []
    try:
        lean_command = [python, str(BENCH / "lean_ai.py"), "--port", str(lean_port)]
        lean = start(lean_command, token_key, f"http://127.0.0.1:{lean_port}/healthz")
        command, env = capacity.servers(python, emulator_port, 1)["bridge"]
        voice_env = {"emulator": {}, "lean": {"SAVANTS_WS_URL": f"ws://127.0.0.1:{lean_port}/voice-stream"}}
        with ProcessPoolExecutor(max_workers=load_procs) as pool:
            for _ in range(rounds):
                rows = {}
                for ai, process in (("emulator", emulator), ("lean", lean)):
                    bridge = (command, {**env, **voice_env[ai]})
                    rows[ai] = _run(pool, load_procs, bridge, process.pid, emulator.pid, calls, seconds)
                    time.sleep(2.0)
                tables.append(table(rows, calls, seconds))
                print(tables[-1], flush=True)
    finally:
        for process in (lean, emulator):
            if process is not None:
                process.terminate()
                process.wait()
    if rounds > 1:
        print("\n".join(t.splitlines()[-1] for t in tables))
    return 0


def _run(
    pool: ProcessPoolExecutor,
    procs: int,
    serve: tuple[list[str], dict[str, str]],
    ai_pid: int,
    emulator_pid: int,
    calls: int,
    seconds: float,
) -> dict:
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


def table(rows: dict[str, dict], calls: int, seconds: float) -> str:
    """The two runs side by side, and the lean echo's CPU as a share of the emulator's."""

    def value(v: object) -> str:
        return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = [
        f"{calls} calls of {seconds:g} s through a real bridge; CPU from /proc, per call per 20 ms (µs)",
        f"{'':44}{'emulator':>12}{'lean':>12}",
    ]
    for label, key in (
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
    ):
        lines.append(f"{label:44}{value(rows['emulator'][key]):>12}{value(rows['lean'][key]):>12}")
    emulator, lean = rows["emulator"], rows["lean"]
    steady = lean["steady_us_per_call_per_20ms"] / emulator["steady_us_per_call_per_20ms"]
    whole = lean["ai_side_us"] / emulator["ai_side_us"]
    verdict = "met" if max(steady, whole) <= GOAL else "not met"
    lines.append(f"lean / emulator: steady {steady:.2f}x, whole AI side {whole:.2f}x (goal <= {GOAL:.2f}: {verdict})")
    return "\n".join(lines)
