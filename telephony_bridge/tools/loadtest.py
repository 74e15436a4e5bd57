"""``telephony-bridge loadtest``: many simulated calls against a bridge on this machine, each one Twilio's full
flow (``twilio_flow``), with a small table of what the callers got.

Calls start evenly over ``ramp_s``, at most ``concurrency`` at once. Every call hangs up after ``seconds``
and the whole run has a deadline; a call still running then is cut off and counted as failed. Only loopback
bridges: this generator is for measuring your own bridge, not for loading someone else's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from telephony_bridge.clock import Clock, SystemClock
from telephony_bridge.tools.caller import new_sid
from telephony_bridge.tools.commands import HTTP_TIMEOUT_S, auth_token_or_env, load_caller_audio
from telephony_bridge.tools.twilio_flow import FlowResult, Outcome, http_base, run_flow

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
    def violations(self) -> int:
        return sum(len(f.call.violations) for f in self.flows if f.call is not None)

    @property
    def underruns(self) -> int:
        return sum(f.call.underruns for f in self.flows if f.call is not None)

    def table(self) -> str:
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
        if times:
            lines.append(
                f"first AI audio p50 {_percentile(times, 50):.3f} s, p95 {_percentile(times, 95):.3f} s, "
                f"max {times[-1]:.3f} s ({len(times)} of {len(served)} served calls)"
            )
        else:
            lines.append(f"first AI audio none heard ({len(served)} served calls)")
        lines += [f"violations     {self.violations}", f"underruns      {self.underruns}"]
        return "\n".join(lines)


def _percentile(sorted_values: list[float], p: float) -> float:
    """Nearest rank: a value that was measured, which matters with few calls."""
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


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
) -> LoadResult:
    """Place ``calls`` calls through ``bridge_ws_url`` (``ws://127.0.0.1:PORT/media-stream``).

    ``deadline_s`` bounds the whole run (default: the ramp plus every wave of calls with generous overhead).
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
) -> int:
    """Print the table. Exit codes: 0 no call failed and no protocol violation (busy calls are fine: that is
    what overload looks like); 1 otherwise; 2 the run could not start (one sentence on stderr)."""
    try:
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
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(result.table())
    return 1 if result.of("failed") or result.violations else 0
