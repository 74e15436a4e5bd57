"""bench/ab.py's comparison of two checkouts' alternating capacity.py runs."""

from __future__ import annotations

import sys

from tests.support import BENCH

sys.path.insert(0, str(BENCH))
import ab  # bench/ is no package: imported from its folder


def _run(steady: float, whole: float) -> dict[str, list[dict]]:
    return {"bridge": [{"calls": 50, "steady_us_per_call_per_20ms": steady, "whole_cpu_s_per_call_minute": whole}]}


def test_ab_counts_wins_pair_by_pair_and_the_mean_difference() -> None:
    new = [_run(100, 0.30), _run(120, 0.40), _run(90, 0.30)]
    old = [_run(110, 0.30), _run(115, 0.45), _run(120, 0.45)]
    steady, whole = ab.compare(new, old)
    # 100 < 110 and 90 < 120 win, 120 > 115 does not; means 103.3 against 115: -10.1 %
    assert _words(steady) == (
        "bridge 50 calls steady new 103 (90–120) old 115 (110–120) µs/call/20ms new lower in 2 of 3 pairs, mean -10.1 %"
    )
    # a tie is no win: 0.30 against 0.30
    assert _words(whole) == (
        "bridge 50 calls whole new 0.333 (0.3–0.4) old 0.4 (0.3–0.45) CPU-s/call-min new lower in 2 of 3 pairs, "
        "mean -16.7 %"
    )


def _words(line: str) -> str:
    """The line with its column padding squeezed out."""
    return " ".join(line.split())


def test_ab_compares_holes_and_long_collections_and_skips_a_figure_a_row_lacks() -> None:
    def run(holes: int, long_gcs: int) -> dict[str, list[dict]]:
        figures = {"calls": 250, "steady_us_per_call_per_20ms": 65.0, "whole_cpu_s_per_call_minute": 0.2}
        sip = {"calls": 20, "steady_us_per_call_per_20ms": 90.0, "whole_cpu_s_per_call_minute": 0.3}
        twilio = {**figures, "calls_with_underruns": holes, "gc_pauses_over_20ms": long_gcs}
        return {"bridge": [twilio], "bridge-sip": [{**sip, "gc_pauses_over_20ms": 0}]}

    lines = [_words(line) for line in ab.compare([run(37, 0), run(4, 0)], [run(208, 1), run(196, 1)])]
    assert (
        "bridge 250 calls holes new 20.5 (4–37) old 202 (196–208) calls with a hole new lower in 2 of 2 pairs, "
        "mean -89.9 %" in lines
    )
    assert (
        "bridge 250 calls GC>20 new 0 (0–0) old 1 (1–1) collections over 20 ms new lower in 2 of 2 pairs, "
        "mean -100.0 %" in lines
    )
    assert (
        "bridge-sip 20 calls GC>20 new 0 (0–0) old 0 (0–0) collections over 20 ms new lower in 0 of 2 pairs, "
        "mean -" in lines
    )
    assert not any(line.startswith("bridge-sip 20 calls holes") for line in lines)  # SIP rows count no holes
