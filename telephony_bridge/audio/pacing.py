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
    # The compiled frame path reads and writes these at their fixed offsets (_pyattrs.h); the rest live in
    # the instance dict.
    __slots__ = ("__dict__", "__weakref__", "_play_end", "frame_s", "lead_s")

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
        end = self._play_end or now
        return self._send(now, end, available, int((self.lead_s - max(0.0, end - now)) / self.frame_s + _EPS))

    def _send(self, now: float, end: float, available: int, room: int) -> int:
        """Record up to ``room`` of ``available`` frames as sent after ``end`` (the play end, or ``now``)."""
        n = max(0, min(available, room))
        self._play_end = max(end, now) + n * self.frame_s
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

    def batch_due(self, now: float, available: int, batch: int, low_water_s: float) -> int:
        """Like ``frames_due``, but a lone frame waits while Twilio still holds more than ``low_water_s``, so
        audio goes out ``batch`` frames per message when the lead allows (fewer sends, same playback)."""
        end = self._play_end or now
        lead = max(0.0, end - now)  # ``lead(now)``, inline: this runs for every frame the AI sends
        room = int((self.lead_s - lead) / self.frame_s + _EPS)
        if min(available, room) < batch and lead > low_water_s + _EPS:
            return 0
        return self._send(now, end, available, room)

    def room_for(self, now: float, frames: int) -> float:
        """The earliest time at which ``frames`` more frames fit under the lead."""
        if self._play_end is None:
            return now
        return max(now, self._play_end - self.lead_s + frames * self.frame_s)

    def hold_until(self, now: float, low_water_s: float) -> float:
        """When a held frame must go anyway: Twilio's buffer is down to ``low_water_s``."""
        if self._play_end is None:
            return now
        return max(now, self._play_end - low_water_s)

    @property
    def play_end(self) -> float | None:
        """When everything sent so far will have finished playing (None before the first send)."""
        return self._play_end


class AdaptivePrebuffer:
    """How much AI audio a talk spurt gathers before its first frame goes out (the playout lead a real-time
    AI then keeps): ``base_s`` while playback runs smoothly, one frame more after each underrun, up to
    ``max_s``; one frame less after ``calm_s`` without one, back down to ``base_s``. Whatever made the hole
    (the AI's frame came late, or a busy event loop sent ours late), a longer lead absorbs the next one.
    ``grows`` and ``shrinks`` count the changes."""

    # The compiled frame path reads and writes these at their fixed offsets (_pyattrs.h); the rest live in
    # the instance dict.
    __slots__ = ("__dict__", "__weakref__", "_changed_at", "base_s", "calm_s", "shrinks", "step_s", "value_s")

    def __init__(self, base_s: float, max_s: float, *, step_s: float = FRAME_S, calm_s: float = 10.0) -> None:
        self.base_s = base_s
        self.max_s = max(base_s, max_s)
        self.step_s = step_s
        self.calm_s = calm_s
        self.value_s = base_s
        self.grows = 0
        self.shrinks = 0
        self._changed_at = float("-inf")

    @property
    def frames(self) -> int:
        """The prebuffer in whole frames, rounded up, at least one."""
        return max(1, -(-round(self.value_s * 1000) // round(self.step_s * 1000)))

    def ran_dry(self, now: float) -> None:
        """Twilio's buffer ran dry mid-spurt: hold one frame more."""
        if self.value_s + self.step_s <= self.max_s + _EPS:
            self.value_s += self.step_s
            self.grows += 1
        self._changed_at = now

    def steady(self, now: float) -> None:
        """Audio went out on time: after ``calm_s`` of that, give one frame back."""
        if self.value_s > self.base_s + _EPS and now - self._changed_at >= self.calm_s:
            self.value_s = max(self.base_s, self.value_s - self.step_s)
            self.shrinks += 1
            self._changed_at = now
