"""A simulated caller's round trips against an echo AI, as it receives and plays them; no I/O, no clock.

Byte n of an echo AI's audio is byte n of the caller's (the resamplers keep the count exactly), so an AI media
message's first byte dates from when the caller sent that byte's frame. Two figures follow (``CallResult``):
the round trip at arrival, and the one the caller hears, when its playback plays that byte, counted on the
caller's 20 ms beat so that its own scheduling adds nothing. Both hold until the first ``clear``, which drops
audio and breaks the count. ``tools.caller.SimulatedCall`` and bench/lean_callers.py keep them here, so the
two callers' figures mean the same.
"""

from __future__ import annotations

from collections import deque

from telephony_bridge.audio.codec import FRAME_S, TWILIO_FRAME_BYTES
from telephony_bridge.tools.twilio_playout import Playout


class RoundTrips:
    def __init__(self, playout: Playout) -> None:
        self._playout = playout
        self.sent_at: list[float] = []  # when caller frame i went out
        self.arrivals_s: list[float] = []  # per AI media message: arrival less when its first byte was sent
        self.heard_s: list[float] = []  # per AI media message: played less sent, on the beat
        self._awaiting_play: deque[tuple[int, int]] = deque()  # (first byte's index in the AI audio, caller frame)

    def received(self, payload: bytes, now: float) -> None:
        """An AI media message arrived at ``now``: call it before the playout takes the payload."""
        playout = self._playout
        frame = playout.bytes_received // TWILIO_FRAME_BYTES
        if not playout.clears and frame < len(self.sent_at) and payload:
            self.arrivals_s.append(now - self.sent_at[frame])
            self._awaiting_play.append((playout.bytes_received, frame))

    def played(self, tick: int) -> None:
        """The playout has played beat ``tick``: the messages whose first sample it played, sent at beat
        ``frame``, were heard ``tick - frame`` beats later."""
        if self._playout.clears:
            self._awaiting_play.clear()
        awaiting, played = self._awaiting_play, self._playout.bytes_played
        while awaiting and awaiting[0][0] < played:
            _, frame = awaiting.popleft()
            self.heard_s.append((tick - frame) * FRAME_S)
