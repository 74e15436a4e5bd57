"""bench/lean_callers.py and bench/lean_wire.py: the messages as bytes, the reader of the bridge's messages (as
strict as the full callers'), the same scripted calls placed by the full and the lean callers with the same
figures, and a few lean calls against the real bridge and the emulator's echo voice."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from types import ModuleType

import numpy as np
import pytest
from picows import WSMsgType
from picows.picows import _make_test_ws_frame

from telephony_bridge.audio.codec import FRAME_S
from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.caller import CallConfig, CallResult, run_call
from telephony_bridge.tools.loadtest import run_load
from telephony_bridge.tools.round_trips import RoundTrips
from telephony_bridge.tools.twilio_playout import Playout
from telephony_bridge.twilio.outbound_messages import (
    MediaMessages,
    OutClear,
    OutMark,
    OutMedia,
    clear_message,
    mark_message,
    parse_outbound,
)
from telephony_bridge.twilio.protocol import Malformed, Mark, Media, Stop
from tests.scripted_bridge import ScriptedBridge, noise, served
from tests.support import AUTH_TOKEN, BENCH, PUBLIC_URL, SPEECH_WAV, bridge_settings, frames_a_stall_cost

sys.path.insert(0, str(BENCH))
import capacity  # bench/ is no package: imported from its folder
import cython_build
import lean_callers
import lean_wire

pytestmark = pytest.mark.timeout(30)

SID = "MZ" + "0" * 32
CALLERS = ["full", "lean", "compiled"]


def test_lean_media_message_is_twilios_media_message_from_a_template() -> None:
    template = lean_wire.media_template(SID)
    payload = bytes(range(160))
    encoded = base64.b64encode(payload)
    assert template % (7, 3, 40, encoded) == (
        b'{"event":"media","sequenceNumber":"7","media":{"track":"inbound","chunk":"3","timestamp":"40",'
        b'"payload":"' + encoded + b'"},"streamSid":"' + SID.encode() + b'"}'
    )
    assert template % (7, 3, 40, encoded) == Media(SID, payload, 40, 3, 7).to_json().encode()


def test_lean_mark_echo_is_twilios_mark_message() -> None:
    assert lean_wire.mark_template(SID) % (12, b'"m-1"') == (
        b'{"event":"mark","sequenceNumber":"12","streamSid":"' + SID.encode() + b'","mark":{"name":"m-1"}}'
    )


def test_lean_frames_are_the_speech_in_20ms_base64_frames_padded_with_silence() -> None:
    audio = np.full(170, 4000, dtype=np.int16)  # one whole frame and 10 samples
    frames = lean_wire.encode_frames(audio)
    decoded = [base64.b64decode(frame) for frame in frames]
    assert [len(d) for d in decoded] == [160, 160]
    assert decoded[1][10:] == b"\xff" * 150 and lean_wire.audible(decoded[1]) and lean_wire.audible(decoded[0])
    assert not lean_wire.audible(base64.b64decode(lean_wire.SILENCE_B64))
    assert lean_wire.encode_frames(None) == []


def test_lean_reader_reads_media_marks_and_clears_and_counts_anything_else_as_a_violation() -> None:
    read = lean_wire.read_outbound
    media = b'{"event":"media","streamSid":"' + SID.encode() + b'","media":{"payload":"AAEC"}}'
    assert read(media, SID) == OutMedia(b"\x00\x01\x02")
    assert read(mark_message(SID, "m-1").encode(), SID) == OutMark("m-1")
    assert read(clear_message(SID).encode(), SID) == OutClear()
    assert "'start'" in read(b'{"event":"start","streamSid":"' + SID.encode() + b'"}', SID).reason  # type: ignore[union-attr]


def _message(event: str, **fields: object) -> str:
    return json.dumps({"event": event, "streamSid": SID, **fields})


OUTBOUND = [
    _message("media", media={"payload": "AAEC"}),
    _message("media", media={"payload": ""}),
    _message("media", media={"payload": "AAEC", "track": "outbound"}),  # an extra field (G3)
    _message("media", media={"payload": "AAEC"}, sequenceNumber="3"),
    _message("media", media={"payload": "not base64!"}),
    _message("media", media={"payload": "AAE"}),
    _message("media", media={"payload": None}),
    _message("media"),
    _message("mark", mark={"name": "m-1"}),
    _message("mark", mark={"name": 5}),
    _message("mark", mark={"name": "m-1", "extra": 1}),
    _message("mark", mark={}),
    _message("clear"),
    _message("clear", extra=1),
    json.dumps({"event": "clear", "streamSid": "MZother"}),
    json.dumps({"event": "clear"}),
    _message("start"),
    json.dumps({"streamSid": SID, "media": {"payload": "AAEC"}, "event": "media"}),  # the event last
    "[1, 2]",
    "not json",
]


@pytest.mark.parametrize("text", OUTBOUND, ids=[str(i) for i in range(len(OUTBOUND))])
def test_lean_reader_reads_the_bridges_messages_as_the_full_callers_strict_reader_does(text: str) -> None:
    """A message the full callers count as a violation the lean ones count too, or the bridge would look better."""
    lean, full = lean_wire.read_outbound(text.encode(), SID), parse_outbound(text, SID)
    assert type(lean) is type(full)
    assert isinstance(full, Malformed) or lean == full


# --- the same scripted calls, placed by the full callers and by the lean ones: the same figures ------------------


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedBridge]:
    with served() as fake:
        yield fake


async def _call(callers: str, config: CallConfig) -> tuple[CallResult, int]:
    """One call by ``callers``: ``full`` (``tools.caller``), ``lean`` or ``compiled`` (a beat of its own in this
    test's loop); and at most how many frames of the call's tail a stall of that beat cost it
    (``tests.support.frames_a_stall_cost``; the lean beat keeps only its stalls' times and the worst's length)."""
    lean = capacity.lean_runner(callers)
    async with asyncio.timeout(5):
        if lean is None:
            result = await run_call(config)
            return result, frames_a_stall_cost(result)
        result = await lean.run_call(config)
        stalls = lean.stalls
        return result, len(stalls.at) * math.ceil(stalls.worst_s / FRAME_S)


@pytest.mark.parametrize("callers", CALLERS)
async def test_callers_number_every_message_echo_marks_once_played_and_count_what_they_heard(
    scripted: ScriptedBridge, callers: str
) -> None:
    began = time.monotonic()
    # 0.8 s of call after the noise: its echo is heard whole even after a stall of the beat (``_call``)
    result, lost = await _call(callers, CallConfig(scripted.url("echo"), audio_in=noise(0.4), seconds=1.2))
    assert (result.ended_by, result.close_code, result.violations, result.media_sent) == ("caller", 1000, [], 60)
    assert (result.heard_s, result.clears) == (pytest.approx(0.4), 0)
    # where capacity.py places its holes: on time.monotonic, each when playback resumed, within the call
    assert result.started_at is not None and began <= result.started_at <= time.monotonic()
    assert len(result.underrun_ends_s) == result.underruns
    assert all(0 < t <= result.duration_s for t in result.underrun_ends_s)
    # Each echo is played at the tick after it came and its mark echoed at the next: the last frame's is cut off,
    # and as many more as a stall of the beat cost the tail.
    assert len(result.marks_echoed) >= 57 - lost, result.summary()
    assert result.marks_echoed == [f"m{i + 1}" for i in range(len(result.marks_echoed))]
    assert len(result.round_trips_s) >= 57 - lost and all(0 < t < 0.5 for t in result.round_trips_s)
    assert result.heard_round_trips_s and all(
        t >= 0.02 and abs(t / 0.02 - round(t / 0.02)) < 1e-9 for t in result.heard_round_trips_s
    )  # on the beat
    assert result.first_audio_s is not None and result.first_heard_s is not None
    assert 0 < result.first_audio_s <= result.first_heard_s < 0.5
    events = await scripted.events_of(result.call_sid)
    numbered = events[1:]  # after ``connected``
    assert [e.sequence_number for e in numbered] == list(range(1, len(numbered) + 1))  # type: ignore[union-attr]
    media = [e for e in numbered if isinstance(e, Media)]
    assert [(m.chunk, m.timestamp_ms, len(m.payload)) for m in media] == [(i + 1, 20 * i, 160) for i in range(60)]
    assert [e.name for e in numbered if isinstance(e, Mark)] == result.marks_echoed
    assert isinstance(numbered[-1], Stop)


@pytest.mark.parametrize("callers", CALLERS)
async def test_callers_count_a_clear_date_round_trips_only_before_it_and_echo_its_marks(
    scripted: ScriptedBridge, callers: str
) -> None:
    result, _ = await _call(callers, CallConfig(scripted.url("clear"), audio_in=noise(0.4), seconds=0.3))
    assert (result.clears, len(result.round_trips_s), result.violations) == (1, 5, [])
    assert result.marks_echoed[:5] == ["m1", "m2", "m3", "m4", "m5"]  # m5 at the latest when the clear came


@pytest.mark.parametrize("callers", CALLERS)
async def test_callers_count_a_media_message_with_an_extra_field_as_a_violation(
    scripted: ScriptedBridge, callers: str
) -> None:
    # 0.8 s of call after the audio: slack for a stall of the callers' beat (``_call``)
    result, _ = await _call(callers, CallConfig(scripted.url("malformed"), audio_in=noise(0.2), seconds=1.0))
    assert len(result.violations) == 1 and "31951" in result.violations[0]
    assert result.heard_s == pytest.approx(0.18)  # the malformed first frame was never played


@pytest.mark.parametrize("callers", CALLERS)
async def test_callers_see_the_bridge_end_the_call_and_send_no_stop(scripted: ScriptedBridge, callers: str) -> None:
    result, lost = await _call(callers, CallConfig(scripted.url("hangup"), audio_in=noise(1.0), seconds=3.0))
    assert (result.ended_by, result.close_code, result.violations) == ("bridge", 1000, [])
    # ended early by the bridge (the call is 3 s), unless a stall of the caller's beat sent a burst first
    assert result.media_sent >= 5
    assert (result.media_sent < 20 and result.duration_s < 1.0) or lost, result.summary()
    assert not any(isinstance(e, Stop) for e in await scripted.events_of(result.call_sid))


# --- lean calls through the real bridge -----------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [False, True], ids=["lean", "compiled"])
async def test_lean_calls_are_served_and_hear_their_own_speech_echoed(bridge: ServerThread, compiled: bool) -> None:
    callers = lean_callers.LeanCallers(compiled=compiled)
    async with asyncio.timeout(20):
        url = bridge.ws_url + "/media-stream"
        result = await run_load(
            url, 3, 3, 2.0, 0.2, AUTH_TOKEN, PUBLIC_URL, SPEECH_WAV, deadline_s=15, run_stream=callers.run_call
        )
    reasons = [flow.reason for flow in result.flows]
    assert (len(result.of("served")), len(result.of("failed")), result.violations) == (3, 0, 0), reasons
    assert len(result.first_audio_s) == 3
    # No hole, unless this process's beat stalled: the callers' audio then went out late, and the echo says it back
    # late, holes that are the load's (here the bridge, the emulator and the callers share one process and its
    # GIL, on a CI machine running other tests beside it: in two of the 15 fresh-clone CI runs of 7 Dec).
    assert result.underruns == 0 or callers.stalls.at, f"{result.underruns} holes with no stall of the callers' beat"
    calls = [flow.call for flow in result.flows if flow.call is not None]
    assert all(call.ended_by == "caller" and call.close_code == 1000 for call in calls)
    assert all(call.media_sent == 100 and call.heard_s > 0 for call in calls)
    # The emulator's echo says each frame back 0.2 s after it heard it: no round trip is quicker than that.
    assert result.round_trips_s and 0.2 <= result.round_trips_s[0] <= result.round_trips_s[-1] < 1.0
    heard = sorted(t for call in calls for t in call.heard_round_trips_s)
    assert heard and heard[0] >= 0.2 and all(abs(t / 0.02 - round(t / 0.02)) < 1e-9 for t in heard)


@pytest.mark.parametrize("callers", ["lean", "compiled"])
def test_capacity_load_part_places_lean_calls_when_asked(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread], callers: str
) -> None:
    settings = {"server.public_url": capacity.PUBLIC_URL, "twilio.auth_token": capacity.AUTH_TOKEN}
    bridge = start_bridge(bridge_settings(emulator, **settings))
    result, stalls = capacity._load_part(bridge.ws_url + "/media-stream", 2, 1.0, time.monotonic(), callers)
    assert (len(result.of("served")), result.violations) == (2, 0), [flow.reason for flow in result.flows]
    assert all(flow.call is not None and flow.call.media_sent == 50 for flow in result.flows)
    assert isinstance(stalls, lean_callers.Stalls)  # the beat's stalls travel back (how many is the machine's business)


async def test_beat_records_each_stall_once_when_it_ticked_more_than_a_frame_late() -> None:
    """A tick that blocks the process's loop for 60 ms makes the ticks of every phase due meanwhile late (some
    40 of them, one a millisecond): the stall is recorded once, on ``time.monotonic``, just after the block."""

    class Call:
        def __init__(self, blocks: bool) -> None:
            self.blocks = blocks
            self.ticks = 0
            self.done = asyncio.Event()

        def tick(self, due: float, now: float) -> bool:
            self.ticks += 1
            if self.blocks and self.ticks == 3:
                blocked_at.append(time.monotonic())
                time.sleep(0.06)
            if self.ticks == 10:
                self.done.set()
            return self.ticks < 10

    blocked_at: list[float] = []
    beat = lean_callers.Beat(phases=20)
    calls = [Call(blocks=i == 0) for i in range(20)]  # one on each phase
    for call in calls:
        beat.add(call)
    async with asyncio.timeout(5):
        await asyncio.gather(*(call.done.wait() for call in calls))
    # Only just after the block: a loaded machine may stall the beat at other times too.
    stall = [t for t in beat.late_at if blocked_at[0] < t < blocked_at[0] + 0.1]
    assert len(stall) == 1, beat.late_at
    assert stall[0] > blocked_at[0] + 0.02  # the first tick that ran late came after the block
    assert beat.worst_late_s > 0.03


# --- the compiled calls' C models against the Python ones ------------------------------------------------------

PLAYOUT_COUNTERS = [
    "buffered_bytes",
    "max_buffered_bytes",
    "bytes_received",
    "bytes_played",
    "bytes_cleared",
    "marks_received",
    "marks_echoed",
    "clears",
    "underruns",
    "underrun_bytes",
    "underrun_ends_ms",
    "underrun_ms",
    "max_lead_ms",
]


@pytest.fixture(scope="module")
def compiled() -> ModuleType:
    return cython_build.load(lean_callers.BENCH / "lean_callers_c.pyx")


@pytest.mark.parametrize("seed", range(40))
def test_compiled_playout_and_round_trips_follow_the_python_models_step_for_step(
    compiled: ModuleType, seed: int
) -> None:
    """Random media, marks, clears and ticks (whole, part and empty frames) into both: the same sound and marks
    out of every tick, the same counters after every step."""
    rng = random.Random(seed)
    model, c = Playout(), compiled.Playout()
    model_trips, c_trips = RoundTrips(model), compiled.RoundTrips(c)
    beat = 0
    for step in range(rng.randint(50, 400)):
        choice = rng.random()
        if choice < 0.35:
            size = rng.choice([0, 1, 7, 80, 160, 160, 320, 480])
            payload = bytes(rng.choice([0xFF, 0x7F, 0x80, 0x10, 0x00]) for _ in range(size))
            at = rng.random()
            model_trips.received(payload, at)
            c_trips.received(payload, at)
            model.push_media(payload)
            c.push_media(payload)
        elif choice < 0.5:
            assert c.push_mark(f"m{step}") == model.push_mark(f"m{step}")
        elif choice < 0.53:
            assert c.clear() == model.clear()
        else:
            n_bytes = rng.choice([160, 160, 160, 80, 0])
            assert c.tick(n_bytes) == model.tick(n_bytes), step
            model_trips.played(beat)
            c_trips.played(beat)
            beat += 1
            if rng.random() < 0.9:
                sent = rng.random()
                model_trips.sent_at.append(sent)
                c_trips.sent_at.append(sent)
        assert {k: getattr(c, k) for k in PLAYOUT_COUNTERS} == {k: getattr(model, k) for k in PLAYOUT_COUNTERS}
        assert (c_trips.sent_at, c_trips.arrivals_s, c_trips.heard_s) == (
            model_trips.sent_at,
            model_trips.arrivals_s,
            model_trips.heard_s,
        )


OUR_MEDIA = [MediaMessages(SID).encode(payload) for payload in (b"\x00\x01\x02", b"", b"\xff" * 160, bytes(range(160)))]
BRIDGE_MEDIA = [
    *OUR_MEDIA,
    *(
        MediaMessages(SID)._head + payload + b'"}}'
        for payload in (b"AB==", b"AAE", b"====", b"AA==AA==", b"not base64!", b"QQ", b"A===", b"AA\\u0041")
    ),
    # padding after a whole quad: binascii's strict mode takes it on 3.11, msgspec does not
    *(MediaMessages(SID)._head + payload + b'"}}' for payload in (b"AAAA=", b"AAAA==", b"AAAAAAAA=", b"AAAA====")),
    MediaMessages("MZother").encode(b"\x00\x01\x02"),
    MediaMessages("MZ" + "1" * 32).encode(b"\x00\x01\x02"),  # another stream's, as long as this one's
    MediaMessages(SID).encode(b"\x00\x01\x02")[:-1],
    MediaMessages(SID).encode(b"\x00\x01\x02") + b" ",
    *(text.encode() for text in OUTBOUND),
]


async def test_compiled_calls_read_the_bridges_messages_as_the_lean_calls_do() -> None:
    """Each message (the bridge's own shape, which the compiled call reads in C, with good and bad payloads, and
    every other) into a lean and a compiled call: the same audio queued, marks, clears and violations."""
    beat = lean_callers.Beat()
    config = CallConfig("ws://127.0.0.1:9/media-stream", stream_sid=SID)
    calls = [lean_callers.LeanCall(config, [], beat), lean_callers.compiled_call_class()(config, [], beat)]
    for call in calls:
        call._started_at = time.monotonic()
    to_python: list[bytes] = []  # what the compiled call left to Python
    receive = calls[1]._receive

    def spy(data: bytes) -> None:
        to_python.append(data)
        receive(data)

    calls[1]._receive = spy
    for text in BRIDGE_MEDIA:
        frame = _make_test_ws_frame(WSMsgType.TEXT, text, True, False)
        for call in calls:
            call.on_ws_frame(None, frame)
        lean, c = calls
        assert {k: getattr(c._playout, k) for k in PLAYOUT_COUNTERS} == {
            k: getattr(lean._playout, k) for k in PLAYOUT_COUNTERS
        }, text
        assert (c._violations, c._first_audio_s is None) == (lean._violations, lean._first_audio_s is None), text
    assert 0 < calls[1]._playout.bytes_received == calls[0]._playout.bytes_received
    assert not set(OUR_MEDIA) & set(to_python)  # the bridge's own media messages were read in C
