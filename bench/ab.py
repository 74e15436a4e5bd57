"""Two checkouts' capacity.py figures, taken in alternating runs on this machine: an A/B that its noise cannot fake.

    .venv/bin/python bench/ab.py ../base --pairs 5 -- --calls 50 100 --seconds 20 --servers bridge

Runs ``bench/capacity.py`` with the arguments after ``--``, ``--pairs`` times in this checkout ("new") and in the
other ("old"), alternating (the first of each pair changes from pair to pair, so a machine that drifts over the
series weighs on both), each run from its own checkout so that its servers import that checkout's code, all on this
interpreter. The other checkout needs its compiled kernels: ``cp telephony_bridge/audio/*.so <other>/...`` or an
install there. Then, per server and load level, steady CPU (µs per call per 20 ms) and whole-call CPU (CPU-s per
call-minute), calls with a hole in playback and the bridge's collections over 20 ms: each side's mean and range,
in how many pairs the new one was lower, and the mean difference.

Why: single runs of capacity.py move by ±10 % or more here (a "high mode" of this VM at 50 calls among it), so a
change is judged only over alternating pairs, and by how often it wins as well as by how much.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
FIGURES = {  # capacity.py's key: what it is called here, its unit
    "steady_us_per_call_per_20ms": ("steady", "µs/call/20ms"),
    "whole_cpu_s_per_call_minute": ("whole", "CPU-s/call-min"),
    "calls_with_underruns": ("holes", "calls with a hole"),
    "calls_with_underruns_steady": ("holes*", "calls with a hole in the steady window"),
    "gc_pauses_over_20ms": ("GC>20", "collections over 20 ms"),
}


def run(checkout: Path, capacity_args: list[str], out: Path) -> dict[str, list[dict]]:
    """One capacity.py run from ``checkout``: its printed lines pass through; its figures come back by server."""
    command = [sys.executable, str(checkout / "bench" / "capacity.py"), *capacity_args, "--json", str(out)]
    if subprocess.run(command, cwd=checkout).returncode != 0:
        raise SystemExit(f"capacity.py failed in {checkout}: its output above says why")
    runs: dict[str, list[dict]] = json.loads(out.read_text())["runs"]
    return runs


def compare(new: list[dict[str, list[dict]]], old: list[dict[str, list[dict]]]) -> list[str]:
    """Per server, load level and figure: both sides' means and ranges, the new side's wins and mean difference.
    ``new[i]`` and ``old[i]`` are pair ``i``'s runs, as ``capacity.py --json`` writes them."""
    lines = []
    for server in new[0]:
        for level, first in enumerate(new[0][server]):
            for key, (name, unit) in FIGURES.items():
                if any(pair[server][level].get(key) is None for pair in (*new, *old)):
                    continue  # a figure this server's rows do not have (a SIP row's holes)
                ours = [pair[server][level][key] for pair in new]
                theirs = [pair[server][level][key] for pair in old]
                wins = sum(a < b for a, b in zip(ours, theirs, strict=True))
                before = statistics.mean(theirs)
                change = f"{100 * (statistics.mean(ours) / before - 1):+.1f} %" if before else "-"
                lines.append(
                    f"{server:12} {first['calls']:4} calls  {name:6} new {statistics.mean(ours):7.3g} "
                    f"({min(ours):.3g}–{max(ours):.3g})  old {before:7.3g} "
                    f"({min(theirs):.3g}–{max(theirs):.3g}) {unit}  new lower in {wins} of {len(ours)} pairs, "
                    f"mean {change}"
                )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s OTHER [--pairs N] -- CAPACITY_ARGS...",
    )
    parser.add_argument("other", type=Path, help="the other checkout (the old code)")
    parser.add_argument("--pairs", type=int, default=3, help="alternating pairs of runs")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    capacity_args = argv[split + 1 :]
    if any(arg.split("=")[0] in ("--json", "--knee", "--knee-at") for arg in capacity_args):
        parser.error("ab.py compares fixed load levels and writes capacity.py's --json itself")
    other = args.other.resolve()
    if not (other / "bench" / "capacity.py").exists():
        parser.error(f"{other} is not a checkout of this project (no bench/capacity.py)")
    new: list[dict[str, list[dict]]] = []
    old: list[dict[str, list[dict]]] = []
    with tempfile.TemporaryDirectory(prefix="ab-") as folder:
        out = Path(folder) / "run.json"
        for pair in range(args.pairs):
            order = [("new", HERE), ("old", other)]
            for side, checkout in order if pair % 2 == 0 else reversed(order):
                print(f"== pair {pair + 1} of {args.pairs}: {side} ({checkout})", flush=True)
                (new if side == "new" else old).append(run(checkout, capacity_args, out))
    print(f"\nnew: {HERE}\nold: {other}")
    print("\n".join(compare(new, old)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
