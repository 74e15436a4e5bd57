"""The WebSocket message reassembler (RFC 6455 §5.4): frames in, messages and faults out; no event loop."""

from __future__ import annotations

from telephony_bridge.ws_fragments import BINARY, CONTINUATION, TEXT, Assembled, Fault, Reassembler


def feed_all(reassembler: Reassembler, frames: list[tuple[int, bytes, bool]]) -> list[Assembled | Fault | None]:
    return [reassembler.feed(opcode, memoryview(payload), fin) for opcode, payload, fin in frames]


def test_reassembler_message_in_one_frame() -> None:
    reassembler = Reassembler(100)
    assert feed_all(reassembler, [(TEXT, b'{"a":1}', True), (BINARY, b"\x01\x02", True)]) == [
        Assembled(True, b'{"a":1}'),
        Assembled(False, b"\x01\x02"),
    ]


def test_reassembler_text_over_many_frames() -> None:
    frames = [(TEXT, b'{"type"', False), (CONTINUATION, b':"sta', False), (CONTINUATION, b'tus"}', True)]
    assert feed_all(Reassembler(100), frames) == [None, None, Assembled(True, b'{"type":"status"}')]


def test_reassembler_binary_over_many_frames_with_empty_fragments() -> None:
    frames = [(BINARY, b"", False), (CONTINUATION, b"\x01" * 3, False), (CONTINUATION, b"", True)]
    assert feed_all(Reassembler(100), frames) == [None, None, Assembled(False, b"\x01" * 3)]


def test_reassembler_copies_the_payload() -> None:
    """picows' view is of its read buffer, which the next read overwrites."""
    buffer = bytearray(b"abc")
    reassembler = Reassembler(100)
    assert reassembler.feed(BINARY, memoryview(buffer), False) is None
    buffer[:] = b"xyz"
    assert reassembler.feed(CONTINUATION, memoryview(buffer), True) == Assembled(False, b"abcxyz")


def test_reassembler_takes_bytes_too() -> None:
    assert Reassembler(100).feed(TEXT, b"hi", True) == Assembled(True, b"hi")


def test_reassembler_orphan_continuation_is_a_fault_and_takes_nothing() -> None:
    frames = [(CONTINUATION, b"lost", True), (TEXT, b"ok", True)]
    assert feed_all(Reassembler(100), frames) == [Fault.ORPHAN, Assembled(True, b"ok")]


def test_reassembler_orphan_after_a_completed_message() -> None:
    frames = [(BINARY, b"a", False), (CONTINUATION, b"b", True), (CONTINUATION, b"c", True)]
    assert feed_all(Reassembler(100), frames) == [None, Assembled(False, b"ab"), Fault.ORPHAN]


def test_reassembler_interrupted_message_keeps_the_unfinished_one() -> None:
    frames = [(TEXT, b"ab", False), (BINARY, b"new", True), (CONTINUATION, b"cd", True)]
    assert feed_all(Reassembler(100), frames) == [None, Fault.INTERRUPTED, Assembled(True, b"abcd")]


def test_reassembler_reset_drops_the_unfinished_message() -> None:
    """What a lenient caller does on a new message: it replaces the unfinished one."""
    reassembler = Reassembler(100)
    assert reassembler.feed(TEXT, b"old", False) is None
    reassembler.reset()
    assert feed_all(reassembler, [(BINARY, b"new", True), (CONTINUATION, b"x", True)]) == [
        Assembled(False, b"new"),
        Fault.ORPHAN,
    ]


def test_reassembler_size_limit_exactly_reached_is_a_message() -> None:
    frames = [(BINARY, b"\x00" * 6, False), (CONTINUATION, b"\x00" * 4, True)]
    assert feed_all(Reassembler(10), frames) == [None, Assembled(False, b"\x00" * 10)]
    assert Reassembler(10).feed(TEXT, b"x" * 10, True) == Assembled(True, b"x" * 10)


def test_reassembler_one_byte_over_the_limit_is_too_big_and_drops_the_message() -> None:
    frames = [(TEXT, b"x" * 6, False), (CONTINUATION, b"x" * 5, False), (CONTINUATION, b"x", True)]
    assert feed_all(Reassembler(10), frames) == [None, Fault.TOO_BIG, Fault.ORPHAN]
    assert Reassembler(10).feed(BINARY, b"\x00" * 11, True) is Fault.TOO_BIG


def test_reassembler_counts_afresh_after_a_message_and_after_too_big() -> None:
    reassembler = Reassembler(4)
    frames = [(BINARY, b"1234", True), (BINARY, b"12345", True), (TEXT, b"12", False), (CONTINUATION, b"34", True)]
    assert feed_all(reassembler, frames) == [
        Assembled(False, b"1234"),
        Fault.TOO_BIG,
        None,
        Assembled(True, b"1234"),
    ]


def test_reassembler_faults_say_what_broke() -> None:
    assert [fault.value for fault in Fault] == [
        "a continuation frame without a message to continue",
        "a new message before the last one's final fragment",
        "a message over the size limit",
    ]
