"""The compiled taps (``_taps.c``) answer as the Python taps they stand in for.

The media tap reads Twilio's media message as ``protocol.media_audio`` does: what its scan takes, it must read
exactly as ``media_audio``; what it does not take goes to the Python tap, so it may refuse more, but never
accept what ``media_audio`` refuses or read anything else. Twilio's own shape must be what it takes. Its handing
over (the watchdog, the handler in its context, what the handler raises) runs under every Twilio call of the
suite, and here on a real stream socket too. The Savants audio tap answers every case as
``SavantsConnection._tapped`` does.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telephony_bridge.clock import SystemClock
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.savants import client
from telephony_bridge.savants.protocol import MAX_FRAME_BYTES, State, VoiceSession
from telephony_bridge.settings import TwilioSettings
from telephony_bridge.twilio import leg as twilio_leg
from telephony_bridge.twilio import protocol as tw
from tests.support import require_built
from tests.test_direct_audio import CALL, leg_and_caller, media
from tests.test_twilio_media_audio import SID, media_messages


@pytest.fixture(autouse=True)
def built() -> None:
    require_built("telephony_bridge._taps", twilio_leg.MediaTap is not None and client.AudioTap is not None)


def read_media(text: bytes) -> tuple[bytes, int] | None:
    from telephony_bridge import _taps  # type: ignore[attr-defined]

    return _taps.read_media(text)  # type: ignore[no-any-return]


DIGITS = st.integers(0, 10**18 - 1).map(str) | st.from_regex(r"0[0-9]{0,17}", fullmatch=True)
NOT_DIGITS = st.sampled_from(["", "9" * 19, "0" * 19, "1 ", "-1", "1.0", "²", "١"])
PAYLOAD = st.binary(max_size=400).map(lambda b: base64.b64encode(b).decode())
# Base64 a little wrong: padding, alphabet, whitespace, unused bits that are not zero, a quote's escape.
NOT_CANONICAL = st.sampled_from(["AQ", "AQ=", "AR==", "AQI=", "AQJ=", "A===", "AQ== ", "AQ\\n==", "AQ-_", "AQ==AQ=="])


@st.composite
def twilio_shaped(draw: st.DrawFn) -> bytes:
    """Twilio's exact shape, its values drawn (now and then one of them wrong), or one byte of it changed."""
    sequence, chunk, timestamp = (draw(DIGITS | NOT_DIGITS) for _ in range(3))
    payload = draw(PAYLOAD | NOT_CANONICAL)
    sid = draw(st.just(SID) | st.text(max_size=40))
    text = (
        f'{{"event":"media","sequenceNumber":"{sequence}","media":{{"track":"inbound","chunk":"{chunk}",'
        f'"timestamp":"{timestamp}","payload":"{payload}"}},"streamSid":"{sid}"}}'
    ).encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        at = draw(st.integers(0, len(text) - 1))
        text = text[:at] + bytes([draw(st.integers(0, 255))]) + text[at + 1 :]
    return text


def agrees(text: bytes) -> bool:
    """The scan's answer, if it has one, is ``media_audio``'s; True if it took the message."""
    ours = read_media(text)
    if ours is not None:
        assert ours == tw.media_audio(text)
    return ours is not None


@given(twilio_shaped())
@settings(max_examples=3000, deadline=None)
def test_the_scan_reads_what_media_audio_reads_or_leaves_the_message_to_it(text: bytes) -> None:
    agrees(text)


@given(media_messages())
@settings(max_examples=1000, deadline=None)
def test_the_scan_reads_any_media_message_as_media_audio_does(text: str | bytes) -> None:
    agrees(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))


@given(st.binary(max_size=3072), st.integers(0, 10**18 - 1), st.integers(0, 10**18 - 1))
def test_the_scan_takes_twilios_own_shape(payload: bytes, timestamp_ms: int, sequence: int) -> None:
    text = tw.Media(SID, payload, timestamp_ms, 7, sequence).to_json().encode()
    assert agrees(text)


def test_the_scan_leaves_a_payload_over_its_buffer_to_python() -> None:
    text = tw.Media(SID, bytes(3073), 20, 1, 2).to_json().encode()
    assert read_media(text) is None
    assert tw.media_audio(text) == (bytes(3073), 20)


async def test_the_compiled_tap_hands_audio_over_in_the_handlers_context_and_keeps_what_it_raises() -> None:
    async with leg_and_caller() as (leg, caller):
        heard: list[tuple[bytes, int | None, str]] = []
        both = asyncio.Event()

        def handler(ulaw: bytes, ts: int | None) -> None:
            heard.append((ulaw, ts, CALL.get()))
            if len(heard) == 2:
                both.set()

        CALL.set("CA1")
        leg.deliver_audio_to(handler)
        CALL.set("")
        assert isinstance(leg._ws._tap, twilio_leg.MediaTap)  # type: ignore[attr-defined]
        before = leg.watchdog._last
        time.sleep(0.002)
        await caller.send(media(1))
        await caller.send(media(2).encode(), text=True)
        await asyncio.wait_for(both.wait(), 5)
        assert heard == [(bytes([1]) * 160, 20, "CA1"), (bytes([2]) * 160, 40, "CA1")]
        assert leg.watchdog._last > before

        def fails(ulaw: bytes, ts: int | None) -> None:
            raise ValueError("the core failed")

        leg.deliver_audio_to(fails)
        await caller.send(media(3))
        with pytest.raises(ValueError, match="the core failed"):
            async with asyncio.timeout(5):
                await leg.receive()
        assert leg._direct.handler is None


def test_the_compiled_tap_is_off_when_audio_kernels_say_numpy() -> None:
    class Socket:
        def tap_text(self, tap: object) -> None: ...

    compiled = twilio_leg.TwilioLeg(Socket(), TwilioSettings(), Metrics(), SystemClock())  # type: ignore[arg-type]
    plain = twilio_leg.TwilioLeg(Socket(), TwilioSettings(), Metrics(), SystemClock(), compiled=False)  # type: ignore[arg-type]
    assert isinstance(compiled.tap(), twilio_leg.MediaTap)
    assert plain.tap() == plain._tapped


class Recorder:
    """A call's handler: what it was handed, in which context; it raises while ``fail`` is set."""

    def __init__(self) -> None:
        self.heard: list[tuple[bytes, str]] = []
        self.fail = False

    def __call__(self, pcm: bytes) -> None:
        if self.fail:
            raise ValueError("the call failed")
        self.heard.append((pcm, CALL.get()))


def connection(*, compiled: bool, state: State, waiting: bool, handler: Recorder | None) -> client.SavantsConnection:
    session = VoiceSession()
    session.state = state
    conn = client.SavantsConnection(session, 5.0, compiled=compiled)
    if waiting:
        conn._events.append(object())  # type: ignore[arg-type]
    CALL.set("CA7")
    conn.deliver_audio_to(handler)
    CALL.set("")
    return conn


@pytest.mark.parametrize("state", [State.CONNECTED, State.AUTHENTICATING, State.CLOSED])
@pytest.mark.parametrize("waiting", [False, True])
@pytest.mark.parametrize("size", [0, 1, 640, MAX_FRAME_BYTES, MAX_FRAME_BYTES + 1])
@pytest.mark.parametrize("handler", ["none", "takes", "raises"])
async def test_the_savants_audio_tap_answers_as_the_python_tap(
    state: State, waiting: bool, size: int, handler: str
) -> None:
    outcomes = []
    for compiled in (True, False):
        recorder = None if handler == "none" else Recorder()
        if recorder is not None:
            recorder.fail = handler == "raises"
        conn = connection(compiled=compiled, state=state, waiting=waiting, handler=recorder)
        tap = conn._tap  # None while no handler is attached: the frame is then read as an event
        assert tap is None if recorder is None else isinstance(tap, client.AudioTap) == compiled
        took = tap is not None and tap(bytes([size % 256]) * size)
        error = conn._direct._error
        outcomes.append(
            (took, recorder.heard if recorder else None, type(error), str(error), conn._direct.handler is None)
        )
    assert outcomes[0] == outcomes[1]
    taken = state is State.CONNECTED and not waiting and 0 < size <= MAX_FRAME_BYTES and handler == "takes"
    assert outcomes[0][0] == taken
    if taken:
        assert outcomes[0][1] == [(bytes([size % 256]) * size, "CA7")]  # in the context it was attached in


@pytest.mark.parametrize("tap", ["MediaTap", "AudioTap"])
def test_a_tap_used_before_init_raises(tap: str) -> None:
    """``__new__`` alone (no ``__init__``) leaves its references unset: a call says so rather than reading them."""
    kind = twilio_leg.MediaTap if tap == "MediaTap" else client.AudioTap
    with pytest.raises(RuntimeError, match="before __init__"):
        kind.__new__(kind)(b"{}")


def test_the_scan_takes_a_payload_that_fills_its_buffer_and_leaves_a_sid_with_a_bad_escape_to_python() -> None:
    assert agrees(tw.Media(SID, bytes(3072), 20, 1, 2).to_json().encode())  # 4096 base64 characters: MAX_PAYLOAD
    text = tw.Media(SID, bytes(160), 20, 1, 2).to_json().encode().replace(SID.encode(), b"MZ\\q")
    assert tw.media_audio(text) is None and not agrees(text)


@pytest.mark.parametrize("compiled", [True, False])
def test_the_media_tap_takes_nothing_once_the_leg_is_closed_and_lets_base_exceptions_through(compiled: bool) -> None:
    class Socket:
        tap: Callable[[bytes], bool]

        def tap_text(self, tap: Callable[[bytes], bool]) -> None:
            self.tap = tap

    socket = Socket()
    leg = twilio_leg.TwilioLeg(socket, TwilioSettings(), Metrics(), SystemClock(), compiled=compiled)  # type: ignore[arg-type]
    heard: list[int | None] = []

    def handler(ulaw: bytes, ts: int | None) -> None:
        heard.append(ts)
        if ts == 40:
            raise KeyboardInterrupt

    leg.deliver_audio_to(handler)
    assert isinstance(socket.tap, twilio_leg.MediaTap) == compiled
    with pytest.raises(KeyboardInterrupt):  # not the core's failure to keep: it goes on up, the handler stays
        socket.tap(tw.Media(SID, bytes(160), 40, 1, 2).to_json().encode())
    assert leg._direct.handler is handler and leg._direct._error is None
    leg._open = False
    assert socket.tap(tw.Media(SID, bytes(160), 60, 1, 2).to_json().encode()) is False
    assert heard == [40]
