"""Playback tracking from mark echoes (spec §4, G7)."""

from __future__ import annotations

from telephony_bridge.audio.playback import PlaybackTracker


def test_playback_mark_echo_means_played() -> None:
    tracker = PlaybackTracker()
    tracker.audio_sent(100)
    first = tracker.mark_sent()
    tracker.audio_sent(60)
    second = tracker.mark_sent()
    tracker.mark_echoed(first)
    assert (tracker.played_ms, tracker.pending_marks) == (100, 1)
    tracker.mark_echoed(second)
    assert (tracker.played_ms, tracker.pending_marks) == (160, 0)


def test_playback_echo_after_clear_means_discarded() -> None:
    tracker = PlaybackTracker()
    tracker.audio_sent(100)
    first = tracker.mark_sent()
    tracker.audio_sent(200)
    second = tracker.mark_sent()
    tracker.mark_echoed(first)
    tracker.cleared(unplayed_ms=150)  # 50 of the 200 ms after the first mark had played when Twilio cleared
    tracker.mark_echoed(second)
    assert (tracker.played_ms, tracker.discarded_ms, tracker.sent_ms) == (150, 150, 300)  # played + discarded = sent


def test_playback_positions_after_a_clear_leave_out_what_was_discarded() -> None:
    tracker = PlaybackTracker()
    tracker.audio_sent(300)
    tracker.cleared(unplayed_ms=200)
    tracker.audio_sent(100)
    tracker.mark_echoed(tracker.mark_sent())
    assert tracker.played_ms == 200  # 100 heard before the clear, 100 after


def test_playback_unknown_marks_are_counted_not_raised() -> None:
    tracker = PlaybackTracker()
    tracker.mark_echoed("nobody-sent-this")
    assert tracker.unknown_marks == 1
