"""Property-based fuzzing: the Twilio parser on any input, and whole random message streams against a running
bridge (real uvicorn, real emulator) while a witness call goes on.

For the parser: it never raises and always returns one of its event values. For the running app: whatever a
stream sends (garbage, wrong types, events out of order, binary frames, huge or negative timestamps, a stop
in the middle, a valid ``start`` from a real webhook or a forged one), nothing is logged at ERROR (no
unhandled exception, no "internal error"), every slot the stream took comes back, and the witness call hears
the AI without a break.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from telephony_bridge.app import create_app
from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.caller import CallResult, new_sid, run_call
from telephony_bridge.tools.emulator import EmulatorConfig, create_emulator_app
from telephony_bridge.twilio import protocol as tw
from tests.support import bridge_settings, call_form, post_voice, signed_call, stream_parameters, upgrade_signature

EVENT_TYPES = (tw.Connected, tw.Start, tw.Media, tw.Dtmf, tw.Mark, tw.Stop, tw.Unknown, tw.Malformed)
EVENTS = ["connected", "start", "media", "dtmf", "mark", "stop", "clear", "bogus", ""]

# JSON as anyone may write it (stdlib json: integers of any size, which Twilio never sends but a peer may)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
numbers = st.one_of(st.integers(-(2**40), 2**40), st.integers(-(2**40), 2**40).map(str), json_values)
payloads = st.one_of(
    st.binary(max_size=400).map(lambda b: base64.b64encode(b).decode()),
    st.text(max_size=40),
    json_values,
)


def message(stream_sid: str) -> st.SearchStrategy[dict[str, Any]]:
    """Twilio-shaped messages whose fields may hold anything."""
    sids = st.one_of(st.just(stream_sid), st.text(max_size=40), json_values)
    media = st.fixed_dictionaries(
        {"payload": payloads},
        optional={"timestamp": numbers, "chunk": numbers, "track": st.sampled_from(["inbound", "outbound", ""])},
    )
    return st.one_of(
        st.fixed_dictionaries({"event": st.just("media"), "streamSid": sids, "media": media}),
        st.fixed_dictionaries(
            {"event": st.sampled_from(EVENTS), "streamSid": sids},
            optional={
                "sequenceNumber": numbers,
                "mark": st.one_of(st.fixed_dictionaries({"name": st.text(max_size=20)}), json_values),
                "dtmf": st.one_of(st.fixed_dictionaries({"digit": st.text(max_size=2)}), json_values),
                "stop": json_values,
                "start": json_values,
                "media": json_values,
            },
        ),
        st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    )


def frames(stream_sid: str) -> st.SearchStrategy[list[str | bytes]]:
    """One stream's frames: mostly Twilio-shaped JSON, some garbage text, some binary frames."""
    frame = st.one_of(
        message(stream_sid).map(lambda m: json.dumps(m)),
        json_values.map(lambda v: json.dumps(v)),
        st.text(max_size=60),
        st.binary(max_size=200),
    )
    return st.lists(frame, max_size=25)


# --- the parser ---------------------------------------------------------------------------------------------


@given(st.one_of(st.text(), st.binary()))
def test_parse_message_never_raises_on_any_text_or_bytes(text: str | bytes) -> None:
    assert isinstance(tw.parse_message(text), EVENT_TYPES)


@given(message("MZ" + "0" * 32))
def test_parse_message_never_raises_on_twilio_shaped_garbage(msg: dict[str, Any]) -> None:
    event = tw.parse_message(json.dumps(msg))
    assert isinstance(event, EVENT_TYPES)
    if isinstance(event, tw.Media):
        assert isinstance(event.payload, bytes) and isinstance(event.stream_sid, str)
        assert event.timestamp_ms is None or isinstance(event.timestamp_ms, int)


@given(st.binary(max_size=400), st.integers(0, 2**31), st.integers(0, 2**31), st.integers(0, 2**31))
def test_media_round_trips(payload: bytes, timestamp_ms: int, chunk: int, sequence_number: int) -> None:
    event = tw.Media(
        stream_sid="MZ" + "1" * 32,
        payload=payload,
        timestamp_ms=timestamp_ms,
        chunk=chunk,
        sequence_number=sequence_number,
    )
    assert tw.parse_message(event.to_json()) == event


# --- whole streams against a running bridge -----------------------------------------------------------------


class ErrorRecords(logging.Handler):
    """Every record at ERROR or above, from any logger of this process (the servers run in threads here)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Stage:
    bridge: ServerThread
    emulator: ServerThread
    errors: ErrorRecords


@pytest.fixture(scope="module")
def stage() -> Iterator[Stage]:
    errors = ErrorRecords()
    root = logging.getLogger()
    root.addHandler(errors)
    emulator = ServerThread(create_emulator_app(EmulatorConfig(api_key="test-key", voice="tone")))
    emulator.start()
    bridge = ServerThread(create_app(bridge_settings(emulator, **{"twilio.start_timeout_s": 2.0})))
    bridge.start()
    try:
        yield Stage(bridge, emulator, errors)
    finally:
        bridge.stop()
        emulator.stop()
        root.removeHandler(errors)


def held_slots(bridge: ServerThread) -> tuple[int, list[str]]:
    status = httpx.get(bridge.http_url + "/status", timeout=5).json()
    devices = status["accounting"]["devices"].values()
    return sum(d["leases"] + d["reservations"] for d in devices), [c["call_sid"] for c in status["calls"]]


async def send_stream(bridge: ServerThread, opening: list[str], frames: list[str | bytes]) -> None:
    """Open a media stream, send everything, read what comes back for a moment, close; tolerate the bridge
    closing first (that is often the right answer to garbage)."""
    async with connect(
        bridge.ws_url + "/media-stream", proxy=None, compression=None, additional_headers=upgrade_signature()
    ) as ws:
        with contextlib.suppress(ConnectionClosed):
            for frame in [*opening, *frames]:
                await ws.send(frame)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    while True:
                        await ws.recv()


@contextlib.contextmanager
def witness_call(bridge: ServerThread, seconds: float) -> Iterator[list[CallResult]]:
    """A well-behaved call in its own thread and event loop for the whole fuzzing run."""
    said = (np.sin(2 * np.pi * 400 * np.arange(int(8000 * seconds)) / 8000) * 3000).astype(np.int16)
    config = signed_call(bridge, audio_in=said, seconds=seconds)
    result: list[CallResult] = []
    thread = threading.Thread(target=lambda: result.append(asyncio.run(run_call(config))), daemon=True)
    thread.start()
    try:
        yield result
    finally:
        thread.join(seconds + 30)


WITNESS_S = 20.0


# The servers run in threads of this process, and websockets draws ping payloads from the global `random`
# while hypothesis draws an example: hypothesis then warns that the strategy used `random`. It did not.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@pytest.mark.timeout(180)
def test_random_streams_harm_nothing_and_no_other_call(stage: Stage) -> None:
    bridge = stage.bridge
    with witness_call(bridge, WITNESS_S) as witness:
        # the witness holds one slot throughout; every fuzzed stream must give back what it took
        baseline = 1
        for _ in range(100):
            if held_slots(bridge)[0] == baseline:
                break
            asyncio.run(asyncio.sleep(0.05))

        @settings(
            max_examples=30,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(stream=frames("MZ" + "2" * 32), admitted=st.booleans(), forged_start=st.booleans())
        def fuzz(stream: list[str | bytes], admitted: bool, forged_start: bool) -> None:
            opening: list[str] = [tw.Connected().to_json()]
            if admitted:  # a real webhook's token: the stream reaches the call core and the AI
                form = call_form()
                parameters = stream_parameters(post_voice(bridge, form))
                start = tw.Start(new_sid("MZ"), form["CallSid"], form["AccountSid"], custom_parameters=parameters)
                opening.append(start.to_json())
            elif forged_start:
                opening.append(tw.Start(new_sid("MZ"), new_sid("CA"), new_sid("AC"), custom_parameters={}).to_json())
            asyncio.run(send_stream(bridge, opening, stream))
            for _ in range(200):  # the bridge notices the close and gives the slot back
                slots, _calls = held_slots(bridge)
                if slots <= baseline:
                    break
                asyncio.run(asyncio.sleep(0.025))
            assert held_slots(bridge)[0] == baseline, "a fuzzed stream kept a device slot"
            assert stage.errors.records == [], [r.getMessage() for r in stage.errors.records]

        fuzz()
    [result] = witness
    assert result.ended_by == "caller" and not result.violations
    assert result.heard_s > WITNESS_S - 3.0, f"the witness heard only {result.heard_s:.1f} s"
    assert held_slots(bridge) == (0, [])
    stats = httpx.get(stage.emulator.http_url + "/_emulator/stats", timeout=5).json()
    assert stats["violations"] == []
    assert stats["sessions_opened"] >= 5  # the witness, and fuzzed streams that got past 'start' to the AI
