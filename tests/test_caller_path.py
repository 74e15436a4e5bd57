"""The compiled caller path (``_caller_path.c``) against the Python path it stands in for.

Two ``Inbound``s, one behind the compiled handler and one behind the Python handler, get the same random
streams of caller frames (on time mostly; also gaps, late and repeated frames, odd sizes, no timestamps,
speech that barges in), on the same fake clock schedule, with a sender that sometimes cannot take audio:
after every frame, everything each has sent, every event and every piece of state must be the same. The
compiled handler must also take most frames itself, or this would compare the Python path with itself.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import pytest

from telephony_bridge.audio import kernels
from telephony_bridge.audio.barge_in import Event
from telephony_bridge.audio.codec import TWILIO_FRAME_BYTES, pcm16_to_ulaw
from telephony_bridge.audio.vad import VAD_FRAME_S
from telephony_bridge.clock import FakeClock
from telephony_bridge.inbound import CallerPath, Inbound
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.settings import AudioSettings, BargeInSettings
from tests.support import instance_state, require_built
from tests.test_inbound import FakeSavants, settle
from tests.test_vad import speech_8k

SPEECH = pcm16_to_ulaw(speech_8k())  # the recorded sentence: loud enough to barge in


@pytest.fixture(autouse=True)
def built() -> None:
    require_built("telephony_bridge._caller_path", CallerPath is not None and kernels.EXTENSION is not None)


QUIET = bytes([0xFF]) * 160


class Twin:
    """One ``Inbound`` behind one handler, as ``Call`` wires it (``_caller_audio``: push, then the events)."""

    def __init__(
        self, audio: AudioSettings, barge_in: BargeInSettings, *, compiled: bool, frame_bytes: int | None
    ) -> None:
        self.clock = FakeClock(start=1000.0)
        self.inbound = Inbound(audio, barge_in, Metrics(), self.clock, frame_bytes=frame_bytes)
        self.savants = FakeSavants(self.clock)
        self.sent: list[bytes] = []
        self.savants.record = self.sent.append  # type: ignore[method-assign]
        self.events: list[tuple[str, Any]] = []
        self.audible_from: float | None = None
        self.handler = self.inbound.audio_handler(
            self._caller_audio, self.clock, self.audible_since, self.on_events, compiled=compiled
        )

    def audible_since(self, now: float) -> float | None:
        return self.audible_from

    def on_events(self, events: list[Event]) -> None:
        self.events.extend((type(event).__name__, event) for event in events)

    def _caller_audio(self, ulaw: bytes, timestamp_ms: int | None) -> None:
        now = self.clock.monotonic()
        events = self.inbound.push(timestamp_ms, ulaw, now, self.audible_since(now))
        if events:
            self.on_events(events)

    def state(self) -> dict[str, Any]:
        inbound = self.inbound
        pipeline = inbound._pipeline
        detector = inbound.detector
        out: dict[str, Any] = {
            "queue": list(inbound._queue),
            "sent": list(self.sent),
            "events": list(self.events),
            "timer": inbound._lone_timer is not None,
            "ready": inbound._ready.is_set(),
            "listening": inbound._listening.is_set(),
            "pending": bytes(pipeline._pending),
            "up_state": bytes(pipeline._upsampler._state),
        }
        for name, obj in (("inbound", inbound), ("timeline", pipeline.timeline), ("detector", detector)):
            for key, value in instance_state(obj).items():
                if isinstance(value, int | float | str | bool | set | type(None)):
                    out[f"{name}.{key}"] = value
        if detector is not None:
            out["vad.pending"] = detector._vad._pending.tobytes()
        return out


def stream(rng: random.Random, frames: int) -> list[Frame]:
    """(payload, timestamp_ms, ms to the next frame, whether the AI can take audio now): mostly Twilio's on-time
    frames, with the faults the Python path handles on its own: gaps, late and repeated frames, jitter within
    the tolerance, empty payloads, a pair of 10 ms payloads (a quirk; re-framed), and, near the end, a sender
    that stops stamping (arrival order for the rest of the call)."""
    out: list[Frame] = []
    ts = 0
    talking = False
    for i in range(frames):
        if rng.random() < 0.05:
            talking = not talking
        start = (i * 160) % (len(SPEECH) - 320)
        payload = SPEECH[start : start + 160] if talking else QUIET
        payloads: list[tuple[bytes, int | None]] = [(payload, ts)]
        roll = rng.random()
        if roll < 0.03:
            payloads = [(payload, ts + rng.choice((20, 40, 100)))]  # a gap: Twilio lost frames
        elif roll < 0.05 and ts >= 60 and out[-1][1] is not None and out[-1][1] >= ts - 20:
            # late; never twice in a row, nor a repeat of the last stamp: either means arrival order for good
            payloads = [(payload, ts - rng.choice((40, 60)))]
        elif roll < 0.06:
            payloads = [(payload[:80], ts), (payload[80:], ts + 10)]  # another size: a quirk, then re-framed
        elif roll < 0.065:
            payloads = [(payload, ts + rng.choice((-3, 3)))]  # a stamp that wobbles, within the tolerance
        elif roll < 0.07:
            payloads = [(b"", ts)]
        elif i > frames * 0.9 and roll < 0.08:
            payloads = [(payload, None)]  # no timestamp: arrival order from here on
        for data, stamp in payloads:
            if stamp is not None and stamp >= ts - 5:  # the next frame's stamp: after this one, on the grid
                ts = max(ts, stamp - stamp % 10) + len(data) // 8
            out.append((data, stamp, rng.choice((20, 20, 20, 19, 21, 5, 45)), rng.random() > 0.1))
    return out


Frame = tuple[bytes, int | None, float, bool]


async def run_both(seed: int, audio: AudioSettings, barge_in: BargeInSettings, frames: int = 400) -> Twin:
    return await run_script(audio, barge_in, stream(random.Random(seed), frames), label=f"seed {seed}")


async def run_script(
    audio: AudioSettings,
    barge_in: BargeInSettings,
    script: list[Frame],
    *,
    label: str = "",
    frame_bytes: int | None = TWILIO_FRAME_BYTES,
    connected: bool = True,
) -> Twin:
    """Both paths through ``script``, compared after each frame; ``connected``: the AI takes audio (``run``)."""
    twins = [Twin(audio, barge_in, compiled=c, frame_bytes=frame_bytes) for c in (True, False)]
    tasks = [asyncio.create_task(t.inbound.run(t.savants)) for t in twins if connected]  # type: ignore[arg-type]
    try:
        await settle()
        for n, (payload, stamp, gap_ms, takes_now) in enumerate(script):
            # The AI talks in turns: silent, audible for long, only just audible (under min_ai_audible_ms), or
            # audible for a hair (1e-6 s, the detector's EPS_S) under min_ai_audible_ms at the onset: it counts.
            turn = (n // 50) % 4
            for twin in twins:
                twin.savants.takes_now = takes_now
                now = twin.clock.monotonic()
                detector = twin.inbound.detector
                near = now - VAD_FRAME_S - (detector._min_ai_audible_s if detector else 0) + 5e-7
                twin.audible_from = (None, 999.0, now - 0.1, near)[turn]
                twin.inbound._listening.clear()  # as ``watch_idle`` does: the handler must set it as Python does
                twin.handler(payload, stamp)
            await settle()
            assert twins[0].state() == twins[1].state(), f"{label}, frame {n}: the paths differ"
            for twin in twins:
                twin.clock.advance(gap_ms / 1000)
            await settle()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return twins[0]


def counts(twin: Twin) -> tuple[int, int]:
    handler: Any = twin.handler
    return handler.counts  # type: ignore[no-any-return]


@pytest.mark.parametrize("seed", range(12))
async def test_compiled_caller_path_matches_the_python_path(seed: int) -> None:
    audio = AudioSettings(upstream_message_ms=40 if seed % 3 else 20)
    barge_in = BargeInSettings(enabled=seed % 4 != 3, min_ai_audible_ms=(0, 200)[seed % 2])
    twin = await run_both(seed, audio, barge_in)
    fast, slow = counts(twin)
    assert fast > 3 * slow, "most frames must take the compiled path, or it is not what is compared"
    assert slow > 0  # and the faults went to the Python path


@pytest.mark.parametrize("max_hold_s", [8.0, 0.1, 0.0])
async def test_compiled_caller_path_barges_in_as_the_python_path(max_hold_s: float) -> None:
    """Speech over an audible AI: the same barge-ins and stops, from the same frames; with a short hold, the same
    stops at the hold's limit too (0: no limit)."""
    barge_in = BargeInSettings(min_ai_audible_ms=0, max_hold_s=max_hold_s)
    twin = await run_both(5, AudioSettings(), barge_in, frames=800)
    kinds = {kind for kind, _ in twin.events}
    assert kinds == {"BargeIn", "CallerStopped"}
    hold_limits = [event for kind, event in twin.events if kind == "CallerStopped" and event.hold_limit]
    assert bool(hold_limits) == (0 < max_hold_s < 1)


def on_time(frames: int, start_ms: int = 0, payload: bytes = QUIET) -> list[Frame]:
    return [(payload, start_ms + 20 * i, 20, True) for i in range(frames)]


@pytest.mark.parametrize("enabled", [True, False])
async def test_compiled_caller_path_drops_the_oldest_as_the_python_path_while_the_ai_is_away(enabled: bool) -> None:
    """Nobody sends (no session yet): past ``pre_connect_buffer_ms`` the oldest frame goes, as in ``push``."""
    script = on_time(20, payload=SPEECH[:160])
    twin = await run_script(
        AudioSettings(pre_connect_buffer_ms=100), BargeInSettings(enabled=enabled), script, connected=False
    )
    assert twin.inbound.dropped_overflow == 15
    assert counts(twin) == (19, 1)  # the first frame starts the timeline: Python's


@pytest.mark.parametrize("enabled", [True, False])
async def test_compiled_caller_path_leaves_frames_behind_a_part_frame_to_the_python_path(enabled: bool) -> None:
    """A lone 10 ms payload puts the next frames half a frame out of step (the pipeline and the VAD each carry a
    part frame), though each is stamped where the last ended; a second one puts them back in step."""
    half = [(QUIET[:80], 200, 10, True)]
    script = on_time(10) + half + on_time(10, 210, SPEECH[:160]) + [(QUIET[:80], 410, 10, True)] + on_time(10, 420)
    twin = await run_script(AudioSettings(), BargeInSettings(enabled=enabled, min_ai_audible_ms=0), script)
    assert counts(twin) == (9 + 10, 1 + 1 + 10 + 1)


@pytest.mark.parametrize("frame_bytes", [None, 320])
async def test_compiled_caller_path_takes_the_frames_its_leg_promises(frame_bytes: int | None) -> None:
    """A leg that promises no size (SIP) has its 160-byte frames taken here; one that promises another size has
    each logged as a quirk, by the Python path."""
    twin = await run_script(AudioSettings(), BargeInSettings(), stream(random.Random(1), 100), frame_bytes=frame_bytes)
    fast, slow = counts(twin)
    assert (fast > 3 * slow) == (frame_bytes is None)
    assert ("frame_size" in twin.inbound.quirks) == (frame_bytes == 320)


def test_the_compiled_caller_path_is_what_audio_kernels_auto_chooses() -> None:
    inbound = Inbound(AudioSettings(), BargeInSettings(), Metrics(), FakeClock())
    fallback: Callable[[bytes, int | None], None] = lambda ulaw, ts: None  # noqa: E731
    handler = inbound.audio_handler(fallback, FakeClock(), lambda now: None, lambda events: None)
    assert isinstance(handler, CallerPath)
    numpy_inbound = Inbound(AudioSettings(kernels="numpy"), BargeInSettings(), Metrics(), FakeClock())
    assert numpy_inbound.audio_handler(fallback, FakeClock(), lambda now: None, lambda events: None) is fallback


def test_the_compiled_caller_path_refuses_an_inbound_without_the_compiled_kernels() -> None:
    inbound = Inbound(AudioSettings(kernels="numpy"), BargeInSettings(), Metrics(), FakeClock())
    with pytest.raises(Exception, match="compiled"):
        inbound.audio_handler(lambda u, t: None, FakeClock(), lambda now: None, lambda e: None, compiled=True)


async def test_compiled_caller_path_leaves_stamps_past_int64_to_the_python_path() -> None:
    """Python's ints have no limit: a stamp or a position the compiled path cannot hold in int64 (none a leg
    sends: Twilio's have 18 digits at most) is the Python path's, which neither raises nor wraps round."""
    top = (2**63 - 1) // 8  # the last stamp whose position fits, but not the next frame's position
    script = [(QUIET, top - 20, 20, True), (QUIET, top, 20, True), (QUIET, 2**63, 20, True), (QUIET, 0, 20, True)]
    twin = await run_script(AudioSettings(), BargeInSettings(), script)
    assert counts(twin) == (0, 4)


@pytest.mark.parametrize("compiled", [True, False])
def test_compiled_caller_path_leaves_an_upsampler_state_of_another_size_to_the_kernels_check(compiled: bool) -> None:
    """Nothing resizes the state; were it done, the kernels refuse it, as the Python path has them do, rather
    than writing past its end."""
    twin = Twin(AudioSettings(), BargeInSettings(), compiled=compiled, frame_bytes=TWILIO_FRAME_BYTES)
    twin.handler(QUIET, 0)
    twin.inbound._pipeline._upsampler._state.clear()
    with pytest.raises(ValueError, match="upsampler state"):
        twin.handler(QUIET, 20)


@pytest.mark.parametrize("compiled", [True, False])
def test_compiled_caller_path_leaves_unconfigured_kernels_to_their_check(compiled: bool) -> None:
    """Kernels whose tables were refused (configure() again, with taps that are not ours) are used by neither
    path: the Python one's ulaw_up raises, and so must the compiled one, not go on with the old tables."""
    assert kernels.EXTENSION is not None
    twin = Twin(AudioSettings(), BargeInSettings(), compiled=compiled, frame_bytes=TWILIO_FRAME_BYTES)
    twin.handler(QUIET, 0)
    with pytest.raises(ValueError):
        kernels.EXTENSION.configure(bytes(8 * 38), bytes(range(8)) * 38, bytes(512), bytes(65536))
    try:
        with pytest.raises(RuntimeError, match="before configure"):
            twin.handler(QUIET, 20)
    finally:
        assert kernels._import_extension()[0] is not None  # configured again, for the tests that follow


def test_compiled_caller_path_used_before_init_raises() -> None:
    """``__new__`` alone (no ``__init__``) leaves its references unset: a call says so rather than reading them."""
    assert CallerPath is not None
    with pytest.raises(RuntimeError, match="before __init__"):
        CallerPath.__new__(CallerPath)(QUIET, 20)
