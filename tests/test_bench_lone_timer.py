"""bench/lone_timer.py carries every pair to the AI both ways and prints each way's cost and the difference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "lone_timer.py"


def test_lone_timer_bench_sends_every_pair_both_ways_and_compares_them() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--calls", "20", "--seconds", "0.4", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,  # each run asserts that every pair reached the AI, on time for its timestamps
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("20 calls, 0.4 s of paired reads a run, 1 runs each way")
    assert [line.split()[1] for line in lines[1:3]] == ["after", "at"]
    assert all("µs CPU a pair" in line for line in lines[1:3])
    assert lines[3].strip().startswith("difference:")
