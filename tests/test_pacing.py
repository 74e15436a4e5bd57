"""Outbound pacing: frames handed to Twilio never run more than the lead ahead of real time."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from telephony_bridge.audio.pacing import AdaptivePrebuffer, OutboundPacer


def test_pacer_first_send_fills_the_lead_at_once() -> None:
    pacer = OutboundPacer(lead_s=0.1)
    assert pacer.frames_due(0.0, available=50) == 5
    assert pacer.frames_due(0.0, available=45) == 0
    assert abs(pacer.lead(0.0) - 0.1) < 1e-9


def test_pacer_steady_state_sends_one_frame_per_20_ms() -> None:
    pacer = OutboundPacer(lead_s=0.1)
    pacer.frames_due(0.0, available=100)
    sent = [pacer.frames_due(0.02 * i, available=100) for i in range(1, 51)]
    assert sent == [1] * 50


def test_pacer_late_tick_catches_up_without_exceeding_the_lead() -> None:
    pacer = OutboundPacer(lead_s=0.1)
    pacer.frames_due(0.0, available=100)
    assert pacer.frames_due(0.5, available=100) == 5  # buffer ran dry: refill to the lead, no more
    assert abs(pacer.lead(0.5) - 0.1) < 1e-9


def test_pacer_next_due_is_when_one_more_frame_fits() -> None:
    pacer = OutboundPacer(lead_s=0.1)
    pacer.frames_due(1.0, available=100)
    assert abs(pacer.next_due(1.0) - 1.02) < 1e-9


def test_pacer_clear_empties_the_lead() -> None:
    pacer = OutboundPacer(lead_s=0.1)
    pacer.frames_due(0.0, available=100)
    pacer.cleared(0.03)
    assert pacer.lead(0.03) == 0
    assert pacer.frames_due(0.03, available=100) == 5


@given(st.lists(st.tuples(st.floats(0.0, 0.2), st.integers(0, 20)), max_size=200))
def test_pacer_never_exceeds_the_lead_and_never_starves_queued_audio(steps: list[tuple[float, int]]) -> None:
    pacer = OutboundPacer(lead_s=0.1)
    now, queued = 0.0, 0
    for dt, arriving in steps:
        now += dt
        queued += arriving
        before = pacer.lead(now)
        sent = pacer.frames_due(now, queued)
        queued -= sent
        assert pacer.lead(now) <= 0.1 + 1e-9
        if queued:  # audio still waiting means the lead is full
            assert pacer.lead(now) > 0.1 - 0.02 - 1e-9
        assert sent == 0 or before < 0.1


def test_adaptive_prebuffer_grows_a_frame_per_underrun_up_to_its_bound_and_shrinks_back_when_calm() -> None:
    prebuffer = AdaptivePrebuffer(0.040, 0.100, calm_s=10.0)
    for at in range(5):
        prebuffer.ran_dry(float(at))
    assert (round(prebuffer.value_s, 3), prebuffer.frames, prebuffer.grows) == (0.1, 5, 3)  # 40 -> 100 ms, bound
    prebuffer.steady(13.9)  # under 10 s since the last underrun (at 4 s): nothing given back
    assert prebuffer.shrinks == 0
    for at in (14.0, 24.0, 34.0, 44.0):
        prebuffer.steady(at)
    assert (round(prebuffer.value_s, 3), prebuffer.shrinks) == (0.04, 3)  # back to the base, never below
