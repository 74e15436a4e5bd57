"""The serving process's GC settings and the cyclic-garbage count ``/debug/heap`` gives (ops/heap.py)."""

from __future__ import annotations

import gc
import weakref

import pytest

from telephony_bridge.errors import ConfigError
from telephony_bridge.ops.gc_tuning import OLDER_THRESHOLDS, tune_gc
from telephony_bridge.ops.heap import cyclic_garbage
from telephony_bridge.settings import load_settings


class _Knot:
    """A type of this test's own, so its count in the garbage is this test's doing."""

    def __init__(self) -> None:
        self.me = self


def test_cyclic_garbage_counts_what_only_the_collector_frees_and_frees_it() -> None:
    knots = [_Knot() for _ in range(25)]
    alive = [weakref.ref(k) for k in knots]
    debug = gc.get_debug()
    del knots
    found = cyclic_garbage(top=50)
    assert dict(found["top_types"])["_Knot"] == 25 and found["objects"] >= 25
    assert [ref() for ref in alive] == [None] * 25  # kept only to be counted, then freed
    assert gc.garbage == [] and gc.get_debug() == debug


def test_cyclic_garbage_names_types_only() -> None:
    secret = "call-secret-value"
    holder: dict[str, object] = {"secret": secret}
    holder["self"] = holder
    del holder
    assert secret not in repr(cyclic_garbage())


def test_tune_gc_freezes_start_up_and_sets_the_thresholds() -> None:
    before = gc.get_threshold()
    try:
        tune_gc(2_000)
        assert gc.get_threshold() == (2_000, *OLDER_THRESHOLDS)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_gc_young_threshold_setting() -> None:
    assert load_settings(env={}).server.gc_young_threshold == 700  # CPython's own
    env = {"BRIDGE__SERVER__GC_YOUNG_THRESHOLD": "5000"}
    assert load_settings(env=env).server.gc_young_threshold == 5000
    with pytest.raises(ConfigError, match="gc_young_threshold"):
        load_settings(env={"BRIDGE__SERVER__GC_YOUNG_THRESHOLD": "10"})
