"""The AI side failing mid-call, on real sockets: the caller keeps the line, hears comfort noise rather than a
dead line, and the AI comes back; or, when it cannot, the stream ends and the fallback message plays. Either
way nothing is left held: no call in /status, no lease or reservation, no Savants socket."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.caller import CallResult, run_call
from telephony_bridge.tools.emulator.faults import Selector, SessionFault, TokenFault
from tests.support import (
    BridgeProcess,
    Served,
    bridge_settings,
    emulator_stats,
    leases,
    signed_call,
    stream_ended,
    wait_until,
)

RATE_HZ = 8000
AUDIBLE = 200  # as Outbound counts audible AI audio
VOICE = (np.sin(2 * np.pi * 440 * np.arange(RATE_HZ * 8) / RATE_HZ) * 3000).astype(np.int16)
DROP_AFTER_S = 1.0


def once(kind: str, **fields: Any) -> SessionFault:
    """A fault that hits the first session only: the reconnect gets a healthy one."""
    return SessionFault(kind=kind, select=Selector(count=1), **{"after_s": DROP_AFTER_S, **fields})  # type: ignore[arg-type]


def status(bridge: Served) -> dict[str, Any]:
    return httpx.get(bridge.http_url + "/status", timeout=5).json()  # type: ignore[no-any-return]


def calls_up(bridge: Served) -> int:
    return len(status(bridge)["calls"])


def released(bridge: Served, emulator: ServerThread, timeout_s: float = 5.0) -> None:
    """Accounting back to zero: no call, no lease or reservation, no Savants socket."""
    wait_until(lambda: calls_up(bridge) == 0 and leases(bridge) == 0, timeout_s, "the call to be released")
    wait_until(lambda: emulator_stats(emulator)["sessions_active"] == 0, timeout_s, "the Savants sockets to close")


def longest_run(mask: npt.NDArray[np.bool_]) -> int:
    """The longest run of True in ``mask``, in samples."""
    best = run = 0
    for value in mask:
        run = run + 1 if value else 0
        best = max(best, run)
    return best


def heard_between_first_and_last_audible(result: CallResult) -> npt.NDArray[np.int16]:
    audible = np.flatnonzero(np.abs(result.heard.astype(np.int32)) >= AUDIBLE)
    return result.heard[audible[0] : audible[-1] + 1]


def call_ended(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    wait_until(lambda: any(r.getMessage() == "call ended" for r in caplog.records), what="the call ended line")
    [record] = [r for r in caplog.records if r.getMessage() == "call ended"]
    return record


def settings(emulator: ServerThread, **overrides: Any) -> Any:
    return bridge_settings(
        emulator,
        **{"barge_in.enabled": False, "savants.connect_timeout_s": 1.0, "savants.stall_timeout_s": 1.0, **overrides},
    )


@pytest.mark.parametrize(
    "fault",
    [
        once("close", close_code=1011),
        once("close", close_code=1001),  # a Savants restart: no longer taken for a goodbye
        once("close", close_code=1012),
        once("error", error_code="SERVER_ERROR"),
        once("reset"),  # TCP reset, no close frame
        once("stall", stall_s=3.0),  # socket open, nothing read or sent, no pong (then a reset)
    ],
    ids=["1011", "1001", "1012", "error", "reset", "stall"],
)
async def test_ai_drop_mid_call_reconnects_and_the_caller_hears_the_ai_again(
    start_emulator: Callable[..., ServerThread],
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
    fault: SessionFault,
) -> None:
    emulator = start_emulator(voice="echo", session_faults=(fault,))
    bridge = start_bridge(settings(emulator))
    with caplog.at_level(logging.INFO):
        result = await run_call(signed_call(bridge, audio_in=VOICE, seconds=6.0))
        ended = call_ended(caplog)
    assert result.ended_by == "caller" and result.violations == []
    heard = result.heard.astype(np.int32)
    # The AI (an echo of the caller's tone) is heard again in the last seconds, after the reconnect.
    assert np.mean(np.abs(heard[-2 * RATE_HZ :]) >= AUDIBLE) > 0.5
    # Meanwhile the line never went dead: comfort noise, never the digital silence of nothing sent (a stall
    # sends nothing until pings find it: stall_timeout_s + at most 1 s)...
    detection_s = 2.0 if fault.kind == "stall" else 0.0
    span = heard_between_first_and_last_audible(result)
    assert longest_run(span == 0) < (detection_s + 0.3) * RATE_HZ
    # ...and the AI was away for a bounded time.
    assert longest_run(np.abs(span.astype(np.int32)) < AUDIBLE) < (detection_s + 2.0) * RATE_HZ
    # The caller's words during the gap were kept and reached the new session (caught up before the end).
    assert ended.overflow_frames_dropped == 0  # type: ignore[attr-defined]
    assert ended.frames_to_ai >= ended.caller_frames - 10  # type: ignore[attr-defined]
    figures = {k: getattr(ended, k) for k in ("outcome", "ai_drops", "ai_reconnect", "ai_reconnect_attempts")}
    assert figures == {"outcome": "completed", "ai_drops": 1, "ai_reconnect": "resumed", "ai_reconnect_attempts": 1}
    # The comfort fill is counted apart from the AI's audio: together they are what reached the caller.
    fill_ms, ai_ms = ended.comfort_fill_ms, ended.ai_audio_sent_ms  # type: ignore[attr-defined]
    # (what crossed the caller's stop on the wire, or was still in flight when it closed, is not received)
    assert fill_ms >= 60 and 0 <= ai_ms + fill_ms - result.received_ms <= 60 * (result.late_messages + 1)
    metrics = httpx.get(bridge.http_url + "/metrics", timeout=5).text
    assert f'bridge_audio_seconds_total{{direction="ai_to_caller"}} {ai_ms / 1000}' in metrics
    assert 'bridge_ai_reconnects_total{result="resumed"} 1.0' in metrics
    assert emulator_stats(emulator)["sessions_opened"] == 2
    released(bridge, emulator)


async def test_ai_that_cannot_be_reached_again_ends_the_stream_with_the_fallback_message(
    start_emulator: Callable[..., ServerThread],
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first session drops; every later one is never confirmed: after the deadline the call ends."""
    never_confirmed = SessionFault(kind="no_confirm")
    emulator = start_emulator(voice="echo", session_faults=(once("close", close_code=1011), never_confirmed))
    bridge = start_bridge(settings(emulator, **{"savants.reconnect_deadline_s": 3.0}))
    with caplog.at_level(logging.INFO):
        result = await run_call(signed_call(bridge, audio_in=VOICE, seconds=15.0))
        ended = call_ended(caplog)
    assert result.ended_by == "bridge" and result.close_code == 1000
    # Two 1 s attempts at least; given up by the deadline (no attempt starts after it; one may run past it).
    assert DROP_AFTER_S + 2.0 < result.duration_s < DROP_AFTER_S + 3.0 + 3.0
    assert [child.tag for child in stream_ended(bridge, result.call_sid)] == ["Say", "Hangup"]
    # Until the stream ended the caller heard comfort noise, not a dead line.
    audible = np.flatnonzero(np.abs(result.heard.astype(np.int32)) >= AUDIBLE)
    assert longest_run(result.heard[audible[0] :] == 0) < 0.3 * RATE_HZ
    assert (ended.outcome, ended.ai_reconnect) == ("ai_unavailable", "failed")  # type: ignore[attr-defined]
    assert ended.ai_reconnect_attempts >= 2  # type: ignore[attr-defined]
    metrics = httpx.get(bridge.http_url + "/metrics", timeout=5).text
    assert 'bridge_ai_reconnects_total{result="failed"} 1.0' in metrics
    released(bridge, emulator)


async def test_caller_hanging_up_during_the_reconnect_records_it_abandoned(
    start_emulator: Callable[..., ServerThread],
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first session drops; later ones are never confirmed, so the reconnect is still trying when the caller
    hangs up: the drop is counted (``abandoned``) and the attempt's socket is closed with the call."""
    never_confirmed = SessionFault(kind="no_confirm")
    emulator = start_emulator(voice="echo", session_faults=(once("close", close_code=1011), never_confirmed))
    bridge = start_bridge(settings(emulator))  # reconnect_deadline_s 10: far longer than the call
    with caplog.at_level(logging.INFO):
        result = await run_call(signed_call(bridge, audio_in=VOICE, seconds=DROP_AFTER_S + 2.5))
        ended = call_ended(caplog)
    assert result.ended_by == "caller"
    figures = {k: getattr(ended, k) for k in ("outcome", "ai_drops", "ai_reconnect")}
    assert figures == {"outcome": "completed", "ai_drops": 1, "ai_reconnect": "abandoned"}
    assert any(r.getMessage().startswith("reconnect abandoned: the call ended") for r in caplog.records)
    metrics = httpx.get(bridge.http_url + "/metrics", timeout=5).text
    assert 'bridge_ai_reconnects_total{result="abandoned"} 1.0' in metrics
    released(bridge, emulator)


async def test_a_device_savants_refuses_is_not_retried_and_leaves_the_pool(
    start_emulator: Callable[..., ServerThread],
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    emulator = start_emulator(voice="echo", session_faults=(once("error", error_code="DEVICE_INACTIVE"),))
    bridge = start_bridge(settings(emulator))
    with caplog.at_level(logging.INFO):
        result = await run_call(signed_call(bridge, audio_in=VOICE, seconds=6.0))
        ended = call_ended(caplog)
    assert result.ended_by == "bridge" and result.duration_s < DROP_AFTER_S + 4.0  # not the 10 s of reconnects
    assert [child.tag for child in stream_ended(bridge, result.call_sid)] == ["Say", "Hangup"]
    assert (ended.outcome, ended.ai_reconnect, ended.ai_reconnect_attempts) == ("ai_unavailable", "not_retried", 0)  # type: ignore[attr-defined]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name.startswith("telephony_bridge")]
    assert len(errors) == 1 and "leaves the pool" in errors[0].getMessage(), errors
    device = ended.device_id  # type: ignore[attr-defined]
    status = httpx.get(bridge.http_url + "/status", timeout=5).json()
    assert status["accounting"]["devices"][device]["exhausted_for_s"] > 60
    assert emulator_stats(emulator)["sessions_opened"] == 1
    released(bridge, emulator)


async def test_reconnect_moves_to_another_device_when_this_one_has_no_token_budget(
    start_emulator: Callable[..., ServerThread],
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One token per device per minute: the warm token spent the first device's; the reconnect's comes from
    the other, and the call's slot goes with it."""
    emulator = start_emulator(voice="echo", session_faults=(once("close", close_code=1011),))
    bridge = start_bridge(settings(emulator, **{"accounting.max_token_requests_per_minute": 1}))
    with caplog.at_level(logging.INFO):
        call = asyncio.create_task(run_call(signed_call(bridge, audio_in=VOICE, seconds=5.0)))
        await asyncio.to_thread(wait_until, lambda: calls_up(bridge) == 1, 5.0, "the call in /status")
        [before] = httpx.get(bridge.http_url + "/status", timeout=5).json()["calls"]
        await asyncio.to_thread(
            wait_until,
            lambda: any(r.getMessage().startswith("AI session reconnected") for r in caplog.records),
            8.0,
            "the reconnect",
        )
        [after] = httpx.get(bridge.http_url + "/status", timeout=5).json()["calls"]
        result = await call
        ended = call_ended(caplog)
    assert {before["device_id"], after["device_id"]} == {"device-a", "device-b"}
    assert after["ai_connected"] and after["ai_reconnects"] == 1
    assert result.ended_by == "caller" and ended.ai_reconnect == "resumed"  # type: ignore[attr-defined]
    devices = emulator_stats(emulator)["devices"]
    assert [devices[d]["token_requests_in_window"] for d in ("device-a", "device-b")] == [1, 1]
    released(bridge, emulator)


async def test_an_ai_that_keeps_dropping_is_not_reconnected_past_the_limit_and_spends_no_more_tokens(
    start_emulator: Callable[..., ServerThread],
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every session closes 1011 after 0.5 s. Each reconnect takes a token from the device's budget, so without
    a limit one call reconnected a dozen times in 8 s; with two a minute allowed, the third drop ends the
    call with the fallback message."""
    flapping = SessionFault(kind="close", close_code=1011, after_s=0.5)
    emulator = start_emulator(voice="echo", session_faults=(flapping,))
    bridge = start_bridge(settings(emulator, **{"savants.max_reconnects_per_minute": 2}))
    with caplog.at_level(logging.INFO):
        result = await run_call(signed_call(bridge, audio_in=VOICE, seconds=8.0))
        ended = call_ended(caplog)
    assert result.ended_by == "bridge" and result.duration_s < 6.0
    assert [child.tag for child in stream_ended(bridge, result.call_sid)] == ["Say", "Hangup"]
    figures = {k: getattr(ended, k) for k in ("outcome", "ai_drops", "ai_reconnect", "ai_reconnect_attempts")}
    assert figures == {
        "outcome": "ai_unavailable",
        "ai_drops": 3,
        "ai_reconnect": "limited",
        "ai_reconnect_attempts": 2,
    }
    limited = [r for r in caplog.records if "max_reconnects_per_minute" in r.getMessage()]
    assert [(r.levelno, getattr(r, "call_sid", None)) for r in limited] == [(logging.WARNING, result.call_sid)]
    metrics = httpx.get(bridge.http_url + "/metrics", timeout=5).text
    assert 'bridge_ai_reconnects_total{result="resumed"} 2.0' in metrics
    assert 'bridge_ai_reconnects_total{result="limited"} 1.0' in metrics
    stats = emulator_stats(emulator)
    assert stats["sessions_opened"] == 3
    assert sum(d["token_requests_in_window"] for d in stats["devices"].values()) == 3  # the first, two reconnects
    released(bridge, emulator)


async def test_a_first_session_that_cannot_be_opened_is_retried_while_the_caller_hears_comfort_noise(
    start_emulator: Callable[..., ServerThread],
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The call's first session is never confirmed (a connect timeout): it is retried as a drop is, rather than
    the call ending at once with the fallback while the same fault a second later would have been survived."""
    first_never_confirms = SessionFault(kind="no_confirm", select=Selector(count=1))
    emulator = start_emulator(voice="echo", session_faults=(first_never_confirms,))
    bridge = start_bridge(settings(emulator))
    with caplog.at_level(logging.INFO):
        result = await run_call(signed_call(bridge, audio_in=VOICE, seconds=6.0))
        ended = call_ended(caplog)
    assert result.ended_by == "caller" and result.violations == []
    assert np.mean(np.abs(result.heard.astype(np.int32)[-2 * RATE_HZ :]) >= AUDIBLE) > 0.5  # the AI, at last
    figures = {k: getattr(ended, k) for k in ("outcome", "ai_drops", "ai_reconnect", "ai_reconnect_attempts")}
    assert figures == {"outcome": "completed", "ai_drops": 1, "ai_reconnect": "resumed", "ai_reconnect_attempts": 1}
    assert ended.comfort_fill_ms > 0  # type: ignore[attr-defined]  # the caller heard the line alive meanwhile
    opened = [r for r in caplog.records if r.getMessage().startswith("AI session could not be opened")]
    assert [(r.levelno, getattr(r, "call_sid", None)) for r in opened] == [(logging.WARNING, result.call_sid)]
    assert emulator_stats(emulator)["sessions_opened"] == 2
    released(bridge, emulator)


async def test_a_first_session_whose_device_savants_refuses_moves_to_another_device_rather_than_ending(
    start_emulator: Callable[..., ServerThread],
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """review-46: a cold start (no warm token) whose token request finds the call's device refused
    (DEVICE_INACTIVE) ends the call with the fallback at once, though the pool has another device with room:
    ``_first_session`` hands the refusal to ``recover``, whose verdict for it is QUARANTINE, not retried. The
    webhook's admission moves a call off a refused device, and so does a reconnect attempt
    (``Admission.reconnect``); the stream's start is the one place that does not."""
    refused = TokenFault(status=401, error_code="DEVICE_INACTIVE", select=Selector(count=1))
    emulator = start_emulator(voice="echo", token_faults=(refused,))
    bridge = start_bridge(settings(emulator, **{"savants.warm_token": False}))
    with caplog.at_level(logging.INFO):
        result = await run_call(signed_call(bridge, audio_in=VOICE, seconds=5.0))
        ended = call_ended(caplog)
    assert (ended.outcome, result.ended_by) == ("completed", "caller")  # type: ignore[attr-defined]
    assert np.mean(np.abs(result.heard.astype(np.int32)[-2 * RATE_HZ :]) >= AUDIBLE) > 0.5  # the AI, on the other
    released(bridge, emulator)


async def test_the_caller_hanging_up_as_the_ai_drops_ends_the_call_and_no_reconnect_outlives_it(
    start_emulator: Callable[..., ServerThread],
) -> None:
    """The caller's stop and the AI's drop reach the bridge in the same turn of its loop: the call still ends,
    with no new session for a caller who has gone, and gives everything back.

    The bridge runs in its own process and is stopped (SIGSTOP) while the emulator drops the session and the
    caller hangs up, so that both wait in its sockets and are read together when it resumes. On Python 3.11 and
    3.12 the AI side's task group lost the call's cancellation there: the AI side caught the drop and reconnected,
    and the call was held for ever with its device slot (``task_group.py``; found by ``bench/soak.py``)."""
    emulator = start_emulator(voice="echo", session_faults=(once("close", close_code=1012, after_s=1.0),))
    bridge = BridgeProcess(emulator, {"BRIDGE__BARGE_IN__ENABLED": "false"})
    try:
        started = time.monotonic()
        call = asyncio.create_task(run_call(signed_call(bridge, audio_in=VOICE, seconds=1.3)))
        await asyncio.to_thread(
            wait_until, lambda: any(c["ai_connected"] for c in status(bridge)["calls"]), what="the AI session"
        )
        bridge.proc.send_signal(signal.SIGSTOP)
        try:
            # the emulator drops the session (1 s after confirming it), the caller hangs up (1.3 s after start)
            def both_sent() -> bool:
                dropped = emulator_stats(emulator)["faults"]["injected"] == {"close:1012": 1}
                return dropped and time.monotonic() > started + 1.3 + 0.6

            await asyncio.to_thread(wait_until, both_sent, 4.0, "the AI's drop and the caller's stop")
        finally:
            bridge.proc.send_signal(signal.SIGCONT)
        result = await asyncio.wait_for(call, 10)
        assert result.ended_by == "caller"
        await asyncio.to_thread(released, bridge, emulator, 10.0)
        assert emulator_stats(emulator)["sessions_opened"] == 1  # no session for a caller who had gone
        metrics = httpx.get(bridge.http_url + "/metrics", timeout=5).text
        assert 'bridge_calls_total{ingress="twilio",outcome="completed"} 1.0' in metrics
    finally:
        bridge.kill()
