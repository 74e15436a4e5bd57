"""tools.round_trips: an echo AI's message dated from the caller frame its first byte came from, at arrival and
when played on the beat; nothing counted after a ``clear``."""

from __future__ import annotations

import pytest

from telephony_bridge.audio.codec import FRAME_S, TWILIO_FRAME_BYTES
from telephony_bridge.tools.round_trips import RoundTrips
from telephony_bridge.tools.twilio_playout import Playout

FRAME = b"\x00" * TWILIO_FRAME_BYTES


def test_round_trips_date_each_message_from_the_frame_its_first_byte_came_from() -> None:
    playout = Playout()
    trips = RoundTrips(playout)
    trips.sent_at.extend([10.00, 10.02, 10.04])
    trips.received(FRAME, now=10.25)  # echoes frame 0
    playout.push_media(FRAME)
    trips.received(FRAME + FRAME, now=10.28)  # starts with frame 1
    playout.push_media(FRAME + FRAME)
    assert trips.arrivals_s == pytest.approx([0.25, 0.26])
    for tick in (13, 14, 15):  # 13 plays frame 0's echo, 14 the second message's first half
        playout.tick(TWILIO_FRAME_BYTES)
        trips.played(tick)
    assert trips.heard_s == pytest.approx([13 * FRAME_S, 13 * FRAME_S])


def test_round_trips_stop_at_the_first_clear_and_skip_empty_or_unsent() -> None:
    playout = Playout()
    trips = RoundTrips(playout)
    trips.sent_at.append(10.0)
    trips.received(b"", now=10.1)  # no byte to date
    trips.received(FRAME, now=10.2)
    playout.push_media(FRAME)
    trips.received(FRAME, now=10.3)  # its first byte is caller frame 1, never sent
    playout.push_media(FRAME)
    assert trips.arrivals_s == pytest.approx([0.2])
    playout.clear()
    trips.received(FRAME, now=10.4)
    playout.push_media(FRAME)
    playout.tick(TWILIO_FRAME_BYTES)  # plays audio again: what was awaiting play before the clear is not heard
    trips.played(12)
    assert trips.heard_s == [] and trips.arrivals_s == pytest.approx([0.2])
