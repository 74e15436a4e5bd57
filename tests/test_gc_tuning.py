"""The serving process's GC settings and the cyclic-garbage count ``/debug/heap`` gives (ops/heap.py)."""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections import Counter
from collections.abc import Iterator

import pytest

from telephony_bridge.errors import ConfigError
from telephony_bridge.ops import heap
from telephony_bridge.ops.gc_tuning import CPYTHON_OLDER_THRESHOLDS, OLDER_THRESHOLDS, tune_gc
from telephony_bridge.ops.heap import cyclic_garbage
from telephony_bridge.settings import load_settings

KNOT = f"{__name__}._Knot"


class _Knot:
    """A type of this test's own, so its count in the garbage is this test's doing."""

    def __init__(self) -> None:
        self.me = self


def _knots_alive() -> int:
    return sum(1 for obj in gc.get_objects() if type(obj) is _Knot)


def test_cyclic_garbage_counts_what_only_the_collector_frees_and_frees_it() -> None:
    gc.collect()
    knots = [_Knot() for _ in range(25)]
    debug = gc.get_debug()
    del knots
    assert _knots_alive() == 25  # cycles: refcounting alone does not free them
    found = cyclic_garbage(top=50)
    assert dict(found["top_types"])[KNOT] == 25 and found["objects"] >= 25
    assert _knots_alive() == 0  # kept only to be counted, then freed
    assert gc.garbage == [] and gc.get_debug() == debug


def test_cyclic_garbage_leaves_what_was_already_in_gc_garbage() -> None:
    mine = object()
    gc.garbage.append(mine)
    try:
        _Knot()
        found = cyclic_garbage(top=50)
        assert gc.garbage == [mine] and dict(found["top_types"]).get("builtins.object") is None
    finally:
        gc.garbage.remove(mine)


def test_cyclic_garbage_restores_the_collector_when_counting_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> Counter[str]:
        raise RuntimeError("counting failed")

    monkeypatch.setattr(heap, "Counter", broken)
    debug = gc.get_debug()
    _Knot()
    with pytest.raises(RuntimeError, match="counting failed"):
        cyclic_garbage()
    assert gc.garbage == [] and gc.get_debug() == debug


def test_cyclic_garbage_names_types_only() -> None:
    secret = "call-secret-value"
    holder: dict[str, object] = {"secret": secret}
    holder["self"] = holder
    del holder
    assert secret not in repr(cyclic_garbage())


@contextlib.contextmanager
def _no_collection_until_counted() -> Iterator[None]:
    """No automatic collection between making a cycle and counting it (which collects explicitly)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _keep_its_own_traceback(secret: str) -> None:
    kept: list[ValueError] = []  # the exception -> its traceback -> this frame -> kept -> the exception
    try:
        raise ValueError(secret)
    except ValueError as exc:
        kept.append(exc)


def test_cyclic_garbage_names_a_frame_by_where_it_ran_and_no_value() -> None:
    secret = "digits-1234"
    with _no_collection_until_counted():
        _keep_its_own_traceback(secret)
        found = dict(cyclic_garbage(top=500)["top_types"])
    [frame] = [name for name in found if "_keep_its_own_traceback" in name]
    assert frame.startswith("builtins.frame _keep_its_own_traceback (") and "test_gc_tuning.py:" in frame, frame
    assert secret not in repr(found)


def test_cyclic_garbage_counts_a_dead_weak_proxy() -> None:
    """picows holds its listener through a ``weakref.proxy``: in the garbage with its referent, the proxy is dead by
    the time it is counted, and asking it anything but its type raises ReferenceError (the soak's /debug/heap did)."""
    with _no_collection_until_counted():
        knot = _Knot()
        knot.proxy = weakref.proxy(knot)  # type: ignore[attr-defined]
        del knot
        found = dict(cyclic_garbage(top=500)["top_types"])
    assert found[KNOT] == 1 and found["weakref.ProxyType"] >= 1


def test_tune_gc_sets_the_thresholds_and_freezes_only_when_asked() -> None:
    before = gc.get_threshold()
    frozen = gc.get_freeze_count()  # 0 on 3.11; 3.12 starts with some frozen already
    try:
        tune_gc(2_000, tuned=False)
        assert gc.get_threshold() == (2_000, *CPYTHON_OLDER_THRESHOLDS) and gc.get_freeze_count() == frozen
        tune_gc(3_000)
        assert gc.get_threshold() == (3_000, *OLDER_THRESHOLDS) and gc.get_freeze_count() > frozen
        assert OLDER_THRESHOLDS[1] > 10 * CPYTHON_OLDER_THRESHOLDS[1]  # full collections rare
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_gc_young_threshold_setting() -> None:
    assert load_settings(env={}).server.gc_young_threshold == 700  # CPython's own
    env = {"BRIDGE__SERVER__GC_YOUNG_THRESHOLD": "5000"}
    assert load_settings(env=env).server.gc_young_threshold == 5000
    with pytest.raises(ConfigError, match="gc_young_threshold"):
        load_settings(env={"BRIDGE__SERVER__GC_YOUNG_THRESHOLD": "10"})
