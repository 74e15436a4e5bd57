"""Log formats: JSON lines off a terminal, one readable line on one, the same fields in both."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from telephony_bridge.ops import logging as oplog


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def log_one_call_line() -> None:
    with oplog.call_context(call_sid="CA123", stream_sid="MZ456"):
        logging.getLogger("telephony_bridge.bridge").info(
            "call ended", extra={"reason": "caller hung up", "duration_s": 1.5, "first_ai_audio_s": None}
        )


def test_logging_auto_writes_json_lines_off_a_terminal(restore_root_logger: None) -> None:
    stream = io.StringIO()
    oplog.configure("INFO", "auto", stream=stream)
    log_one_call_line()
    record = orjson.loads(stream.getvalue())
    assert {k: v for k, v in record.items() if k != "ts"} == {
        "level": "INFO",
        "logger": "telephony_bridge.bridge",
        "msg": "call ended",
        "call_sid": "CA123",
        "stream_sid": "MZ456",
        "reason": "caller hung up",
        "duration_s": 1.5,
        "first_ai_audio_s": None,
    }


def test_logging_auto_writes_one_readable_line_with_the_same_fields_on_a_terminal(restore_root_logger: None) -> None:
    stream = Terminal()
    oplog.configure("INFO", "auto", stream=stream)
    log_one_call_line()
    text = stream.getvalue()
    assert text.count("\n") == 1
    line = text.split(" ", 1)[1].rstrip("\n")  # after the timestamp
    assert line == (
        "INFO    telephony_bridge.bridge: call ended call_sid=CA123 stream_sid=MZ456 "
        'reason="caller hung up" duration_s=1.5 first_ai_audio_s=null'
    )
