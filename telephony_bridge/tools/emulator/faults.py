"""Fault switches: what the emulator breaks, for which sessions or token requests, and how often.

A fault is armed (from ``EmulatorConfig``, the CLI or ``POST /_emulator/faults/...``) and matches the next
sessions or token requests of its devices: every one, the next ``count``, or each with ``probability``. The
first armed fault that matches takes effect; a fault whose count reaches zero disarms itself. The plan holds
no I/O: the session driver and the token endpoint ask it what to do and do it. Both the CLI's
``key=value,...`` specs and the admin endpoint's JSON go through ``from_mapping``, so each switch is
validated in one place and a wrong one names its key.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, get_args

from telephony_bridge.errors import ConfigError

SessionFaultKind = Literal["close", "error", "garbage", "reset", "stall", "no_confirm"]
SESSION_FAULT_KINDS: tuple[str, ...] = get_args(SessionFaultKind)
# Close codes a server may send (RFC 6455 §7.4): 1004-1006 and 1015 are reserved, 1015+ up to 2999 unassigned.
SENDABLE_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)}) | frozenset(range(3000, 5000))
DEFAULT_CLOSE_CODE = {"close": 1011, "error": 4500}  # error: 4000 + 500, as the emulator's SERVER_ERROR
TOKEN_FAULT_STATUSES = frozenset({401, 429, *range(500, 600)})
TOKEN_401_CODES = ("AUTHENTICATION_FAILED", "DEVICE_INACTIVE")


def _check(ok: bool, where: str, key: str, value: object, allowed: str) -> None:
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"emulator {where} fault {key} is {value!r}; allowed: {allowed}")


@dataclass(frozen=True)
class Selector:
    """Which sessions or requests a fault hits: its devices (None: all), the next ``count`` (None: no end),
    each with ``probability``."""

    devices: frozenset[str] | None = None
    count: int | None = None
    probability: float = 1.0

    def validate(self, where: str) -> None:
        _check(self.count is None or self.count >= 1, where, "count", self.count, "None or an integer >= 1")
        _check(0.0 <= self.probability <= 1.0, where, "probability", self.probability, "0 <= p <= 1")
        _check(self.devices is None or all(self.devices), where, "devices", self.devices, "non-empty device ids")

    def to_json(self) -> dict[str, Any]:
        devices = None if self.devices is None else sorted(self.devices)
        return {"devices": devices, "count": self.count, "probability": self.probability}


@dataclass(frozen=True)
class SessionFault:
    """What to do to a voice-stream session ``after_s`` after its confirmation.

    - ``close``: close with ``close_code`` (default 1011; 1000 is the AI's normal goodbye, 1001 a restart).
    - ``error``: send ``{"type":"error","error":{"code": error_code, ...}}``, then close with ``close_code``
      (default 4500).
    - ``garbage``: send a text frame that is not JSON, and go on.
    - ``reset``: a TCP reset: no close frame, the connection simply dies (RST).
    - ``stall``: keep the socket open but stop reading and sending (so no pong either) for ``stall_s``, then
      reset it, as a hung server whose socket a load balancer finally drops.
    - ``no_confirm``: accept the token but never send the confirmation; keep reading until the client leaves.
    """

    kind: SessionFaultKind
    after_s: float = 1.0
    close_code: int | None = None
    error_code: str = "SERVER_ERROR"
    stall_s: float = 30.0
    select: Selector = Selector()

    def __post_init__(self) -> None:
        _check(self.kind in SESSION_FAULT_KINDS, "session", "kind", self.kind, ", ".join(SESSION_FAULT_KINDS))
        _check(self.after_s >= 0, "session", "after_s", self.after_s, "a number >= 0")
        _check(self.stall_s > 0, "session", "stall_s", self.stall_s, "a number > 0")
        _check(bool(self.error_code), "session", "error_code", self.error_code, "a non-empty error code")
        code = self.close_code
        _check(
            code is None or code in SENDABLE_CLOSE_CODES,
            "session",
            "close_code",
            code,
            "1000-1003, 1007-1014, 3000-4999",
        )
        self.select.validate("session")

    @property
    def effective_close_code(self) -> int:
        return self.close_code if self.close_code is not None else DEFAULT_CLOSE_CODE.get(self.kind, 1011)

    @property
    def label(self) -> str:
        """How the stats count it: the kind, with the close or error code where there is one."""
        if self.kind == "close":
            return f"close:{self.effective_close_code}"
        if self.kind == "error":
            return f"error:{self.error_code}"
        return self.kind

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "after_s": self.after_s,
            "close_code": self.effective_close_code if self.kind in DEFAULT_CLOSE_CODE else None,
            "error_code": self.error_code if self.kind == "error" else None,
            "stall_s": self.stall_s if self.kind == "stall" else None,
            **self.select.to_json(),
        }


@dataclass(frozen=True)
class TokenFault:
    """What the token endpoint does to a matching request: wait ``delay_s`` (a slow or timing-out endpoint),
    then answer normally (``status`` None) or with ``status``: 5xx, 429 (``details.retryAfter`` =
    ``retry_after_s``, not counted against the device's window) or 401 (``error_code``)."""

    status: int | None = None
    delay_s: float = 0.0
    retry_after_s: int = 1
    error_code: str = "AUTHENTICATION_FAILED"
    select: Selector = Selector()

    def __post_init__(self) -> None:
        statuses = "None, 401, 429 or 500-599"
        _check(self.status is None or self.status in TOKEN_FAULT_STATUSES, "token", "status", self.status, statuses)
        _check(self.delay_s >= 0, "token", "delay_s", self.delay_s, "a number >= 0")
        _check(self.retry_after_s >= 1, "token", "retry_after_s", self.retry_after_s, "an integer >= 1")
        codes = ", ".join(TOKEN_401_CODES)
        _check(self.error_code in TOKEN_401_CODES, "token", "error_code", self.error_code, codes)
        _check(self.status is not None or self.delay_s > 0, "token", "status", self.status, "a status or a delay_s")
        self.select.validate("token")

    @property
    def label(self) -> str:
        return f"token:{self.status}" if self.status is not None else "token:delay"

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "delay_s": self.delay_s,
            "retry_after_s": self.retry_after_s if self.status == 429 else None,
            "error_code": self.error_code if self.status == 401 else None,
            **self.select.to_json(),
        }


Fault = SessionFault | TokenFault


def session_fault_from_mapping(values: Mapping[str, Any]) -> SessionFault:
    """A ``SessionFault`` from JSON or CLI values (strings are converted); a wrong key or value names it."""
    return _from_mapping(SessionFault, values, "session")


def token_fault_from_mapping(values: Mapping[str, Any]) -> TokenFault:
    return _from_mapping(TokenFault, values, "token")


def parse_spec(spec: str) -> dict[str, str]:
    """``kind=close,close_code=1001,after_s=2,devices=a+b`` -> a mapping for ``*_from_mapping``."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"emulator fault spec part {part!r} is not key=value (in {spec!r})")
        out[key.strip()] = value.strip()
    return out


_SELECTOR_KEYS = {f.name for f in fields(Selector)}
_CONVERTERS: dict[str, Any] = {
    "after_s": float,
    "stall_s": float,
    "delay_s": float,
    "probability": float,
    "close_code": int,
    "status": int,
    "retry_after_s": int,
    "count": int,
}


def _from_mapping(cls: type[Any], values: Mapping[str, Any], where: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"emulator {where} fault must be a JSON object, got {type(values).__name__}")
    own = {f.name for f in fields(cls)} - {"select"}
    unknown = sorted(set(values) - own - _SELECTOR_KEYS)
    if unknown:
        allowed = ", ".join(sorted(own | _SELECTOR_KEYS))
        raise ConfigError(f"emulator {where} fault has unknown key {unknown[0]!r}; allowed: {allowed}")
    kwargs: dict[str, Any] = {}
    select: dict[str, Any] = {}
    for key, value in values.items():
        converted = _convert(key, value, where)
        (select if key in _SELECTOR_KEYS else kwargs)[key] = converted
    try:
        return cls(**kwargs, select=Selector(**select))
    except TypeError as exc:  # a required key is missing
        raise ConfigError(f"emulator {where} fault is incomplete: {exc}") from None


def _convert(key: str, value: Any, where: str) -> Any:
    if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
        return None
    if key == "devices":
        items = value.split("+") if isinstance(value, str) else value
        if not isinstance(items, list | tuple | frozenset | set) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"emulator {where} fault devices is {value!r}; allowed: a list of device ids")
        return frozenset(items)
    converter = _CONVERTERS.get(key)
    if converter is None:
        return value
    if isinstance(value, bool) or (converter is int and isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"emulator {where} fault {key} is {value!r}; allowed: a number")
    try:
        return converter(value)
    except (TypeError, ValueError):
        raise ConfigError(f"emulator {where} fault {key} is {value!r}; allowed: a number") from None


class FaultPlan:
    """The armed faults, in order, and how often each has fired; used from the emulator's event loop only."""

    def __init__(self, faults: tuple[Fault, ...] = (), *, seed: int | None = None) -> None:
        self._armed: list[Fault] = []
        self._random = random.Random(seed)
        self.injected: Counter[str] = Counter()
        for fault in faults:
            self.arm(fault)

    def arm(self, fault: Fault) -> None:
        self._armed.append(fault)

    def clear(self) -> None:
        self._armed.clear()

    def session_fault(self, device_id: str | None) -> SessionFault | None:
        fault = self._draw(SessionFault, device_id)
        return fault if isinstance(fault, SessionFault) else None

    def token_fault(self, device_id: str | None) -> TokenFault | None:
        """The fault for a token request of ``device_id`` (None: a request naming no device)."""
        fault = self._draw(TokenFault, device_id)
        return fault if isinstance(fault, TokenFault) else None

    def _draw(self, cls: type[Fault], device_id: str | None) -> Fault | None:
        for index, fault in enumerate(self._armed):
            select = fault.select
            if not isinstance(fault, cls) or (select.devices is not None and device_id not in select.devices):
                continue
            if select.probability < 1.0 and self._random.random() >= select.probability:
                continue
            if select.count is not None:
                if select.count == 1:
                    del self._armed[index]
                else:
                    self._armed[index] = replace(fault, select=replace(select, count=select.count - 1))
            self.injected[fault.label] += 1
            return fault
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "session": [f.to_json() for f in self._armed if isinstance(f, SessionFault)],
            "token": [f.to_json() for f in self._armed if isinstance(f, TokenFault)],
            "injected": dict(sorted(self.injected.items())),
        }
