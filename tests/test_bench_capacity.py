"""bench/capacity.py's ``--server-cpus``: which CPUs each side gets, and each side's busy cores."""

from __future__ import annotations

import os
import sys

import pytest

from tests.support import BENCH

sys.path.insert(0, str(BENCH))  # capacity imports perf_stacks, beside it
import capacity  # bench/ is no package: imported from its folder

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


def test_capacity_pinning_counts_each_sides_busy_cores() -> None:
    pinning = capacity.Pinning(server=frozenset({0}), load=frozenset({1, 2}))
    before = {"server": (10.0, 100.0), "load": (50.0, 200.0)}
    after = {"server": (15.0, 110.0), "load": (65.0, 220.0)}  # server 5 of 10 s busy; load 15 of 20 s, on 2 CPUs
    assert pinning.busy_cores(before, after) == {
        "server_cores_busy": pytest.approx(0.5),
        "load_cores_busy": pytest.approx(1.5),
    }


def test_capacity_busy_time_of_some_cpus_is_part_of_the_machines() -> None:
    busy_all, total_all = capacity.machine_busy_s()
    busy_one, total_one = capacity.machine_busy_s(frozenset({min(CPUS)}))
    assert 0 < total_one <= total_all
    assert 0 <= busy_one <= busy_all
