"""Barge-in: the caller starting to talk over the AI, found in the caller's audio. Pure: time is passed in.

The Savants API sends no interruption message, so the bridge must notice on its own that the caller wants the
floor, stop playing the AI to them (``BargeIn``) and resume once they have finished (``CallerStopped``).

The detector is a state machine over the 20 ms frames of ``VoiceActivityDetector``:

- idle -> candidate: a speech frame; its start is the candidate onset.
- candidate -> idle: more than ``max_gap_ms`` of non-speech before ``min_speech_ms`` of speech has accumulated,
  so one noisy frame cannot start an utterance, and a consonant's gap does not reset one.
- candidate -> speaking: ``min_speech_ms`` of speech accumulated. This is one utterance; it is a barge-in only
  if the AI had been audible for ``min_ai_audible_ms`` at the onset. Speech that began before the AI (or in its
  first moments) is the AI talking over the caller, a backchannel or an echo voice repeating them: not cut.
- speaking -> idle: ``utterance_end_ms`` of continuous non-speech; ``CallerStopped`` if it was a barge-in.
- speaking (a barge-in) -> speaking (not one any more): the hold has lasted ``max_hold_ms``; ``CallerStopped`` with
  ``hold_limit`` set, so steady background speech (a TV) cannot mute the AI for ever. The utterance still has to
  end before another one can barge in.

A sender that stops sending media when its caller is quiet gives no frames to be silent in: ``caller_silent``
counts the time since the last frame as non-speech frames, so a hold always ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from telephony_bridge.audio.codec import TWILIO_RATE_HZ
from telephony_bridge.audio.vad import VAD_FRAME_S, VAD_FRAME_SAMPLES, VoiceActivityDetector

_FRAME_MS = 20
EPS_S = 1e-6  # frame times are sums of floats: an exact 200 ms must not come out as 199.999999 ms


@dataclass(frozen=True, slots=True)
class BargeIn:
    """The caller is talking over the AI: stop playing the AI to them (Twilio ``clear``).

    ``onset_s`` is when their speech began, ``detected_s`` when enough of it had been heard to be sure (the end of
    the deciding frame, at most the ``now_s`` of the chunk that completed it).
    """

    onset_s: float
    detected_s: float


@dataclass(frozen=True, slots=True)
class CallerStopped:
    """The utterance that barged in has ended (``utterance_end_ms`` of silence, ending at ``at_s``), or its hold
    reached ``max_hold_ms`` (``hold_limit``) while the caller goes on talking."""

    at_s: float
    hold_limit: bool = False


Event: TypeAlias = BargeIn | CallerStopped


def _check_ms(name: str, ms: int, minimum: int) -> int:
    if ms < minimum:
        raise ValueError(f"expected {name} >= {minimum} ms, got {ms}")
    return ms


class BargeInDetector:
    """Watches one call's caller audio for barge-ins; see the module docstring for the state machine.

    Defaults: 160 ms of speech is more than a click or a stray noisy frame, yet a sentence is detected 170-190 ms
    after its onset (a cough lasts longer, and does barge in); 500 ms of silence outlasts the pauses between a
    hesitant caller's words; 200 ms of AI audio before the onset means the caller had heard the AI before starting
    to talk. ``tests/test_barge_in.py`` measures the first two.
    """

    # The compiled frame path reads and writes these at their fixed offsets (_pyattrs.h); the rest live in
    # the instance dict.
    __slots__ = (
        "__dict__",
        "__weakref__",
        "_barged",
        "_end_frames_needed",
        "_held_since_s",
        "_last_end_s",
        "_max_gap_frames",
        "_max_hold_s",
        "_min_ai_audible_s",
        "_onset_ai_since_s",
        "_onset_s",
        "_quiet_frames",
        "_speaking",
        "_speech_frames",
        "_speech_frames_needed",
        "_vad",
        "barge_ins",
        "utterances",
    )

    def __init__(
        self,
        *,
        min_speech_ms: int = 160,
        utterance_end_ms: int = 500,
        min_ai_audible_ms: int = 200,
        max_gap_ms: int = 60,
        max_hold_ms: int = 0,
        vad: VoiceActivityDetector | None = None,
    ) -> None:
        """``max_hold_ms`` 0: a hold lasts until the utterance ends."""
        # Whole frames: "at least N ms" rounds up, "a gap of at most N ms" rounds down.
        self._speech_frames_needed = -(-_check_ms("min_speech_ms", min_speech_ms, 1) // _FRAME_MS)
        self._end_frames_needed = -(-_check_ms("utterance_end_ms", utterance_end_ms, 1) // _FRAME_MS)
        self._max_gap_frames = _check_ms("max_gap_ms", max_gap_ms, 0) // _FRAME_MS
        self._min_ai_audible_s = _check_ms("min_ai_audible_ms", min_ai_audible_ms, 0) / 1000
        self._max_hold_s = _check_ms("max_hold_ms", max_hold_ms, 0) / 1000
        self._vad = vad if vad is not None else VoiceActivityDetector()
        self.utterances = 0  # utterances heard, barge-ins or not
        self.barge_ins = 0  # BargeIn events emitted
        self._speaking = False
        self._barged = False  # the current utterance is a barge-in, so its end is reported
        self._onset_s: float | None = None  # start of the candidate's first speech frame
        self._onset_ai_since_s: float | None = None  # ``ai_audible_since_s`` as it was at that frame
        self._speech_frames = 0  # speech frames in the candidate
        self._quiet_frames = 0  # consecutive non-speech frames (candidate gap, or the end of an utterance)
        self._held_since_s = 0.0  # when the current barge-in was detected
        self._last_end_s: float | None = None  # end of the last frame decided

    @property
    def speaking(self) -> bool:
        """True from the detection of an utterance until its end."""
        return self._speaking

    @property
    def listening(self) -> bool:
        """True while an utterance is under way or may be starting: then the caller's silence matters."""
        return self._speaking or self._onset_s is not None

    def caller_silent(self, now_s: float, ai_audible_since_s: float | None) -> list[Event]:
        """The caller sent nothing since the last frame: count whole 20 ms frames of non-speech up to ``now_s``."""
        if self._last_end_s is None:
            return []
        events: list[Event] = []
        end_s = self._last_end_s + VAD_FRAME_S
        while end_s <= now_s + EPS_S and self.listening:
            event = self._frame(False, end_s, ai_audible_since_s)
            if event is not None:
                events.append(event)
            end_s += VAD_FRAME_S
        return events

    def caller_audio(
        self, samples_8k: npt.NDArray[np.int16], now_s: float, ai_audible_since_s: float | None
    ) -> list[Event]:
        """Feed caller audio of any length whose last sample ends at ``now_s``; get the events it completes.

        ``ai_audible_since_s`` is when the AI's current talk spurt became audible to the caller, None while the
        AI is silent; it applies to every frame this chunk completes (exact for Twilio's 20 ms chunks).
        """
        pending = self._vad.pending_samples
        if not pending and len(samples_8k) == VAD_FRAME_SAMPLES:  # Twilio's 20 ms: one frame, ending at ``now_s``
            event = self._frame(self._vad.process(samples_8k)[0], now_s, ai_audible_since_s)
            return [] if event is None else [event]
        decisions = self._vad.process(samples_8k)
        events: list[Event] = []
        # Frame i ends (i + 1) * 160 - pending samples into this chunk.
        first_end_s = now_s - (len(samples_8k) + pending - VAD_FRAME_SAMPLES) / TWILIO_RATE_HZ
        for i, speech in enumerate(decisions):
            end_s = first_end_s + i * VAD_FRAME_S
            event = self._frame(speech, end_s, ai_audible_since_s)
            if event is not None:
                events.append(event)
        return events

    def _frame(self, speech: bool, end_s: float, ai_audible_since_s: float | None) -> Event | None:
        """Every state transition, for one 20 ms frame ending at ``end_s``."""
        self._last_end_s = end_s
        if self._speaking:
            self._quiet_frames = 0 if speech else self._quiet_frames + 1
            if self._barged and self._max_hold_s and end_s - self._held_since_s >= self._max_hold_s - EPS_S:
                self._barged = False  # the utterance goes on, but no longer holds the AI back
                return CallerStopped(end_s, hold_limit=True)
            if self._quiet_frames < self._end_frames_needed:
                return None
            self._speaking = False
            self._onset_s = None
            self._quiet_frames = 0
            if self._barged:
                self._barged = False
                return CallerStopped(end_s)
            return None
        if not speech:
            if self._onset_s is not None:
                self._quiet_frames += 1
                if self._quiet_frames > self._max_gap_frames:
                    self._onset_s = None
            return None
        if self._onset_s is None:
            self._onset_s = end_s - VAD_FRAME_S
            self._onset_ai_since_s = ai_audible_since_s
            self._speech_frames = 0
        self._speech_frames += 1
        self._quiet_frames = 0
        if self._speech_frames < self._speech_frames_needed:
            return None
        self._speaking = True
        self.utterances += 1
        since = self._onset_ai_since_s
        if since is None or self._onset_s - since < self._min_ai_audible_s - EPS_S:
            return None
        self._barged = True
        self._held_since_s = end_s
        self.barge_ins += 1
        return BargeIn(self._onset_s, end_s)
