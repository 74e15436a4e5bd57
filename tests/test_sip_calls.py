"""SIP calls end to end on real sockets: our SIP caller -> the bridge's SIP ingress (UDP/TCP + RTP) ->
the emulator's echo voice -> back. Faults are injected on the wire; accounting must return to zero."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from telephony_bridge.serving import ServerThread
from telephony_bridge.sip.auth import ha1
from telephony_bridge.tools.sip_caller import SipCallConfig, SipCallResult, place_sip_call
from tests.support import bridge_settings, emulator_stats, wait_until
from tests.test_end_to_end import speech_band_noise

DATA = Path(__file__).parent / "data"
# 40 ranges of 200 RTP ports, round robin: a test's bridge is stopped before the next test starts, so a range can be
# used again once the others have been (a whole-suite run starts more than 40 SIP bridges). Under pytest-xdist each
# worker (gw0, gw1, ...) takes every Nth range, so no two workers' bridges share one (a port another process holds
# would only be skipped, but a test counting ports in use should see its own bridge's alone).
_worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
_next_rtp = itertools.cycle(range(31000 + 200 * _worker, 39000, 200 * _workers))


def start_sip_bridge(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread, **overrides: Any
) -> ServerThread:
    first = next(_next_rtp)
    values: dict[str, Any] = {
        "sip.port": 0,
        "sip.rtp_ports": f"{first}-{first + 199}",
        "sip.allowed_sources": ["127.0.0.0/8"],
        "sip.t1_ms": 50,
    }
    values.update(overrides)
    return start_bridge(bridge_settings(emulator, **values))


def status(bridge: ServerThread) -> dict[str, Any]:
    return httpx.get(bridge.http_url + "/status", timeout=5).json()


def target(bridge: ServerThread) -> str:
    return f"sip:ai@127.0.0.1:{status(bridge)['sip']['port']}"


def assert_all_released(bridge: ServerThread, emulator: ServerThread) -> None:
    wait_until(lambda: status(bridge)["calls"] == [], 10.0, "the call to leave /status")
    wait_until(lambda: status(bridge)["sip"]["calls"] == 0, 10.0, "the SIP call to be cleaned up")
    wait_until(lambda: emulator_stats(emulator)["sessions_active"] == 0, 10.0, "the Savants session to close")
    now = status(bridge)
    assert all(d["leases"] == 0 for d in now["accounting"]["devices"].values()), now["accounting"]
    assert now["sip"]["rtp_ports_in_use"] == 0


def echo_quality(said: np.ndarray, result: SipCallResult) -> tuple[float, float, float]:
    """Worst correlation and level over the 250 ms bursts of ``said``, each at its own lag, and the first lag.

    The echo voice re-times what it hears on arrival, so uplink jitter on a loaded machine can move a later
    burst by a 20 ms frame; each burst must still come back recognisably, within 100 ms of the first one.
    """
    heard = result.heard_pcm.astype(float)
    x = said.astype(float)
    corr = np.correlate(heard, x, mode="valid")
    first_lag = int(np.argmax(corr))
    worst_corr, worst_level = 1.0, 0.0
    for start in range(0, x.size, 2000):
        burst = x[start : start + 2000]
        if not burst.any():
            continue
        lo = max(0, first_lag + start - 800)
        window = heard[lo : first_lag + start + 800 + burst.size]
        c = np.correlate(window, burst, mode="valid")
        at = int(np.argmax(c))
        aligned = window[at : at + burst.size]
        worst_corr = min(worst_corr, c[at] / (np.linalg.norm(burst) * np.linalg.norm(aligned)))
        level = 20 * np.log10(np.sqrt(np.mean(aligned**2)) / np.sqrt(np.mean(burst**2)))
        worst_level = max(worst_level, abs(level), key=abs)
    return worst_corr, worst_level, first_lag / 8000


def recording_heard(path: Path, result: SipCallResult) -> tuple[float, float]:
    """How closely what the caller heard matches the first 2 s of the recording at ``path`` (1.0: exactly), and
    when (monotonic) the RTP packet where the best match starts arrived."""
    from telephony_bridge.tools.commands import read_wav

    recording = read_wav(str(path)).astype(float)[: 8000 * 2]
    heard = result.heard_pcm.astype(float)
    corr = np.correlate(heard, recording, mode="valid")
    at = int(np.argmax(corr))
    norms = np.linalg.norm(recording) * np.linalg.norm(heard[at : at + recording.size])
    similarity = corr[at] / norms if norms else 0.0  # heard only silence: nothing like it
    return float(similarity), result.arrivals[at // 160]  # no hold: the bridge's packet k is heard[160 k:]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_sip_echo_comes_back_recognisably(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    bridge = start_sip_bridge(start_bridge, emulator)
    said = speech_band_noise()
    with caplog.at_level(logging.INFO):
        result = await place_sip_call(
            SipCallConfig(
                target(bridge), audio_in=said, seconds=3.5, transport=transport, dtmf=[(2.6, "1"), (2.9, "#")]
            )
        )
        assert result.answered and result.ended_by == "caller", result.summary()
        assert result.violations == [], result.violations
        correlation, level_db, lag_s = echo_quality(said, result)
        assert correlation > 0.9, f"echo does not resemble what was said (correlation {correlation:.3f})"
        assert abs(level_db) < 3, f"echo level off by {level_db:.1f} dB"
        assert 0.2 <= lag_s < 1.5, f"echo arrived after {lag_s:.3f} s"
        assert_all_released(bridge, emulator)
        wait_until(lambda: any(r.getMessage() == "call ended" for r in caplog.records), 5.0, "the call ended line")
    [ended] = [r for r in caplog.records if r.getMessage() == "call ended"]
    assert (ended.ingress, ended.outcome) == ("sip", "completed")  # type: ignore[attr-defined]
    assert ended.dtmf_digits == 2 and ended.rfc4733_digits == 2  # type: ignore[attr-defined]
    assert ended.rtp_packets_in > 100 and ended.rtp_lost == 0  # type: ignore[attr-defined]
    assert ended.call_sid == result.call_id  # type: ignore[attr-defined]
    # The jitter buffer's output is any length (a DTMF event's gap comes out as one long chunk): no Twilio quirk.
    assert ended.client_quirks == []  # type: ignore[attr-defined]
    metrics = httpx.get(bridge.http_url + "/metrics", timeout=5).text
    assert 'bridge_calls_total{ingress="sip",outcome="completed"} 1.0' in metrics
    assert "bridge_client_quirks_total{" not in metrics
    # The SIP call fed the latency histograms, whose help names its start too (not Twilio's alone).
    for name in ("bridge_ai_connect_seconds", "bridge_first_ai_audio_seconds"):
        assert f"{name}_count 1.0" in metrics
        [help_line] = [line for line in metrics.splitlines() if line.startswith(f"# HELP {name} ")]
        assert "SIP: our 200 OK" in help_line, help_line


async def test_sip_source_outside_allow_list_is_403_and_nothing_allocated(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread
) -> None:
    bridge = start_sip_bridge(start_bridge, emulator, **{"sip.allowed_sources": ["192.0.2.0/24"]})
    result = await place_sip_call(SipCallConfig(target(bridge), seconds=1))
    assert (result.status, result.ended_by) == (403, "refused")
    assert emulator_stats(emulator)["sessions_opened"] == 0
    assert_all_released(bridge, emulator)


async def test_sip_digest_right_and_wrong_password(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread
) -> None:
    users = {"pbx": {"SHA-256": ha1("SHA-256", "pbx", "telephony-bridge", "s3cret")}}
    bridge = start_sip_bridge(start_bridge, emulator, **{"sip.allowed_sources": ["192.0.2.0/24"], "sip.users": users})
    wrong = await place_sip_call(SipCallConfig(target(bridge), seconds=1, user="pbx", password="nope"))
    assert (wrong.status, wrong.ended_by) == (401, "refused")
    right = await place_sip_call(SipCallConfig(target(bridge), seconds=1.5, user="pbx", password="s3cret"))
    assert right.answered and right.ended_by == "caller", right.summary()
    assert_all_released(bridge, emulator)


async def test_sip_never_acked_call_is_torn_down_after_64_t1(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    bridge = start_sip_bridge(start_bridge, emulator)  # T1 = 50 ms: 64*T1 = 3.2 s
    with caplog.at_level(logging.INFO):
        result = await place_sip_call(SipCallConfig(target(bridge), seconds=8, never_ack=True))
        assert result.answered and result.ended_by == "bridge", result.summary()
        wait_until(lambda: any(r.getMessage() == "call ended" for r in caplog.records), 5.0, "the call ended line")
    # A dialog that was never confirmed is a lost caller, not a completed call; the warning names the call
    # although it comes from the signalling, outside the call's task (both found by a fault-injection pass).
    [warning] = [r for r in caplog.records if r.getMessage().startswith("no ACK for our 200 OK")]
    assert getattr(warning, "call_sid", None) == result.call_id
    [ended] = [r for r in caplog.records if r.getMessage() == "call ended"]
    assert (ended.reason, ended.outcome) == ("no ACK", "caller_lost")  # type: ignore[attr-defined]
    metrics = httpx.get(bridge.http_url + "/metrics", timeout=5).text
    assert 'bridge_calls_total{ingress="sip",outcome="caller_lost"} 1.0' in metrics
    assert_all_released(bridge, emulator)


async def test_sip_media_timeout_ends_the_call_with_bye(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread
) -> None:
    bridge = start_sip_bridge(start_bridge, emulator, **{"sip.media_timeout_s": 1.0})
    result = await place_sip_call(SipCallConfig(target(bridge), seconds=8, rtp_stop_after_s=1.0))
    assert result.answered and result.ended_by == "bridge", result.summary()
    assert_all_released(bridge, emulator)


async def test_sip_pool_full_is_486(start_bridge: Callable[..., ServerThread], emulator: ServerThread) -> None:
    bridge = start_sip_bridge(
        start_bridge, emulator, **{"savants.device_ids": ["only"], "accounting.max_concurrent_per_device": 1}
    )
    sip_target = target(bridge)
    first = asyncio.create_task(place_sip_call(SipCallConfig(sip_target, seconds=3)))
    await asyncio.to_thread(wait_until, lambda: len(status(bridge)["calls"]) == 1, 10.0, "the first call")
    second = await place_sip_call(SipCallConfig(sip_target, seconds=1))
    assert second.status == 486
    assert (await first).answered
    assert_all_released(bridge, emulator)


def test_sipcall_and_loadtest_sip_commands(
    start_bridge: Callable[..., ServerThread],
    emulator: ServerThread,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from telephony_bridge.cli import main

    bridge = start_sip_bridge(start_bridge, emulator)
    out = tmp_path / "heard.wav"
    args = ["--wav", str(DATA / "speech_8k.wav"), "--out", str(out), "--seconds", "2", "--dtmf", "1#"]
    code = main(["sipcall", target(bridge), *args, "--transport", "tcp"])
    line = capsys.readouterr().out
    assert code == 0, line
    assert ": 200 in " in line and "ended by caller" in line and "digits sent 2" in line and "violations 0" in line
    assert out.stat().st_size > 44 + 2 * 8000  # more than a second of what the caller heard
    code = main(["loadtest", "--sip", target(bridge), "--calls", "4", "--concurrency", "4", "--seconds", "1.5"])
    line = capsys.readouterr().out
    assert code == 0, line
    assert line.startswith("sip loadtest: 4/4 answered, refused none, INVITE->200 p50 ")
    assert main(["sipcall", "http://nope"]) == 3
    assert_all_released(bridge, emulator)


async def test_sip_barge_in_cuts_the_ai_off(
    start_emulator: Callable[..., ServerThread], start_bridge: Callable[..., ServerThread]
) -> None:
    from telephony_bridge.tools import barge_in_probe as probe
    from tests.test_barge_in_call import INTERRUPT_AT_S, INTERRUPTION, QUESTION

    emulator = start_emulator(voice="talker", talker_reply_s=4.0)
    bridge = start_sip_bridge(start_bridge, emulator)
    said = probe.script(QUESTION, INTERRUPTION, INTERRUPT_AT_S, seconds=6.0)
    result = await place_sip_call(SipCallConfig(target(bridge), audio_in=said, seconds=6.0))
    assert result.answered and result.violations == [], result.summary()
    cut = probe.measure(result.heard_pcm, said, INTERRUPT_AT_S)
    assert 0.5 < cut.into_answer_s < 2.0, cut
    assert cut.stop_after_s < 0.6, cut  # the queued AI audio was dropped at the leg, not played out
    metrics = httpx.get(bridge.http_url + "/metrics", timeout=5).text
    assert "bridge_barge_in_total 1.0" in metrics
    assert_all_released(bridge, emulator)


async def test_sip_ai_failure_plays_the_fallback_then_byes(
    start_emulator: Callable[..., ServerThread], start_bridge: Callable[..., ServerThread]
) -> None:
    # garbage from the AI is a protocol break: not retried (savants/retry.py), so the call must end
    emulator = start_emulator(voice="tone", fault="garbage", fault_after_s=1.0)
    fallback = DATA / "speech_8k.wav"
    bridge = start_sip_bridge(start_bridge, emulator, **{"sip.fallback_wav": str(fallback)})
    result = await place_sip_call(SipCallConfig(target(bridge), seconds=20.0))
    assert result.answered and result.ended_by == "bridge", result.summary()  # a BYE, never dead air
    similarity, _ = recording_heard(fallback, result)
    assert similarity > 0.9, f"the fallback recording was not heard before the BYE ({similarity:.2f})"
    assert_all_released(bridge, emulator)


async def test_sip_hold_and_resume_by_reinvite(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread
) -> None:
    bridge = start_sip_bridge(start_bridge, emulator, **{"sip.media_timeout_s": 1.0})
    config = SipCallConfig(target(bridge), audio_in=speech_band_noise(4.0), seconds=5.0, hold_at_s=1.0, resume_at_s=3.0)
    result = await place_sip_call(config)
    assert result.answered and result.ended_by == "caller", result.summary()  # held 2 s > media timeout: no BYE
    assert result.reinvites == [200, 200]
    assert result.packets_between(1.3, 2.9) == 0  # held (we answered recvonly): the bridge sends nothing
    assert result.packets_between(3.3, 4.9) > 60  # resumed
    assert result.violations == []  # one SSRC, sequence continuous, the timestamp jump carries the marker
    assert_all_released(bridge, emulator)


async def test_sip_resume_by_a_reinvite_without_sdp_is_heard_again(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread
) -> None:
    """Some PBXs resume from a hold with a re-INVITE that carries no SDP: our 200 must offer sendrecv (our last
    answer was recvonly) and the ACK's answer must be applied; else the call stays muted to the end."""
    bridge = start_sip_bridge(start_bridge, emulator, **{"sip.media_timeout_s": 1.0})
    config = SipCallConfig(
        target(bridge),
        audio_in=speech_band_noise(4.0),
        seconds=5.0,
        hold_at_s=1.0,
        resume_at_s=3.0,
        resume_without_sdp=True,
    )
    result = await place_sip_call(config)
    assert result.answered and result.ended_by == "caller", result.summary()
    assert result.reinvites == [200, 200]
    assert result.packets_between(1.3, 2.9) == 0  # held
    assert result.packets_between(3.3, 4.9) > 60  # resumed, though the re-INVITE said nothing of media
    assert result.violations == []
    assert_all_released(bridge, emulator)


async def test_sip_ai_audio_during_a_hold_is_neither_sent_nor_played(
    start_emulator: Callable[..., ServerThread],
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The AI talks throughout (a tone); the caller holds us for 2 s of it. What the core counts as sent and as
    played (marks confirmed) must be what the caller heard, not also the 2 s it could not hear."""
    emulator = start_emulator(voice="tone")
    bridge = start_sip_bridge(start_bridge, emulator)
    config = SipCallConfig(target(bridge), seconds=5.0, hold_at_s=1.0, resume_at_s=3.0)
    with caplog.at_level(logging.INFO):
        result = await place_sip_call(config)
        assert result.answered and result.ended_by == "caller" and result.reinvites == [200, 200], result.summary()
        assert_all_released(bridge, emulator)
    frames = result.heard_pcm.reshape(-1, 160)
    heard_ms = 20 * int(np.count_nonzero(np.abs(frames).max(axis=1) >= 200))  # the tone, as Outbound counts audible
    [ended] = [r for r in caplog.records if r.getMessage() == "call ended"]
    sent_ms, played_ms = ended.ai_audio_sent_ms, ended.ai_audio_played_ms  # type: ignore[attr-defined]
    assert heard_ms > 1500, result.summary()  # heard before the hold and after the resume
    # Sent but not yet heard when the caller hung up: at most the leg's queue (the lead and the spurt prebuffer).
    assert played_ms <= sent_ms <= heard_ms + 500, (sent_ms, played_ms, heard_ms)


async def test_sip_refusals_488_and_422(start_bridge: Callable[..., ServerThread], emulator: ServerThread) -> None:
    bridge = start_sip_bridge(start_bridge, emulator)
    g729 = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 18\r\n"
    assert (await place_sip_call(SipCallConfig(target(bridge), offer_sdp=g729))).status == 488
    short = [("Session-Expires", "60")]
    assert (await place_sip_call(SipCallConfig(target(bridge), extra_headers=short))).status == 422
    assert emulator_stats(emulator)["sessions_opened"] == 0
    assert_all_released(bridge, emulator)


async def test_sip_stale_nonce_is_challenged_again_then_admitted(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread
) -> None:
    users = {"pbx": {"SHA-256": ha1("SHA-256", "pbx", "telephony-bridge", "s3cret")}}
    overrides = {"sip.allowed_sources": ["192.0.2.0/24"], "sip.users": users, "sip.nonce_ttl_s": 1.0}
    bridge = start_sip_bridge(start_bridge, emulator, **overrides)
    config = SipCallConfig(target(bridge), seconds=1.0, user="pbx", password="s3cret", auth_delay_s=2.5)
    result = await place_sip_call(config)
    assert result.challenges == ["401", "401 stale"]  # the late answer was stale, the fresh one went through
    assert result.answered and result.ended_by == "caller", result.summary()
    assert_all_released(bridge, emulator)


async def test_sip_late_offer_answer_in_the_ack(
    start_bridge: Callable[..., ServerThread], emulator: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    bridge = start_sip_bridge(start_bridge, emulator)
    said = speech_band_noise()
    with caplog.at_level(logging.INFO):
        result = await place_sip_call(SipCallConfig(target(bridge), audio_in=said, seconds=3.5, late_offer=True))
        assert result.answered and result.ended_by == "caller" and result.violations == [], result.summary()
        correlation, _, _ = echo_quality(said, result)
        assert correlation > 0.9, f"no echo after a late offer (correlation {correlation:.3f})"
        assert_all_released(bridge, emulator)
