"""``telephony-bridge loadtest``: many simulated calls against a bridge on this machine, each one Twilio's full
flow (``twilio_flow``), with a small table of what the callers got.

Calls start evenly over ``ramp_s``, at most ``concurrency`` at once. Every call hangs up after ``seconds``
and the whole run has a deadline; a call still running then is cut off and counted as failed. Only loopback
bridges: this generator is for measuring your own bridge, not for loading someone else's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from telephony_bridge.clock import Clock, SystemClock
from telephony_bridge.tools.caller import CallResult, new_sid, run_call
from telephony_bridge.tools.commands import HTTP_TIMEOUT_S, auth_token_or_env, load_caller_audio
from telephony_bridge.tools.twilio_flow import FlowResult, Outcome, StreamRunner, http_base, run_flow

# Beyond its ``seconds``, a call may spend this long on the webhook, the handshake, the close and the action.
CALL_OVERHEAD_S = 30.0
SHOWN_FAILURES = 3


@dataclass(frozen=True)
class LoadResult:
    flows: tuple[FlowResult, ...]
    duration_s: float
    calls: int
    concurrency: int
    seconds: float
    ramp_s: float

    def of(self, outcome: Outcome) -> list[FlowResult]:
        return [flow for flow in self.flows if flow.outcome == outcome]

    @property
    def first_audio_s(self) -> list[float]:
        """Seconds from ``start`` to the first audible AI audio, for each served call that got some."""
        return sorted(
            f.call.first_audio_s for f in self.of("served") if f.call is not None and f.call.first_audio_s is not None
        )

    @property
    def round_trips_s(self) -> list[float]:
        """Every AI media message's round trip (caller -> bridge -> echo AI -> bridge -> caller)."""
        return sorted(t for f in self.of("served") if f.call is not None for t in f.call.round_trips_s)

    @property
    def added_s(self) -> list[float]:
        """Each round trip less its call's quickest: what load and scheduling added to the call's fixed path
        (the AI's own delay, resampler delay, the emulator's tick phase and set-up backlog cancel out)."""
        return self._less_quickest(lambda call: call.round_trips_s)

    @property
    def heard_added_s(self) -> list[float]:
        """The same for when each message was played: what the caller hears added, in whole 20 ms frames. Arrival
        jitter the playback buffer absorbs is not there; a hole, or a spurt that starts late, is."""
        return self._less_quickest(lambda call: call.heard_round_trips_s)

    def _less_quickest(self, times: Callable[[CallResult], list[float]]) -> list[float]:
        added = []
        for f in self.of("served"):
            if f.call is not None and times(f.call):
                fastest = min(times(f.call))
                added += [t - fastest for t in times(f.call)]
        return sorted(added)

    @property
    def underruns_per_call(self) -> list[float]:
        return sorted(float(f.call.underruns) for f in self.of("served") if f.call is not None)

    @property
    def stalled_calls(self) -> int:
        """Served calls whose own beat ran a frame late or more (``CallResult.beat_stalls_s``): the load's process
        stalled, and a hole soon after may be its own, not the bridge's."""
        return sum(1 for f in self.of("served") if f.call is not None and f.call.beat_stalls_s)

    @property
    def violations(self) -> int:
        return sum(len(f.call.violations) for f in self.flows if f.call is not None)

    @property
    def underruns(self) -> int:
        return sum(f.call.underruns for f in self.flows if f.call is not None)

    def summary(self, cpu: CpuUse | None = None) -> dict[str, object]:
        """Every figure of the table, for ``--json``; times in ms."""
        ms = [v * 1000 for v in self.first_audio_s]
        out: dict[str, object] = {
            "calls": self.calls,
            "concurrency": self.concurrency,
            "seconds": self.seconds,
            "ramp_s": self.ramp_s,
            "duration_s": round(self.duration_s, 3),
            "served": len(self.of("served")),
            "refused": len(self.of("busy")),
            "failed": len(self.of("failed")),
            "violations": self.violations,
            "underruns": self.underruns,
            "first_audio_ms": stats(ms),
            "round_trip_ms": stats([v * 1000 for v in self.round_trips_s]),
            "added_latency_ms": stats([v * 1000 for v in self.added_s]),
            "heard_added_latency_ms": stats([v * 1000 for v in self.heard_added_s]),
            "underruns_per_call": stats(self.underruns_per_call),
            "calls_whose_beat_stalled": self.stalled_calls,
        }
        if cpu is not None:
            out["bridge_cpu"] = cpu.summary(len(self.of("served")) * self.seconds)
        return out

    def table(self, cpu: CpuUse | None = None) -> str:
        served, busy, failed = self.of("served"), self.of("busy"), self.of("failed")
        lines = [
            f"calls          {self.calls} over {self.ramp_s:g} s, at most {self.concurrency} at once, "
            f"{self.seconds:g} s each; the run took {self.duration_s:.1f} s",
            f"served         {len(served)}",
            f"busy           {len(busy)}" + _counted(f.reason for f in busy),
            f"failed         {len(failed)}",
        ]
        lines += [f"  {f.call_sid}: {f.reason}" for f in failed[:SHOWN_FAILURES]]
        times = self.first_audio_s
        lines.append(
            f"first AI audio {_shown(stats([t * 1000 for t in times]), 'ms')} "
            f"({len(times)} of {len(served)} served calls)"
        )
        stalled = f"; {self.stalled_calls} calls' own beat stalled (their holes may be the load's)"
        lines += [
            f"round trip     {_shown(stats([t * 1000 for t in self.round_trips_s]), 'ms')} (echo AI delay included)",
            f"added latency  {_shown(stats([t * 1000 for t in self.added_s]), 'ms')} (round trip less the call's best)",
            f"heard added    {_shown(stats([t * 1000 for t in self.heard_added_s]), 'ms')} (the same, when played)",
            f"underruns      {self.underruns} in all; per call {_shown(stats(self.underruns_per_call), '', 0)}"
            + (stalled if self.stalled_calls else ""),
            f"violations     {self.violations}",
        ]
        if cpu is not None:
            use = cpu.summary(len(served) * self.seconds)
            lines.append(
                f"bridge CPU     {use['cpu_s']:.1f} s over the run: {use['cpu_s_per_call_minute']:.3f} CPU-s per "
                f"call-minute, {use['us_per_call_per_20ms']:.0f} µs per call per 20 ms (set-up and tear-down included)"
            )
        return "\n".join(lines)


PERCENTILES = (50, 90, 99)


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest rank: a value that was measured, which matters with few calls."""
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def stats(values: list[float]) -> dict[str, float] | None:
    """p50/p90/p99/max of ``values`` (any order); None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return {**{f"p{p}": percentile(ordered, p) for p in PERCENTILES}, "max": ordered[-1], "n": len(ordered)}


def _shown(figures: dict[str, float] | None, unit: str, digits: int = 1) -> str:
    if figures is None:
        return "none"
    return ", ".join(f"{k} {v:.{digits}f}" for k, v in figures.items() if k != "n") + (f" {unit}" if unit else "")


TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used so far (Linux /proc); raises ``OSError`` if it is gone."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S


@dataclass
class CpuUse:
    """CPU the given processes (a bridge and its workers) used between ``start()`` and ``stop()``."""

    pids: tuple[int, ...]
    started: dict[int, float] = field(default_factory=dict)
    used_s: float = 0.0

    def start(self) -> None:
        self.started = {pid: process_cpu_s(pid) for pid in self.pids}

    def stop(self) -> None:
        self.used_s = sum(process_cpu_s(pid) - before for pid, before in self.started.items())

    def summary(self, call_seconds: float) -> dict[str, float]:
        """Per call-minute and per call per 20 ms, over ``call_seconds`` of served calls."""
        call_s = max(call_seconds, 1e-9)
        return {
            "cpu_s": round(self.used_s, 3),
            "cpu_s_per_call_minute": self.used_s / (call_s / 60.0),
            "us_per_call_per_20ms": 1e6 * self.used_s / (call_s / 0.020),
        }


def _counted(reasons: Iterable[str]) -> str:
    counts = Counter(reasons)
    return " (" + ", ".join(f"{reason} ×{n}" for reason, n in counts.most_common()) + ")" if counts else ""


def require_loopback(url: str) -> None:
    """Raise ``ValueError`` unless ``url`` names this machine."""
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the load generator only targets loopback bridges (127.0.0.1, ::1, localhost), got {host!r}")


async def run_load(
    bridge_ws_url: str,
    calls: int,
    concurrency: int,
    seconds: float,
    ramp_s: float,
    auth_token: str | None,
    public_url: str | None,
    wav: str | None = None,
    *,
    deadline_s: float | None = None,
    clock: Clock | None = None,
    run_stream: StreamRunner = run_call,
) -> LoadResult:
    """Place ``calls`` calls through ``bridge_ws_url`` (``ws://127.0.0.1:PORT/media-stream``).

    ``deadline_s`` bounds the whole run (default: the ramp plus every wave of calls with generous overhead).
    ``run_stream`` plays each call's media stream (``twilio_flow.run_flow``).
    Raises ``ValueError`` for arguments out of range, a non-loopback bridge or an unusable WAV.
    """
    if calls < 1 or concurrency < 1 or not seconds > 0 or ramp_s < 0:
        raise ValueError(
            f"expected calls >= 1, concurrency >= 1, seconds > 0 and ramp_s >= 0, "
            f"got {calls}, {concurrency}, {seconds} and {ramp_s}"
        )
    require_loopback(bridge_ws_url)
    audio = load_caller_audio(wav)
    clock = clock or SystemClock()
    if deadline_s is None:
        deadline_s = ramp_s + math.ceil(calls / concurrency) * (seconds + CALL_OVERHEAD_S)
    base = http_base(bridge_ws_url)
    slots = asyncio.Semaphore(concurrency)
    flows: list[FlowResult | None] = [None] * calls
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    t0 = clock.monotonic()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(trust_env=False, timeout=HTTP_TIMEOUT_S, limits=limits) as http:

        async def one(i: int) -> None:
            call_sid = new_sid("CA")
            try:
                async with asyncio.timeout_at(deadline):
                    await clock.sleep_until(t0 + i * ramp_s / calls)
                    async with slots:
                        flows[i] = await run_flow(
                            base,
                            http=http,
                            audio_in=audio,
                            seconds=seconds,
                            auth_token=auth_token,
                            public_url=public_url,
                            call_sid=call_sid,
                            clock=clock,
                            run_stream=run_stream,
                        )
            except TimeoutError:
                flows[i] = FlowResult(call_sid, None, None, None, f"cut off by the run's {deadline_s:g} s deadline")

        async with asyncio.TaskGroup() as tg:
            for i in range(calls):
                tg.create_task(one(i))

    done = tuple(flow for flow in flows if flow is not None)
    return LoadResult(done, clock.monotonic() - t0, calls, concurrency, seconds, ramp_s)


async def loadtest_command(
    url: str,
    calls: int,
    concurrency: int,
    seconds: float,
    ramp_s: float,
    wav: str | None = None,
    *,
    auth_token: str | None = None,
    public_url: str | None = None,
    deadline_s: float | None = None,
    pids: tuple[int, ...] = (),
    json_out: str | None = None,
) -> int:
    """Print the table (and write it as JSON to ``json_out``). ``pids``: bridge processes whose CPU over the
    run is reported. Exit codes: 0 no call failed and no protocol violation (busy calls are fine: that is
    what overload looks like); 1 otherwise; 2 the run could not start (one sentence on stderr)."""
    cpu = CpuUse(pids) if pids else None
    try:
        if cpu is not None:
            cpu.start()
        result = await run_load(
            url,
            calls,
            concurrency,
            seconds,
            ramp_s,
            auth_token_or_env(auth_token),
            public_url,
            wav,
            deadline_s=deadline_s,
        )
        if cpu is not None:
            cpu.stop()
    except OSError as exc:
        print(f"cannot read the CPU time of process {', '.join(map(str, pids))}: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(result.table(cpu))
    if json_out:
        Path(json_out).write_text(json.dumps(result.summary(cpu), indent=2) + "\n")  # noqa: ASYNC240 (once, at the end)
    return 1 if result.of("failed") or result.violations else 0
