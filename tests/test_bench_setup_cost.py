"""bench/setup_cost.py's reading of two call lengths: CPU once per call (the intercept) and per call-second."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.support import BENCH, wait_until

sys.path.insert(0, str(BENCH))  # setup_cost imports capacity, beside it
_spec = importlib.util.spec_from_file_location("setup_cost", BENCH / "setup_cost.py")
assert _spec is not None and _spec.loader is not None
setup_cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(setup_cost)


def test_intercept_splits_cost_once_from_cost_per_second() -> None:
    # 3 ms once and 8 ms per call-second: a 0.5 s call costs 7 ms, a 2.5 s call 23 ms
    once, per_second = setup_cost.intercept((0.5, 0.007), (2.5, 0.023))
    assert (once, per_second) == (pytest.approx(0.003), pytest.approx(0.008))


def test_thread_cpu_s_counts_a_processs_cpu() -> None:
    """A child that burns 0.2 s of CPU, then sleeps: its threads' count reaches that (a process of one thread,
    since a thread that exits leaves the count: this test process's threads come and go with other tests)."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.2: pass\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", burn])
    try:
        wait_until(lambda: setup_cost.thread_cpu_s(child.pid) >= 0.2, 10, "the child's 0.2 CPU-s")
        assert setup_cost.thread_cpu_s(child.pid) < 1.0  # and not much more: it sleeps after
    finally:
        child.kill()
        child.wait()
