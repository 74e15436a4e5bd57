"""SIGTERM with a SIP call live, on a real `telephony-bridge serve --sip-port` process: the live call finishes,
new INVITEs hear 503 + Retry-After meanwhile (carriers fail over), then the process exits cleanly. And a SIP call
the drain deadline cuts hears the drain recording before our BYE."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from telephony_bridge.app import drain
from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.sip_caller import SipCallConfig, place_sip_call
from tests.support import SPEECH_WAV, BridgeProcess, leases, wait_until
from tests.test_sip_calls import assert_all_released, recording_heard, start_sip_bridge, status, target


@pytest.fixture
def sip_process(emulator: ServerThread, tmp_path: Path) -> Iterator[BridgeProcess]:
    config = tmp_path / "config.yaml"
    config.write_text("server:\n  drain_timeout_s: 30\n")
    env = {"BRIDGE_CONFIG": str(config), "SIP_PORT": "0", "SIP_ALLOWED_SOURCES": "127.0.0.0/8"}
    process = BridgeProcess(emulator, {**env, "RTP_PORTS": "39200-39299"})
    yield process
    process.kill()


async def test_sip_drain_lets_the_live_call_finish_and_refuses_new_ones(sip_process: BridgeProcess) -> None:
    bridge = sip_process
    port = httpx.get(bridge.http_url + "/status", timeout=5).json()["sip"]["port"]
    target = f"sip:ai@127.0.0.1:{port}"
    live = asyncio.create_task(place_sip_call(SipCallConfig(target, seconds=4.0)))
    await asyncio.to_thread(
        wait_until, lambda: len(httpx.get(bridge.http_url + "/status", timeout=5).json()["calls"]) == 1, 10.0
    )
    bridge.proc.send_signal(signal.SIGTERM)
    await asyncio.to_thread(
        wait_until, lambda: httpx.get(bridge.http_url + "/readyz", timeout=5).status_code == 503, 5.0, "readyz"
    )
    refused = await place_sip_call(SipCallConfig(target, seconds=1.0))
    assert refused.status == 503
    result = await live
    assert result.answered and result.ended_by == "caller", result.summary()  # not cut by the shutdown
    assert await asyncio.to_thread(bridge.finish, 15.0) == 0
    messages = [str(line["msg"]) for line in bridge.lines]
    assert "drained: no calls left" in messages
    ended = [line for line in bridge.lines if line["msg"] == "call ended"]
    assert [(e["ingress"], e["outcome"]) for e in ended] == [("sip", "completed")]


def start_drain(bridge: ServerThread) -> asyncio.Future[None]:
    """What the first SIGTERM starts (``app.drain``), on the in-process bridge's own loop."""
    assert bridge.loop is not None
    return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(drain(bridge.server.config.app), bridge.loop))


async def test_sip_call_cut_by_the_drain_hears_the_drain_recording_then_bye(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    overrides = {"server.drain_timeout_s": 0.5, "sip.drain_wav": SPEECH_WAV}
    bridge = start_sip_bridge(start_bridge, emulator, **overrides)
    with caplog.at_level(logging.INFO):
        call = asyncio.create_task(place_sip_call(SipCallConfig(target(bridge), seconds=20.0)))  # says nothing
        await asyncio.to_thread(wait_until, lambda: len(status(bridge)["calls"]) == 1, 10.0, "the call")
        drain_began = time.monotonic()
        drained = start_drain(bridge)
        result = await call
        await drained
        assert result.answered and result.ended_by == "bridge", result.summary()  # our BYE, after the recording
        similarity, heard_at = recording_heard(Path(SPEECH_WAV), result)
        assert similarity > 0.9, f"the drain recording was not heard before the BYE ({similarity:.2f})"
        assert heard_at >= drain_began  # the echo of a silent caller is silence: this is the drain's doing
        assert_all_released(bridge, emulator)
    [ended] = [r for r in caplog.records if r.getMessage() == "call ended"]
    assert (ended.ingress, ended.outcome, ended.reason) == ("sip", "drained", "drain timeout")  # type: ignore[attr-defined]


async def test_sip_only_drain_does_not_wait_for_connect_action_requests(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """The grace for Twilio's after-call requests (``drain.ACTION_GRACE_S``) is not spent on SIP calls, which
    send none: the drain is over as soon as the cut SIP call has ended."""
    bridge = start_sip_bridge(start_bridge, emulator, **{"server.drain_timeout_s": 0.5})
    with caplog.at_level(logging.INFO):
        call = asyncio.create_task(place_sip_call(SipCallConfig(target(bridge), seconds=20.0)))
        await asyncio.to_thread(wait_until, lambda: len(status(bridge)["calls"]) == 1, 10.0, "the call")
        await start_drain(bridge)
        result = await call
    assert result.answered and result.ended_by == "bridge", result.summary()
    said = [r.getMessage() for r in caplog.records if r.name == "telephony_bridge.drain"]
    assert said[-1] == "drained: no calls left", said
    assert not [m for m in said if m.startswith("drain: waiting")], said
    assert_all_released(bridge, emulator)


async def test_sip_invite_still_in_admission_when_the_drain_begins_is_refused_503_and_holds_nothing(
    start_emulator: Callable[..., ServerThread], start_bridge: Callable[..., ServerThread]
) -> None:
    """The drain counts calls up and streams admitted, not an INVITE whose admission is in flight (a slow token
    endpoint): answered 200 once admission ended, it was a call the drain did not know of. It hears 503 +
    Retry-After instead (carriers fail over), as a new INVITE during the drain does."""
    emulator = start_emulator(voice="echo")
    faults = f"{emulator.http_url}/_emulator/faults/token"
    httpx.post(faults, json={"delay_s": 1.5}, timeout=5).raise_for_status()  # slow, then a token
    bridge = start_sip_bridge(start_bridge, emulator)
    call = asyncio.create_task(place_sip_call(SipCallConfig(target(bridge), seconds=2.0)))
    await asyncio.to_thread(wait_until, lambda: leases(bridge) == 1, 5.0, "admission to reserve a device")
    await start_drain(bridge)
    result = await call
    assert result.status == 503 and not result.answered, result.summary()
    assert_all_released(bridge, emulator)
    assert leases(bridge) == 0


async def test_a_drain_recording_longer_than_the_drain_allows_is_warned_of_at_start(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A call cut by the drain has ``CUT_GRACE_S`` (5 s) to end: a longer recording would be cut off before its
    end, and with only ``sip.fallback_wav`` set, that is what drained calls hear. Say so at start-up."""
    long_wav = tmp_path / "long.wav"
    with wave.open(str(long_wav), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(b"\x00\x10" * 8000 * 6)  # 6 s
    with caplog.at_level(logging.WARNING):
        start_sip_bridge(start_bridge, emulator, **{"sip.fallback_wav": str(long_wav)})
    warned = [r.getMessage() for r in caplog.records if "cut by the drain" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("sip.fallback_wav lasts 6.0 s"), warned
