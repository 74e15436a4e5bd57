"""BargeInDetector: fires once when the caller talks over an AI that was already talking, never on noise or on
speech that began first, and gives the same events for any chunking. Signals: see ``tests/test_vad.py``."""

from __future__ import annotations

from functools import cache

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telephony_bridge.audio.barge_in import BargeIn, BargeInDetector, CallerStopped, Event
from telephony_bridge.audio.codec import TWILIO_RATE_HZ
from telephony_bridge.audio.vad import VAD_FRAME_SAMPLES, VoiceActivityDetector
from tests.test_vad import noise, speech_8k, talker_8k, to_int16

FOREVER = 1e9
SPEECH_END_S = 2.42  # the recorded sentence's last frame above -45 dBFS ends here (it starts at 0)


def caller_track(
    duration_s: float,
    speech: list[tuple[float, npt.NDArray[np.int16]]],
    *,
    noise_kind: str = "white",
    noise_dbfs: float = -60.0,
) -> npt.NDArray[np.int16]:
    """``duration_s`` of line noise with each ``(at_s, signal)`` of ``speech`` mixed in at ``at_s``."""
    track = noise(noise_kind, duration_s, noise_dbfs, seed=7)
    for at_s, signal in speech:
        start = round(at_s * TWILIO_RATE_HZ)
        track[start : start + len(signal)] += signal
    return to_int16(track)


def run(
    audio: npt.NDArray[np.int16],
    spurts: list[tuple[float, float]],
    *,
    sizes: list[int] | None = None,
    detector: BargeInDetector | None = None,
) -> tuple[list[Event], BargeInDetector]:
    """Feed ``audio`` (starting at t = 0) in chunks of ``sizes`` (20 ms by default, the rest in one), telling the
    detector at each chunk's end since when the AI spurt then playing, from ``spurts`` [(start_s, end_s)], was
    audible."""
    detector = detector or BargeInDetector()
    events: list[Event] = []
    steps = sizes if sizes is not None else [VAD_FRAME_SAMPLES] * (len(audio) // VAD_FRAME_SAMPLES)
    bounds = [int(b) for b in np.cumsum(steps) if b < len(audio)] + [len(audio)]
    start = 0
    for end in bounds:
        now_s = end / TWILIO_RATE_HZ
        since = next((a for a, b in spurts if a < now_s <= b), None)
        events += detector.caller_audio(audio[start:end], now_s, since)
        start = end
    return events, detector


def test_barge_in_fires_once_within_min_speech_of_the_onset() -> None:
    audio = caller_track(5.0, [(1.5, speech_8k())])
    events, detector = run(audio, [(0.5, FOREVER)])  # speech starts 1.0 s into the AI's spurt
    assert [type(e) for e in events] == [BargeIn, CallerStopped]
    barge_in = events[0]
    assert isinstance(barge_in, BargeIn)
    assert 1.5 <= barge_in.onset_s <= 1.5 + 0.04  # measured: 1.52, the first frame ("h") is below the gate
    assert barge_in.detected_s - 1.5 <= 0.160 + 0.040  # measured: 0.18
    assert (detector.utterances, detector.barge_ins, detector.speaking) == (1, 1, False)


def test_barge_in_caller_stopped_after_utterance_end() -> None:
    audio = caller_track(6.0, [(1.5, speech_8k())])
    events, _ = run(audio, [(0.5, FOREVER)])
    stopped = events[-1]
    assert isinstance(stopped, CallerStopped)
    assert stopped.at_s - (1.5 + SPEECH_END_S) == pytest.approx(0.5, abs=0.04)  # measured: 0.50


def test_barge_in_never_for_speech_that_began_before_the_ai() -> None:
    """The AI starts 0.2 s after the caller and talks over them; 250 ms pauses keep it all one utterance."""
    segments = [(1.0 + 1.25 * i, talker_8k(1.0)) for i in range(4)]  # 1 s of talk, 250 ms pause, ... to 5.75 s
    events, detector = run(caller_track(7.0, segments), [(1.2, FOREVER)])
    assert events == []
    assert (detector.utterances, detector.barge_ins, detector.speaking) == (1, 0, False)


@pytest.mark.parametrize(("into_spurt_s", "fires"), [(0.1, False), (0.3, True)])
def test_barge_in_only_after_the_ai_was_audible_for_200_ms(into_spurt_s: float, fires: bool) -> None:
    events, detector = run(caller_track(3.0, [(1.0 + into_spurt_s, talker_8k(1.0))]), [(1.0, FOREVER)])
    assert [type(e) for e in events] == ([BargeIn, CallerStopped] if fires else [])
    assert detector.utterances == 1


@pytest.mark.parametrize(
    ("kind", "level_dbfs", "sensitivity"), [("white", -45.0, 2), ("pink", -45.0, 2), ("white", -40.0, 3)]
)
def test_barge_in_never_on_background_noise(kind: str, level_dbfs: float, sensitivity: int) -> None:
    audio = caller_track(30.0, [], noise_kind=kind, noise_dbfs=level_dbfs)
    detector = BargeInDetector(vad=VoiceActivityDetector(sensitivity))
    events, detector = run(audio, [(0.0, FOREVER)], detector=detector)  # the AI talks throughout
    assert (events, detector.utterances) == ([], 0)


def test_barge_in_again_for_a_second_utterance_in_the_same_spurt() -> None:
    events, detector = run(caller_track(8.0, [(1.0, speech_8k()), (5.0, talker_8k(1.0))]), [(0.2, FOREVER)])
    assert [type(e) for e in events] == [BargeIn, CallerStopped, BargeIn, CallerStopped]
    assert [round(e.onset_s, 2) for e in events if isinstance(e, BargeIn)] == [1.02, 5.02]
    assert (detector.utterances, detector.barge_ins) == (2, 2)


@cache
def chunking_scenario() -> npt.NDArray[np.int16]:
    """Talk before the AI (no barge-in), then a sentence at an onset off the 20 ms grid (a barge-in)."""
    return caller_track(6.0, [(0.3, talker_8k(1.0)), (2.013, speech_8k())], noise_kind="pink", noise_dbfs=-50.0)


@cache
def events_in_frames() -> tuple[Event, ...]:
    return tuple(run(chunking_scenario(), [(0.5, FOREVER)])[0])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=2000), min_size=1, max_size=40))
def test_barge_in_any_chunking_gives_the_same_events(sizes: list[int]) -> None:
    events, _ = run(chunking_scenario(), [(0.5, FOREVER)], sizes=sizes)
    expected = events_in_frames()
    assert [type(e) for e in expected] == [BargeIn, CallerStopped]
    assert [type(e) for e in events] == [type(e) for e in expected]
    for got, want in zip(events, expected, strict=True):
        for field in want.__dataclass_fields__:
            assert getattr(got, field) == pytest.approx(getattr(want, field), abs=1e-9)


# The state machine to the frame: a stand-in VAD that calls any frame with a non-zero sample speech.


class MarkerVad(VoiceActivityDetector):
    def _decide(self, frame: npt.NDArray[np.int16]) -> bool:  # what ``process`` and ``is_speech`` ask per frame
        return bool(frame.any())


def frames(pattern: str) -> npt.NDArray[np.int16]:
    """One 20 ms frame per character: '#' speech, '.' not."""
    return np.repeat(np.array([c == "#" for c in pattern], dtype=np.int16), VAD_FRAME_SAMPLES)


def marked(pattern: str, spurts: list[tuple[float, float]], **options: int) -> tuple[list[Event], BargeInDetector]:
    return run(frames(pattern), spurts, detector=BargeInDetector(vad=MarkerVad(), **options))


def test_barge_in_continuous_speech_detected_after_exactly_min_speech() -> None:
    events, detector = marked("." * 50 + "#" * 20 + "." * 30, [(0.0, FOREVER)])
    assert events == [BargeIn(pytest.approx(1.0), pytest.approx(1.16)), CallerStopped(pytest.approx(1.9))]
    assert detector.speaking is False


def test_barge_in_gaps_up_to_60_ms_do_not_reset_the_run() -> None:
    events, _ = marked("." * 50 + "#######...#" + "." * 30, [(0.0, FOREVER)])
    assert events[0] == BargeIn(pytest.approx(1.0), pytest.approx(1.22))
    events, detector = marked("." * 50 + "#######....########" + "." * 30, [(0.0, FOREVER)])
    assert events[0] == BargeIn(pytest.approx(1.22), pytest.approx(1.38))
    assert detector.utterances == 1
    events, detector = marked("." * 50 + "#......" * 20, [(0.0, FOREVER)])  # isolated noisy frames
    assert (events, detector.utterances) == ([], 0)


def test_barge_in_speaking_until_utterance_end_of_silence() -> None:
    pattern = "." * 50 + "#" * 10 + "." * 24 + "#" + "." * 25 + "." * 5
    events, detector = marked(pattern, [(0.0, FOREVER)])
    # the 24-frame pause (480 ms) is inside the utterance; 25 quiet frames after the last speech end it
    assert events == [BargeIn(pytest.approx(1.0), pytest.approx(1.16)), CallerStopped(pytest.approx(2.2))]
    assert (detector.utterances, detector.barge_ins) == (1, 1)


def test_barge_in_uses_the_ai_state_at_the_onset_not_at_detection() -> None:
    """Spurt A is playing when the caller starts; A ends and B starts before detection: still a barge-in."""
    events, _ = marked("." * 50 + "#" * 20 + "." * 30, [(0.0, 1.04), (1.1, FOREVER)])
    assert events[0] == BargeIn(pytest.approx(1.0), pytest.approx(1.16))
    events, _ = marked("." * 50 + "#" * 20 + "." * 30, [(1.06, FOREVER)])  # AI starts after the onset
    assert events == []


def test_barge_in_only_barge_ins_report_caller_stopped() -> None:
    events, detector = marked("." * 50 + "#" * 20 + "." * 30, [])  # the AI silent
    assert events == []
    assert (detector.utterances, detector.barge_ins, detector.speaking) == (1, 0, False)


def test_barge_in_speaking_while_the_utterance_lasts() -> None:
    detector = BargeInDetector(vad=MarkerVad())
    detector.caller_audio(frames("#" * 8), 0.16, None)
    assert detector.speaking is True
    detector.caller_audio(frames("." * 24), 0.64, None)
    assert detector.speaking is True
    detector.caller_audio(frames("."), 0.66, None)
    assert detector.speaking is False


def test_barge_in_options_must_make_sense() -> None:
    with pytest.raises(ValueError, match="expected min_speech_ms >= 1 ms, got 0"):
        BargeInDetector(min_speech_ms=0)
    with pytest.raises(ValueError, match="expected max_gap_ms >= 0 ms, got -20"):
        BargeInDetector(max_gap_ms=-20)


def test_barge_in_hold_ends_at_max_hold_while_the_caller_keeps_talking() -> None:
    """Steady background speech (a TV) must not mute the AI for ever: the hold lifts, the utterance goes on."""
    sentence = speech_8k()
    audio = caller_track(14.0, [(1.0 + 2.3 * i, sentence) for i in range(5)])  # 11.5 s of near-continuous talk
    events, detector = run(audio, [(0.5, FOREVER)], detector=BargeInDetector(max_hold_ms=3000, max_gap_ms=60))
    assert [type(e) for e in events] == [BargeIn, CallerStopped]
    barge_in, stopped = events
    assert isinstance(barge_in, BargeIn) and isinstance(stopped, CallerStopped)
    assert stopped.hold_limit and stopped.at_s - barge_in.detected_s == pytest.approx(3.0, abs=0.021)
    assert detector.barge_ins == 1


def test_barge_in_hold_ends_when_the_sender_stops_sending() -> None:
    """A client that sends media only while its caller speaks: the time without frames is silence."""
    audio = caller_track(2.0, [(1.0, speech_8k()[: 8000 // 2])])  # 0.5 s of speech, then the stream goes quiet
    cut = round(1.5 * TWILIO_RATE_HZ)
    events, detector = run(audio[:cut], [(0.5, FOREVER)])
    assert [type(e) for e in events] == [BargeIn] and detector.listening
    assert detector.caller_silent(1.7, 0.5) == []  # 200 ms without frames: not yet the end of the utterance
    stopped = detector.caller_silent(2.2, 0.5)
    assert [type(e) for e in stopped] == [CallerStopped] and not detector.listening
    assert 1.5 < stopped[0].at_s <= 1.5 + 0.5 + 0.021  # type: ignore[union-attr]
    assert detector.caller_silent(9.0, 0.5) == []  # nothing left to end


def test_barge_in_caller_silent_before_any_audio_is_nothing() -> None:
    assert BargeInDetector().caller_silent(5.0, 0.0) == []
