"""Outbound pacing: frames handed to Twilio never run more than the lead ahead of real time."""

from __future__ import annotations

import random

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


class _SeparateSteps:
    """The pacer's decision as it was written before ``batch_due`` computed the lead once: ``lead``, then
    ``frames_due``, each from the play end; the reference the one-pass version must match bit for bit."""

    def __init__(self, lead_s: float, frame_s: float = 0.02) -> None:
        self.lead_s, self.frame_s, self.play_end = lead_s, frame_s, None

    def batch_due(self, now: float, available: int, batch: int, low_water_s: float) -> int:
        lead = max(0.0, (self.play_end or now) - now)
        room = int((self.lead_s - lead) / self.frame_s + 1e-9)
        if min(available, room) < batch and lead > low_water_s + 1e-9:
            return 0
        play_end = max(self.play_end or now, now)
        n = max(0, min(available, int((self.lead_s - (play_end - now)) / self.frame_s + 1e-9)))
        self.play_end = play_end + n * self.frame_s
        return n


def test_pacer_batch_due_and_frames_due_match_their_separate_steps_exactly() -> None:
    rng = random.Random(5)
    for lead_s in (0.02, 0.1, 0.14, 1.0):
        pacer, reference = OutboundPacer(lead_s), _SeparateSteps(lead_s)
        now = 0.0
        for _ in range(2000):
            now += rng.choice([0.0, 0.001, 0.0199, 0.02, 0.02, 0.0201, 0.05, 0.4])
            if rng.random() < 0.02:
                pacer.cleared(now)
                reference.play_end = now
            args = (now, rng.randint(0, 8), rng.randint(0, 4), rng.choice([0.0, 0.02, 0.04, lead_s]))
            due = pacer.frames_due(now, args[1]) if args[2] == 0 else pacer.batch_due(*args)
            assert due == reference.batch_due(*args)  # a batch of 0: frames_due's decision
            assert pacer.play_end == reference.play_end
