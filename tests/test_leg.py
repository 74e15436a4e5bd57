"""The caller-leg interface: the call core names the ingress everywhere, and the shared silence watchdog."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from telephony_bridge.clock import FakeClock
from telephony_bridge.leg import Watchdog
from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.caller import run_call
from tests.support import signed_call, wait_until


async def test_status_metrics_and_the_call_ended_line_name_the_ingress(
    bridge: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        call = asyncio.create_task(run_call(signed_call(bridge, seconds=1.5)))

        def one_call() -> bool:
            return len(httpx.get(bridge.http_url + "/status", timeout=5).json()["calls"]) == 1

        await asyncio.to_thread(wait_until, one_call, 5.0, "the call in /status")
        [entry] = httpx.get(bridge.http_url + "/status", timeout=5).json()["calls"]
        result = await call
        assert entry["ingress"] == "twilio" and entry["call_sid"] == result.call_sid
        # still inside at_level: the line comes after the caller has gone, and INFO must still be captured then
        await asyncio.to_thread(
            wait_until, lambda: any(r.getMessage() == "call ended" for r in caplog.records), 5.0, "the call ended line"
        )
    [ended] = [r for r in caplog.records if r.getMessage() == "call ended"]
    assert (ended.ingress, ended.outcome, ended.protocol_errors) == ("twilio", "completed", 0)  # type: ignore[attr-defined]
    metrics = httpx.get(bridge.http_url + "/metrics", timeout=5).text
    assert 'bridge_calls_total{ingress="twilio",outcome="completed"} 1.0' in metrics


async def test_watchdog_expires_only_after_a_whole_timeout_of_silence() -> None:
    clock = FakeClock()
    watchdog = Watchdog(clock, 5.0)
    async with asyncio.timeout(5):
        expired = asyncio.create_task(watchdog.expired())
        for _ in range(8):  # a sign of life every 4 s keeps it quiet
            await asyncio.sleep(0)
            clock.advance(4.0)
            watchdog.alive()
        await asyncio.sleep(0)
        assert not expired.done()
        clock.advance(4.9)
        for _ in range(5):
            await asyncio.sleep(0)
        assert not expired.done()
        clock.advance(0.1)
        assert await expired == pytest.approx(5.0)


async def test_watchdog_without_a_timeout_never_expires() -> None:
    clock = FakeClock()
    expired = asyncio.create_task(Watchdog(clock, None).expired())
    clock.advance(1e6)
    for _ in range(5):
        await asyncio.sleep(0)
    assert not expired.done()
    expired.cancel()
    await asyncio.gather(expired, return_exceptions=True)
