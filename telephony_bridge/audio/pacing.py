"""Outbound pacing: when to hand AI audio to Twilio.

Twilio plays whatever it has buffered in real time and keeps playing it until ``clear`` (spec §4), so a bridge
that forwards AI audio as fast as it arrives leaves seconds of speech queued where no barge-in can reach it.
The pacer keeps at most ``lead_s`` of audio ahead of real time at Twilio, in whole 20 ms frames. Time is
passed in, so tests drive it without a clock.
"""

from __future__ import annotations

from telephony_bridge.audio.codec import FRAME_S

_EPS = 1e-9


class OutboundPacer:
    def __init__(self, lead_s: float, frame_s: float = FRAME_S) -> None:
        if lead_s < frame_s:
            raise ValueError(f"lead_s must be at least one frame ({frame_s} s), got {lead_s}")
        self.lead_s = lead_s
        self.frame_s = frame_s
        self._play_end: float | None = None  # when everything sent so far will have finished playing

    def frames_due(self, now: float, available: int) -> int:
        """How many of ``available`` frames to send at ``now``; records them as sent.

        After a late tick the buffer at Twilio may have run dry: we refill it up to the lead, never beyond,
        so catching up never bursts.
        """
        play_end = max(self._play_end or now, now)
        room = int((self.lead_s - (play_end - now)) / self.frame_s + _EPS)
        n = max(0, min(available, room))
        self._play_end = play_end + n * self.frame_s
        return n

    def lead(self, now: float) -> float:
        """Seconds of sent audio not yet played at ``now``."""
        return max(0.0, (self._play_end or now) - now)

    def next_due(self, now: float) -> float:
        """The earliest time at which one more frame fits under the lead."""
        if self._play_end is None:
            return now
        return max(now, self._play_end - self.lead_s + self.frame_s)

    def cleared(self, now: float) -> None:
        """Twilio dropped its buffer (we sent ``clear``): nothing is queued there any more."""
        self._play_end = now
