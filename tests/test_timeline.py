"""Inbound timeline: gaps become silence, late frames vanish, overlaps are trimmed, jitter is ignored."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from telephony_bridge.audio.codec import TWILIO_BYTES_PER_MS, TWILIO_FRAME_BYTES, ULAW_SILENCE
from telephony_bridge.audio.timeline import JITTER_TOLERANCE_S, NO_TIMESTAMP, STALE_TIMESTAMP, InboundTimeline
from tests.support import instance_state

SILENCE = bytes([ULAW_SILENCE])
TOLERANCE_BYTES = round(JITTER_TOLERANCE_S * 1000 * TWILIO_BYTES_PER_MS)


def _frame(index: int) -> bytes:
    """A recognisable 20 ms payload (never the silence byte)."""
    return bytes([index % 200]) * TWILIO_FRAME_BYTES


def _counters(timeline: InboundTimeline) -> tuple[int, int, int, int]:
    return timeline.filled_bytes, timeline.dropped_frames, timeline.trimmed_bytes, timeline.skipped_bytes


def test_timeline_passes_contiguous_frames_unchanged() -> None:
    timeline = InboundTimeline()
    out = b"".join(timeline.place(20 * i, _frame(i)) for i in range(50))
    assert out == b"".join(_frame(i) for i in range(50))
    assert _counters(timeline) == (0, 0, 0, 0)
    assert timeline.position_s == 1.0


def test_timeline_fills_a_lost_frame_with_silence() -> None:
    timeline = InboundTimeline()
    assert [timeline.place(0, _frame(0)), timeline.place(40, _frame(2))] == [_frame(0), SILENCE * 160 + _frame(2)]
    assert _counters(timeline) == (160, 0, 0, 0)


def test_timeline_fills_silence_before_a_late_first_frame() -> None:
    timeline = InboundTimeline()
    assert timeline.place(100, _frame(5)) == SILENCE * 800 + _frame(5)


@pytest.mark.parametrize("timestamp_ms", [0, 20, 5])
def test_timeline_drops_duplicate_and_late_frames(timestamp_ms: int) -> None:
    timeline = InboundTimeline()
    timeline.place(0, _frame(0))
    timeline.place(20, _frame(1))
    timeline.place(40, _frame(2))
    assert timeline.place(timestamp_ms, _frame(9)) == b""
    assert _counters(timeline) == (0, 1, 0, 0)


def test_timeline_keeps_only_the_new_tail_of_an_overlapping_frame() -> None:
    timeline = InboundTimeline()
    timeline.place(0, _frame(0))
    assert timeline.place(10, b"a" * 80 + b"b" * 80) == b"b" * 80
    assert _counters(timeline) == (0, 0, 80, 0)
    assert timeline.place(30, _frame(3)) == _frame(3)


@pytest.mark.parametrize("timestamp_ms", [11, 29])
def test_timeline_takes_frames_whole_within_the_jitter_tolerance(timestamp_ms: int) -> None:
    timeline = InboundTimeline()
    timeline.place(0, _frame(0))
    assert timeline.place(timestamp_ms, _frame(1)) == _frame(1)
    assert timeline.place(40, _frame(2)) == _frame(2)
    assert _counters(timeline) == (0, 0, 0, 0)


def test_timeline_with_zero_tolerance_fills_a_one_ms_gap() -> None:
    timeline = InboundTimeline(jitter_tolerance_s=0)
    timeline.place(0, _frame(0))
    assert timeline.place(21, _frame(1)) == SILENCE * 8 + _frame(1)


def test_timeline_caps_the_silence_for_an_absurd_timestamp() -> None:
    timeline = InboundTimeline(max_fill_s=0.5)
    timeline.place(0, _frame(0))
    assert timeline.place(3_600_000, _frame(1)) == SILENCE * 4000 + _frame(1)
    assert _counters(timeline) == (4000, 0, 0, 3_600_000 * 8 - 160 - 4000)
    assert timeline.place(3_600_020, _frame(2)) == _frame(2)


def test_timeline_ignores_empty_payloads() -> None:
    timeline = InboundTimeline()
    assert timeline.place(500, b"") == b""
    assert _counters(timeline) == (0, 0, 0, 0)
    assert timeline.position_s == 0.0


def test_timeline_rejects_negative_settings() -> None:
    with pytest.raises(ValueError, match="expected jitter_tolerance_s >= 0"):
        InboundTimeline(jitter_tolerance_s=-0.001)


frames = st.lists(st.tuples(st.integers(0, 400), st.integers(1, 320)), max_size=40)


@given(frames)
def test_timeline_with_zero_tolerance_puts_every_byte_at_its_timestamp(placements: list[tuple[int, int]]) -> None:
    # Frames cut from one true stream, in any order, repeated or overlapping: every byte produced is either
    # the true byte for its position or filler silence, and the output ends where the furthest frame ends.
    truth = bytes(i % 251 for i in range(500 * TWILIO_BYTES_PER_MS))
    timeline = InboundTimeline(jitter_tolerance_s=0)
    out = b""
    for i, (timestamp_ms, length) in enumerate(placements):
        start = timestamp_ms * TWILIO_BYTES_PER_MS
        placed = timeline.place(timestamp_ms, truth[start : start + length])
        if timeline.untimed_reason:  # a sender whose stamps stop advancing: its frames follow in arrival order
            assert placed == truth[start : start + length]
            placements = placements[:i]
            break
        out += placed
    assert all(got in (expected, ULAW_SILENCE) for got, expected in zip(out, truth, strict=False))
    assert len(out) == max((t * TWILIO_BYTES_PER_MS + n for t, n in placements), default=0)
    assert out.count(ULAW_SILENCE) == timeline.filled_bytes


@given(frames)
def test_timeline_never_drifts_from_the_stream_clock_by_the_tolerance(placements: list[tuple[int, int]]) -> None:
    timeline = InboundTimeline()
    produced = 0
    for timestamp_ms, length in placements:
        out = timeline.place(timestamp_ms, b"x" * length)
        if timeline.untimed_reason:  # arrival order from here on: see test_timeline_falls_back_to_arrival_order
            break
        produced += len(out)
        position = round(timeline.position_s * 1000 * TWILIO_BYTES_PER_MS)
        assert produced == position - timeline.skipped_bytes
        if out:
            assert abs(position - (timestamp_ms * TWILIO_BYTES_PER_MS + length)) < TOLERANCE_BYTES
            audio = out.lstrip(SILENCE)  # silence first, if any, then (the tail of) this frame
            assert audio == b"x" * len(audio) and 0 < len(audio) <= length


def test_timeline_without_timestamps_passes_every_frame_in_arrival_order() -> None:
    timeline = InboundTimeline()
    out = b"".join(timeline.place(None, _frame(i)) for i in range(50))
    assert out == b"".join(_frame(i) for i in range(50))
    assert (timeline.untimed_reason, timeline.untimed_frames) == (NO_TIMESTAMP, 50)
    assert _counters(timeline) == (0, 0, 0, 0) and timeline.position_s == 1.0


@pytest.mark.parametrize("stamps", [[0, 0, 0, 0], [100, 100, 100, 100], [500, 20, 40, 60], [60, 40, 20, 0]])
def test_timeline_whose_stamps_do_not_advance_falls_back_to_arrival_order(stamps: list[int]) -> None:
    """Stamps that repeat, or go back twice in a row: a sender without a clock; at most one frame is lost."""
    timeline = InboundTimeline()
    out = b"".join(timeline.place(stamp, _frame(i)) for i, stamp in enumerate(stamps))
    assert timeline.untimed_reason == STALE_TIMESTAMP
    assert len(out) >= (len(stamps) - 1) * TWILIO_FRAME_BYTES and out.endswith(_frame(2) + _frame(3))
    assert timeline.dropped_frames <= 1


def test_timeline_keeps_gap_fill_for_a_sender_that_stamps() -> None:
    """One late frame among advancing stamps is Twilio's lost-and-found frame: dropped, the clock kept."""
    timeline = InboundTimeline()
    for stamp in (0, 20, 40, 200, 220, 40, 240):
        timeline.place(stamp, _frame(stamp // 20))
    assert timeline.untimed_reason == "" and _counters(timeline) == (140 * 8, 1, 0, 0)


def test_timeline_a_frame_on_time_ends_a_run_of_stamps_that_go_back() -> None:
    """A late frame, then one exactly where the last ended (the common case, taken by a shorter path), then
    another late one: two late frames, but not in a row, so the clock is kept."""
    timeline = InboundTimeline()
    out = [timeline.place(stamp, _frame(i)) for i, stamp in enumerate((0, 20, 40, 20, 60, 40, 80))]
    assert out == [_frame(0), _frame(1), _frame(2), b"", _frame(4), b"", _frame(6)]
    assert timeline.untimed_reason == "" and _counters(timeline) == (0, 2, 0, 0)


@given(st.lists(st.one_of(st.none(), st.integers(0, 400)), min_size=1, max_size=40), st.integers(1, 320))
def test_timeline_falls_back_to_arrival_order(stamps: list[int | None], length: int) -> None:
    # Once in arrival order, every byte of every frame goes through, in order, and nothing else.
    timeline = InboundTimeline()
    after: list[bytes] = []
    expected: list[bytes] = []
    for i, stamp in enumerate(stamps):
        was_untimed = bool(timeline.untimed_reason)
        payload = bytes([i % 200]) * length
        placed = timeline.place(stamp, payload)
        if was_untimed or timeline.untimed_reason:
            after.append(placed)
            expected.append(payload)
    assert after == expected
    assert (None in stamps) <= bool(timeline.untimed_reason)


# Mostly Twilio's own stream (each frame stamped where the last ended), with every kind of exception mixed in:
# gaps, repeats, overlaps, jitter, no stamp, empty and odd payloads.
_step = st.one_of(
    st.just(("next", 160)),
    st.tuples(st.sampled_from(["next", "jump", "none"]), st.integers(0, 480)),
    st.tuples(st.just("at"), st.integers(0, 2000)),
)


@given(st.lists(_step, min_size=1, max_size=60), st.sampled_from([0.0, JITTER_TOLERANCE_S]))
def test_timeline_shortcut_for_the_next_frame_agrees_with_the_general_rules(
    steps: list[tuple[str, int]], tolerance_s: float
) -> None:
    """``place`` takes a frame stamped where the last one ended by a shortcut; ``_place`` is every rule. Both
    must give the same bytes and leave the same state, frame after frame."""
    fast, general = (InboundTimeline(jitter_tolerance_s=tolerance_s) for _ in range(2))
    stamp = 0
    for kind, n in steps:
        if kind == "at":
            stamp, length = n, TWILIO_FRAME_BYTES
        else:
            length = n
            stamp = round(fast.position_s * 1000) if kind == "next" else stamp + n // TWILIO_BYTES_PER_MS
        timestamp_ms = None if kind == "none" else stamp
        payload = bytes([len(steps) % 256]) * length
        assert fast.place(timestamp_ms, payload) == general._place(timestamp_ms, payload)
        assert instance_state(fast) == instance_state(general)
