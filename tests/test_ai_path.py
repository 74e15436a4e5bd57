"""The compiled AI → caller path (``_ai_path.c``) against ``Outbound.push_pcm``, the Python it transliterates.

Two ``Outbound``s on the same settings, each on its own fake clock and sink and with its pacer task running, one
fed through the compiled path and one through ``push_pcm``, get the same operations; after each, both must have
sent the same messages in the same order and hold the same state, every attribute of every object in the chain
(floats compared bit for bit). The sink is a recording one, or a real ``TwilioLeg`` on a real ``StreamSocket``
over a transport that records its frames (the path builds that leg's media messages itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telephony_bridge.audio import kernels
from telephony_bridge.audio.comfort import ComfortFill
from telephony_bridge.clock import FakeClock
from telephony_bridge.errors import CallerGone
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.outbound import AiAudioPath, Outbound
from telephony_bridge.settings import AudioSettings, TwilioSettings
from telephony_bridge.twilio.leg import TwilioLeg
from telephony_bridge.twilio.stream_socket import StreamSocket
from tests.support import instance_state, require_built


@pytest.fixture(autouse=True)
def built() -> None:
    require_built("telephony_bridge._ai_path", AiAudioPath is not None and kernels.EXTENSION is not None)


STREAM_SID = "MZ00000000000000000000000000000001"
STEP_S = 0.005
CALM_S = 1.0  # a grown prebuffer shrinks after this long without an underrun (10 s by default: longer than a test)
SETTINGS = [
    AudioSettings(),
    AudioSettings(outbound_batch_ms=20, adaptive_prebuffer=False, mark_interval_ms=100, playout_prebuffer_ms=40),
    AudioSettings(outbound_batch_ms=60, playout_prebuffer_ms=100, max_ai_ahead_s=1),
    AudioSettings(playout_prebuffer_ms=0, outbound_lead_ms=60, mark_interval_ms=40),
    # A prebuffer over the lead (the low water is then the lead's), and not in whole frames (rounded up).
    AudioSettings(playout_prebuffer_ms=150, outbound_lead_ms=100, outbound_batch_ms=40),
]


class RecordingSink:
    """A caller leg's sending half: every message in order; audio taken synchronously only while ``takes_now``;
    every send raises once ``broken``."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.takes_now = True
        self.broken = False

    def _record(self, *message: Any) -> None:
        if self.broken:
            raise RuntimeError("the leg is gone")
        self.sent.append(message)

    async def send_audio(self, ulaw: bytes) -> None:
        self._record("audio", ulaw)

    def can_send_now(self) -> bool:
        return self.takes_now

    def send_audio_nowait(self, ulaw: bytes) -> None:
        self._record("nowait", ulaw)

    async def send_mark(self, name: str) -> None:
        self._record("mark", name)

    async def clear(self) -> None:
        self._record("clear")


class Wire:
    """picows' transport as ``StreamSocket`` uses it: the frames it sends, in order; raises once ``broken``."""

    is_close_frame_sent = False

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.broken = False

    def send(self, _kind: object, data: bytes) -> None:
        if self.broken:
            raise ConnectionResetError("the caller's connection reset")
        self.sent.append(bytes(data))


class Side:
    """One ``Outbound`` with its clock, sink, pacer task and handler (compiled or not)."""

    def __init__(self, audio: AudioSettings, twilio: bool, compiled: bool) -> None:
        self.clock = FakeClock()
        if twilio:
            self.wire = Wire()
            self.socket = StreamSocket(lambda _socket: None)
            self.socket.on_ws_connected(self.wire)
            leg = TwilioLeg(self.socket, TwilioSettings(), Metrics(), self.clock)
            leg.stream_id = STREAM_SID
            self.sink: Any = leg
            self.sent: list[Any] = self.wire.sent
        else:
            self.sink = RecordingSink()
            self.sent = self.sink.sent
        self.outbound = Outbound(audio, self.clock, self.sink)
        self.outbound.prebuffer.calm_s = CALM_S
        self.handler = self.outbound.audio_handler(compiled=compiled)
        self.tasks = [asyncio.create_task(self.outbound.run())]
        self.raised: list[str] = []

    def takes_now(self, yes: bool) -> None:
        if isinstance(self.sink, RecordingSink):
            self.sink.takes_now = yes
        elif yes:
            self.socket.resume_writing()
        else:
            self.socket.pause_writing()

    def break_sink(self) -> None:
        if isinstance(self.sink, RecordingSink):
            self.sink.broken = True
        else:
            self.wire.broken = True

    def push(self, pcm: bytes) -> None:
        try:
            self.handler(pcm)
        except Exception as exc:  # what DirectAudio would hand to ``receive``
            cause = exc.__cause__
            self.raised.append(f"{type(exc).__name__}: {exc} from {type(cause).__name__}: {cause}")

    def ended(self) -> list[str]:
        """How the tasks that have ended ended."""
        return [repr(t.exception()) if not t.cancelled() else "cancelled" for t in self.tasks if t.done()]


def plain(value: Any, seen: frozenset[int] = frozenset()) -> Any:
    """``value`` as comparable data: every attribute of every object, recursively; floats by their bits; futures,
    timers and callbacks by what they say, not by identity."""
    if isinstance(value, bool | int | str | None):
        return value
    if isinstance(value, float):
        return ("float", value.hex())
    if isinstance(value, bytes | bytearray):
        return (type(value).__name__, bytes(value))
    if isinstance(value, list | tuple):
        return [plain(v, seen) for v in value]
    if isinstance(value, set):
        return sorted(plain(v, seen) for v in value)
    if isinstance(value, dict):
        return {k: plain(v, seen) for k, v in value.items()}
    if isinstance(value, asyncio.Future):
        return ("future", value.done())
    if isinstance(value, asyncio.Handle):
        return ("handle", value.cancelled())
    if callable(value) and hasattr(value, "__name__"):
        return ("callable", value.__name__)
    if isinstance(value, np.ndarray):
        return ("array", value.tobytes())
    if isinstance(value, ModuleType):
        return ("module", value.__name__)
    if id(value) in seen or isinstance(value, FakeClock | RecordingSink | TwilioLeg):
        return ("ref", type(value).__name__)
    seen = seen | {id(value)}
    return (type(value).__name__, {n: plain(v, seen) for n, v in instance_state(value).items()})


def pcm_chunk(size: int, loudness: int, seed: int) -> bytes:
    """``size`` bytes of the AI's 16 kHz PCM: a tone under noise at ``loudness`` (0: digital silence)."""
    rng = np.random.default_rng(seed)
    t = np.arange((size + 1) // 2)
    samples = loudness * np.sin(2 * np.pi * 440 * t / 16000) + rng.normal(0, loudness / 8 + 1e-9, len(t))
    return np.clip(np.round(samples), -32768, 32767).astype("<i2").tobytes()[:size]


OPERATIONS = st.one_of(
    # The AI's frames: mostly 20 ms ones, some ragged (odd, empty), the odd burst of a second.
    st.tuples(
        st.just("pcm"),
        st.one_of(st.just(640), st.just(640), st.just(1280), st.integers(0, 1300), st.integers(20000, 40000)),
        st.sampled_from([0, 100, 3000, 20000]),
        st.integers(0, 2**16),
    ),
    st.tuples(st.just("advance"), st.sampled_from([0.0, 0.001, 0.005, 0.02, 0.02, 0.02, 0.04, 0.1, 0.3, 1.0])),
    st.tuples(st.just("takes_now"), st.booleans()),
    # "barge": a barge-in that ends, and a frame that comes, before the pacer has sent its clear.
    st.tuples(st.sampled_from(["interrupt", "resume", "barge", "echo", "fill", "no_fill", "finish", "break"])),
)
# A real-time AI: frames of 10 to 60 ms, each its length after the last, give or take some jitter.
TALK = st.tuples(st.just("talk"), st.integers(5, 120), st.sampled_from([10, 20, 20, 20, 40, 60]), st.integers(0, 2**16))
SCENARIOS = st.lists(st.one_of(TALK, TALK, OPERATIONS), max_size=20)


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def apply(sides: list[Side], op: tuple[Any, ...]) -> None:
    """One operation on both sides alike."""
    kind = op[0]
    if kind == "talk":
        _, frames, frame_ms, seed = op
        rng = random.Random(seed)
        for i in range(frames):
            await apply(sides, ("pcm", frame_ms * 32, rng.choice([100, 3000, 3000]), seed + i))
            jitter_s = rng.choice([0.0, 0.0, 0.0, -0.005, 0.005, 0.015, 0.04])
            await apply(sides, ("advance", max(0.0, frame_ms / 1000 + jitter_s)))
        return
    for side in sides:
        out = side.outbound
        if kind == "pcm":
            side.push(pcm_chunk(op[1], op[2], op[3]))
        elif kind == "takes_now":
            side.takes_now(op[1])
        elif kind == "interrupt":
            out.interrupt()
        elif kind == "resume":
            out.resume()
        elif kind == "barge":
            out.interrupt()
            out.resume()
            side.push(pcm_chunk(640, 3000, 0))  # ``_clear_pending`` and no hold: the pacer's, not inline
        elif kind == "echo" and out.playback._pending:
            out.mark_echoed(next(iter(out.playback._pending)))
        elif kind == "fill":
            out.fill(ComfortFill(noise=True, seed=7))
        elif kind == "no_fill":
            out.fill(None)
        elif kind == "finish" and len(side.tasks) == 1:
            side.tasks.append(asyncio.create_task(out.finish(0.5)))
        elif kind == "break":
            side.break_sink()
    if kind == "advance":
        remaining = op[1]
        while remaining > 1e-12:
            step = min(STEP_S, remaining)
            for side in sides:
                side.clock.advance(step)
            remaining -= step
            await settle()
    await settle()


def assert_alike(compiled: Side, python: Side) -> None:
    assert compiled.sent == python.sent
    assert compiled.raised == python.raised
    assert compiled.ended() == python.ended()
    assert plain(compiled.outbound) == plain(python.outbound)
    if isinstance(compiled.sink, TwilioLeg):
        assert compiled.sink._open == python.sink._open


async def run_both(audio: AudioSettings, twilio: bool, ops: list[tuple[Any, ...]]) -> Side:
    """Both paths through ``ops``, compared after each; the compiled side, for its counts."""
    compiled, python = Side(audio, twilio, compiled=True), Side(audio, twilio, compiled=False)
    assert type(compiled.handler).__name__ == "AiAudioPath" and python.handler == python.outbound.push_pcm
    try:
        await settle()
        for op in ops:
            await apply([compiled, python], op)
            assert_alike(compiled, python)
        await apply([compiled, python], ("advance", 1.0))  # whatever is queued goes out, marks and all
        assert_alike(compiled, python)
    finally:
        for task in compiled.tasks + python.tasks:
            task.cancel()
        for task in compiled.tasks + python.tasks:
            with contextlib.suppress(BaseException):
                await task
    return compiled


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(audio=st.sampled_from(SETTINGS), twilio=st.booleans(), ops=SCENARIOS)
def test_ai_path_sends_and_leaves_everything_as_push_pcm_does(
    audio: AudioSettings, twilio: bool, ops: list[tuple[Any, ...]]
) -> None:
    asyncio.run(asyncio.wait_for(run_both(audio, twilio, ops), 60))


def real_time_speech(frames: int, seed: int = 3) -> Iterator[tuple[str, Any]]:
    """A real-time AI: talk spurts of 20 ms frames with pauses, the odd ragged chunk and barge-in."""
    rng = random.Random(seed)
    for i in range(frames):
        yield ("pcm", 640 if rng.random() > 0.02 else rng.randrange(1, 1300), 3000, i)
        yield ("advance", 0.02)
        if rng.random() < 0.02:
            yield ("advance", rng.choice([0.1, 0.5]))
        if rng.random() < 0.005:
            yield ("interrupt",)
            yield ("resume",)


@pytest.mark.parametrize("twilio", [True, False], ids=["twilio-leg", "other-sink"])
@pytest.mark.parametrize("audio", SETTINGS[:2], ids=["defaults", "unbatched"])
async def test_ai_path_takes_a_real_time_ais_frames_itself(audio: AudioSettings, twilio: bool) -> None:
    """The common case is the compiled path's, not ``push_pcm``'s: nearly every frame, and most messages."""
    async with asyncio.timeout(60):
        compiled = await run_both(audio, twilio, list(real_time_speech(600)))
    path: Any = compiled.handler
    assert path.calls == 600
    assert path.fast >= 0.97 * path.calls
    messages = len(compiled.sent) if twilio else sum(kind in ("audio", "nowait") for kind, *_ in compiled.sent)
    assert path.sent >= 0.6 * messages > 0


async def test_ai_path_builds_a_twilio_legs_media_messages_itself_and_only_for_a_leg_that_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A leg class with ``compiled_media_messages`` (TwilioLeg) has its messages built and sent in C, without its
    ``send_audio_nowait``; without the flag, the leg's own method sends them. (The Python side of ``run_both``
    calls the method the same number of times either way.)"""
    assert TwilioLeg.compiled_media_messages  # the leg the bridge runs says so
    calls = 0
    send = TwilioLeg.send_audio_nowait

    def counted(self: TwilioLeg, ulaw: bytes) -> None:
        nonlocal calls
        calls += 1
        send(self, ulaw)

    monkeypatch.setattr(TwilioLeg, "send_audio_nowait", counted)
    sent = []
    for flagged in (True, False):
        monkeypatch.setattr(TwilioLeg, "compiled_media_messages", flagged)
        calls = 0
        async with asyncio.timeout(60):
            compiled = await run_both(SETTINGS[0], True, list(real_time_speech(200)))
        path: Any = compiled.handler
        assert path.sent > 100
        sent.append(calls)
    assert sent[1] - sent[0] > 100  # the compiled side's own sends went through the method only unflagged


async def test_ai_path_a_send_that_fails_raises_caller_gone_from_its_cause() -> None:
    """The TwilioLeg's own except clause, as the Python path raises it: the stream marked closed."""
    side = Side(AudioSettings(playout_prebuffer_ms=0), twilio=True, compiled=True)
    try:
        await settle()
        for i in range(3):
            side.push(pcm_chunk(640, 3000, i))
            await apply([side], ("advance", 0.02))
        side.wire.broken = True
        with pytest.raises(CallerGone) as raised:
            side.handler(pcm_chunk(640, 3000, 9))
        assert isinstance(raised.value.__cause__, ConnectionResetError) and raised.value.__suppress_context__
        assert side.sink._open is False
    finally:
        side.tasks[0].cancel()
        with contextlib.suppress(BaseException):
            await side.tasks[0]


def test_ai_path_is_push_pcm_where_the_kernels_are_numpy() -> None:
    outbound = Outbound(AudioSettings(kernels="numpy"), FakeClock(), RecordingSink())
    handler: Callable[[bytes], None] = outbound.audio_handler()
    assert handler == outbound.push_pcm
    with pytest.raises(ValueError, match="compiled AI audio path"):
        outbound.audio_handler(compiled=True)


@pytest.mark.parametrize("spoilt", ["resized", "unconfigured"])
async def test_ai_path_leaves_a_spoilt_downsampler_to_the_kernels_check(spoilt: str) -> None:
    """A downsampler state of another size (nothing resizes it), or kernels whose tables were refused
    (configure() again): the Python path's down_ulaw raises, and so must the compiled path, rather than read and
    write past the state's end or go on with the old tables."""
    audio = SETTINGS[1]  # a real-time AI's frames go out inline from the third on
    sides = [Side(audio, twilio=False, compiled=c) for c in (True, False)]
    assert kernels.EXTENSION is not None
    try:
        await settle()
        for i in range(3):
            await apply(sides, ("pcm", 640, 3000, i))
            await apply(sides, ("advance", 0.02))
        if spoilt == "resized":
            for side in sides:
                side.outbound._buffer._to_caller._downsampler._state.clear()
        else:
            with pytest.raises(ValueError):
                kernels.EXTENSION.configure(bytes(8 * 38), bytes(range(8)) * 38, bytes(512), bytes(65536))
        try:
            await apply(sides, ("pcm", 640, 3000, 9))
        finally:
            assert kernels._import_extension()[0] is not None  # configured again, for the tests that follow
        expected = "ValueError: expected a 151-byte" if spoilt == "resized" else "RuntimeError: telephony_bridge"
        assert [r.startswith(expected) for r in sides[1].raised] == [True]  # the Python path's
        assert sides[0].raised == sides[1].raised
    finally:
        for side in sides:
            side.tasks[0].cancel()
            with contextlib.suppress(BaseException):
                await side.tasks[0]
