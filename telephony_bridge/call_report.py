"""What one call leaves behind when it ends: the canonical "call ended" line's figures and its metrics.

``bridge.Call`` gathers the call's parts once, in its cleanup, into a ``CallReport``; this module only reads
them. Counts only, never content: no audio, no digits (a keypad entry may be a PIN), no tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from telephony_bridge.audio.codec import FRAME_S
from telephony_bridge.inbound import Inbound
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.outbound import Outbound
from telephony_bridge.reconnect import ReconnectFigures


@dataclass(frozen=True)
class CallReport:
    ingress: str
    reason: str
    outcome: str
    started_at: float  # monotonic, like every time here
    ended_at: float
    ai_connected_at: float | None
    inbound: Inbound
    outbound: Outbound
    reconnects: ReconnectFigures
    dtmf_digits: int
    leg_figures: dict[str, Any]

    @property
    def duration_s(self) -> float:
        return self.ended_at - self.started_at

    def count(self, metrics: Metrics) -> None:
        """The call's contribution to the Prometheus metrics (``calls_active`` is the caller's to keep)."""
        inbound, outbound = self.inbound, self.outbound
        metrics.calls.labels(outcome=self.outcome, ingress=self.ingress).inc()
        metrics.call_duration.observe(self.duration_s)
        metrics.audio_seconds.labels(direction="caller_to_ai").inc(inbound.frames_to_ai * FRAME_S)
        metrics.audio_seconds.labels(direction="ai_to_caller").inc(outbound.playback.sent_ms / 1000)
        metrics.ai_audio_overflow.inc(outbound.overflow_ms / 1000)
        if outbound.first_audio_at is not None:
            metrics.first_audio_latency.observe(outbound.first_audio_at - self.started_at)
        metrics.playout_underruns.labels(cause="ai_late").inc(outbound.underruns_ai_late)
        metrics.playout_underruns.labels(cause="scheduling").inc(outbound.underruns_scheduling)
        metrics.prebuffer_changes.labels(direction="up").inc(outbound.prebuffer.grows)
        metrics.prebuffer_changes.labels(direction="down").inc(outbound.prebuffer.shrinks)

    def figures(self) -> dict[str, Any]:
        """The canonical "call ended" line's fields."""
        inbound, outbound, reconnects = self.inbound, self.outbound, self.reconnects
        return {
            "ingress": self.ingress,
            "reason": self.reason,
            "outcome": self.outcome,
            "duration_s": round(self.duration_s, 3),
            "ai_connect_s": self._since_start(self.ai_connected_at),
            "first_ai_audio_s": self._since_start(outbound.first_audio_at),
            "caller_frames": inbound.frames_in,
            "frames_to_ai": inbound.frames_to_ai,
            "ai_audio_sent_ms": outbound.playback.sent_ms,
            "ai_audio_played_ms": outbound.playback.played_ms,
            "ai_audio_discarded_ms": outbound.discarded_ms,
            "comfort_fill_ms": outbound.fill_ms,  # what the caller heard while the AI was away: no AI audio
            "clears": outbound.clears,
            "underruns_ai_late": outbound.underruns_ai_late,
            "underruns_scheduling": outbound.underruns_scheduling,
            "prebuffer_grows": outbound.prebuffer.grows,
            "prebuffer_shrinks": outbound.prebuffer.shrinks,
            "barge_ins": inbound.detector.barge_ins if inbound.detector else 0,
            "late_frames_dropped": inbound.late_frames_dropped,
            "gap_filled_ms": inbound.gap_filled_ms,
            "overflow_frames_dropped": inbound.dropped_overflow,
            "ai_audio_overflow_ms": outbound.overflow_ms,
            "ai_drops": reconnects.drops,
            "ai_reconnect_attempts": reconnects.attempts,
            "ai_reconnect": reconnects.outcome,
            "ai_gap_s": round(reconnects.gap_s, 3),
            "dtmf_digits": self.dtmf_digits,  # a count only: the digits may be a PIN
            "client_quirks": sorted(inbound.quirks),
            **self.leg_figures,
        }

    def _since_start(self, at: float | None) -> float | None:
        return None if at is None else round(at - self.started_at, 3)
