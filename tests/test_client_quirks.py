"""Twilio-protocol senders that are not Twilio, end to end on real sockets (issue 12).

Each deviation a simulator or "Twilio-compatible" client shows is sent by hand to a bridge under uvicorn with the
Savants emulator behind it; the tests assert what the AI received (the emulator's counts, or its echo) and that
/status, leases and reservations are back to zero afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from telephony_bridge.audio.codec import pcm16_to_ulaw
from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.caller import new_sid
from telephony_bridge.twilio import protocol as tw
from tests.redis_server import RedisServer
from tests.support import (
    bridge_settings,
    call_form,
    emulator_stats,
    leases,
    post_voice,
    stream_parameters,
    upgrade_signature,
    wait_until,
)
from tests.test_vad import speech_8k, talker_8k

SILENCE_FRAME = bytes([0xFF]) * 160
SPEECH = pcm16_to_ulaw(speech_8k())
NO_TOKEN = {"twilio.require_stream_token": False}  # as a simulator meets a dev bridge: any CallSid may stream


def calls_up(bridge: ServerThread) -> int:
    return len(httpx.get(bridge.http_url + "/status", timeout=5).json()["calls"])


def metrics(bridge: ServerThread) -> str:
    return httpx.get(bridge.http_url + "/metrics", timeout=5).text


def released(bridge: ServerThread, emulator: ServerThread) -> None:
    """Everything back to zero: no call on /status, no lease or reservation, no AI session."""
    wait_until(
        lambda: calls_up(bridge) == 0 and leases(bridge) == 0 and emulator_stats(emulator)["sessions_active"] == 0,
        timeout_s=10.0,
        what="calls, leases, reservations and AI sessions back to zero",
    )


def media(stream_sid: str, payload: bytes, timestamp_ms: int | None = None) -> str:
    """A media message as lean as a simulator sends it: the timestamp only if given, no track or chunk."""
    body: dict[str, Any] = {"payload": base64.b64encode(payload).decode()}
    if timestamp_ms is not None:
        body["timestamp"] = str(timestamp_ms)
    return orjson.dumps({"event": "media", "streamSid": stream_sid, "media": body}).decode()


@dataclass
class Sender:
    """One socket speaking the Twilio protocol; records what the bridge sends back and echoes marks."""

    ws: ClientConnection
    call_sid: str
    stream_sid: str
    started_at: float = field(default_factory=time.monotonic)
    heard: bytearray = field(default_factory=bytearray)
    events: list[tuple[float, str]] = field(default_factory=list)  # (seconds after start, event)
    echo_marks: bool = True  # as Twilio does once the audio before a mark has played

    async def read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for text in self.ws:
                message = orjson.loads(text)
                self.events.append((time.monotonic() - self.started_at, message["event"]))
                if message["event"] == "media":
                    self.heard += base64.b64decode(message["media"]["payload"])
                elif message["event"] == "mark" and self.echo_marks:
                    mark = {"event": "mark", "streamSid": self.stream_sid, "mark": message["mark"]}
                    await self.ws.send(orjson.dumps(mark).decode())

    async def send_frames(self, ulaw: bytes, sizes: list[int] | None = None, *, stamped: bool = False) -> None:
        """``ulaw`` in payloads of ``sizes`` (160 bytes by default), paced in real time."""
        at = 0
        for size in sizes or [160] * (len(ulaw) // 160):
            payload = ulaw[at : at + size]
            await self.ws.send(media(self.stream_sid, payload, round(at / 8) if stamped else None))
            at += size
            await asyncio.sleep(size / 8000)

    async def stop(self) -> None:
        await self.ws.send(tw.Stop(self.stream_sid, self.call_sid, new_sid("AC"), 0).to_json())

    def first(self, event: str, after_s: float = 0.0) -> float | None:
        return next((t for t, e in self.events if e == event and t >= after_s), None)


@contextlib.asynccontextmanager
async def sender(
    bridge: ServerThread,
    call_sid: str,
    parameters: dict[str, str] | None = None,
    media_format: dict[str, Any] | None = None,
    *,
    echo_marks: bool = True,
) -> AsyncIterator[Sender]:
    """A socket that has sent ``connected`` and ``start`` for ``call_sid`` (``media_format`` None: left out)."""
    stream_sid = new_sid("MZ")
    start: dict[str, Any] = {"streamSid": stream_sid, "callSid": call_sid, "customParameters": parameters or {}}
    if media_format is not None:
        start["mediaFormat"] = media_format
    async with connect(bridge.ws_url + "/media-stream", additional_headers=upgrade_signature(), proxy=None) as ws:
        await ws.send(tw.Connected().to_json())
        await ws.send(orjson.dumps({"event": "start", "streamSid": stream_sid, "start": start}).decode())
        caller = Sender(ws, call_sid, stream_sid, echo_marks=echo_marks)
        reader = asyncio.create_task(caller.read())
        try:
            yield caller
        finally:
            await ws.close()
            await reader


async def closed(refused: Sender) -> None:
    """Wait (bounded) for the bridge to close a socket it refuses."""
    async with asyncio.timeout(5):
        await refused.ws.wait_closed()


def webhook(bridge: ServerThread) -> tuple[str, dict[str, str]]:
    """A signed /voice for a new CallSid (reserving its device slot); the stream parameters it answered."""
    form = call_form()
    return form["CallSid"], stream_parameters(post_voice(bridge, form))


# --- media without timestamps --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stamps", "quirk", "line"),
    [
        (None, "no_timestamps", "the client sends no media timestamps"),
        (0, "stale_timestamps", "the client's media timestamps do not advance"),
    ],
)
async def test_media_without_advancing_timestamps_reaches_the_ai_whole(
    emulator: ServerThread,
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
    stamps: int | None,
    quirk: str,
    line: str,
) -> None:
    """pipecat-examples' client sends no timestamp: before, 149 of 150 frames were dropped as late."""
    bridge = start_bridge(bridge_settings(emulator))
    call_sid, params = webhook(bridge)
    with caplog.at_level(logging.INFO):
        async with sender(bridge, call_sid, params) as caller:
            for i in range(100):  # 2 s of speech
                await caller.ws.send(media(caller.stream_sid, SPEECH[i * 160 : (i + 1) * 160], stamps))
                await asyncio.sleep(0.02)
            await asyncio.to_thread(
                wait_until, lambda: emulator_stats(emulator)["audio_bytes_in"] == 100 * 640, 5.0, "2 s at the AI"
            )
            await asyncio.sleep(0.5)  # the echo comes back 0.2 s late
            await caller.stop()
    released(bridge, emulator)
    heard = np.abs(np.frombuffer(caller.heard, np.uint8).astype(int) - 0x7F)  # μ-law: 0xFF/0x7F are silence
    assert np.count_nonzero(heard > 8) > 8000  # more than 1 s of the 2 s sentence came back through the AI
    lines = [r for r in caplog.records if line in r.getMessage()]
    assert len(lines) == 1 and getattr(lines[0], "call_sid", None) == call_sid
    text = metrics(bridge)
    assert f'bridge_client_quirks_total{{quirk="{quirk}"}} 1.0' in text
    assert 'reason="late"' not in text


# --- frames of other sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stamped", [True, False])
async def test_frames_of_other_sizes_are_reframed_for_the_ai(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture, stamped: bool
) -> None:
    bridge = start_bridge(bridge_settings(emulator))
    call_sid, params = webhook(bridge)
    sizes = [320, 480, 97, 63, 160, 1, 159, 480, 320] * 5  # 40 ms, 60 ms and odd lengths: 2080 bytes, x5
    with caplog.at_level(logging.WARNING):
        async with sender(bridge, call_sid, params) as caller:
            await caller.send_frames(SPEECH, sizes, stamped=stamped)
            total = sum(sizes)  # 10400 bytes = 1.3 s = 65 frames of 20 ms
            await asyncio.to_thread(
                wait_until, lambda: emulator_stats(emulator)["audio_bytes_in"] == total // 160 * 640, 5.0, "1.3 s"
            )
            await caller.stop()
    released(bridge, emulator)
    lines = [r for r in caplog.records if "re-framed" in r.getMessage()]
    assert len(lines) == 1 and "320-byte" in lines[0].getMessage()
    assert 'bridge_client_quirks_total{quirk="frame_size"} 1.0' in metrics(bridge)
    assert 'reason="late"' not in metrics(bridge)


# --- media format ------------------------------------------------------------------------------------------------


async def test_start_without_media_format_is_mulaw_8k(emulator: ServerThread, bridge: ServerThread) -> None:
    call_sid, params = webhook(bridge)
    async with sender(bridge, call_sid, params, media_format=None) as caller:
        await caller.send_frames(SPEECH[: 50 * 160], stamped=True)
        await asyncio.to_thread(
            wait_until, lambda: emulator_stats(emulator)["audio_bytes_in"] == 50 * 640, 5.0, "1 s at the AI"
        )
        await caller.stop()
    released(bridge, emulator)


async def test_an_unsupported_media_format_is_refused_with_the_reason(
    emulator: ServerThread, bridge: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    call_sid, params = webhook(bridge)
    assert leases(bridge) == 1  # the webhook's reservation
    l16 = {"encoding": "audio/L16", "sampleRate": 16000, "channels": 1}
    with caplog.at_level(logging.WARNING):
        async with sender(bridge, call_sid, params, media_format=l16) as caller:
            await closed(caller)
    assert caller.ws.close_code == 1003
    assert caller.ws.close_reason is not None and "unsupported mediaFormat 'audio/L16'" in caller.ws.close_reason
    lines = [r for r in caplog.records if "unsupported mediaFormat" in r.getMessage()]
    assert len(lines) == 1 and getattr(lines[0], "call_sid", None) == call_sid
    released(bridge, emulator)  # the reservation is given back at once, not after its 30 s
    assert emulator_stats(emulator)["sessions_opened"] == 0
    assert 'bridge_streams_refused_total{reason="unsupported_media_format"} 1.0' in metrics(bridge)


# --- one live stream per CallSid ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ends_first", ["live stream", "refused socket"])
async def test_a_second_stream_for_a_live_call_sid_is_refused_and_the_first_keeps_its_lease(
    emulator: ServerThread,
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
    ends_first: str,
) -> None:
    """pipecat-examples' client opens two sockets with one CallSid: one call, one lease, one AI session."""
    bridge = start_bridge(bridge_settings(emulator, **NO_TOKEN))
    call_sid, _ = webhook(bridge)
    with caplog.at_level(logging.WARNING):
        async with sender(bridge, call_sid) as first:
            await first.send_frames(SPEECH[: 25 * 160])
            await asyncio.to_thread(wait_until, lambda: emulator_stats(emulator)["sessions_active"] == 1)
            second_cm = sender(bridge, call_sid)
            second = await second_cm.__aenter__()
            await closed(second)
            assert (second.ws.close_code, second.ws.close_reason) == (1008, "another stream for this CallSid is live")
            if ends_first == "refused socket":
                await second_cm.__aexit__(None, None, None)
            # The first call goes on, whole: still on /status with its lease, its audio still reaching the AI. At
            # least 48 of the 50 frames more: ``before`` may be read while the first 0.5 s is still on its way (it
            # was, under a loaded CI), and a lone last frame waits for its partner (audio.upstream_message_ms).
            before = emulator_stats(emulator)["audio_bytes_in"]
            await first.send_frames(SPEECH[25 * 160 : 75 * 160])
            await asyncio.to_thread(
                wait_until, lambda: emulator_stats(emulator)["audio_bytes_in"] >= before + 48 * 640, 5.0, "1 s more"
            )
            assert (calls_up(bridge), leases(bridge), emulator_stats(emulator)["sessions_active"]) == (1, 1, 1)
            await first.stop()
        if ends_first == "live stream":
            await second_cm.__aexit__(None, None, None)
    released(bridge, emulator)
    assert emulator_stats(emulator)["sessions_opened"] == 1
    lines = [r for r in caplog.records if "a second twilio stream for a call" in r.getMessage()]
    assert len(lines) == 1 and getattr(lines[0], "call_sid", None) == call_sid
    assert 'bridge_streams_refused_total{reason="duplicate_call_sid"} 1.0' in metrics(bridge)
    assert "lost the device lease" not in caplog.text


async def test_a_call_sid_may_stream_again_once_its_stream_ended(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread]
) -> None:
    """A second <Connect><Stream> on one call is legitimate once the first is over: a fresh lease, zero after."""
    bridge = start_bridge(bridge_settings(emulator, **NO_TOKEN))
    call_sid, _ = webhook(bridge)
    for _ in range(2):
        async with sender(bridge, call_sid) as caller:
            await caller.send_frames(SPEECH[: 25 * 160])
            await asyncio.to_thread(wait_until, lambda: calls_up(bridge) == 1 and leases(bridge) == 1)
            await caller.stop()
        released(bridge, emulator)
    assert emulator_stats(emulator)["sessions_opened"] == 2


# --- barge-in holds always end ---------------------------------------------------------------------------------


async def test_a_hold_ends_when_the_sender_stops_sending_media(
    start_emulator: Callable[..., ServerThread], start_bridge: Callable[..., ServerThread]
) -> None:
    """A client that sends media only while its caller talks: no frames counts as silence, the AI resumes."""
    emulator = start_emulator(voice="tone")
    bridge = start_bridge(bridge_settings(emulator))
    call_sid, params = webhook(bridge)
    async with sender(bridge, call_sid, params) as caller:
        await caller.send_frames(SILENCE_FRAME * 50)  # 1 s: the AI's tone is playing
        await caller.send_frames(SPEECH[: 40 * 160])  # 0.8 s of the caller talking over it
        stopped_at = time.monotonic() - caller.started_at  # and then nothing at all, the socket open
        await asyncio.sleep(2.0)
        await caller.stop()
    released(bridge, emulator)
    clear_at = caller.first("clear")
    assert clear_at is not None and clear_at < stopped_at  # the barge-in
    resumed_at = caller.first("media", after_s=clear_at + 0.05)
    assert resumed_at is not None and resumed_at < stopped_at + 1.5, (clear_at, stopped_at, caller.events[-5:])


async def test_a_hold_ends_after_max_hold_while_the_caller_keeps_talking(
    start_emulator: Callable[..., ServerThread], start_bridge: Callable[..., ServerThread]
) -> None:
    """A television in the room: steady speech must not mute the AI for the rest of the call."""
    emulator = start_emulator(voice="tone")
    bridge = start_bridge(bridge_settings(emulator, **{"barge_in.max_hold_s": 1.0}))
    call_sid, params = webhook(bridge)
    async with sender(bridge, call_sid, params) as caller:
        await caller.send_frames(SILENCE_FRAME * 50)
        talk_from = time.monotonic() - caller.started_at
        await caller.send_frames(pcm16_to_ulaw(talker_8k(4.0)), stamped=False)
        talk_until = time.monotonic() - caller.started_at
        await caller.stop()
    released(bridge, emulator)
    clear_at = caller.first("clear", after_s=talk_from)
    assert clear_at is not None
    resumed_at = caller.first("media", after_s=clear_at + 0.05)
    assert resumed_at is not None and resumed_at < talk_until - 1.0, (clear_at, resumed_at, talk_until)
    assert [e for t, e in caller.events if e == "clear"] == ["clear"]  # the same utterance does not cut again


# --- webhooks that are not Twilio's ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "headers", "reason", "says"),
    [
        (b"", {"Content-Type": "application/x-www-form-urlencoded"}, "empty_body", "got an empty body"),
        (b"", {}, "empty_body", "got an empty body"),
        (b'{"CallSid": "CA1"}', {"Content-Type": "application/json"}, "content_type", "got 'application/json'"),
        (b"From=%2B15551230000", {"Content-Type": "application/x-www-form-urlencoded"}, "no_call_sid", "CallSid"),
    ],
)
def test_a_webhook_that_is_not_twilios_is_400_with_the_reason_before_any_work(
    emulator: ServerThread,
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
    content: bytes,
    headers: dict[str, str],
    reason: str,
    says: str,
) -> None:
    bridge = start_bridge(bridge_settings(emulator, **{"twilio.auth_token": "", "twilio.allow_unsigned": True}))
    with caplog.at_level(logging.WARNING):
        answers = [
            httpx.post(bridge.http_url + "/voice", content=content, headers=headers, timeout=5) for _ in range(3)
        ]
    assert [a.status_code for a in answers] == [400] * 3 and all(says in a.text for a in answers)
    lines = [r for r in caplog.records if "not a Twilio webhook" in r.getMessage()]
    assert len(lines) == 1 and says in lines[0].getMessage()  # throttled: one line for the three
    assert f'bridge_webhooks_rejected_total{{reason="{reason}"}} 3.0' in metrics(bridge)
    assert leases(bridge) == 0 and emulator_stats(emulator)["tokens_issued"] == 0


# --- property: two sockets, one CallSid, any interleaving ----------------------------------------------------------


def claimed_leases(bridge: ServerThread) -> int:
    devices = httpx.get(bridge.http_url + "/status", timeout=5).json()["accounting"]["devices"]
    return sum(d["leases"] for d in devices.values())


def ai_sessions(emulator: ServerThread) -> int:
    return int(emulator_stats(emulator)["sessions_active"])


@st.composite
def interleavings(draw: st.DrawFn) -> list[tuple[str, str, float]]:
    """Both sockets' start and end in any order (each starts before it ends), each ended by a 'stop' or by a
    dropped connection, with no, a short or a longer pause after each step: (socket, action, pause_s)."""
    steps = draw(
        st.permutations(["A start", "A end", "B start", "B end"]).filter(
            lambda s: s.index("A start") < s.index("A end") and s.index("B start") < s.index("B end")
        )
    )
    ends = {name: draw(st.sampled_from(["stop", "drop"])) for name in "AB"}
    result = []
    for step in steps:
        name, what = step.split()
        result.append((name, ends[name] if what == "end" else "start", draw(st.sampled_from([0.0, 0.05, 0.3]))))
    return result


async def _interleave(bridge: ServerThread, emulator: ServerThread, steps: list[tuple[str, str, float]]) -> None:
    call_sid = new_sid("CA")
    sockets: dict[str, ClientConnection] = {}
    for name, action, pause_s in steps:
        if action == "start":
            ws = await connect(bridge.ws_url + "/media-stream", additional_headers=upgrade_signature(), proxy=None)
            sockets[name] = ws
            await ws.send(tw.Connected().to_json())
            stream_sid = new_sid("MZ")
            await ws.send(tw.Start(stream_sid, call_sid, new_sid("AC")).to_json())
            await ws.send(media(stream_sid, SILENCE_FRAME, 0))
        elif action == "stop":
            with contextlib.suppress(ConnectionClosed):
                await sockets[name].send(tw.Stop(new_sid("MZ"), call_sid, new_sid("AC"), 9).to_json())
            await sockets[name].close()
        else:  # the peer vanishes: no stop, no close frame
            sockets[name].transport.abort()
        await asyncio.sleep(pause_s)
        # Never two AI sessions for one call; and an AI session always has a lease (at once, or within moments
        # while a start or an end is being processed: the bug this guards kept a session lease-less for 6 s).
        assert await asyncio.to_thread(ai_sessions, emulator) <= 1
        await asyncio.to_thread(
            wait_until,
            lambda: ai_sessions(emulator) <= claimed_leases(bridge) <= 1,
            3.0,
            f"AI sessions <= leases <= 1 after {name} {action}",
        )
    for ws in sockets.values():
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 2.0)


@pytest.mark.timeout(600)
def test_two_sockets_with_one_call_sid_never_have_more_ai_sessions_than_leases(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread]
) -> None:
    bridge = start_bridge(bridge_settings(emulator, **NO_TOKEN))

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(interleavings())
    def check(steps: list[tuple[str, str, float]]) -> None:
        asyncio.run(_interleave(bridge, emulator, steps))
        released(bridge, emulator)

    check()


async def test_one_live_stream_per_call_sid_across_replicas(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread], redis_server: RedisServer
) -> None:
    """Two replicas sharing Redis, stream tokens off: the second socket lands on the other replica, and is
    refused there all the same; the live one keeps its lease; all zero once it ends."""
    shared = {**NO_TOKEN, "redis_url": redis_server.url}
    first_bridge, second_bridge = (
        start_bridge(bridge_settings(emulator, **shared)),
        start_bridge(bridge_settings(emulator, **shared)),
    )
    call_sid = new_sid("CA")
    async with sender(first_bridge, call_sid) as first:
        await first.send_frames(SPEECH[: 25 * 160])
        await asyncio.to_thread(wait_until, lambda: ai_sessions(emulator) == 1 and claimed_leases(first_bridge) == 1)
        async with sender(second_bridge, call_sid) as second:
            await closed(second)
        assert (second.ws.close_code, second.ws.close_reason) == (1008, "another stream for this CallSid is live")
        await first.send_frames(SPEECH[25 * 160 : 50 * 160])
        assert (calls_up(first_bridge), calls_up(second_bridge), claimed_leases(second_bridge)) == (1, 0, 1)
        await first.stop()
    released(first_bridge, emulator)
    released(second_bridge, emulator)
    assert emulator_stats(emulator)["sessions_opened"] == 1
    # Once the first stream is over, the CallSid may stream again, on either replica.
    async with sender(second_bridge, call_sid) as again:
        await asyncio.to_thread(wait_until, lambda: claimed_leases(second_bridge) == 1)
        await again.stop()
    released(second_bridge, emulator)
