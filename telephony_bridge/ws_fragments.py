"""A WebSocket message split over frames, put back together (RFC 6455 §5.4), without I/O.

Both picows listeners (the Twilio media stream and the Savants client) feed it their data frames that are not
whole messages; it says what happened and leaves what to do about it to them: the Twilio side is lenient, the
Savants side treats broken framing as a protocol failure.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

CONTINUATION, TEXT, BINARY = 0x0, 0x1, 0x2  # the data-frame opcodes (RFC 6455 §5.2); picows' WSMsgType values


class Assembled(NamedTuple):
    """A whole message: text (UTF-8, not yet checked) or binary."""

    is_text: bool
    payload: bytes


class Fault(Enum):
    """A frame that breaks the framing rules, or a message over the limit; the value says which in words."""

    ORPHAN = "a continuation frame without a message to continue"
    INTERRUPTED = "a new message before the last one's final fragment"
    TOO_BIG = "a message over the size limit"


class Reassembler:
    """The fragments of one message at a time, at most ``max_bytes`` of them in all.

    ``feed`` returns the message a final fragment completes (``Assembled``), ``None`` while one is incomplete,
    or a ``Fault``. A faulty frame is not taken: after ``INTERRUPTED`` the unfinished message stays as it was
    (``reset`` drops it); ``TOO_BIG`` drops the whole message, so a peer cannot grow our memory frame by frame.
    """

    __slots__ = ("_fragments", "_is_text", "_max_bytes", "_size")

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._fragments: list[bytes] = []
        self._is_text: bool | None = None  # None: no message under way
        self._size = 0

    def feed(self, opcode: int, payload: bytes | memoryview, fin: bool) -> Assembled | Fault | None:
        """One data frame: ``opcode`` is ``CONTINUATION``, ``TEXT`` or ``BINARY`` (control frames are never
        fragmented). ``payload`` may be a view of the reader's buffer, which its next read overwrites: it is
        copied here, and a message of one frame is not copied again (one of several is, once, to join it)."""
        if opcode == CONTINUATION:
            if self._is_text is None:
                return Fault.ORPHAN
        elif self._is_text is not None:
            return Fault.INTERRUPTED
        else:
            self._is_text = opcode == TEXT
        self._size += len(payload)
        if self._size > self._max_bytes:
            self.reset()
            return Fault.TOO_BIG
        self._fragments.append(bytes(payload))
        if not fin:
            return None
        message = Assembled(self._is_text, b"".join(self._fragments))
        self.reset()
        return message

    def reset(self) -> None:
        """Drop the message under way, if any."""
        self._fragments, self._is_text, self._size = [], None, 0
