"""What a caller's message to the AI costs in timers: the lone-frame deadline armed after the read, against at once.

    .venv/bin/python bench/lone_timer.py [--calls 250] [--seconds 4] [--rounds 3]

``Inbound`` sends the caller's audio to the AI two 20 ms frames a message (``audio.upstream_message_ms``), and
a first frame waits for its partner with a deadline, in case none comes. Twilio's frames are read in pairs
(``twilio.paired_reads``), so the partner nearly always arrives in the same read and calls the deadline off.
``Inbound._arm_lone_timer`` now defers the deadline with one ``call_soon`` until the read is over; before
(the baseline here, ``at once``), it set the deadline at once on the shared ``TimerQueue`` (a heap entry
that the partner dropped and the queue popped later).

No sockets, the real loop (uvloop, as ``serve`` runs) and the real clock: ``--calls`` calls' ``Inbound``s, each
read of a pair a loop callback pushing both frames (the first sets its deadline, or now its ``call_soon``; the
second calls it off and sends the 40 ms message to a session that takes it at once), rounds of reads 40 ms apart
as Twilio's pairs come, with the two ways alternating ``--rounds`` times. Prints the process CPU per pair (a read
of two frames, the deadline, the message to the AI, and the bench's own loop timer for the read), each way's
median with its runs (whole runs: the ``Inbound``s built and the loop's timers included), and the difference.
The frames go through ``Inbound.push`` in Python, not the compiled caller path the bridge takes by default
(``_caller_path.c``), which arms and calls off the deadline through the same two methods.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from telephony_bridge.audio.codec import TWILIO_FRAME_BYTES
from telephony_bridge.clock import SystemClock
from telephony_bridge.inbound import Inbound
from telephony_bridge.ops.gc_tuning import tune_gc
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.settings import AudioSettings, BargeInSettings

SILENCE = bytes([0xFF]) * TWILIO_FRAME_BYTES
PAIR_S = 0.04


class NullSavants:
    """A Savants session that takes every message at once and sends it nowhere; keeps their sizes."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def can_send_now(self) -> bool:
        return True

    def send_audio_nowait(self, pcm: bytes) -> None:
        self.sizes.append(len(pcm))

    async def send_audio(self, pcm: bytes) -> bool:
        self.sizes.append(len(pcm))
        return True


class AtOnce(Inbound):
    """The baseline: the lone-frame deadline set at once, as before the deferral."""

    __slots__ = ()

    def _arm_lone_timer(self) -> None:
        self._arm_lone_deadline()  # no call_soon first: the deadline itself, at once


async def one_run(kind: type[Inbound], calls: int, seconds: float) -> tuple[float, int]:
    """CPU seconds of the process for ``seconds`` of pairs on ``calls`` calls, and the pairs read."""
    started = time.process_time()
    clock = SystemClock()
    audio, barge_in, metrics = AudioSettings(upstream_message_ms=40), BargeInSettings(enabled=False), Metrics()
    inbounds = [kind(audio, barge_in, metrics, clock) for _ in range(calls)]
    sessions = [NullSavants() for _ in range(calls)]
    runs = [asyncio.ensure_future(inbound.run(session)) for inbound, session in zip(inbounds, sessions, strict=True)]
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    rounds = round(seconds / PAIR_S)
    start = loop.time() + PAIR_S

    def read(inbound: Inbound, offset: float, r: int) -> None:  # one read bringing a pair, as picows' callback does
        now = clock.monotonic()
        inbound.push(r * 40, SILENCE, now, None)
        inbound.push(r * 40 + 20, SILENCE, now, None)
        if r + 1 < rounds:
            loop.call_at(start + offset + (r + 1) * PAIR_S, read, inbound, offset, r + 1)

    for i, inbound in enumerate(inbounds):  # the calls' reads spread over each 40 ms, as their streams' are
        offset = i * PAIR_S / calls
        loop.call_at(start + offset, read, inbound, offset, 0)
    await asyncio.sleep(rounds * PAIR_S + 0.2)
    for task in runs:
        task.cancel()
    await asyncio.gather(*runs, return_exceptions=True)
    sizes = [size for session in sessions for size in session.sizes]
    assert sizes == [1280] * (rounds * calls), "every pair went to the AI as one 40 ms message"
    return time.process_time() - started, rounds * calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=250)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    tune_gc()
    results: dict[str, list[float]] = {"after the read": [], "at once": []}
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        for _ in range(args.rounds):
            for name, kind in (("after the read", Inbound), ("at once", AtOnce)):
                cpu_s, pairs = runner.run(one_run(kind, args.calls, args.seconds))
                results[name].append(cpu_s / pairs * 1e6)
    loop_name = "uvloop" if loop_factory else "asyncio"
    print(f"{args.calls} calls, {args.seconds:g} s of paired reads a run, {args.rounds} runs each way, {loop_name}")
    for name, per_pair in results.items():
        runs = ", ".join(f"{us:.2f}" for us in per_pair)
        print(f"  deadline {name:<15} {statistics.median(per_pair):6.2f} µs CPU a pair (runs: {runs})")
    new, old = (statistics.median(results[name]) for name in ("after the read", "at once"))
    per_20ms = (new - old) / 2  # a pair is 40 ms of the call
    print(f"  difference: {new - old:+.2f} µs a pair ({(new - old) / old:+.1%}), {per_20ms:+.2f} µs a call per 20 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
