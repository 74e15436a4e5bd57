"""bench/capacity.py: ``--server-cpus`` (which CPUs each side gets, and each side's busy cores), starting servers,
and the knee's test of a level."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import wave
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from telephony_bridge.serving import running
from telephony_bridge.tools.emulator import EmulatorConfig, create_emulator_app
from telephony_bridge.tools.emulator.app import STATS_PATH
from tests.redis_server import free_port
from tests.support import BENCH

sys.path.insert(0, str(BENCH))  # capacity imports perf_stacks, beside it
import capacity  # bench/ is no package: imported from its folder
import lean_callers

CPUS = frozenset(os.sched_getaffinity(0))


@pytest.mark.skipif(len(CPUS) < 2, reason="pinning needs two CPUs: one for the server, one for the load")
def test_capacity_pinning_gives_the_load_every_cpu_the_server_does_not_get() -> None:
    first = min(CPUS)
    pinning = capacity.Pinning.parse(str(first))
    assert (pinning.server, pinning.load) == (frozenset({first}), CPUS - {first})


def test_capacity_pinning_refuses_cpus_it_cannot_have_or_leaving_none_for_the_load() -> None:
    with pytest.raises(ValueError, match="leaving at least one for the load"):
        capacity.Pinning.parse(",".join(map(str, sorted(CPUS))))
    with pytest.raises(ValueError, match="leaving at least one for the load"):
        capacity.Pinning.parse(str(max(CPUS) + 1000))
    with pytest.raises(ValueError, match="CPU numbers separated by commas"):
        capacity.Pinning.parse("0-1")  # a range, as taskset takes: not this option's form


def test_capacity_pinning_counts_each_sides_busy_cores() -> None:
    pinning = capacity.Pinning(server=frozenset({0}), load=frozenset({1, 2}))
    before = {"server": (10.0, 100.0), "load": (50.0, 200.0)}
    after = {"server": (15.0, 110.0), "load": (65.0, 220.0)}  # server 5 of 10 s busy; load 15 of 20 s, on 2 CPUs
    assert pinning.busy_cores(before, after) == {
        "server_cores_busy": pytest.approx(0.5),
        "load_cores_busy": pytest.approx(1.5),
    }


# /proc/stat as a 2-CPU machine shows it: cpu0 ran a guest for 40 ticks, which the kernel counts in its user 100.
STAT = """\
cpu  300 10 100 1000 50 5 5 0 40 0
cpu0 100 5 50 500 25 2 3 0 40 0
cpu1 200 5 50 500 25 3 2 0 0 0
intr 12345 0 1
ctxt 999
btime 1700000000
processes 42
procs_running 2
procs_blocked 0
softirq 100 1 2
"""


def test_capacity_cpu_busy_counts_the_machine_or_the_cpus_asked_for_each_tick_once() -> None:
    ticks = capacity.TICKS_PER_S
    assert capacity.cpu_busy_s(STAT) == (pytest.approx(420 / ticks), pytest.approx(1470 / ticks))
    assert capacity.cpu_busy_s(STAT, frozenset({0})) == (pytest.approx(160 / ticks), pytest.approx(685 / ticks))
    assert capacity.cpu_busy_s(STAT, frozenset({1})) == (pytest.approx(260 / ticks), pytest.approx(785 / ticks))
    assert capacity.cpu_busy_s(STAT, frozenset({0, 1})) == capacity.cpu_busy_s(STAT)
    assert capacity.cpu_busy_s(STAT, frozenset({7})) == (0, 0)


def test_capacity_machine_busy_reads_this_machines_cpus() -> None:
    busy, total = capacity.machine_busy_s(frozenset({min(CPUS)}))
    assert 0 <= busy <= total and total > 0


def _children() -> set[int]:
    """This process's children, running or not yet reaped, from /proc."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                pids.add(int(stat.parent.name))
    return pids


def test_capacity_start_kills_a_process_whose_health_never_answers() -> None:
    before = _children()
    with pytest.raises(SystemExit, match="did not come up"):
        capacity.start(
            [sys.executable, "-c", "import time; time.sleep(60)"],
            {},
            f"http://127.0.0.1:{free_port()}/healthz",
            timeout_s=0.3,
        )
    assert _children() - before == set()


def test_capacity_knee_fails_a_level_on_a_violation_an_underrun_a_refusal_or_latency() -> None:
    level = {"calls": 10, "served": 10, "violations": 0, "calls_with_underruns": 0, "heard_added_p99_ms": 20.0}
    assert capacity.passed(level, "heard")
    assert not capacity.passed({**level, "violations": 1}, "heard")
    assert not capacity.passed({**level, "calls_with_underruns": 1}, "heard")
    assert not capacity.passed({**level, "served": 9}, "heard")
    assert not capacity.passed({**level, "heard_added_p99_ms": 40.0}, "heard")
    assert not capacity.passed({**level, "heard_added_p99_ms": None}, "heard")


def test_capacity_reads_the_bridges_collections_lag_and_holes_from_its_own_metrics() -> None:
    from telephony_bridge.ops.metrics import Metrics

    metrics = Metrics()
    for generation, pause_s in (("0", 0.001), ("0", 0.003), ("1", 0.004), ("2", 0.036), ("2", 0.002)):
        metrics.gc_pause.labels(generation=generation).observe(pause_s)
    for lag_s in (0.0005, 0.03):
        metrics.loop_lag.observe(lag_s)
    metrics.playout_underruns.labels(cause="ai_late").inc(3)
    counters = capacity.counters_from_metrics(metrics.render().decode())
    assert counters == {
        "gc": 5,
        "gc_within_20ms": 4,
        "gc_full": 2,
        "lag": 2,
        "lag_within_20ms": 1,
        "ai_late": 3,
    }


def test_capacity_counts_the_calls_with_a_hole_inside_the_steady_window_only() -> None:
    """A hole is placed by its call's start and when playback resumed after it; holes in the set-up ramp or
    among the calls ending are not the steady window's."""

    def call(started_at: float | None, *ends_s: float) -> Any:
        return SimpleNamespace(started_at=started_at, underrun_ends_s=ends_s)

    calls = [
        call(100.0, 1.0),  # at 101: in the ramp
        call(100.5, 3.0, 9.0),  # at 103.5: inside
        call(101.0, 12.0),  # at 113: after
        call(101.0),  # no hole
        call(None, 5.0),  # no start known (a call that never started its stream)
        call(102.0, 1.0, 2.0),  # at 103 and 104: inside, counted once
        call(100.0, 3.0),  # at 103.0: on the edge, inside
    ]
    assert capacity.calls_with_holes_between(calls, 103.0, 110.0) == 3


def test_capacity_adds_the_load_processes_beat_stalls_and_keeps_the_worst() -> None:
    """Each load process's stalls are counted, in all and those begun in the steady window, and the worst
    lateness is the latest of any process; a process without a beat (the full callers) leaves them unknown."""
    stalls = [
        lean_callers.Stalls([101.0, 104.0], 0.031),
        lean_callers.Stalls([], 0.0),
        lean_callers.Stalls([110.0, 111.0], 0.052),
    ]
    figures = capacity.stall_figures(stalls, 103.0, 7.0)
    assert figures == {"beat_stalls": 4, "beat_stalls_steady": 2, "beat_worst_late_ms": pytest.approx(52.0)}
    unknown = {"beat_stalls": None, "beat_stalls_steady": None, "beat_worst_late_ms": None}
    assert capacity.stall_figures([stalls[0], None], 103.0, 7.0) == unknown
    assert capacity.stall_figures([], 103.0, 7.0) == unknown  # SIP calls: no beat


def test_capacity_send_counter_reads_perfs_intervals_and_rates_the_window_from_the_whole_ones_inside() -> None:
    output = "\n".join(
        [
            "     0.250,100,,syscalls:sys_enter_sendto,250000,100.00,,",
            "     0.250,<not counted>,,syscalls:sys_enter_write,0,100.00,,",  # the process never ran: 0
            "     0.500,30,,syscalls:sys_enter_sendto,250000,100.00,,",
            "     0.500,20,,syscalls:sys_enter_write,250000,100.00,,",
            "     0.750,<not supported>,,syscalls:sys_enter_sendto,0,100.00,,",  # no tracepoints: left out
            "     0.750,7,,syscalls:sys_enter_write,250000,100.00,,",
            "     1.000,5,,syscalls:sys_enter_sendto,250000,100.00,,",  # one of the two events missing: left out
            "# a comment perf may print",
        ]
    )
    assert capacity.send_intervals(output, 10.0, 2) == [(10.25, 100), (10.5, 50)]
    counter = capacity.SendCounter([])  # no pids: nothing is started, nothing counted
    assert counter.per_s(0.0, 100.0) is None
    counter._rows = capacity.send_intervals(output, 10.0, 2)
    assert counter.per_s(10.0, 10.5) == pytest.approx(150 / 0.5)  # both intervals, whole
    assert counter.per_s(10.1, 10.5) == pytest.approx(50 / 0.25)  # the first began before the window
    assert counter.per_s(10.5, 11.0) is None


def test_capacity_send_counter_dates_perfs_intervals_by_when_their_lines_came() -> None:
    """perf counts its times from its own start, after its set-up: the earliest line's arrival less its time."""
    lines = [
        (10.30, "# started on ...\n"),
        (10.31, "     0.250,100,,syscalls:sys_enter_sendto,250000,100.00,,\n"),
        (10.32, "     0.250,100,,syscalls:sys_enter_write,250000,100.00,,\n"),  # came later: not the bound
        (10.56, "     0.500,30,,syscalls:sys_enter_sendto,250000,100.00,,\n"),
    ]
    assert capacity.perf_started(lines) == pytest.approx(10.06)
    assert capacity.perf_started(lines[:1]) is None


def test_capacity_voices_start_the_emulator_speaking_the_recording_at_once_or_in_real_time(tmp_path: Path) -> None:
    """``--voice tts`` sends the recording all at once (``--burst``); ``--voice speech`` a frame every 20 ms on the
    voice's own clock (the file voice without it, tests/test_emulator.py); ``echo`` is the emulator's default."""
    wav = tmp_path / "tts.wav"
    echo = capacity.emulator_command(8000)
    tts, speech = (capacity.emulator_command(8000, wav, burst=burst) for burst in (True, False))
    assert "--voice" not in echo
    assert tts[tts.index("--voice") :] == ["--voice", "file", "--wav", str(wav), "--burst"]
    assert speech[speech.index("--voice") :] == ["--voice", "file", "--wav", str(wav)]


def test_capacity_reads_the_emulators_own_late_ticks_from_its_stats() -> None:
    """With ``--ai emulator`` each level reports the emulator's speaker ticks more than a frame late (counted in
    tests/test_emulator.py), read from its stats by that name."""
    with running(create_emulator_app(EmulatorConfig())) as emulator:
        assert capacity.emulator_ticks_late(emulator.http_url + STATS_PATH) == 0


def test_capacity_tts_voice_is_the_speech_recording_at_16_khz_for_the_whole_call(tmp_path: Path) -> None:
    """``--voice tts``: what the emulator's file voice sends all at once must outlast the call, at Savants' rate."""
    path = capacity.write_tts_wav(tmp_path, 7.0)
    with wave.open(str(path)) as recording:
        rate, channels, width, frames = (
            recording.getframerate(),
            recording.getnchannels(),
            recording.getsampwidth(),
            recording.getnframes(),
        )
    assert (rate, channels, width) == (16000, 1, 2)
    assert frames / rate >= 7.0


@pytest.mark.parametrize(
    "args",
    [["--record-sip", "--perf-stacks", "out.txt"], ["--sip", "--record-sip"]],
    ids=["without-sip", "without-a-recorder"],
)
def test_capacity_record_sip_needs_sip_and_a_recorder(args: list[str]) -> None:
    """``--record-sip`` moves a recorder from the first level's Twilio run to its SIP one: alone it would record
    nothing, so it is refused before anything starts."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "capacity.py"), *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "--record-sip records the SIP run" in done.stderr
