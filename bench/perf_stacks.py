"""Where a server's CPU goes, by Python function with whole Python stacks: perf and CPython 3.13's perf_jit.

    python bench/capacity.py --calls 50 --servers bridge --server-python /tmp/v313/bin/python --perf-stacks OUT

py-spy samples wall time and stops at the innermost Python frame, so a ``send()`` that waits on the receiver
looks costly, and where the loop's own C runs is one line. ``--perf`` counts CPU truly, but by library only.
CPython 3.13 run with ``PYTHON_PERF_JIT_SUPPORT=1`` writes, for each Python function it runs, a trampoline
with unwinding information that ``perf inject --jit`` turns into symbols, so a DWARF call graph shows the
whole Python stack of each CPU sample, C and kernel frames beneath. (3.12's ``-X perf`` names only the
innermost function without frame pointers; 3.11 has neither.) Recording costs the server ~10-30 % more CPU
while it runs: read shares, not the run's µs.

The summary (printed, and written to OUT; the recording itself is not kept: it needs thousands of jitted
objects beside it): each function's share of the server's CPU samples, inclusive (anywhere on the stack) and
self (the innermost Python frame: its own bytecode and whatever C or kernel work it called), and the
commonest outermost call paths.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

# for the servers under test only: every process started with it writes /tmp/jit-<pid>.dump
ENV = {"PYTHON_PERF_JIT_SUPPORT": "1"}
MIN_PYTHON = (3, 13)
RATE_HZ = 199  # each sample copies 16 KB of stack: a higher rate perturbs the server more than it informs
STACK_BYTES = 16384
NO_PYTHON_FRAME = "(no Python frame: the event loop's C, the kernel)"


def record_command(out: str, pids: list[int], window_s: float) -> list[str]:
    """``perf record`` of ``pids`` for ``window_s`` with DWARF call graphs, without filling perf's build-id cache."""
    return [
        *("perf", "record", "-q", "--no-buildid-cache", "-F", str(RATE_HZ), "-k", "1"),
        *("--call-graph", f"dwarf,{STACK_BYTES}", "-o", out, "-p", ",".join(map(str, pids))),
        *("--", "sleep", str(window_s)),
    ]


def collect(raw: str, pids: list[int]) -> str:
    """The summary of ``raw`` (a ``record_command`` recording of ``pids``), after which the recording, the jit
    dumps and the objects ``perf inject`` makes from them (thousands a run) are removed."""
    try:
        with tempfile.TemporaryDirectory() as scratch:  # perf inject would otherwise file each object in ~/.debug
            injected = str(Path(scratch) / "injected.data")
            subprocess.run(
                ["perf", "inject", "--jit", "-i", raw, "-o", injected],
                env={**os.environ, "PERF_BUILDID_DIR": scratch},
                check=True,
                capture_output=True,
            )
            return summarize(injected)
    finally:
        Path(raw).unlink(missing_ok=True)
        for pid in pids:
            Path(f"/tmp/jit-{pid}.dump").unlink(missing_ok=True)
            for path in Path("/tmp").glob(f"jitted-{pid}-*.so"):
                path.unlink(missing_ok=True)


def _python_frames(sample: str) -> list[str]:
    """A sample's Python functions, innermost first, as ``name (file)``; consecutive repeats (a trampoline
    and its frame) once."""
    frames: list[str] = []
    for row in sample.splitlines():
        at = row.find("py::")
        if at < 0:
            continue
        name, _, where = row[at + 4 :].rsplit(" (", 1)[0].partition(":")
        frame = f"{name} ({Path(where).name})" if where else name
        if not frames or frames[-1] != frame:
            frames.append(frame)
    return frames


def summarize(perf_data: str, top: int = 40, depth: int = 4) -> str:
    """Shares of the samples by Python function (inclusive and self) and by outermost call path."""
    script = subprocess.run(
        ["perf", "script", "-i", perf_data, "-F", "ip,sym"], capture_output=True, text=True, check=True
    ).stdout
    return summarize_script(script, top, depth)


def summarize_script(script: str, top: int = 40, depth: int = 4) -> str:
    """``summarize`` on ``perf script -F ip,sym``'s text: samples apart by blank lines, innermost frame first."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    paths: Counter[str] = Counter()
    samples = 0
    for sample in script.split("\n\n"):
        if not sample.strip():
            continue
        samples += 1
        frames = _python_frames(sample) or [NO_PYTHON_FRAME]
        own[frames[0]] += 1
        inclusive.update(set(frames))
        paths[" > ".join(reversed(frames[-depth:]))] += 1
    if not samples:
        return "no samples (was the server running, and on Python 3.13+ with PYTHON_PERF_JIT_SUPPORT=1?)"
    share = lambda n: f"{100 * n / samples:5.1f}"  # noqa: E731
    lines = [f"{samples} CPU samples; inclusive % / self %  function"]
    named = sorted(inclusive, key=lambda k: (-inclusive[k], -own[k]))
    lines += [f"{share(inclusive[k])} / {share(own[k])}  {k}" for k in named[:top]]
    lines.append(f"outermost {depth} Python frames of each sample, commonest first:")
    lines += [f"{share(n)}  {path}" for path, n in paths.most_common(top // 2)]
    return "\n".join(lines)


def available(python_version: tuple[int, int]) -> str | None:
    """Why ``--perf-stacks`` cannot run here, or None."""
    if python_version < MIN_PYTHON:
        return (
            f"--perf-stacks needs the servers on Python {'.'.join(map(str, MIN_PYTHON))}+ (perf_jit), not "
            f"{'.'.join(map(str, python_version))}: pass --server-python with a 3.13 venv that has the package"
        )
    if shutil.which("perf") is None:
        return "--perf-stacks needs perf (Debian: linux-perf)"
    return None
