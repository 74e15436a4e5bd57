"""bench/lean_callers.py: its messages as bytes, its reader of the bridge's, and a few lean calls against the real
bridge and the emulator's echo voice."""

from __future__ import annotations

import asyncio
import base64
import sys
import time
from collections.abc import Callable

import numpy as np
import pytest

from telephony_bridge.serving import ServerThread
from telephony_bridge.twilio.outbound_messages import OutClear, OutMark, OutMedia, clear_message, mark_message
from telephony_bridge.twilio.protocol import Malformed, Media
from tests.support import AUTH_TOKEN, BENCH, PUBLIC_URL, SPEECH_WAV, bridge_settings

sys.path.insert(0, str(BENCH))
import capacity  # bench/ is no package: imported from its folder
import lean_callers

pytestmark = pytest.mark.timeout(30)

SID = "MZ" + "0" * 32


def test_lean_media_message_is_twilios_media_message_from_a_template() -> None:
    template = lean_callers.media_template(SID)
    payload = bytes(range(160))
    encoded = base64.b64encode(payload)
    assert template % (7, 3, 40, encoded) == (
        b'{"event":"media","sequenceNumber":"7","media":{"track":"inbound","chunk":"3","timestamp":"40",'
        b'"payload":"' + encoded + b'"},"streamSid":"' + SID.encode() + b'"}'
    )
    assert template % (7, 3, 40, encoded) == Media(SID, payload, 40, 3, 7).to_json().encode()


def test_lean_mark_echo_is_twilios_mark_message() -> None:
    assert lean_callers.mark_template(SID) % (12, b'"m-1"') == (
        b'{"event":"mark","sequenceNumber":"12","streamSid":"' + SID.encode() + b'","mark":{"name":"m-1"}}'
    )


def test_lean_frames_are_the_speech_in_20ms_base64_frames_padded_with_silence() -> None:
    audio = np.full(170, 4000, dtype=np.int16)  # one whole frame and 10 samples
    frames = lean_callers.encode_frames(audio)
    decoded = [base64.b64decode(frame) for frame in frames]
    assert [len(d) for d in decoded] == [160, 160]
    assert decoded[1][10:] == b"\xff" * 150 and lean_callers.audible(decoded[1]) and lean_callers.audible(decoded[0])
    assert not lean_callers.audible(base64.b64decode(lean_callers.SILENCE_B64))
    assert lean_callers.encode_frames(None) == []


def test_lean_reader_reads_media_marks_and_clears_and_counts_anything_else_as_a_violation() -> None:
    read = lean_callers.read_outbound
    media = b'{"event":"media","streamSid":"' + SID.encode() + b'","media":{"payload":"AAEC"}}'
    assert read(media, SID) == OutMedia(b"\x00\x01\x02")
    assert read(mark_message(SID, "m-1").encode(), SID) == OutMark("m-1")
    assert read(clear_message(SID).encode(), SID) == OutClear()
    wrong = [
        b'{"event":"start","streamSid":"' + SID.encode() + b'"}',  # not one a bridge may send
        b'{"event":"media","streamSid":"' + SID.encode() + b'","media":{"payload":"not base64!"}}',
        b'{"event":"mark","streamSid":"' + SID.encode() + b'"}',  # no mark.name
        b'{"event":"clear","streamSid":"MZother"}',
        b"[1, 2]",
        b"not json",
    ]
    assert [type(read(message, SID)) for message in wrong] == [Malformed] * len(wrong)
    assert "'start'" in read(wrong[0], SID).reason  # type: ignore[union-attr]


async def test_lean_calls_are_served_and_hear_their_own_speech_echoed(bridge: ServerThread) -> None:
    async with asyncio.timeout(20):
        result = await lean_callers.run_load(
            bridge.ws_url + "/media-stream", 3, 3, 2.0, 0.2, AUTH_TOKEN, PUBLIC_URL, SPEECH_WAV, deadline_s=15
        )
    reasons = [flow.reason for flow in result.flows]
    assert (len(result.of("served")), len(result.of("failed")), result.violations) == (3, 0, 0), reasons
    assert len(result.first_audio_s) == 3 and result.underruns == 0
    calls = [flow.call for flow in result.flows if flow.call is not None]
    assert all(call.ended_by == "caller" and call.close_code == 1000 for call in calls)
    assert all(call.media_sent == 100 and call.heard_s > 0 for call in calls)
    # The emulator's echo says each frame back 0.2 s after it heard it: no round trip is quicker than that.
    assert result.round_trips_s and 0.2 <= result.round_trips_s[0] <= result.round_trips_s[-1] < 1.0
    heard = sorted(t for call in calls for t in call.heard_round_trips_s)
    assert heard and heard[0] >= 0.2 and all(abs(t / 0.02 - round(t / 0.02)) < 1e-9 for t in heard)


def test_capacity_load_part_places_lean_calls_when_asked(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread]
) -> None:
    settings = {"server.public_url": capacity.PUBLIC_URL, "twilio.auth_token": capacity.AUTH_TOKEN}
    bridge = start_bridge(bridge_settings(emulator, **settings))
    result = capacity._load_part(bridge.ws_url + "/media-stream", 2, 1.0, time.monotonic(), "lean")
    assert (len(result.of("served")), result.violations) == (2, 0), [flow.reason for flow in result.flows]
    assert all(flow.call is not None and flow.call.media_sent == 50 for flow in result.flows)
