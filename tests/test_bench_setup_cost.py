"""bench/setup_cost.py's reading of two call lengths: CPU once per call (the intercept) and per call-second."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from tests.support import BENCH

sys.path.insert(0, str(BENCH))  # setup_cost imports capacity, beside it
_spec = importlib.util.spec_from_file_location("setup_cost", BENCH / "setup_cost.py")
assert _spec is not None and _spec.loader is not None
setup_cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(setup_cost)


def test_intercept_splits_cost_once_from_cost_per_second() -> None:
    # 3 ms once and 8 ms per call-second: a 0.5 s call costs 7 ms, a 2.5 s call 23 ms
    once, per_second = setup_cost.intercept((0.5, 0.007), (2.5, 0.023))
    assert (once, per_second) == (pytest.approx(0.003), pytest.approx(0.008))


def test_thread_cpu_s_counts_this_process() -> None:
    before = setup_cost.thread_cpu_s(os.getpid())
    sum(i * i for i in range(200_000))  # some CPU
    assert setup_cost.thread_cpu_s(os.getpid()) > before
