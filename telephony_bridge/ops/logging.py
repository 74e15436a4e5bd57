"""Logging: JSON lines off a terminal, one readable line per record on one, and call context on every record.

Both formats carry the same fields: time, level, logger, message, the call context and the record's extras.

``call_context`` binds ``call_sid``, ``stream_sid`` and ``device_id`` in contextvars; a filter copies them onto
every record logged inside the call's tasks, so no log call has to repeat them.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import logging
import sys
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import orjson

_context: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "call_context", default=MappingProxyType({})
)


def bind(**fields: str | None) -> None:
    """Add fields to the current task's call context (children inherit it)."""
    merged = dict(_context.get())
    merged.update({k: v for k, v in fields.items() if v})
    _context.set(merged)


def rebind(**fields: str | None) -> None:
    """Change fields of the call context in place, for every task of the call (a call moved to another device
    mid-call names it from then on, in the call's own task too): ``bind`` changes only the current task's and
    its later children's. Outside any call context it does nothing."""
    current = _context.get()
    if isinstance(current, dict):  # the default, outside a call, is a read-only empty mapping
        current.update({k: v for k, v in fields.items() if v})


@contextlib.contextmanager
def call_context(**fields: str | None) -> Iterator[None]:
    token = _context.set({k: v for k, v in fields.items() if v})
    try:
        yield
    finally:
        _context.reset(token)


class Throttled:
    """At most one line per key every ``every_s`` (for what strangers can make us log); the next line that gets
    through says how many were held back. Time comes from the caller (``now`` is monotonic seconds)."""

    def __init__(self, logger: logging.Logger, every_s: float = 60.0) -> None:
        self._logger = logger
        self._every_s = every_s
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, now: float, msg: str, *args: object) -> bool:
        """Log ``msg`` unless a line for ``key`` went out less than ``every_s`` ago; True if it was logged."""
        if now < self._next.get(key, float("-inf")):
            self._held[key] = self._held.get(key, 0) + 1
            return False
        held = self._held.pop(key, 0)
        self._next[key] = now + self._every_s
        if held:
            msg, args = msg + " (%d more like it held back)", (*args, held)
        self._logger.warning(msg, *args)
        return True


# Loggers that, at DEBUG, print the first bytes of every WebSocket frame: Savants JWTs and call audio. They
# are held at INFO whatever LOG_LEVEL says (uvicorn passes "uvicorn.error" to the websockets protocol).
# picows logs a line per connection at INFO (our own lines cover calls): held at WARNING.
WIRE_LOGGERS = {
    "websockets": logging.INFO,
    "uvicorn.error": logging.INFO,
    "httpcore": logging.INFO,
    "picows": logging.WARNING,
}


def guard_wire_loggers() -> None:
    for name, floor in WIRE_LOGGERS.items():
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level < floor:
            logger.setLevel(floor)


def install_context() -> None:
    """Stamp the call context on every record when it is made, whichever handler later sees it.

    A handler filter would miss handlers added by others (pytest's caplog, an embedding app's own); the
    record factory is process-wide, so it is installed once and wraps whatever factory was there.
    """
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_stamps_call_context", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        for key, value in _context.get().items():
            setattr(record, key, value)
        return record

    factory._stamps_call_context = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's own fields (call context, ``extra=``), in the order they were set."""
    return {k: v for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")}


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...``; a value with spaces or quotes is JSON-quoted.

    A traceback, when there is one, follows on its own lines: on a terminal that is what a reader wants.
    """

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        fields = _fields(record)
        if fields:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text_value(value: Any) -> str:
    if isinstance(value, str) and value and not any(c in value for c in ' "=\n'):
        return value
    return orjson.dumps(value, default=str).decode()


def configure(level: str = "INFO", fmt: str = "auto", stream: Any = None) -> None:
    """Configure the root logger once (called from the CLI only).

    ``auto``: readable text when the log stream (stderr) is a terminal, JSON lines otherwise (containers,
    files, pipes), so a log collector never has to parse prose.
    """
    install_context()
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "websockets", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    guard_wire_loggers()
