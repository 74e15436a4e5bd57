"""The compiled frame path's attribute access (``_pyattrs.h``): a ``__slots__`` member is read and written at its
offset, and everything else exactly as Python would, however the classes change under it."""

from __future__ import annotations

import bz2
import gc
import struct
import weakref
from typing import Any

import pytest

from tests.support import require_built

try:
    from telephony_bridge import _taps
except ImportError:  # not built: require_built says whether that is allowed
    _taps = None  # type: ignore[assignment]


@pytest.fixture(autouse=True)
def _built() -> None:
    require_built("telephony_bridge._taps", _taps is not None)


def get(obj: object, name: str) -> Any:
    return _taps.get_attribute(obj, name)


def put(obj: object, name: str, value: object) -> None:
    _taps.set_attribute(obj, name, value)


class Slotted:
    __slots__ = ("__dict__", "__weakref__", "a", "b")

    def __init__(self) -> None:
        self.a = 1
        self.b = "two"


class Value:
    """A value whose release can be seen."""


def test_slots_and_dict_attributes_read_and_write_as_python_sees_them() -> None:
    obj = Slotted()
    obj.c = 3.5  # in the instance dict
    assert (get(obj, "a"), get(obj, "b"), get(obj, "c")) == (1, "two", 3.5)
    put(obj, "a", 10)
    put(obj, "c", None)
    put(obj, "d", "new")
    assert (obj.a, obj.c, obj.d) == (10, None, "new")
    assert "a" not in vars(obj)  # written to the slot, not beside it


def test_a_slot_is_taken_at_its_offset_and_a_dict_attribute_the_generic_way() -> None:
    """The fast path is taken at all: the generic way gives the same values, so the other tests cannot tell (on 3.13,
    which no longer sets Py_TPFLAGS_VALID_VERSION_TAG, every access went the generic way and they all passed)."""
    obj = Slotted()
    obj.c = 3.5
    offsets = {_taps.slot_offset(obj, "a"), _taps.slot_offset(obj, "b")}
    assert min(offsets) > 0
    assert max(offsets) - min(offsets) == struct.calcsize("P")  # two neighbouring slots
    assert _taps.slot_offset(obj, "a") in offsets  # known now, and still the same
    assert _taps.slot_offset(obj, "c") == 0


def test_a_value_overwritten_in_a_slot_is_released_and_the_new_one_kept() -> None:
    obj, old, new = Slotted(), Value(), Value()
    put(obj, "a", old)
    gone = weakref.ref(old)
    del old
    put(obj, "a", new)
    assert gone() is None
    kept = weakref.ref(new)
    del new
    gc.collect()
    assert kept() is obj.a


def test_an_unset_slot_or_missing_attribute_raises_as_python_does() -> None:
    obj = Slotted()
    del obj.a
    with pytest.raises(AttributeError, match="a"):
        get(obj, "a")
    with pytest.raises(AttributeError, match="nothing"):
        get(obj, "nothing")
    put(obj, "a", 5)  # a slot can be set again
    assert obj.a == 5


def test_a_subclass_instance_reads_its_base_s_slots() -> None:
    class Sub(Slotted):
        __slots__ = ("z",)

        def __init__(self) -> None:
            super().__init__()
            self.z = "zed"

    obj = Sub()
    assert (get(obj, "a"), get(obj, "z")) == (1, "zed")
    put(obj, "z", "set")
    assert obj.z == "set"


def test_more_slots_of_one_class_than_the_cache_has_entries_are_told_apart() -> None:
    """Past 256 names, two of one class share an entry (pigeonhole): the name, not only the type, decides."""
    names = [f"s{i}" for i in range(300)]
    cls = type("Wide", (), {"__slots__": (*names, "__dict__")})
    obj = cls()
    for i, name in enumerate(names):
        setattr(obj, name, i)
    assert [get(obj, name) for name in names] == list(range(300))


def test_a_class_changed_after_its_slot_was_read_is_followed() -> None:
    class Changing:
        __slots__ = ("__dict__", "x")

    obj = Changing()
    obj.x = "slot"
    assert get(obj, "x") == "slot"  # the offset is now known for (Changing, "x")
    written: list[object] = []
    Changing.x = property(lambda self: "property", lambda self, v: written.append(v))  # type: ignore[assignment]
    assert get(obj, "x") == "property"
    put(obj, "x", 7)
    assert written == [7]


def test_a_class_that_overrides_attribute_access_keeps_it() -> None:
    class Watched(Slotted):
        def __getattribute__(self, name: str) -> Any:
            return ("seen", object.__getattribute__(self, name))

        def __setattr__(self, name: str, value: object) -> None:
            object.__setattr__(self, name, ("stored", value))

    obj = Watched()
    assert get(obj, "a") == ("seen", ("stored", 1))
    put(obj, "b", 2)
    assert object.__getattribute__(obj, "b") == ("stored", 2)


def test_another_class_s_slot_planted_on_a_class_is_refused_as_python_refuses_it() -> None:
    class Other:
        __slots__ = ("__dict__", "a")

    Other.a = Slotted.a  # type: ignore[misc]  # a member descriptor of another layout
    obj = Other()
    with pytest.raises(TypeError):
        obj.a  # noqa: B018
    with pytest.raises(TypeError):
        get(obj, "a")
    with pytest.raises(TypeError):
        put(obj, "a", 1)


def test_a_read_only_member_is_read_but_not_written() -> None:
    decompressor = bz2.BZ2Decompressor()  # its ``unused_data`` is a read-only member of the slots' own kind
    assert get(decompressor, "unused_data") == b""
    with pytest.raises(AttributeError, match=r"readonly|read-only|not writable"):
        put(decompressor, "unused_data", b"x")
    assert decompressor.unused_data == b""


def test_a_member_that_holds_no_object_is_read_and_written_as_python_does() -> None:
    error = ValueError()  # ``__suppress_context__``: a writable member of BaseException, a C char, not an object
    assert get(error, "__suppress_context__") is False
    put(error, "__suppress_context__", True)
    assert error.__suppress_context__ is True
    assert _taps.slot_offset(error, "__suppress_context__") == 0


def test_classes_made_and_freed_in_turn_never_share_an_offset() -> None:
    """A type freed and another made at its address: the version tag, not the address, decides."""
    addresses: set[int] = set()
    reused = 0
    for i in range(300):
        names = [f"p{k}" for k in range(i % 5)] + ["x"]
        cls = type(f"C{i}", (), {"__slots__": (*names, "__dict__")})
        reused += id(cls) in addresses
        addresses.add(id(cls))
        obj = cls()
        for name in names:
            setattr(obj, name, (i, name))
        assert get(obj, "x") == (i, "x")
        put(obj, "x", i)
        assert obj.x == i
        del obj, cls
        gc.collect(1)  # a new class's cycles are young
    assert reused, "no class was made at a freed one's address: the case this is for did not happen"
