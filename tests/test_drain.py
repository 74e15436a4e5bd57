"""Graceful drain of a real `telephony-bridge serve` process: SIGTERM stops readiness and new calls, the calls
it already took finish (or hear the drain message at the deadline), then the process exits."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from telephony_bridge.app import drain
from telephony_bridge.serving import ServerThread
from telephony_bridge.settings import TwilioSettings
from telephony_bridge.tools.caller import run_call
from telephony_bridge.tools.twilio_flow import Connect, Hangup, Reject, Say, parse_twiml, run_flow
from tests.support import (
    AUTH_TOKEN,
    PUBLIC_URL,
    BridgeProcess,
    bridge_settings,
    call_form,
    post_voice,
    signed_call,
    wait_until,
)

DRAIN_MESSAGE = TwilioSettings().drain_message


@pytest.fixture
def serve(emulator: ServerThread, tmp_path: Path) -> Iterator[Callable[..., BridgeProcess]]:
    processes: list[BridgeProcess] = []

    def start(drain_timeout_s: float, drain_pending_streams_s: float = 10.0) -> BridgeProcess:
        config = tmp_path / "config.yaml"
        config.write_text(
            f"server:\n  drain_timeout_s: {drain_timeout_s}\n  drain_pending_streams_s: {drain_pending_streams_s}\n"
        )
        process = BridgeProcess(emulator, {"BRIDGE_CONFIG": str(config)})
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.kill()


def calls_up(bridge: Any) -> int:
    return len(httpx.get(bridge.http_url + "/status", timeout=5).json()["calls"])


def messages(bridge: BridgeProcess) -> list[str]:
    return [str(line["msg"]) for line in bridge.lines]


async def flow(bridge: Any, http: httpx.AsyncClient, seconds: float) -> Any:
    return await run_flow(bridge.http_url, http=http, seconds=seconds, auth_token=AUTH_TOKEN, public_url=PUBLIC_URL)


async def test_drain_refuses_new_calls_serves_the_admitted_and_exits_soon_after_the_last(
    serve: Callable[..., BridgeProcess],
) -> None:
    bridge = serve(drain_timeout_s=30)
    async with httpx.AsyncClient(trust_env=False, timeout=15) as http:
        live = asyncio.create_task(flow(bridge, http, seconds=3.0))
        await asyncio.to_thread(wait_until, lambda: calls_up(bridge) == 1, 10.0, "the live call")
        ringing = signed_call(bridge, seconds=1.5)  # admitted now; its stream starts only after the SIGTERM
        bridge.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(
            wait_until, lambda: httpx.get(bridge.http_url + "/readyz").status_code == 503, 5.0, "readyz to fail"
        )
        ready = await http.get(bridge.http_url + "/readyz")
        assert ready.status_code == 503
        assert (ready.json()["ready"], ready.json()["reason"]) == (False, "draining")
        refused = parse_twiml(post_voice(bridge, call_form()).text)
        assert refused.connect is None and isinstance(refused.verbs[-1], Hangup)
        assert any(isinstance(verb, Say) for verb in refused.verbs)  # the busy message
        late = await run_call(ringing)
        live_result = await live
    ended_at = time.monotonic()
    assert late.ended_by == "caller" and late.violations == []
    assert live_result.outcome == "served" and live_result.call is not None
    assert live_result.call.ended_by == "caller"  # not cut by the shutdown
    assert await asyncio.to_thread(bridge.finish, 10.0) == 0
    exit_s = time.monotonic() - ended_at
    assert exit_s < 3.0, f"exited {exit_s:.2f} s after the last call"  # the bound is 1 s; the margin is for load
    assert any(m.startswith("draining: not ready any more") for m in messages(bridge))
    assert "call refused: this replica is draining" in messages(bridge)
    assert "drained: no calls left" in messages(bridge)
    ended = {line["call_sid"]: line for line in bridge.lines if line["msg"] == "call ended"}
    assert ended[ringing.call_sid]["outcome"] == "completed"  # admitted before the drain: served in full
    assert ended[ringing.call_sid]["ai_connect_s"] is not None


async def test_drain_waits_only_briefly_for_a_stream_that_never_starts(
    serve: Callable[..., BridgeProcess],
) -> None:
    bridge = serve(drain_timeout_s=30, drain_pending_streams_s=1)
    answer = parse_twiml(post_voice(bridge, call_form()).text)
    assert isinstance(answer.connect, Connect)  # admitted: a device is reserved for 30 s
    began = time.monotonic()
    bridge.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(bridge.finish, 15.0) == 0
    assert time.monotonic() - began < 8.0  # 1 s of waiting, not the reservation's 30 s
    assert "drain: 1 admitted calls never started their stream; not waiting longer" in messages(bridge)


async def test_drain_deadline_ends_the_call_with_the_drain_message(serve: Callable[..., BridgeProcess]) -> None:
    bridge = serve(drain_timeout_s=1)
    async with httpx.AsyncClient(trust_env=False, timeout=15) as http:
        call = asyncio.create_task(flow(bridge, http, seconds=20.0))
        await asyncio.to_thread(wait_until, lambda: calls_up(bridge) == 1, 10.0, "the call")
        bridge.proc.send_signal(signal.SIGTERM)
        result = await call
    assert result.call is not None and result.call.ended_by == "bridge" and result.call.duration_s < 10
    assert result.after is not None and result.after.verbs == (Say(DRAIN_MESSAGE), Hangup())
    assert await asyncio.to_thread(bridge.finish, 10.0) == 0
    ended = [line for line in bridge.lines if line["msg"] == "call ended"]
    assert [(line["outcome"], line["reason"]) for line in ended] == [("drained", "drain timeout")]


@pytest.mark.parametrize(
    ("second", "code"),
    [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM)],  # Ctrl-C's status; killed by the signal itself
)
async def test_a_second_signal_exits_at_once(serve: Callable[..., BridgeProcess], second: int, code: int) -> None:
    bridge = serve(drain_timeout_s=60)
    call = asyncio.create_task(run_call(signed_call(bridge, seconds=20.0)))
    await asyncio.to_thread(wait_until, lambda: calls_up(bridge) == 1, 10.0, "the call")
    bridge.proc.send_signal(signal.SIGTERM)
    await asyncio.to_thread(
        wait_until, lambda: httpx.get(bridge.http_url + "/readyz").status_code == 503, 5.0, "the drain to begin"
    )
    began = time.monotonic()
    bridge.proc.send_signal(second)
    assert await asyncio.to_thread(bridge.finish, 15.0) == code  # interrupted, not a clean drain
    assert time.monotonic() - began < 8.0  # not the 60 s drain, nor the 20 s call
    assert (await call).ended_by == "bridge"


async def test_drain_in_process_counts_cut_calls_by_outcome_and_answers_reject_when_so_configured(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread]
) -> None:
    settings = bridge_settings(emulator, **{"server.drain_timeout_s": 0.5, "twilio.busy_response": "reject"})
    bridge = start_bridge(settings)
    async with httpx.AsyncClient(trust_env=False, timeout=15) as http:
        call = asyncio.create_task(flow(bridge, http, seconds=20.0))
        await asyncio.to_thread(wait_until, lambda: calls_up(bridge) == 1, 10.0, "the call")
        assert bridge.loop is not None
        drained = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(drain(bridge.server.config.app), bridge.loop))
        refused = parse_twiml(post_voice(bridge, call_form()).text)
        result = await call
        await drained
    assert refused.verbs == (Reject("busy"),)
    assert result.after is not None and result.after.verbs == (Say(DRAIN_MESSAGE), Hangup())
    metrics = httpx.get(bridge.http_url + "/metrics").text
    assert 'bridge_calls_total{ingress="twilio",outcome="drained"} 1.0' in metrics
    assert 'bridge_admission_refused_total{where="draining"} 1.0' in metrics
    assert calls_up(bridge) == 0


async def test_drain_waits_for_the_connect_action_request_of_a_cut_twilio_call(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture
) -> None:
    """A cut Twilio call's ``<Connect action>`` request is waited for (its caller never sends one here); a SIP
    call's is not (tests/test_sip_drain.py)."""
    bridge = start_bridge(bridge_settings(emulator, **{"server.drain_timeout_s": 0.5}))
    call = asyncio.create_task(run_call(signed_call(bridge, seconds=20.0)))
    await asyncio.to_thread(wait_until, lambda: calls_up(bridge) == 1, 10.0, "the call")
    assert bridge.loop is not None
    with caplog.at_level(logging.INFO):
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(drain(bridge.server.config.app), bridge.loop))
    assert (await call).ended_by == "bridge"
    said = [r.getMessage() for r in caplog.records if r.name == "telephony_bridge.drain"]
    assert said[-2:] == ["drain: waiting up to 0.5 s for 1 calls' <Connect action> requests", "drained: no calls left"]
