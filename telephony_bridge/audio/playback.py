"""Playback tracking: what the caller has actually heard, from Twilio's mark echoes (spec §4, G7).

Bytes sent overstate what was heard; a mark echo says the audio before it has played, unless it arrives
after a ``clear``, when it means that audio was discarded. Positions are on the caller's timeline: audio
discarded by a ``clear`` never reached it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PlaybackTracker:
    sent_ms: int = 0  # all AI audio handed to Twilio
    played_ms: int = 0  # heard by the caller, as of the last mark echo
    discarded_ms: int = 0  # flushed by a clear before it played
    unknown_marks: int = 0
    _pending: dict[str, int] = field(default_factory=dict)  # mark name -> timeline position at the mark
    _next: int = 0
    _flushed: set[str] = field(default_factory=set)

    def audio_sent(self, ms: int) -> None:
        self.sent_ms += ms

    def mark_sent(self) -> str:
        """Name the next mark; it stands behind everything sent so far."""
        self._next += 1
        name = f"m{self._next}"
        self._pending[name] = self.sent_ms - self.discarded_ms
        return name

    def cleared(self, unplayed_ms: int) -> None:
        """We sent ``clear`` with ``unplayed_ms`` still buffered at Twilio: every pending mark will echo,
        meaning 'discarded'."""
        self._flushed.update(self._pending)
        self.discarded_ms += unplayed_ms
        self.played_ms = max(self.played_ms, self.sent_ms - self.discarded_ms)  # all else had played

    def mark_echoed(self, name: str) -> None:
        at_ms = self._pending.pop(name, None)
        if at_ms is None:
            self.unknown_marks += 1  # late or foreign: ignore, never throw (G7)
            return
        if name in self._flushed:
            self._flushed.discard(name)
            return
        self.played_ms = max(self.played_ms, at_ms)

    @property
    def pending_marks(self) -> int:
        return len(self._pending)
