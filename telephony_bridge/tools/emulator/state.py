"""The emulator's live state: limits, counters, violations and per-session byte counts.

It is what ``GET /_emulator/stats`` serialises and what in-process tests read as ``app.state.emulator``.
A *violation* is a request a well-behaved client never makes (over the token rate, over the socket cap);
bridge tests assert there are none.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Literal

from telephony_bridge.clock import Clock
from telephony_bridge.tools.emulator.config import EmulatorConfig
from telephony_bridge.tools.emulator.faults import FaultPlan
from telephony_bridge.tools.emulator.limits import ConcurrencyLimit, RollingWindow
from telephony_bridge.tools.emulator.protocol import iso_timestamp
from telephony_bridge.tools.emulator.tokens import JtiLedger

ViolationKind = Literal["token_rate", "concurrency"]
CLOSED_SESSIONS_KEPT = 1000  # enough for a load test's report, bounded for a long-running emulator


@dataclass(frozen=True)
class Violation:
    kind: ViolationKind
    device_id: str
    at: str  # ISO 8601

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "device_id": self.device_id, "at": self.at}


@dataclass
class SessionStats:
    """Byte counts of one authenticated session; audio content is never kept."""

    session_id: str
    device_id: str
    opened_at: str
    bytes_in: int = 0
    bytes_out: int = 0
    frames_in: int = 0
    frames_out: int = 0
    closed: bool = False
    fault: str | None = None  # the injected fault's label, once it fired

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "device_id": self.device_id,
            "opened_at": self.opened_at,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "closed": self.closed,
            "fault": self.fault,
        }


@dataclass
class EmulatorState:
    """Everything that changes while the emulator runs; mutated only from its event loop."""

    config: EmulatorConfig
    clock: Clock
    token_window: RollingWindow = field(init=False)
    sockets: ConcurrencyLimit = field(init=False)
    faults: FaultPlan = field(init=False)
    used_tokens: JtiLedger = field(default_factory=JtiLedger)
    tokens_issued: int = 0
    sessions_opened: int = 0
    violations: list[Violation] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    active_sessions: dict[str, SessionStats] = field(default_factory=dict)
    closed_sessions: deque[SessionStats] = field(default_factory=lambda: deque(maxlen=CLOSED_SESSIONS_KEPT))
    closed_bytes_in: int = 0  # totals of closed sessions, which may have left ``closed_sessions``
    closed_bytes_out: int = 0
    # Speaker ticks that ran more than a frame late, over all sessions (one stall of the loop counts once in
    # each session speaking): the AI's own lateness, which a bridge in front counts as its frames coming late.
    ticks_late_over_a_frame: int = 0

    def __post_init__(self) -> None:
        self.token_window = RollingWindow(self.config.max_token_requests)
        self.sockets = ConcurrencyLimit(self.config.max_concurrent)
        self.faults = FaultPlan(self.config.initial_faults(), seed=self.config.fault_seed)

    @property
    def sessions_active(self) -> int:
        return len(self.active_sessions)

    def now_iso(self) -> str:
        return iso_timestamp(self.clock.wall())

    def record_violation(self, kind: ViolationKind, device_id: str) -> None:
        self.violations.append(Violation(kind, device_id, self.now_iso()))

    def record_error(self, code: str) -> None:
        self.errors[code] += 1

    def open_session(self, session_id: str, device_id: str) -> SessionStats:
        """Count a session that passed authentication and the socket cap."""
        session = SessionStats(session_id, device_id, self.now_iso())
        self.active_sessions[session_id] = session
        self.sessions_opened += 1
        return session

    def close_session(self, session: SessionStats) -> None:
        session.closed = True
        del self.active_sessions[session.session_id]
        self.closed_bytes_in += session.bytes_in
        self.closed_bytes_out += session.bytes_out
        self.closed_sessions.append(session)

    def snapshot(self) -> dict[str, Any]:
        """The stats document: JSON-ready, no tokens, keys or audio."""
        now_s = self.clock.monotonic()
        devices = sorted(set(self.token_window.keys()) | set(self.sockets.keys()))
        active = list(self.active_sessions.values())
        return {
            "devices": {
                device: {
                    "token_requests_in_window": self.token_window.count(device, now_s),
                    "active_sockets": self.sockets.held(device),
                }
                for device in devices
            },
            "tokens_issued": self.tokens_issued,
            "sessions_opened": self.sessions_opened,
            "sessions_active": self.sessions_active,
            "violations": [violation.to_json() for violation in self.violations],
            "errors": dict(sorted(self.errors.items())),
            "audio_bytes_in": self.closed_bytes_in + sum(session.bytes_in for session in active),
            "audio_bytes_out": self.closed_bytes_out + sum(session.bytes_out for session in active),
            "ticks_late_over_a_frame": self.ticks_late_over_a_frame,
            "sessions": [session.to_json() for session in [*self.closed_sessions, *active]],
            "faults": self.faults.to_json(),
        }
