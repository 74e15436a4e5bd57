"""The bridge's CPU per call spent once (set-up and tear-down), apart from what each second of a call costs.

    .venv/bin/python bench/setup_cost.py                     # 100 calls of 0.5 s and of 2.5 s, twice: ~50 s
    .venv/bin/python bench/setup_cost.py --profile prof.txt  # also py-spy 300 calls of 0.2 s, top functions
    .venv/bin/python bench/setup_cost.py --server-python /tmp/v/bin/python   # the bridge on another interpreter
    .venv/bin/python bench/setup_cost.py --rounds 0 --parts 2000   # some parts alone: token request, accounting...
    .venv/bin/python bench/setup_cost.py --tls       # the voice stream over wss://, as to Savants (needs openssl)

Starts the Savants emulator and ``telephony-bridge serve`` with ``capacity.py``'s settings, then runs rounds of
``--calls`` calls of each ``--lengths`` (alternating), at most ``--concurrency`` at once, each call Twilio's whole
flow (``loadtest``: the signed ``/voice`` webhook, the media stream with speech both ways, the caller's hang-up);
the callers run in this process. Around each run it reads the bridge's CPU time from /proc: from before the first
webhook until the last call was over and the bridge had had 0.5 s more to close it, so every figure printed per
run is the whole run's, set-up, tear-down and the idle loop included.

How the per-call figure is derived: a call of length T costs the bridge ``a + b·T`` CPU-s; the line through each
round's mean CPU per served call at the two lengths gives ``b`` (the steady cost per call-second, its slope) and
``a`` (its intercept: what a call costs once, whatever its length: the webhook and its signature, admission, the
token request, the stream's accept and hand-off, opening the Savants session, the call's objects, the "call ended"
line, metrics and the release). Each round gives its own ``a``; their mean and range are printed. Call lengths
count from the stream's ``start`` to the caller's hang-up, so the first audio's wait is in ``a``. The bridge's
idle CPU over the run (measured before the first round) is counted in the runs and is not subtracted: it is
printed so it can be judged. On this 2-core machine the callers share the cores with the bridge: compare
figures from the same half-hour, alternating old and new code; even so the intercept moved by up to ±1 ms between
invocations of the same code (5 Dec), so a part that costs a few hundred µs or less is better timed alone:
``--parts N`` times N runs of each of these, on the bridge's event loop (uvloop), in this process, as CPU per run:
a request of the bridge's own ``TokenClient`` to the same emulator (the warm token each call fetches; client side),
the memory accounting's reserve, claim and release on the bench's 100 devices with 20 calls up, the ``/voice``
signature check (Twilio's 13 parameters) and the ``<Connect><Stream>`` TwiML.

``--tls``: the bridge reaches the emulator's voice stream over ``wss://``, as it reaches Savants: a TLS relay in
this process (its own thread) sits in front of the emulator, with a certificate made for the run by openssl's
command line, which the bridge trusts through ``SSL_CERT_FILE``: the system's CA bundle with it appended, so that
building a default TLS context costs the bridge what it costs in production. The token endpoint stays http.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import capacity  # bench/, beside this script
import httpx
import uvloop
from starlette.datastructures import FormData
from tls_relay import TlsRelay  # bench/, beside this script

from telephony_bridge.accounting.base import Lease, Limits
from telephony_bridge.accounting.memory import MemoryAccounting
from telephony_bridge.clock import SystemClock
from telephony_bridge.savants.http_post import JsonPoster
from telephony_bridge.savants.tokens import TOKEN_PATH, TokenClient
from telephony_bridge.tools.loadtest import run_load
from telephony_bridge.tools.twilio_flow import call_params, sign
from telephony_bridge.twilio import twiml
from telephony_bridge.twilio.signatures import SignatureChecker

SETTLE_S = 0.5  # after the last call, for the bridge to close its side (as capacity.py)
IDLE_S = 2.0
PROFILE_LENGTH_S = 0.2  # the profiled run's calls: mostly set-up and tear-down
RAMP_S = 1.0


def one_run(pid: int, url: str, calls: int, concurrency: int, seconds: float) -> tuple[float, int, float]:
    """``calls`` calls of ``seconds``; the bridge's CPU-s over the run, the calls served, the run's wall time."""
    before, t0 = capacity.cpu_s(pid), time.monotonic()
    result = asyncio.run(
        run_load(url, calls, concurrency, seconds, RAMP_S, capacity.AUTH_TOKEN, capacity.PUBLIC_URL, capacity.WAV)
    )
    time.sleep(SETTLE_S)
    return capacity.cpu_s(pid) - before, len(result.of("served")), time.monotonic() - t0


def token_cpu_s(base_url: str, requests: int, *, through_httpx: bool = False) -> float:
    """CPU-s of this process per ``TokenClient.fetch``, over ``requests`` of them on one kept-alive connection,
    as the bridge makes them (its client, on uvloop as ``serve`` runs); the first 20 are a warm-up. Devices rotate
    over the bench's 100, within the emulator's 60 requests per device-minute for up to 6,000 requests a minute
    (``--parts`` runs both clients against one emulator: keep it under ~2,900, or the second meets 429s).
    ``through_httpx``: the same requests through ``httpx.AsyncClient``, the bridge's client until 6 Dec."""

    async def fetch_all() -> float:
        async with contextlib.AsyncExitStack() as stack:
            if through_httpx:
                http = await stack.enter_async_context(httpx.AsyncClient(trust_env=False, base_url=base_url))

                async def fetch(device_id: str) -> None:
                    body = {"apiKey": "bench-key", "deviceId": device_id}
                    response = await http.post(TOKEN_PATH, json=body, headers={"Accept": "application/json"})
                    assert isinstance(response.json()["token"], str)
            else:
                tokens = TokenClient(await stack.enter_async_context(JsonPoster(base_url)), "bench-key")
                fetch = tokens.fetch
            for i in range(20):
                await fetch(f"bench-{i}")
            before = time.process_time()
            for i in range(requests):
                await fetch(f"bench-{i % capacity.DEVICES}")
            return (time.process_time() - before) / requests

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(fetch_all())


def parts_cpu_s(base_url: str, runs: int) -> dict[str, float]:
    """``--parts``: CPU-s of this process per run of each part alone (see the module's docstring)."""
    accounting = MemoryAccounting(
        [f"bench-{i}" for i in range(capacity.DEVICES)], Limits(max_token_requests=10**9), SystemClock()
    )

    async def reserve_claim_release() -> float:
        for i in range(20):  # calls up
            await accounting.acquire(f"CA-up-{i}")
        before = time.process_time()
        for i in range(runs):
            await accounting.reserve(f"CA{i}", 10.0, token="take")
            await accounting.release(await accounting.claim(f"CA{i}") or Lease(f"CA{i}", "none"))
        return (time.process_time() - before) / runs

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        accounting_s = runner.run(reserve_claim_release())
    checker = SignatureChecker(capacity.AUTH_TOKEN, capacity.PUBLIC_URL)
    params = FormData(call_params("CA" + "0" * 32, "AC" + "1" * 32, "+15550001111", "+15550002222", "ringing"))
    signature = sign(capacity.AUTH_TOKEN, capacity.PUBLIC_URL + "/voice", params)
    assert checker.check_http("/voice", "", params, signature)
    return {
        "token request (client side)": token_cpu_s(base_url, runs),
        "the same through httpx (the client before 6 Dec)": token_cpu_s(base_url, runs, through_httpx=True),
        "accounting reserve + claim + release": accounting_s,
        "/voice signature check": _per_run(lambda: checker.check_http("/voice", "", params, signature), runs),
        "<Connect><Stream> TwiML": _per_run(
            lambda: twiml.connect_document(
                "wss://bridge.bench.test/media-stream",
                {"token": "t" * 32, "from": "+15550001111", "to": "+15550002222"},
                status_callback=capacity.PUBLIC_URL + "/stream-status",
                action=capacity.PUBLIC_URL + "/stream-ended",
            ),
            runs,
        ),
    }


def _per_run(part: Callable[[], object], runs: int) -> float:
    before = time.process_time()
    for _ in range(runs):
        part()
    return (time.process_time() - before) / runs


def thread_cpu_s(pid: int) -> float:
    """CPU-s the live threads of ``pid`` have run, from the scheduler's nanosecond counts: /proc's stat counts
    10 ms ticks, too coarse for an idle process over a few seconds (a thread that has exited is not counted)."""
    total_ns = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            total_ns += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total_ns / 1e9


def intercept(short: tuple[float, float], long: tuple[float, float]) -> tuple[float, float]:
    """``(a, b)`` of the line through two (length s, CPU-s per call) points: CPU once per call, CPU per call-second."""
    slope = (long[1] - short[1]) / (long[0] - short[0])
    return short[1] - slope * short[0], slope


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100, help="calls in each run")
    parser.add_argument("--concurrency", type=int, default=20, help="calls at once (keep it well below 50 here)")
    parser.add_argument("--lengths", type=float, nargs=2, default=[0.5, 2.5], metavar=("SHORT", "LONG"))
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs, one of each length")
    parser.add_argument("--profile", metavar="OUT", help="py-spy a further run of 0.2 s calls into OUT (raw)")
    parser.add_argument("--profile-calls", type=int, default=300, help="calls in the profiled run")
    parser.add_argument("--parts", type=int, default=0, metavar="N", help="also time some parts alone, N runs each")
    parser.add_argument("--tls", action="store_true", help="the voice stream over wss:// (see above)")
    parser.add_argument("--server-python", metavar="PYTHON", default=sys.executable, help="the bridge's interpreter")
    args = parser.parse_args()
    short_s, long_s = args.lengths
    if not 0 < short_s < long_s:
        parser.error(f"expected two lengths, the shorter first, both above 0, got {short_s:g} and {long_s:g}")
    if args.profile and capacity.py_spy() is None:
        parser.error("--profile needs py-spy (not found next to this Python or on PATH): pip install py-spy")
    print(f"bridge runs on {capacity.interpreter(args.server_python)}")
    emulator, emulator_port = capacity.start_emulator()
    bridge = None
    stack = contextlib.ExitStack()  # the --tls certificate's folder
    try:
        command, env = capacity.servers(args.server_python, emulator_port, 1)["bridge"]
        if args.tls:
            relay = TlsRelay(emulator_port, Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tls-"))))
            env = {**env, **relay.env()}
            print(f"voice stream over wss:// (a TLS relay on port {relay.port}); the bridge trusts {relay.bundle}")
        port = capacity.free_port()
        bridge = capacity.start(command, {**env, "PORT": str(port)}, f"http://127.0.0.1:{port}/healthz")
        url = f"ws://127.0.0.1:{port}/media-stream"
        one_run(bridge.pid, url, args.concurrency, args.concurrency, short_s)  # warm-up, not reported
        before = thread_cpu_s(bridge.pid)
        time.sleep(IDLE_S)
        idle = (thread_cpu_s(bridge.pid) - before) / IDLE_S
        print(f"idle bridge: {1000 * idle:.1f} ms CPU per second (in every run below, not subtracted)")
        fits = []
        for r in range(args.rounds):
            points = {}
            order = (short_s, long_s) if r % 2 == 0 else (long_s, short_s)
            for seconds in order:
                used, served, wall = one_run(bridge.pid, url, args.calls, args.concurrency, seconds)
                per_call = used / max(1, served)
                points[seconds] = (seconds, per_call)
                print(
                    f"round {r + 1}: {served:4} of {args.calls} calls of {seconds:g} s served in {wall:5.1f} s: "
                    f"bridge {used:5.2f} CPU-s = {1000 * per_call:5.2f} ms per call, "
                    f"{used / max(1e-9, served * seconds / 60):.3f} CPU-s per call-minute",
                    flush=True,
                )
                if served < args.calls:
                    print(f"  {args.calls - served} calls not served: this round's figures are suspect")
            fits.append(intercept(points[short_s], points[long_s]))
        once = [a for a, _ in fits]
        if fits:
            a, b = statistics.mean(once), statistics.mean(slope for _, slope in fits)
            print(
                f"once per call (set-up + tear-down, the intercept): {1000 * a:.2f} ms "
                f"(rounds: {', '.join(f'{1000 * x:.2f}' for x in once)}), for a 20 s call {a * 3:.4f} CPU-s per "
                f"call-minute (issue 10's goal: 0.25 in all); per call-second (the slope, {args.concurrency} calls at "
                f"once): {1000 * b:.2f} ms"
            )
        if args.parts:
            for part, cpu_s in parts_cpu_s(f"http://127.0.0.1:{emulator_port}", args.parts).items():
                print(f"alone, {args.parts} runs: {part}: {1e6 * cpu_s:.1f} µs CPU a run")
        if args.profile:
            command = [str(capacity.py_spy()), "record", "--pid", str(bridge.pid), "--rate", "400", "--format", "raw"]
            spy = subprocess.Popen(
                [*command, "--nonblocking", "-o", args.profile],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)  # py-spy attached
            used, served, wall = one_run(bridge.pid, url, args.profile_calls, args.concurrency, PROFILE_LENGTH_S)
            spy.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
            spy.wait()
            print(f"profiled: {served} calls of {PROFILE_LENGTH_S:g} s, {1000 * used / max(1, served):.2f} ms each")
            print(capacity.top_functions(args.profile, 30))
    finally:
        if bridge is not None:
            bridge.terminate()
            bridge.wait()
        emulator.terminate()
        emulator.wait()
        stack.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
