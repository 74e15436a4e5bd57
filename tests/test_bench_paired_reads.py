"""bench/paired_reads.py runs each sender and reads every message: a lone last one is let go, as the tick does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "paired_reads.py"


def test_paired_reads_bench_reads_every_message_of_every_sender() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--messages", "21"], capture_output=True, text=True, timeout=60, check=True
    )
    rows = [line for line in result.stdout.splitlines() if "messages)" in line]
    names = ["unpaired (baseline)", "paired, TCP_NODELAY", "paired, Nagle", "paired, Nagle, TCP_QUICKACK"]
    assert [row.split("  p50")[0].strip() for row in rows] == [*names, "paired, Nagle, talking back"]
    assert all(row.endswith("(21 of 21 messages)") for row in rows), rows  # 21: the last one alone
