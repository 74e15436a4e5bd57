"""What a call costs the bridge, against a deliberately naive bridge measured in the same run.

    .venv/bin/python bench/capacity.py [--calls 50 100] [--seconds 20] [--servers bridge naive]
    .venv/bin/python bench/capacity.py --knee 50 400 50 --seconds 12       # ramp until latency or underruns
    .venv/bin/python bench/capacity.py --knee 50 200 25 --seconds 12 --servers bridge --server-cpus 0  # one core
    .venv/bin/python bench/capacity.py --knee 50 300 25 --seconds 12 --servers bridge --server-cpus 0 --callers lean
    .venv/bin/python bench/capacity.py --variant nogc:BRIDGE__SERVER__GC_TUNING=false   # A/B a setting
    .venv/bin/python bench/capacity.py --workers 2 --servers bridge         # serve --workers 2 (own redis)
    .venv/bin/python bench/capacity.py --calls 20 --seconds 12 --sip --servers bridge   # + a SIP row
    .venv/bin/python bench/capacity.py --calls 50 --servers bridge --perf perf.data  # CPU by library (perf)
    .venv/bin/python bench/capacity.py --knee 50 400 50 --servers bridge --server-cpus 0 --ai lean  # lean AI
    .venv/bin/python bench/capacity.py --calls 100 --servers bridge --voice tts   # an AI ahead of real time
    .venv/bin/python bench/capacity.py --calls 50 --servers bridge --voice speech   # ...in real time, its own clock

Three kinds of process on 127.0.0.1: the Savants emulator (voice ``echo``), the servers under test (``bridge``:
``telephony-bridge serve``, the real thing; ``naive``: ``bench/naive_bridge.py``, written like the public
samples; ``echo``: ``bench/echo_server.py``, a bare WebSocket echo, the floor; ``echo-picows``: the same echo
on picows, the floor of the bridge's own media-stream WebSocket; ``relay-picows``: ``bench/relay_floor.py``,
both legs on the bridge's stack with its message counts and conversions and nothing else, the floor of a
call; ``relay-c``: ``bench/relay_c.py``, that relay with its per-frame path compiled (bench/relay_floor_c.pyx:
built with Cython on first use, and checked against relay_floor's bytes before each run), what a call would cost
with the bridge's frames carried in C), and the simulated callers
(``loadtest``'s Twilio flow with speech both ways, spread over ``--load-procs`` processes; ``--callers lean``:
bench/lean_callers.py's, the same calls and figures for a fraction of the load's CPU). Each load level
runs against every server in turn, so the ratio compares figures taken minutes apart on the same machine.

Per server and load level:
- whole-call CPU: the server's CPU time (from /proc) from the first call's webhook until the last call has
  closed, per call-minute served: set-up, tear-down and idle cost included;
- steady CPU: over the middle of the run, when every call is up, per call per 20 ms, and the kernel's share
  of it (system time: on loopback each send also runs the receiver's TCP stack);
- activity: over the same window, per call-second, the server's read and write system calls and its wake-ups
  (voluntary context switches): exact counts that show what a change saves even when CPU figures are noisy.
  /proc counts ``read``/``write``-family calls only: picows sends with ``send()``, which it does not count,
  so with ``--count-sends`` (root: perf's syscall tracepoints, which cost the servers CPU) ``send/write calls``
  counts ``sendto``, ``sendmsg``, ``write`` and ``writev`` (log lines and the event loop's wake-up writes too);
  and how many of the machine's cores were busy (every process: callers and emulator too);
- the bridge's event loop lag (sampled every 50 ms) and garbage collections over the run, with those over
  20 ms: whether a late send was our loop or collector (the bridge's ``scheduling`` underruns) or the AI;
- the load's own lateness: with ``--callers lean`` or ``compiled``, how often the callers' beat stalled (a tick
  more than a frame late; in all and in the steady window: their audio went out late, and the bridge hears it
  200 ms on as the AI's frames coming late) and how late the worst one ran; with ``--ai lean``, the echo's
  late ticks and its collections over 20 ms; with ``--ai emulator``, the emulator's speaker ticks more than a
  frame late, summed over its sessions;
- memory: resident set at steady state less the idle process's, per call;
- added latency p50/p99: each echoed frame's round trip less its call's quickest (what load added); the
  round trip itself p50/p99 (the emulator's 200 ms echo delay included: a pacing change that sends some frames
  sooner lowers a call's quickest and so raises "added" while the round trip falls); "heard added" p50/p99:
  the same from when each message was played (the simulated caller's playback, on its 20 ms beat: arrival
  jitter its buffer absorbed is not there, a hole or a late spurt start is); underruns per call (holes in the
  caller's playback), and how many calls had one, in all and in the steady window (by when playback resumed
  after it: holes in the set-up ramp and among the calls ending are mostly the load's on a 2-core machine,
  docs/performance.md); first AI audio p99.
Each level's calls start evenly over ``--ramp`` seconds (2 by default, however many: 250 calls arrive at 125 a
second, and their set-up work delays the calls already up); whole-call figures count the ramp, the steady window
starts after it. ``--knee`` ramps the calls until p99 added latency passes 20 ms, an underrun appears or a call
fails, and reports the last level that passed (``--knee-latency heard``: p99 heard added latency instead);
``--knee-at`` ramps through the levels it lists (``1 5 9 25 50 100 200 250``: the naive bridge's knee and ours in
one run).
``--sip`` starts the bridge with its SIP ingress on too (same ``serve`` otherwise) and, after each bridge run, runs
the same load level as SIP calls (``loadtest --sip``'s caller, the same speech, RTP both ways) to print a
``bridge-sip`` row beside it: CPU and memory figures as above, set-up p99 and the bridge's RTP jitter in place of
the Twilio-only latency figures. Every process shares this machine's cores: on a 2-core VM the callers and the
emulator take a core's worth or more, so a knee here is the machine's, not the bridge's alone. ``--server-cpus 0``
separates them: the servers under test (and redis) run on CPU 0 only, the emulator and the callers on the others,
each line says how busy each side's cores were, and the knee says whether the load's were saturated where it failed
(the bridge's count of underruns by cause tells the AI's late frames, the emulator's, from its own late sends).
``--savants-tls``: the servers reach the emulator's voice stream over ``wss://``, as the bridge reaches Savants in
production (``bench/tls_relay.py``, in a process of its own on the load's CPUs); without it that leg is plain ws://
on loopback and its encryption is in no figure. ``--ai lean``: the servers' voice streams go to
``bench/lean_ai.py`` (on the load's CPUs), an echo that behaves as the emulator's for what a server sees at a
fraction of its CPU, so the load's cores carry more calls; tokens stay with the emulator, which shares its token
key with the echo.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import wave
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cython_build  # bench/, beside this script
import httpx
import lean_ai  # bench/, beside this script
import lean_callers
import load_gc  # bench/, beside this script
import perf_stacks  # bench/, beside this script
from prometheus_client.parser import text_string_to_metric_families
from tls_relay import TlsRelay  # bench/, beside this script

from telephony_bridge.cli import EMULATOR_JWT_SECRET_ENV
from telephony_bridge.tools.caller import CallResult, run_call
from telephony_bridge.tools.commands import load_caller_audio
from telephony_bridge.tools.emulator.app import STATS_PATH as EMULATOR_STATS_PATH
from telephony_bridge.tools.emulator.protocol import SAMPLE_BYTES, SAMPLE_RATE_HZ
from telephony_bridge.tools.emulator.wav import read_wav_pcm16
from telephony_bridge.tools.loadtest import TICKS_PER_S, LoadResult, percentile, process_cpu_s, run_load
from telephony_bridge.tools.sip_caller import SipCallResult, sip_load
from telephony_bridge.tools.twilio_flow import StreamRunner

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
AUTH_TOKEN = "bench-auth-token-0123456789abcdef"
PUBLIC_URL = "https://bridge.bench.test"
WAV = str(ROOT / "tests" / "data" / "speech_8k.wav")
DEVICES = 100  # 10 sockets each: room for 1000 calls
RTP_PORTS = "41000-42999"  # --sip: room for 1000 calls
RAMP_S = 2.0
KNEE_P99_MS = 20.0
# --voice tts: the recording outlasts the call by this much, and the servers queue up to TTS_AHEAD_S of the AI's
# audio (``audio.max_ai_ahead_s``, at most 120; 10 by default, beyond which the bridge drops the oldest), so the
# AI talks through the whole steady window; memory per call then includes that queue.
TTS_EXTRA_S = 5.0
TTS_AHEAD_S = 120


# The first level an invocation measured showed more added latency (p50 up to 15-20 ms more, p99 ~22 ms against
# ~7 ms for the same level run again), whichever server went first, old code and new alike: enough to fail a
# knee's first level. Each server first takes the first level's calls for a few seconds, not reported.
WARM_UP_S = 5.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def family(pid: int) -> list[int]:
    """``pid`` and its descendants (a server with worker processes counts as one)."""
    pids = [pid]
    for tid in os.listdir(f"/proc/{pid}/task"):
        children = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
        for child in children:
            pids += family(int(child))
    return pids


def cpu_s(pid: int) -> float:
    total = 0.0
    for member in family(pid):
        with contextlib.suppress(OSError):  # exited between listing and reading
            total += process_cpu_s(member)
    return total


def kernel_cpu_s(pid: int) -> float:
    """The system (kernel) part of ``cpu_s``: on loopback a send also runs the receiving side's TCP stack,
    so this is what sockets cost whatever the Python above them does."""
    total = 0.0
    for member in family(pid):
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()[12]) / TICKS_PER_S
    return total


def rss_kb(pid: int) -> int:
    total = 0
    for member in family(pid):
        for line in Path(f"/proc/{member}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def activity(pid: int) -> tuple[int, int, int]:
    """System calls that read and that wrote, and voluntary context switches (each one an event loop that
    went to sleep and was woken), summed over the server's processes and threads: what CPU figures blur,
    these count exactly, so a change that saves sends or wake-ups shows even on a busy machine."""
    reads = writes = switches = 0
    for member in family(pid):
        with contextlib.suppress(OSError):  # exited between listing and reading
            io = dict(row.split(": ", 1) for row in Path(f"/proc/{member}/io").read_text().splitlines())
            reads, writes = reads + int(io["syscr"]), writes + int(io["syscw"])
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{member}/task"):
                with contextlib.suppress(OSError):  # a thread that ended: the others still count
                    status = Path(f"/proc/{member}/task/{tid}/status").read_text()
                    switches += int(status.split("voluntary_ctxt_switches:", 1)[1].split()[0])
    return reads, writes, switches


SEND_SYSCALLS = ("sendto", "sendmsg", "write", "writev")  # picows and uvloop send with send(); others write


class SendCounter:
    """The send and write system calls of ``pids`` (none: nothing counted), with perf's syscall tracepoints in
    250 ms intervals: exact, unlike ``/proc``'s ``syscw``, which misses ``send()``.

    Off by default (``--count-sends``): every system call of the servers then passes a tracepoint, which is CPU in
    the very figure being measured (three alternating pairs at 250 calls: 60.1 µs a call per 20 ms with it, 57.4
    without, within this bench's noise; docs/performance.md, 6 Dec), and turning tracepoints on and off patches
    the kernel's code on every CPU at once. So the counter starts before the calls and stops after they end, and
    ``per_s`` reads the intervals of the steady window."""

    STEP_S = 0.25

    def __init__(self, pids: list[int]) -> None:
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._lines: list[tuple[float, str]] = []  # perf's lines, each with when it came (time.monotonic)
        self._rows: list[tuple[float, int]] = []  # (end of the interval on time.monotonic, its count)
        if not pids or shutil.which("perf") is None:
            return
        events = ",".join(f"syscalls:sys_enter_{name}" for name in SEND_SYSCALLS)
        command = ["perf", "stat", "-x", ",", "-I", str(round(self.STEP_S * 1000)), "-e", events]
        self._process = subprocess.Popen(
            [*command, "-p", ",".join(map(str, pids))],  # until stopped
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Read as perf writes: ~1 KB a second would fill the pipe in about a minute and stall its intervals, and
        # when a line comes dates its interval (perf counts its times from its own start, after its set-up).
        self._reader = threading.Thread(target=self._read, args=(self._process.stderr,), daemon=True)
        self._reader.start()

    def __enter__(self) -> SendCounter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _read(self, stream: Iterable[str]) -> None:
        for line in stream:
            self._lines.append((time.monotonic(), line))

    def stop(self) -> None:
        """Stop counting (once the calls have ended) and read what was counted; again, nothing."""
        process, reader, self._process = self._process, self._reader, None
        if process is None or reader is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join()  # perf has exited: its stderr is at its end
        if process.stderr is not None:
            process.stderr.close()
        started = perf_started(self._lines)
        if started is not None:
            output = "".join(line for _, line in self._lines)
            self._rows = send_intervals(output, started, len(SEND_SYSCALLS))

    def per_s(self, start: float, end: float) -> float | None:
        """Calls a second over the whole intervals between ``start`` and ``end`` (``time.monotonic``); None
        where nothing was counted (no perf, not root, no tracefs)."""
        inside = [count for at, count in self._rows if start <= at - self.STEP_S and at <= end]
        return sum(inside) / (len(inside) * self.STEP_S) if inside else None


def perf_started(lines: list[tuple[float, str]]) -> float | None:
    """When ``perf stat -I`` started its clock, on ``time.monotonic``, from its lines and when each came: perf
    writes an interval's line just after its end, so the earliest arrival less its time is the closest bound.
    None without an interval line."""
    starts = [
        came - float(fields[0])
        for came, line in lines
        if len(fields := line.split(",")) > 3 and "sys_enter_" in fields[3]
    ]
    return min(starts, default=None)


def send_intervals(output: str, started: float, events: int) -> list[tuple[float, int]]:
    """``perf stat -x , -I`` output as (end of each interval, ``started`` + its time, the count of all ``events``
    in it). "<not counted>": the processes did not run in that interval (0); an interval with an event that is
    "<not supported>" (no tracepoints here) or missing is left out."""
    counts: dict[float, list[str]] = {}
    for row in output.splitlines():
        fields = row.split(",")
        if len(fields) > 3 and "sys_enter_" in fields[3]:
            counts.setdefault(float(fields[0]), []).append(fields[1])
    return [
        (started + at, sum(int(c) if c.isdigit() else 0 for c in row))
        for at, row in sorted(counts.items())
        if len(row) == events and all(c.isdigit() or c == "<not counted>" for c in row)
    ]


LOAD_SATURATED = 0.9  # the load's cores this busy (a share of them): its callers and emulator fall behind


def machine_busy_s(cpus: frozenset[int] | None = None) -> tuple[float, float]:
    """Seconds the CPUs have spent busy and in all, from /proc/stat (every CPU of the machine, or those in
    ``cpus``): the share in use, callers and emulator included, which decides whether any server can keep real
    time."""
    return cpu_busy_s(Path("/proc/stat").read_text(), cpus)


def cpu_busy_s(stat: str, cpus: frozenset[int] | None = None) -> tuple[float, float]:
    """``machine_busy_s`` from /proc/stat's text: the ``cpu`` row (the machine), or the ``cpuN`` rows of ``cpus``.

    Only the first eight columns count (user, nice, system, idle, iowait, irq, softirq, steal): the kernel counts
    guest time in user and nice already, so adding the guest columns would count it twice (proc(5))."""
    busy = total = 0
    for row in stat.splitlines():
        name, *values = row.split() or [""]
        number = name.removeprefix("cpu")
        if name == number:  # not a CPU's row: intr, ctxt, btime, processes, softirq...
            continue
        if (number == "") if cpus is None else (number.isdigit() and int(number) in cpus):
            fields = [int(v) for v in values[:8]]
            idle = fields[3] + fields[4]  # idle + iowait
            busy, total = busy + sum(fields) - idle, total + sum(fields)
    return busy / TICKS_PER_S, total / TICKS_PER_S


@dataclasses.dataclass(frozen=True)
class Pinning:
    """``--server-cpus``: the servers under test (and redis) on these CPUs, the emulator and the callers on the
    rest, so a server's figures are its own cores' and a saturated load shows as such."""

    server: frozenset[int]
    load: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Pinning:
        available = frozenset(os.sched_getaffinity(0))
        try:
            server = frozenset(int(cpu) for cpu in text.split(","))
        except ValueError:
            raise ValueError(f"expected CPU numbers separated by commas (e.g. 0 or 0,1), got {text!r}") from None
        if not server <= available or not available - server:
            raise ValueError(
                f"expected some of CPUs {sorted(available)}, leaving at least one for the load, got {text!r}"
            )
        return cls(server, available - server)

    def busy_cores(
        self, before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
    ) -> dict[str, float]:
        """Each side's busy cores between two ``snapshot()``s."""
        return {
            f"{side}_cores_busy": (after[side][0] - before[side][0])
            / max(1e-9, after[side][1] - before[side][1])
            * len(getattr(self, side))
            for side in ("server", "load")
        }

    def snapshot(self) -> dict[str, tuple[float, float]]:
        return {"server": machine_busy_s(self.server), "load": machine_busy_s(self.load)}


def wait_for(url: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def start(
    args: list[str], env: dict[str, str], health: str, cpus: frozenset[int] | None = None, timeout_s: float = 20.0
) -> subprocess.Popen[bytes]:
    """The process, once ``health`` answers; if it never does (or this one is interrupted), it is killed before
    the error goes on: the caller has no handle to stop it with. ``cpus``: the process (and what it starts:
    ``serve --workers``) runs on these CPUs only."""
    pin = None if cpus is None else functools.partial(os.sched_setaffinity, 0, cpus)
    process = subprocess.Popen(args, env={**os.environ, **env}, stderr=subprocess.DEVNULL, preexec_fn=pin)
    try:
        wait_for(health, timeout_s)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process


def start_emulator(
    env: dict[str, str] | None = None,
    cpus: frozenset[int] | None = None,
    *,
    wav: Path | None = None,
    burst: bool = True,
) -> tuple[subprocess.Popen[bytes], int]:
    """The Savants emulator (echo voice, the bench's API key) on a free port, once it answers: its process and
    port. ``env``: e.g. its token key (``EMULATOR_JWT_SECRET_ENV``), for bench/lean_ai.py to check its tokens.
    ``wav``: its voice plays this recording instead, all of it at once, as a TTS engine sends ahead of real
    time (the emulator's file voice with ``--burst``); with ``burst`` False, a frame every 20 ms on the voice's
    own clock, whatever the caller says or when (``--voice speech``)."""
    port = free_port()
    command = emulator_command(port, wav, burst=burst)
    return start(command, env or {}, f"http://127.0.0.1:{port}{EMULATOR_STATS_PATH}", cpus), port


def emulator_command(port: int, wav: Path | None = None, *, burst: bool = True) -> list[str]:
    """``start_emulator``'s command line: the echo voice, or ``wav`` played by the file voice, all at once
    (``burst``) or a frame a tick."""
    command = [sys.executable, "-m", "telephony_bridge", "emulator", "--port", str(port), "--api-key", "bench-key"]
    if wav is not None:
        command += ["--voice", "file", "--wav", str(wav), *(["--burst"] if burst else [])]
    return command


def start_lean_ai(
    env: dict[str, str], cpus: frozenset[int] | None = None, *, compiled: bool = False
) -> tuple[subprocess.Popen[bytes], int]:
    """bench/lean_ai.py on a free port, once it answers: its process and port. ``env`` holds the emulator's token
    key (``EMULATOR_JWT_SECRET_ENV``), which the echo needs to check the emulator's tokens. ``compiled``: its
    sessions' per-frame work in C (bench/lean_ai_c.pyx)."""
    port = free_port()
    command = [sys.executable, str(BENCH / "lean_ai.py"), "--port", str(port), *(["--compiled"] if compiled else [])]
    return start(command, env, f"http://127.0.0.1:{port}/healthz", cpus), port


def write_tts_wav(folder: Path, seconds: float) -> Path:
    """The AI's speech for ``--voice tts`` and ``--voice speech``: the bench's speech recording, at 16 kHz as
    Savants speaks, repeated to last ``seconds``, written into ``folder``."""
    pcm = read_wav_pcm16(str(ROOT / "tests" / "data" / "speech_16k.wav"))  # the emulator's own reader and format
    repeats = max(1, math.ceil(seconds * SAMPLE_RATE_HZ * SAMPLE_BYTES / len(pcm)))
    path = folder / "tts.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(SAMPLE_BYTES)
        out.setframerate(SAMPLE_RATE_HZ)
        out.writeframes(pcm * repeats)
    return path


def stream_runner(callers: str, phases: int = lean_callers.PHASES) -> StreamRunner:
    """What plays each call's media stream: ``full``, ``tools.caller``; ``lean``, bench/lean_callers.py on
    ``phases`` phases of its beat (the same calls and figures for less CPU); ``compiled``, the same with each
    call's per-frame work in C (bench/lean_callers_c.pyx). One per load's event loop."""
    lean = lean_runner(callers, phases)
    return run_call if lean is None else lean.run_call


def lean_runner(callers: str, phases: int = lean_callers.PHASES) -> lean_callers.LeanCallers | None:
    """The ``LeanCallers`` behind ``stream_runner(callers, phases)``, or None for the full callers."""
    return None if callers == "full" else lean_callers.LeanCallers(phases, compiled=callers == "compiled")


def _load_part(
    url: str, calls: int, seconds: float, start_at: float, callers: str = "full", ramp_s: float = RAMP_S
) -> tuple[LoadResult, lean_callers.Stalls | None]:
    """One load process's share of the calls, started over ``ramp_s``; what the callers heard is dropped (only the
    figures travel). ``callers``: ``full``, ``lean`` or ``compiled`` (``stream_runner``). With the latter two, also
    this process's beat stalls (``lean_callers.Stalls``)."""
    lean = lean_runner(callers)
    stream = run_call if lean is None else lean.run_call

    async def run() -> LoadResult:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))  # CLOCK_MONOTONIC is system-wide on Linux
        return await run_load(url, calls, calls, seconds, ramp_s, AUTH_TOKEN, PUBLIC_URL, wav=WAV, run_stream=stream)

    result = asyncio.run(run())
    flows = tuple(
        dataclasses.replace(f, call=dataclasses.replace(f.call, heard=f.call.heard[:0])) if f.call else f
        for f in result.flows
    )
    return dataclasses.replace(result, flows=flows), None if lean is None else lean.stalls


def _sip_part(target: str, calls: int, seconds: float, start_at: float, ramp_s: float = RAMP_S) -> list[SipCallResult]:
    """One load process's share of the SIP calls, all at once after the same ramp; what was heard is dropped."""

    async def run() -> list[SipCallResult]:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        return await sip_load(target, calls, calls, seconds, ramp_s, load_caller_audio(WAV))

    results = asyncio.run(run())
    for result in results:
        result.heard = b""
        result.arrivals = []
    return results


def calls_with_holes_between(calls: Iterable[CallResult], from_s: float, to_s: float) -> int:
    """How many ``calls`` had a hole whose playback resumed between ``from_s`` and ``to_s`` (``time.monotonic``):
    the steady window's, told from those of the set-up ramp and of the calls ending, where a load on one core
    falls behind (docs/performance.md, "Where the holes at 150–250 calls come from")."""
    return sum(
        1
        for call in calls
        if call.started_at is not None and any(from_s <= call.started_at + t <= to_s for t in call.underrun_ends_s)
    )


def measure(
    pool: ProcessPoolExecutor,
    procs: int,
    pid: int,
    url: str,
    calls: int,
    seconds: float,
    profile: str | None = None,
    sip_target: str | None = None,
    perf: str | None = None,
    stacks: str | None = None,
    pinning: Pinning | None = None,
    callers: str = "full",
    ramp_s: float = RAMP_S,
    count_sends: bool = False,
) -> dict:
    """Run ``calls`` calls of ``seconds`` against the server ``pid`` and return its figures; with ``profile``,
    py-spy records the server over the steady window into that file (collapsed stacks), with ``perf`` perf
    does, with ``stacks`` perf does with Python stacks (``perf_stacks``: its summary goes to that file); with
    ``sip_target``, the calls are SIP calls to it instead of Twilio calls to ``url``; with ``pinning``, each
    side's busy cores too; ``callers``: which simulated callers place the Twilio calls (``_load_part``);
    ``count_sends``: the server's send calls too (``SendCounter``, which costs the server CPU)."""
    idle_rss = rss_kb(pid)
    http_url = url.replace("ws://", "http://").removesuffix("/media-stream")
    counters_before = bridge_counters(http_url)
    with SendCounter(family(pid) if count_sends else []) as sends:  # before the calls: see SendCounter
        start_at = time.monotonic() + 1.5  # the load processes are up and waiting by then
        shares = [calls // procs + (i < calls % procs) for i in range(procs)]
        if sip_target:
            futures = [pool.submit(_sip_part, sip_target, n, seconds, start_at, ramp_s) for n in shares if n]
        else:
            futures = [pool.submit(_load_part, url, n, seconds, start_at, callers, ramp_s) for n in shares if n]
        time.sleep(max(0.0, start_at - time.monotonic()))
        whole_before = cpu_s(pid)
        time.sleep(ramp_s + 1.5)  # every call is up and talking
        window_s = max(1.0, seconds - ramp_s - 1.0)  # until the first calls end (half a second into their ends)
        spy = None
        if profile:
            command = [str(py_spy()), "record", "--pid", str(pid), "--duration", str(int(window_s)), "--format", "raw"]
            spy = subprocess.Popen([*command, "--nonblocking", "-o", profile], stdout=subprocess.DEVNULL)
        if perf:
            command = ["perf", "record", "-q", "-F", "499", "-o", perf, "-p", ",".join(map(str, family(pid)))]
            spy = subprocess.Popen([*command, "--", "sleep", str(window_s)], stderr=subprocess.DEVNULL)
        recorded = family(pid)
        if stacks:
            command = perf_stacks.record_command(f"{stacks}.raw", recorded, window_s)
            spy = subprocess.Popen(command, stderr=subprocess.DEVNULL)
        steady_from = time.monotonic()
        steady_before, activity_before, machine_before = cpu_s(pid), activity(pid), machine_busy_s()
        sides_before = pinning.snapshot() if pinning else None
        kernel_before = kernel_cpu_s(pid)
        time.sleep(window_s / 2)
        steady_rss = rss_kb(pid)
        time.sleep(window_s / 2)
        steady_used = cpu_s(pid) - steady_before
        kernel_used = kernel_cpu_s(pid) - kernel_before
        activity_after = activity(pid)
        machine_after = machine_busy_s()
        sides = pinning.busy_cores(sides_before, pinning.snapshot()) if pinning and sides_before else {}
        if pinning:
            sides["load_cores"] = len(pinning.load)
        machine_busy = (machine_after[0] - machine_before[0]) / max(1e-9, machine_after[1] - machine_before[1])
        per_call_s = [(activity_after[i] - activity_before[i]) / window_s / calls for i in range(3)]
        if spy is not None:
            spy.wait()
        if stacks:
            Path(stacks).write_text(perf_stacks.collect(f"{stacks}.raw", recorded) + "\n")
        parts = [future.result() for future in futures]  # LoadResults, or a SIP part's results
        stalls: list[lean_callers.Stalls | None] = []  # each load process's beat stalls (None: no beat)
        if not sip_target:
            parts, stalls = [p for p, _ in parts], [late for _, late in parts]
        time.sleep(0.5)  # the server closes its side
        whole_used = cpu_s(pid) - whole_before
        sends.stop()  # the calls are over
        sent_per_s = sends.per_s(steady_from, steady_from + window_s)
        counters = {k: v - counters_before.get(k, 0.0) for k, v in bridge_counters(http_url).items()}
        causes = {k: counters[k] for k in ("ai_late", "scheduling") if k in counters}
        health = {k: v for k, v in counters.items() if k.startswith(("lag", "gc"))}
        cpu = {
            "calls": calls,
            "steady_cpu_pct": 100 * steady_used / window_s,
            "steady_us_per_call_per_20ms": 1e6 * steady_used / window_s / calls * 0.020,
            "steady_kernel_pct": 100 * kernel_used / max(1e-9, steady_used),
            "kb_per_call": (steady_rss - idle_rss) / calls,
            "reads_per_call_s": per_call_s[0],
            "writes_per_call_s": per_call_s[1],
            "wakeups_per_call_s": per_call_s[2],
            "sends_per_call_s": None if sent_per_s is None else sent_per_s / calls,
            "machine_busy_cores": machine_busy * (os.cpu_count() or 1),
            **sides,
            "bridge_underruns_by_cause": causes,
            "loop_lag_samples": health.get("lag"),
            "loop_lag_over_20ms": health["lag"] - health["lag_within_20ms"] if "lag" in health else None,
            "gc_pauses": health.get("gc", 0.0),
            "gc_pauses_over_20ms": health.get("gc", 0.0) - health.get("gc_within_20ms", 0.0),
            "gc_full_collections": health.get("gc_full", 0.0),
        }
        if sip_target:
            return {**cpu, **sip_figures([r for part in parts for r in part], whole_used, seconds)}
        result = LoadResult(
            tuple(flow for part in parts for flow in part.flows),
            max(part.duration_s for part in parts),
            calls,
            calls,
            seconds,
            ramp_s,
        )
        served = len(result.of("served"))
        added = [t * 1000 for t in result.added_s]
        heard = [t * 1000 for t in result.heard_added_s]
        trips = [t * 1000 for t in result.round_trips_s]
        underruns = result.underruns_per_call
        served_calls = [flow.call for flow in result.of("served") if flow.call is not None]
        holes_steady = calls_with_holes_between(served_calls, steady_from, steady_from + window_s)
        first = [t * 1000 for t in result.first_audio_s]
        return {
            **cpu,
            "served": served,
            "refused": len(result.of("busy")),
            "failed": len(result.of("failed")),
            "violations": result.violations,
            **whole_cpu(whole_used, served, seconds),
            "added_p50_ms": percentile(added, 50) if added else None,
            "added_p99_ms": percentile(added, 99) if added else None,
            "heard_added_p50_ms": percentile(heard, 50) if heard else None,
            "heard_added_p99_ms": percentile(heard, 99) if heard else None,
            "round_trip_p50_ms": percentile(trips, 50) if trips else None,
            "round_trip_p99_ms": percentile(trips, 99) if trips else None,
            "underruns_per_call_p50": percentile(underruns, 50) if underruns else None,
            "underruns_per_call_max": underruns[-1] if underruns else None,
            "calls_with_underruns": sum(1 for u in underruns if u),
            "calls_with_underruns_steady": holes_steady,
            **stall_figures(stalls, steady_from, window_s),
            "first_audio_p99_ms": percentile(first, 99) if first else None,
        }


def stall_figures(
    stalls: list[lean_callers.Stalls | None], steady_from: float, window_s: float
) -> dict[str, float | None]:
    """The load processes' beat stalls together: how many, how many began in the steady window, and the worst
    lateness in ms; None for each where a process had no beat (the full callers) or there was none."""
    if not stalls or None in stalls:
        return {"beat_stalls": None, "beat_stalls_steady": None, "beat_worst_late_ms": None}
    beats = [part for part in stalls if part is not None]  # all of them (the guard above): for the type checker
    at = [t for part in beats for t in part.at]
    return {
        "beat_stalls": len(at),
        "beat_stalls_steady": sum(steady_from <= t <= steady_from + window_s for t in at),
        "beat_worst_late_ms": 1000 * max(part.worst_s for part in beats),
    }


def whole_cpu(used_s: float, served: int, seconds: float) -> dict:
    return {
        "whole_cpu_s_per_call_minute": used_s / max(1e-9, served * seconds / 60),
        "whole_us_per_call_per_20ms": 1e6 * used_s / max(1e-9, served * seconds / 0.020),
    }


def sip_figures(results: list[SipCallResult], whole_used: float, seconds: float) -> dict:
    """A SIP run's own figures; the Twilio flow's latency and underrun figures have no SIP counterpart here."""
    answered = [r for r in results if r.answered]
    setups = sorted(1000 * r.setup_s for r in answered if r.setup_s is not None)
    jitter = sorted(r.jitter_ms for r in answered)
    return {
        "served": len(answered),
        "refused": sum(1 for r in results if r.status in (480, 486, 503)),
        "failed": sum(1 for r in results if not r.answered and r.status not in (480, 486, 503)),
        "violations": sum(len(r.violations) for r in results),
        **whole_cpu(whole_used, len(answered), seconds),
        "setup_p50_ms": percentile(setups, 50) if setups else None,
        "setup_p99_ms": percentile(setups, 99) if setups else None,
        "rtp_jitter_p50_ms": percentile(jitter, 50) if jitter else None,
        "rtp_jitter_max_ms": jitter[-1] if jitter else None,
    }


def print_recordings(profile: str | None, perf: str | None, stacks: str | None) -> None:
    """What a level's recorder found (``--profile``, ``--perf``, ``--perf-stacks``), after its line."""
    if profile:
        print(top_functions(profile), flush=True)
    if perf:
        print(by_library(perf), flush=True)
    if stacks:
        print(Path(stacks).read_text(), end="", flush=True)


def top_functions(collapsed: str, n: int = 25) -> str:
    """The functions holding the CPU in a py-spy raw profile: self time (the leaf) and total (anywhere on the
    stack), as shares of all samples."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for row in Path(collapsed).read_text().splitlines():
        stack, _, count_text = row.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        samples += count
        frames = [_function(frame) for frame in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + count
    lines = [f"{samples} samples; self % / total %  function"]
    for name, count in sorted(own.items(), key=lambda kv: -kv[1])[:n]:
        lines.append(f"{100 * count / samples:5.1f} / {100 * total[name] / samples:5.1f}  {name}")
    return "\n".join(lines)


# perf's shared objects, grouped by what they are
_LIBRARIES = (
    ("kernel", ("[kernel",)),
    ("python interpreter", ("libpython", "python3")),
    ("numpy", ("_multiarray", "openblas", "libm.")),
    ("uvloop", ("loop.cpython",)),
    ("picows", ("picows",)),
    ("libc", ("libc.",)),
)


def by_library(perf_data: str) -> str:
    """A ``perf record`` of the server as shares of its CPU by library: what no Python profiler sees (the
    interpreter itself, the kernel's socket work, numpy, uvloop), robust on a shared machine."""
    report = subprocess.run(
        ["perf", "report", "-i", perf_data, "--sort", "dso", "--stdio", "-g", "none"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shares: dict[str, float] = {}
    for row in report.splitlines():
        fields = row.split()
        if len(fields) < 2 or not fields[0].endswith("%") or row.lstrip().startswith("#"):
            continue
        group = next((name for name, marks in _LIBRARIES if any(m in fields[1] for m in marks)), "other")
        shares[group] = shares.get(group, 0.0) + float(fields[0].rstrip("%"))
    ranked = sorted(shares.items(), key=lambda kv: -kv[1])
    return "CPU by library (perf): " + ", ".join(f"{name} {share:.1f} %" for name, share in ranked)


def _function(frame: str) -> str:
    """``send (websockets/protocol.py:123)`` -> ``send (websockets/protocol.py)``: lines apart, one function."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "telephony-bridge/", "perf-bench/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})"


def py_spy() -> Path | None:
    """py-spy beside this Python (the venv's) or else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    return Path(found) if found else None


def bridge_counters(http_url: str) -> dict[str, float]:
    """``counters_from_metrics`` of one scrape of the bridge's /metrics; empty for servers without them."""
    try:
        response = httpx.get(http_url + "/metrics", timeout=5)
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    return counters_from_metrics(response.text)


def echo_counts(stats_url: str) -> tuple[int, int]:
    """bench/lean_ai.py's counts so far of its ticks more than a frame late and of its GC pauses longer than a
    frame: the load's own lateness, which the bridge counts among the AI's frames coming late (``ai_late``)."""
    stats = httpx.get(stats_url, timeout=5).json()
    return int(stats["ticks_late_over_a_frame"]), int(stats["gc_pauses_over_a_frame"])


def emulator_ticks_late(stats_url: str) -> int:
    """The emulator's count so far of its speakers' ticks more than a frame late, summed over its sessions (one
    stall of its loop counts once in each session speaking): the AI's own lateness, which the bridge counts among
    the AI's frames coming late (``ai_late``)."""
    return int(httpx.get(stats_url, timeout=5).json()["ticks_late_over_a_frame"])


def counters_from_metrics(text: str) -> dict[str, float]:
    """From the bridge's /metrics text: its own count of playback holes by cause (``ai_late``, ``scheduling``),
    its event loop lag samples and garbage collections so far, all (``lag``, ``gc``) and those within 20 ms
    (``ops/loop_health.py``), and its full collections (``gc_full``)."""
    histograms = {"bridge_event_loop_lag_seconds": "lag", "bridge_gc_pause_seconds": "gc"}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        short = histograms.get(family.name)
        for sample in family.samples:
            if sample.name == "bridge_playout_underruns_total":
                key = sample.labels["cause"]
            elif short and sample.name.endswith("_count"):
                key = short
                if short == "gc" and sample.labels.get("generation") == "2":  # full collections
                    counts["gc_full"] = counts.get("gc_full", 0.0) + sample.value
            elif short and sample.name.endswith("_bucket") and float(sample.labels["le"]) == 0.02:
                key = short + "_within_20ms"
            else:
                continue
            counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def passed(figures: dict, latency: str = "arrival") -> bool:
    """Whether a level passes the knee's test: every call served, none with a protocol violation or an underrun,
    and p99 added latency within ``KNEE_P99_MS``; ``latency`` says which added latency: "arrival" (each message's
    arrival less the call's quickest) or "heard" (when it was played, less the call's quickest)."""
    p99 = figures["added_p99_ms" if latency == "arrival" else "heard_added_p99_ms"]
    return (
        figures["served"] == figures["calls"]
        and not figures["violations"]  # a protocol violation fails a level as a hole does
        and not figures["calls_with_underruns"]
        and p99 is not None
        and p99 <= KNEE_P99_MS
    )


def line(label: str, f: dict) -> str:
    def ms(value: float | None) -> str:
        return "   -" if value is None else f"{value:5.1f}"

    head = (
        f"{label:10} {f['calls']:4} calls  {f['served']:4} served  "
        f"steady {f['steady_cpu_pct']:5.1f} % = {f['steady_us_per_call_per_20ms']:5.1f} µs/call/20ms "
        f"({f['steady_kernel_pct']:.0f} % kernel)  "
        f"whole {f['whole_cpu_s_per_call_minute']:.3f} CPU-s/call-min ({f['whole_us_per_call_per_20ms']:5.1f} µs)  "
        f"{f['kb_per_call']:6.0f} KB/call  "
        f"per call-s: {f['reads_per_call_s']:.0f} reads {f['writes_per_call_s']:.0f} writes "
        + ("" if f.get("sends_per_call_s") is None else f"{f['sends_per_call_s']:.0f} send/write calls ")
        + f"{f['wakeups_per_call_s']:.0f} wake-ups  "
        f"machine {f['machine_busy_cores']:.1f} of {os.cpu_count()} cores busy  "
    )
    if "server_cores_busy" in f:
        head += f"(server's {f['server_cores_busy']:.2f}, load's {f['load_cores_busy']:.2f})  "
    if f.get("loop_lag_samples") is not None:
        head += (
            f"loop lag > 20 ms: {f['loop_lag_over_20ms']:.0f} of {f['loop_lag_samples']:.0f} samples, "
            f"GC pauses > 20 ms: {f['gc_pauses_over_20ms']:.0f} of {f['gc_pauses']:.0f} "
            f"({f.get('gc_full_collections', 0):.0f} full)  "
        )
    if f.get("beat_stalls") is not None:
        stalls, steady = f["beat_stalls"], f["beat_stalls_steady"]
        worst = f", the worst {f['beat_worst_late_ms']:.0f} ms late" if stalls else ""
        head += f"callers' beat stalls > 20 ms: {stalls} ({steady} in the steady window){worst}  "
    if f.get("echo_ticks_late") is not None:
        head += f"echo's ticks > 20 ms late: {f['echo_ticks_late']}, GC pauses > 20 ms: {f['echo_gc_pauses']}  "
    if f.get("emulator_ticks_late") is not None:
        head += f"the emulator's ticks > 20 ms late: {f['emulator_ticks_late']} (over its sessions)  "
    if "setup_p99_ms" in f:
        return head + (
            f"set-up p50 {ms(f['setup_p50_ms'])} p99 {ms(f['setup_p99_ms'])} ms  RTP jitter p50 "
            f"{ms(f['rtp_jitter_p50_ms'])} max {ms(f['rtp_jitter_max_ms'])} ms  violations {f['violations']}"
            + (f"  bridge's count: {f['bridge_underruns_by_cause']}" if f["bridge_underruns_by_cause"] else "")
        )
    return head + (
        f"added p50 {ms(f['added_p50_ms'])} p99 {ms(f['added_p99_ms'])} ms  "
        f"heard added p50 {ms(f['heard_added_p50_ms'])} p99 {ms(f['heard_added_p99_ms'])} ms  "
        f"round trip p50 {ms(f['round_trip_p50_ms'])} p99 {ms(f['round_trip_p99_ms'])} ms  "
        f"underruns/call p50 {f['underruns_per_call_p50']} max {f['underruns_per_call_max']} "
        f"({f['calls_with_underruns']} calls, {f['calls_with_underruns_steady']} in the steady window)  "
        f"first audio p99 {ms(f['first_audio_p99_ms'])} ms"
        + (f"  bridge's count: {f['bridge_underruns_by_cause']}" if f["bridge_underruns_by_cause"] else "")
    )


def interpreter(python: str) -> str:
    """Which interpreter that is, and its version: how it was built matters as much as the version (README,
    Performance: the bridge on pyenv's default build and on Debian's)."""
    probe = "import os, sys; print(os.path.realpath(sys._base_executable), sys.version.replace(chr(10), ' '))"
    return subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()


def relay_c_ready(python: str) -> str | None:
    """Builds relay-c's extension for ``python`` (once: it is cached) and checks its bytes against relay_floor's
    (bench/relay_floor_c_check.py), before any server starts: what went wrong, or None."""
    check = subprocess.run([python, str(BENCH / "relay_floor_c_check.py")], capture_output=True, text=True)
    if check.returncode:
        return (check.stderr or check.stdout).strip()[-3000:]
    print(check.stdout.strip())
    return None


def python_version(python: str) -> tuple[int, int]:
    probe = "import sys; print(*sys.version_info[:2])"
    major, minor = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    return int(major), int(minor)


def servers(
    python: str, emulator_port: int, workers: int, sip_port: int | None = None
) -> dict[str, tuple[list[str], dict[str, str]]]:
    savants = {
        "SAVANTS_BASE_URL": f"http://127.0.0.1:{emulator_port}",
        "SAVANTS_API_KEY": "bench-key",
        "SAVANTS_DEVICE_IDS": ",".join(f"bench-{i}" for i in range(DEVICES)),
    }
    bridge_env = {**savants, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "PUBLIC_URL": PUBLIC_URL, "HOST": "127.0.0.1"}
    if sip_port is not None:  # the same serve, its SIP ingress on as well
        bridge_env |= {"SIP_PORT": str(sip_port), "RTP_PORTS": RTP_PORTS, "SIP_ALLOWED_SOURCES": "127.0.0.0/8"}
    serve = [python, "-m", "telephony_bridge", "serve"]
    if workers > 1:
        serve += ["--workers", str(workers)]
    return {
        "bridge": (serve, bridge_env),
        "naive": ([python, str(BENCH / "naive_bridge.py")], savants),
        "echo": ([python, str(BENCH / "echo_server.py")], {}),
        "echo-picows": ([python, str(BENCH / "echo_server.py")], {"ECHO_WEBSOCKET": "picows"}),
        "relay-picows": ([python, str(BENCH / "relay_floor.py")], savants),
        "relay-c": ([python, str(BENCH / "relay_c.py")], savants),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, nargs="+", default=[50, 100], help="load levels")
    ramp = parser.add_mutually_exclusive_group()
    ramp.add_argument("--knee", type=int, nargs=3, metavar=("FROM", "TO", "STEP"), help="ramp instead")
    ramp.add_argument(
        "--knee-at", type=int, nargs="+", metavar="CALLS", help="ramp through these levels (e.g. 1 5 9 25 50 250)"
    )
    parser.add_argument(
        "--knee-latency", choices=["arrival", "heard"], default="arrival", help="which added latency the knee tests"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each call")
    parser.add_argument(
        "--ramp",
        type=float,
        default=RAMP_S,
        help=f"start each level's calls evenly over this many seconds (default {RAMP_S:g}: 250 calls arrive at 125 a "
        "second, a burst whose set-up work delays the calls already up); the steady window starts after it, so "
        "--seconds must exceed it by 2 or more",
    )
    parser.add_argument(
        "--servers",
        nargs="+",
        default=["bridge", "naive"],
        choices=["bridge", "naive", "echo", "echo-picows", "relay-picows", "relay-c"],
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:VAR=VALUE[,VAR=VALUE]",
        help="also run the bridge with these environment settings, e.g. unbatched:BRIDGE__AUDIO__OUTBOUND_BATCH_MS=20",
    )
    parser.add_argument(
        "--load-procs",
        type=int,
        help=f"processes the simulated callers run in (default: 2; {lean_callers.LOAD_PROCS} with --callers lean, "
        "whose fewer processes would bunch the servers' arrivals: see bench/lean_callers.py)",
    )
    parser.add_argument(
        "--callers",
        choices=["full", "lean", "compiled"],
        default="full",
        help="the simulated Twilio callers: full (tools.caller), lean (bench/lean_callers.py: the same calls and "
        "figures for a fraction of the load's CPU) or compiled (lean, with each call's per-frame work in C: "
        "bench/lean_callers_c.pyx, built on first use with Cython)",
    )
    parser.add_argument(
        "--server-cpus",
        metavar="CPUS",
        help="run the servers under test (and redis) on these CPUs only, e.g. 0, and the emulator and callers on the "
        "others: a server's knee per core, as long as the load's cores keep up (each line says how busy each side was)",
    )
    parser.add_argument("--workers", type=int, default=1, help="serve --workers N for the bridge")
    parser.add_argument("--redis-url", help="REDIS_URL for the bridge (default with --workers > 1: a redis-server)")
    parser.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file")
    parser.add_argument("--profile", metavar="OUT", help="py-spy the first server's steady window (first level) to OUT")
    parser.add_argument(
        "--perf",
        metavar="OUT",
        help="perf record the first server's steady window (first level) to OUT; perturbs that run's latency",
    )
    parser.add_argument(
        "--count-sends",
        action="store_true",
        help="count the servers' send and write system calls with perf's tracepoints (root): the figure /proc "
        "cannot give, at a cost: each system call of theirs passes a tracepoint (a few per cent of their CPU)",
    )
    parser.add_argument(
        "--perf-stacks",
        metavar="OUT",
        help="perf with whole Python stacks over the first server's steady window (first level), its summary to "
        "OUT: needs --server-python on Python 3.13+ (bench/perf_stacks.py); perturbs that run",
    )
    parser.add_argument(
        "--ai",
        choices=["emulator", "lean", "compiled"],
        default="emulator",
        help="what the servers' voice streams reach: the emulator, or bench/lean_ai.py (the same echo as the "
        "bridge sees it, for a fraction of the CPU; tokens stay with the emulator), or compiled (lean, with each "
        "session's per-frame work in C: bench/lean_ai_c.pyx)",
    )
    parser.add_argument(
        "--voice",
        choices=["echo", "tts", "speech"],
        default="echo",
        help="the AI's voice: echo (the caller's speech said back in real time, in 20 ms frames: the dearest case, "
        "and the one the latency figures need), tts (a recording sent all at once, as a TTS engine sends ahead "
        "of real time), or speech (the recording in real time on the AI's own clock: when its frames come owes "
        "nothing to when the caller's reached it, as an echo's does). tts and speech need --ai emulator; the "
        "latency figures then mean nothing: the AI does not echo",
    )
    parser.add_argument("--sip", action="store_true", help="also run each level over SIP against the bridge")
    parser.add_argument(
        "--record-sip",
        action="store_true",
        help="with --sip and --profile, --perf or --perf-stacks: record the first level's SIP run, not its Twilio one",
    )
    parser.add_argument(
        "--savants-tls",
        action="store_true",
        help="the servers reach the emulator's voice stream over wss://, as the bridge reaches Savants: a TLS relay "
        "in a process of its own (on the load's CPUs with --server-cpus; bench/tls_relay.py, needs openssl)",
    )
    parser.add_argument(
        "--server-python",
        metavar="PYTHON",
        default=sys.executable,
        help="the interpreter the servers under test run on (a venv's python with the package installed, e.g. "
        "on an optimised build); the emulator and the callers stay on this one",
    )
    args = parser.parse_args()
    if not 0 <= args.ramp <= args.seconds - 2:
        parser.error(f"--ramp {args.ramp:g} must be 0 or more and at least 2 s under --seconds {args.seconds:g}")
    if args.load_procs is None:
        args.load_procs = 2 if args.callers == "full" else lean_callers.LOAD_PROCS
    if args.profile and py_spy() is None:
        parser.error("--profile needs py-spy (not found next to this Python or on PATH): pip install py-spy")
    if sum(map(bool, (args.profile, args.perf, args.perf_stacks))) > 1:
        parser.error("--profile, --perf and --perf-stacks each record the same window: choose one")
    if args.record_sip and not (args.sip and (args.profile or args.perf or args.perf_stacks)):
        parser.error("--record-sip records the SIP run with --profile, --perf or --perf-stacks: it needs --sip and one")
    if args.savants_tls and shutil.which("openssl") is None:
        parser.error("--savants-tls needs the openssl command, to make the relay's certificate")
    if args.perf and shutil.which("perf") is None:
        parser.error("--perf needs perf (Debian: linux-perf)")
    try:
        print(f"servers run on {interpreter(args.server_python)}")
    except (OSError, subprocess.CalledProcessError) as exc:
        parser.error(f"--server-python {args.server_python} does not run: {exc}")
    if args.perf_stacks and (why := perf_stacks.available(python_version(args.server_python))):
        parser.error(why)
    if "relay-c" in args.servers and (why := relay_c_ready(args.server_python)):
        parser.error(why)
    if args.callers == "compiled":
        try:
            lean_callers.compiled_call_class()  # built here once, not in each load process
        except cython_build.BuildError as exc:
            parser.error(f"--callers compiled: {exc}")
    if args.voice != "echo" and args.ai != "emulator":
        parser.error(f"--voice {args.voice} needs --ai emulator: the lean echo only echoes")
    if args.voice == "tts" and args.seconds + TTS_EXTRA_S > TTS_AHEAD_S:
        most = TTS_AHEAD_S - TTS_EXTRA_S
        parser.error(f"--voice tts: --seconds at most {most:g}, so that the bridge queues all the AI's audio")
    if args.ai == "compiled":
        try:
            lean_ai.compiled_session_class()  # built here once, before the echo's process needs it
        except cython_build.BuildError as exc:
            parser.error(f"--ai compiled: {exc}")
    try:
        pinning = Pinning.parse(args.server_cpus) if args.server_cpus else None
    except ValueError as exc:
        parser.error(f"--server-cpus: {exc}")
    server_cpus, load_cpus = (pinning.server, pinning.load) if pinning else (None, None)
    if pinning:
        print(f"servers on CPUs {sorted(pinning.server)}; emulator and callers on CPUs {sorted(pinning.load)}")
        os.sched_setaffinity(0, pinning.load)  # this process too, and what it starts unpinned (perf, py-spy)
    token_key = {EMULATOR_JWT_SECRET_ENV: secrets.token_urlsafe(32)}  # the lean echo checks the emulator's tokens
    with tempfile.TemporaryDirectory(prefix="tts-") as folder:  # the emulator reads its recording as it starts
        wav = write_tts_wav(Path(folder), args.seconds + TTS_EXTRA_S) if args.voice != "echo" else None
        emulator, emulator_port = start_emulator(token_key, load_cpus, wav=wav, burst=args.voice == "tts")
    if args.voice == "tts":
        print("the AI's voice: a recording sent all at once (tts); the latency figures mean nothing: it does not echo")
    elif args.voice == "speech":
        print("the AI's voice: a recording in real time on its own clock; the latency figures mean nothing")
    # From here on, whatever is started is stopped in the ``finally`` below, however this run ends.
    running: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    folders = contextlib.ExitStack()  # the --savants-tls certificate's
    relay: TlsRelay | None = None
    redis: subprocess.Popen[bytes] | None = None
    lean: subprocess.Popen[bytes] | None = None
    lean_stats: str | None = None  # the lean echo's /_lean/stats
    emulator_stats = f"http://127.0.0.1:{emulator_port}{EMULATOR_STATS_PATH}"
    try:
        voice_port = emulator_port  # where the servers' voice streams go: the emulator, the lean echo, a relay
        voice_env: dict[str, str] = {}
        if args.ai in ("lean", "compiled"):
            lean, voice_port = start_lean_ai(token_key, load_cpus, compiled=args.ai == "compiled")
            lean_stats = f"http://127.0.0.1:{voice_port}{lean_ai.STATS_PATH}"
            voice_env = {"SAVANTS_WS_URL": f"ws://127.0.0.1:{voice_port}/voice-stream"}
            print(f"the servers' voice streams on bench/lean_ai.py (port {voice_port}); tokens from the emulator")
        if args.savants_tls:
            folder = Path(folders.enter_context(tempfile.TemporaryDirectory(prefix="tls-")))
            relay = TlsRelay(voice_port, folder, process=True, cpus=load_cpus)
            voice_env = relay.env()
            print(f"the servers' voice streams over wss:// (a TLS relay on port {relay.port}); tokens stay on http")
        if args.voice == "tts":  # the bridge keeps the whole recording queued, not its default 10 s ahead
            voice_env = {**voice_env, "BRIDGE__AUDIO__MAX_AI_AHEAD_S": str(TTS_AHEAD_S)}
        if args.workers > 1 and not args.redis_url:
            redis_port = free_port()
            redis = subprocess.Popen(
                ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL,
                preexec_fn=None if server_cpus is None else functools.partial(os.sched_setaffinity, 0, server_cpus),
            )
            args.redis_url = f"redis://127.0.0.1:{redis_port}/0"
            time.sleep(0.5)
        sip_port = free_port() if args.sip else None
        catalogue = servers(args.server_python, emulator_port, args.workers, sip_port)
        for variant in args.variant:
            name, _, assignments = variant.partition(":")
            command, env = catalogue["bridge"]
            catalogue[name] = (command, {**env, **dict(a.split("=", 1) for a in assignments.split(",") if a)})
            args.servers.append(name)
        results: dict[str, list[dict]] = {name: [] for name in args.servers + ["bridge-sip"] * args.sip}
        for name in args.servers:
            command, env = catalogue[name]
            if "TWILIO_AUTH_TOKEN" in env and args.redis_url:  # the bridge and its variants
                env = {**env, "REDIS_URL": args.redis_url}
            if args.perf_stacks and name == args.servers[0]:  # the one recorded
                env = {**env, **perf_stacks.ENV}
            port = free_port()
            env = {**env, **voice_env}
            process = start(command, {**env, "PORT": str(port)}, f"http://127.0.0.1:{port}/healthz", server_cpus)
            running[name] = (process, f"ws://127.0.0.1:{port}/media-stream")
        ramping = bool(args.knee or args.knee_at)
        levels = (
            sorted(args.knee_at)
            if args.knee_at
            else list(range(args.knee[0], args.knee[1] + 1, args.knee[2]))
            if args.knee
            else args.calls
        )
        knee: dict[str, int | None] = {name: None for name in args.servers}
        live = set(args.servers)
        # Each caller process on the load's CPUs, with the bridge's GC settings (bench/load_gc.py says why).
        with ProcessPoolExecutor(args.load_procs, initializer=load_gc.prepare, initargs=(load_cpus,)) as pool:
            for name in args.servers:  # a warm-up, not reported: see WARM_UP_S
                process, url = running[name]
                measure(pool, args.load_procs, process.pid, url, levels[0], WARM_UP_S, callers=args.callers)  # 2 s ramp
                time.sleep(1.0)
            for calls in levels:
                for name in args.servers:
                    if name not in live:
                        continue
                    process, url = running[name]
                    first = name == args.servers[0] and calls == levels[0]
                    unrecorded = (None, None, None)
                    recorders = (args.profile, args.perf, args.perf_stacks) if first else unrecorded
                    # --record-sip: the first level's SIP run is the one recorded, not its Twilio one
                    twilio_recorders, sip_recorders = (
                        (unrecorded, recorders) if args.record_sip else (recorders, unrecorded)
                    )
                    profile, perf, stacks = twilio_recorders
                    level = functools.partial(
                        measure,
                        pool,
                        args.load_procs,
                        process.pid,
                        url,
                        calls,
                        args.seconds,
                        pinning=pinning,
                        callers=args.callers,
                        ramp_s=args.ramp,
                        count_sends=args.count_sends,
                    )  # this server at this level: over Twilio, and over SIP below
                    if lean_stats is None:  # the emulator speaks: its own late ticks
                        late_before = emulator_ticks_late(emulator_stats)
                        figures = level(profile, perf=perf, stacks=stacks)
                        figures["emulator_ticks_late"] = emulator_ticks_late(emulator_stats) - late_before
                    else:
                        late_before, pauses_before = echo_counts(lean_stats)
                        figures = level(profile, perf=perf, stacks=stacks)
                        late_after, pauses_after = echo_counts(lean_stats)
                        figures["echo_ticks_late"] = late_after - late_before
                        figures["echo_gc_pauses"] = pauses_after - pauses_before
                    results[name].append(figures)
                    print(line(name, figures), flush=True)
                    print_recordings(*twilio_recorders)
                    if sip_port is not None and name == "bridge":
                        time.sleep(3.0)
                        target = f"sip:ai@127.0.0.1:{sip_port}"
                        sip_profile, sip_perf, sip_stacks = sip_recorders
                        sip = level(sip_profile, perf=sip_perf, stacks=sip_stacks, sip_target=target)
                        results["bridge-sip"].append(sip)
                        print(line("bridge-sip", sip), flush=True)
                        print_recordings(*sip_recorders)
                    if ramping:
                        if passed(figures, args.knee_latency):
                            knee[name] = calls
                        else:
                            live.discard(name)
                    time.sleep(3.0)  # let the emulator and the server settle between runs
                if not live:
                    break
        summary(results, knee if ramping else None, args.knee_latency, levels[-1])
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": results, "knee": knee}, indent=2) + "\n")
    finally:
        for process, _ in running.values():
            process.terminate()
            process.wait()
        emulator.terminate()
        emulator.wait()
        if lean is not None:
            lean.terminate()
            lean.wait()
        if relay is not None:
            relay.close()
        folders.close()
        if redis is not None:
            redis.terminate()
            redis.wait()
    return 0


def summary(
    results: dict[str, list[dict]], knee: dict[str, int | None] | None, latency: str, top: int | None = None
) -> None:
    """``top``: the ramp's last level; a server that passed it has a knee above it, so a ratio is a lower bound."""
    if "bridge" in results and "naive" in results:
        for ours, naive in zip(results["bridge"], results["naive"], strict=False):
            print(
                f"naive / bridge at {ours['calls']} calls: whole-call CPU "
                f"{naive['whole_cpu_s_per_call_minute'] / ours['whole_cpu_s_per_call_minute']:.2f}x, "
                f"steady CPU {naive['steady_us_per_call_per_20ms'] / ours['steady_us_per_call_per_20ms']:.2f}x"
            )
    for twilio, sip in zip(results.get("bridge", []), results.get("bridge-sip", []), strict=False):
        print(
            f"SIP / Twilio at {twilio['calls']} calls: steady CPU "
            f"{sip['steady_us_per_call_per_20ms'] / twilio['steady_us_per_call_per_20ms']:.2f}x, whole-call CPU "
            f"{sip['whole_cpu_s_per_call_minute'] / twilio['whole_cpu_s_per_call_minute']:.2f}x"
        )
    if knee is not None:
        for name, calls in knee.items():
            print(
                f"knee {name}: {calls if calls is not None else 'below the first level'} calls passed "
                f"(p99 {'heard ' if latency == 'heard' else ''}added <= {KNEE_P99_MS:g} ms, no underrun, "
                "no protocol violation, every call served)"
            )
            last = results[name][-1] if results[name] else None
            if last is not None and "server_cores_busy" in last and last["calls"] != calls:
                saturated = last["load_cores_busy"] >= LOAD_SATURATED * last["load_cores"]
                print(
                    f"  at {last['calls']} calls, the first level that failed: the server's cores "
                    f"{last['server_cores_busy']:.2f} busy, the load's {last['load_cores_busy']:.2f} of "
                    f"{last['load_cores']}"
                    + (
                        f"; {last['calls_with_underruns']} calls with a hole, "
                        f"{last['calls_with_underruns_steady']} of them in the steady window"
                        if "calls_with_underruns_steady" in last
                        else ""
                    )
                    + (
                        f"; the callers' beat stalled {last['beat_stalls']} times, the echo's ticks were late "
                        f"{last.get('echo_ticks_late', 'uncounted')}"
                        if last.get("beat_stalls") is not None
                        else ""
                    )
                    + (
                        ": the load's cores were saturated, so this knee is the load's, not the server's"
                        if saturated
                        else ""
                    )
                )
        if knee.get("bridge") and knee.get("naive") and knee["naive"] != top:  # the naive one's knee is known
            at_least = ">= " if knee["bridge"] == top else ""  # the bridge never failed: its knee is higher
            print(f"capacity ratio bridge / naive: {at_least}{knee['bridge'] / knee['naive']:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
