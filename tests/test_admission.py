"""Admission on real servers: a new call needs a free slot *and* token budget; token requests retried within
the webhook's deadline; 429 and refused devices move the call; stream tokens compared before they are
consumed; reservations given back as soon as their call cannot use them; a reconnect takes a fresh token,
moving the call when its device has no budget."""

from __future__ import annotations

import asyncio
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis

from telephony_bridge.accounting.base import Lease, Limits
from telephony_bridge.accounting.memory import MemoryAccounting
from telephony_bridge.admission import Admission, CallSlot, VoiceEndpoint
from telephony_bridge.clock import SystemClock
from telephony_bridge.errors import TokenError
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.savants.client import open_voice_session
from telephony_bridge.savants.http_post import JsonPoster
from telephony_bridge.savants.tokens import TokenClient
from telephony_bridge.serving import ServerThread
from telephony_bridge.store import MemoryStore, RedisStore, Store
from telephony_bridge.tools.caller import CallConfig, new_sid, run_call
from telephony_bridge.tools.emulator.faults import Selector, TokenFault
from tests.redis_server import RedisServer
from tests.support import (
    bridge_settings,
    call_form,
    collector_off,
    emulator_stats,
    leases,
    post_voice,
    signed_call,
    stream_callback,
    stream_parameters,
    token_requests,
    upgrade_signature,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

VOICE = (np.sin(2 * np.pi * 500 * np.arange(8000 * 2) / 8000) * 3000).astype(np.int16)


def answer(response: httpx.Response) -> str:
    """Which TwiML document /voice answered: connect, busy or unavailable."""
    root = ET.fromstring(response.text)
    if root.find("Connect") is not None:
        return "connect"
    said = (root.findtext("Say") or "").lower()
    return "busy" if "busy" in said else "unavailable"


def status(bridge: ServerThread) -> dict[str, Any]:
    return httpx.get(bridge.http_url + "/status", timeout=5).json()


def metric(bridge: ServerThread, line: str) -> bool:
    return line in httpx.get(bridge.http_url + "/metrics", timeout=5).text


def ready(bridge: ServerThread) -> tuple[int, dict[str, Any]]:
    response = httpx.get(bridge.http_url + "/readyz", timeout=5)
    return response.status_code, response.json()


# --- a new call needs a slot and token budget --------------------------------------------------------------


def test_voice_is_busy_when_no_device_has_token_budget_and_readyz_agrees(
    start_emulator: Callable[..., ServerThread], start_bridge: Callable[..., ServerThread]
) -> None:
    emulator = start_emulator(voice="echo")
    bridge = start_bridge(
        bridge_settings(emulator, **{"savants.device_ids": ["only"], "accounting.max_token_requests_per_minute": 2})
    )
    assert [answer(post_voice(bridge, call_form())) for _ in range(3)] == ["connect", "connect", "busy"]
    assert token_requests(emulator) == 2  # the warm tokens were the budget; the third call never asked
    device = status(bridge)["accounting"]["devices"]["only"]
    assert (device["reservations"], device["tokens_in_window"]) == (2, 2)  # slots free (10), budget gone
    assert ready(bridge) == (
        503,
        {"ready": False, "reason": "device pool full", "detail": "no device has both a free slot and token budget"},
    )
    assert metric(bridge, 'bridge_admission_refused_total{where="webhook"} 1.0')
    assert emulator_stats(emulator)["violations"] == []


def test_no_budget_at_stream_start_is_not_counted_as_a_token_request(
    start_emulator: Callable[..., ServerThread], start_bridge: Callable[..., ServerThread]
) -> None:
    """Cold start (no warm token): two webhooks see budget for one; the second stream finds none left."""
    emulator = start_emulator(voice="echo")
    bridge = start_bridge(
        bridge_settings(
            emulator,
            **{
                "savants.device_ids": ["only"],
                "savants.warm_token": False,
                "accounting.max_token_requests_per_minute": 1,
            },
        )
    )
    first, second = signed_call(bridge, seconds=1.0), signed_call(bridge, seconds=4.0)

    async def both() -> None:
        heard_first = await run_call(first)
        assert heard_first.close_code is not None or heard_first.ended_by == "caller"
        refused = await run_call(second)
        assert refused.ended_by == "bridge"

    asyncio.run(both())
    assert token_requests(emulator) == 1
    assert metric(bridge, "bridge_token_no_budget_total 1.0")
    assert 'result="NO_BUDGET"' not in httpx.get(bridge.http_url + "/metrics", timeout=5).text
    wait_until(lambda: leases(bridge) == 0, 5.0, "every slot back")


# --- token endpoint failures at the webhook ----------------------------------------------------------------


def test_token_5xx_is_retried_within_the_webhook_deadline(
    start_emulator: Callable[..., ServerThread], start_bridge: Callable[..., ServerThread]
) -> None:
    emulator = start_emulator(voice="echo", token_faults=(TokenFault(status=503, select=Selector(count=2)),))
    bridge = start_bridge(bridge_settings(emulator))
    started = time.monotonic()
    assert answer(post_voice(bridge, call_form())) == "connect"
    assert time.monotonic() - started < 3.0
    assert token_requests(emulator) == 3  # each retry is a request of its own, counted before it was sent
    assert metric(bridge, 'bridge_token_requests_total{result="SERVICE_UNAVAILABLE"} 2.0')
    assert metric(bridge, 'bridge_token_requests_total{result="OK"} 1.0')
    assert ready(bridge)[0] == 200  # the endpoint answered in the end


def test_token_timeout_is_retried(
    start_emulator: Callable[..., ServerThread], start_bridge: Callable[..., ServerThread]
) -> None:
    emulator = start_emulator(voice="echo", token_faults=(TokenFault(delay_s=3.0, select=Selector(count=1)),))
    bridge = start_bridge(bridge_settings(emulator, **{"savants.token_timeout_s": 0.8}))
    started = time.monotonic()
    assert answer(post_voice(bridge, call_form())) == "connect"
    assert time.monotonic() - started < 3.0
    assert metric(bridge, 'bridge_token_requests_total{result="TIMEOUT"} 1.0')


def test_a_failing_token_endpoint_answers_unavailable_in_time_and_readyz_recovers_by_probe(
    start_emulator: Callable[..., ServerThread], start_bridge: Callable[..., ServerThread]
) -> None:
    emulator = start_emulator(voice="echo", token_faults=(TokenFault(status=500),))
    bridge = start_bridge(bridge_settings(emulator, **{"savants.probe_interval_s": 1}))
    started = time.monotonic()
    assert answer(post_voice(bridge, call_form())) == "unavailable"
    assert time.monotonic() - started < 3.5  # Twilio waits 15 s; the caller should not
    assert leases(bridge) == 0  # the failed admission gave its reservation back
    code, body = ready(bridge)
    assert (code, body["reason"]) == (503, "token endpoint failing")
    assert "CONFIGURATION_ERROR" in body["detail"]
    time.sleep(1.5)  # a probe is due: it meets the outage too, so readyz stays 503
    assert ready(bridge)[0] == 503
    wait_until(lambda: emulator_stats(emulator)["faults"]["injected"]["token:500"] >= 2, 5.0, "a probe")
    assert ready(bridge)[0] == 503

    httpx.delete(emulator.http_url + "/_emulator/faults", timeout=5)
    wait_until(lambda: ready(bridge)[0] == 200, 10.0, "readyz to recover through the probe")
    stats = emulator_stats(emulator)
    assert stats["tokens_issued"] == 0  # the probe is not a token request
    assert stats["errors"].get("INVALID_REQUEST", 0) >= 1  # it is an empty body, refused with 400


def test_a_429_moves_the_call_to_another_device(
    start_emulator: Callable[..., ServerThread], start_bridge: Callable[..., ServerThread]
) -> None:
    fault = TokenFault(status=429, retry_after_s=40, select=Selector(devices=frozenset({"device-a"})))
    emulator = start_emulator(voice="echo", token_faults=(fault,))
    bridge = start_bridge(bridge_settings(emulator))
    assert answer(post_voice(bridge, call_form())) == "connect"
    devices = status(bridge)["accounting"]["devices"]
    assert devices["device-a"]["exhausted_for_s"] > 30  # retryAfter honoured
    assert (devices["device-a"]["reservations"], devices["device-b"]["reservations"]) == (0, 1)


def test_a_refused_device_leaves_the_pool_logged_once(
    start_emulator: Callable[..., ServerThread],
    start_bridge: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fault = TokenFault(status=401, error_code="DEVICE_INACTIVE", select=Selector(devices=frozenset({"device-a"})))
    emulator = start_emulator(voice="echo", token_faults=(fault,))
    bridge = start_bridge(bridge_settings(emulator, **{"savants.device_suspend_s": 120}))
    with caplog.at_level(logging.ERROR):
        answers = [answer(post_voice(bridge, call_form())) for _ in range(3)]
    assert answers == ["connect"] * 3
    devices = status(bridge)["accounting"]["devices"]
    assert devices["device-a"]["exhausted_for_s"] > 100
    assert (devices["device-a"]["reservations"], devices["device-b"]["reservations"]) == (0, 3)
    refused = [r for r in caplog.records if "leaves the pool" in r.getMessage()]
    assert len(refused) == 1 and "DEVICE_INACTIVE" in refused[0].getMessage()


async def test_every_device_refused_leaves_no_cycle(start_emulator: Callable[..., ServerThread]) -> None:
    """The refusal kept to say why no device is left is raised from the admission loop's own frame: held there, it
    made a cycle with the frame until a full collection, rare in a serving process."""
    emulator = start_emulator(voice="echo", token_faults=(TokenFault(status=401, error_code="DEVICE_INACTIVE"),))
    clock = SystemClock()
    async with JsonPoster(emulator.http_url) as http:
        voice = VoiceEndpoint(open_voice_session, emulator.ws_url + "/voice-stream", 5.0)
        accounting = MemoryAccounting(("device-a", "device-b"), Limits(), clock)
        admission = Admission(accounting, TokenClient(http, "test-key"), voice, MemoryStore(clock), Metrics(), clock)
        with collector_off() as left:
            with pytest.raises(TokenError) as refused:
                await admission.admit("CA1")
            assert refused.value.code == "DEVICE_INACTIVE"
            del refused
    assert not [name for name in left if "admission.py" in name], left


# --- stream tokens and reservations ------------------------------------------------------------------------


def wrong_and_right_streams(bridge: ServerThread, **right: Any) -> tuple[CallConfig, CallConfig]:
    """A ringing call's stream with a wrong token, and its real one (with the token the webhook minted)."""
    form = call_form()
    parameters = stream_parameters(post_voice(bridge, form))
    url, call_sid = bridge.ws_url + "/media-stream", form["CallSid"]
    wrong = CallConfig(
        url=url,
        call_sid=call_sid,
        custom_parameters={**parameters, "token": "not-the-token"},
        headers=upgrade_signature(),
        seconds=2.0,
    )
    real = CallConfig(
        url=url,
        call_sid=call_sid,
        custom_parameters=parameters,
        headers=upgrade_signature(),
        audio_in=VOICE,
        seconds=2.0,
        **right,
    )
    return wrong, real


async def test_a_wrong_stream_token_spoils_nothing_and_leaves_the_reservation_to_the_right_stream(
    emulator: ServerThread, bridge: ServerThread
) -> None:
    wrong, right = wrong_and_right_streams(bridge)
    assert leases(bridge) == 1
    refused = await run_call(wrong)
    assert (refused.ended_by, refused.close_code) == ("bridge", 1008)
    assert leases(bridge) == 1  # not the call's stream: it gave back nothing of the call's
    result = await run_call(right)
    assert result.heard_s > 1.0  # the right token still admits the call: the AI answers
    assert token_requests(emulator) == 1  # on its reservation's warm token
    await asyncio.to_thread(wait_until, lambda: leases(bridge) == 0, 5.0, "every slot back")


@pytest.mark.parametrize("right_after_s", [0.0, 0.05, 0.3])
async def test_a_wrong_token_stream_racing_the_right_one_never_harms_it(
    emulator: ServerThread, bridge: ServerThread, right_after_s: float
) -> None:
    """A stream with a wrong token for a ringing call, just before (or with) the real one: it is refused
    before it claims anything, so the real stream is never taken for a duplicate and finds its reservation
    and warm token intact."""
    wrong, right = wrong_and_right_streams(bridge, start_delay_s=right_after_s)
    refused, result = await asyncio.gather(run_call(wrong), run_call(right))
    assert (refused.ended_by, refused.close_code) == ("bridge", 1008)
    assert (result.ended_by, result.violations) == ("caller", []) and result.heard_s > 1.0
    stats = emulator_stats(emulator)
    assert (token_requests(emulator), stats["sessions_opened"]) == (1, 1)  # the warm token, not a cold start
    assert not metric(bridge, 'bridge_streams_refused_total{reason="duplicate_call_sid"} 1.0')
    assert metric(bridge, "bridge_stream_token_refused_total 1.0")
    await asyncio.to_thread(wait_until, lambda: leases(bridge) == 0, 5.0, "every slot back")


async def test_a_stream_without_a_token_takes_nothing_and_the_reservation_lapses(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread]
) -> None:
    bridge = start_bridge(bridge_settings(emulator, **{"accounting.reservation_ttl_s": 1.0}))
    form = call_form()
    post_voice(bridge, form)
    config = CallConfig(
        url=bridge.ws_url + "/media-stream", call_sid=form["CallSid"], headers=upgrade_signature(), seconds=2.0
    )
    refused = await run_call(config)
    assert refused.close_code == 1008
    assert emulator_stats(emulator)["sessions_opened"] == 0
    await asyncio.to_thread(wait_until, lambda: leases(bridge) == 0, 5.0, "the reservation to lapse")


@pytest.mark.parametrize("callback", ["stream-ended", "stream-error"])
def test_a_stream_ended_or_error_callback_gives_the_reservation_back(
    emulator: ServerThread, bridge: ServerThread, callback: str
) -> None:
    form = call_form()
    assert answer(post_voice(bridge, form)) == "connect"
    assert leases(bridge) == 1
    done = {"CallSid": form["CallSid"], "AccountSid": form["AccountSid"]}
    if callback == "stream-ended":
        response = stream_callback(bridge, "/stream-ended", {**done, "CallStatus": "in-progress"})
    else:
        error = {**done, "StreamSid": new_sid("MZ"), "StreamEvent": "stream-error", "StreamError": "could not connect"}
        response = stream_callback(bridge, "/stream-status", error)
    assert response.status_code in (200, 204)
    assert leases(bridge) == 0  # at once, not after reservation_ttl_s


def test_an_unclaimed_reservation_lapses_after_its_ttl(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread]
) -> None:
    bridge = start_bridge(bridge_settings(emulator, **{"accounting.reservation_ttl_s": 0.5}))
    post_voice(bridge, call_form())
    assert leases(bridge) == 1
    wait_until(lambda: leases(bridge) == 0, 5.0, "the reservation to lapse")


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[], Store]]:
    if request.param == "memory":
        yield MemoryStore
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    clients: list[aioredis.Redis] = []

    def make() -> Store:
        clients.append(aioredis.Redis.from_url(server.url, decode_responses=True))
        return RedisStore(clients[-1], prefix=f"t{new_sid('X')[-8:]}:")

    yield make
    for client in clients:
        await client.aclose()


async def test_store_take_if_equal_consumes_only_a_match(store: Callable[[], Store]) -> None:
    kv = store()
    await kv.put("k", "right", 5.0)
    assert not await kv.take_if_equal("k", "wrong")
    assert not await kv.take_if_equal("k", "")
    assert await kv.take_if_equal("k", "right")  # the right one still works after wrong guesses
    assert not await kv.take_if_equal("k", "right")  # once
    assert not await kv.take_if_equal("absent", "x")
    await kv.close()


# --- a fresh token for a reconnect ----------------------------------------------------------------------------


async def test_reconnect_takes_a_fresh_token_moving_the_call_when_its_device_has_no_budget(
    emulator: ServerThread,
) -> None:
    clock = SystemClock()
    accounting = MemoryAccounting(("device-a", "device-b"), Limits(max_token_requests=3), clock)
    async with JsonPoster(emulator.http_url) as http:
        tokens = TokenClient(http, "test-key")
        voice = VoiceEndpoint(open_voice_session, emulator.ws_url + "/voice-stream", 5.0)
        admission = Admission(accounting, tokens, voice, MemoryStore(clock), Metrics(), clock)
        slot = CallSlot(await accounting.acquire("CA1"))
        assert slot.lease.device_id == "device-a"
        session = await admission.reconnect(slot, deadline=clock.monotonic() + 3)
        await session.close()
        assert slot.lease.device_id == "device-a"  # its own device had budget

        await accounting.exhaust("device-a", 60)  # e.g. Savants said 429 for it
        session = await admission.reconnect(slot, deadline=clock.monotonic() + 3)
        await session.close()
        assert slot.lease == Lease("CA1", "device-b")
        devices = (await accounting.snapshot())["devices"]
        assert (devices["device-a"]["calls"], devices["device-b"]["calls"]) == ([], ["CA1"])
        assert devices["device-b"]["tokens_in_window"] == 1

        await accounting.exhaust("device-b", 60)  # nowhere left with budget
        started = clock.monotonic()
        with pytest.raises(TokenError) as no_budget:
            await admission.reconnect(slot, deadline=clock.monotonic() + 0.5)
        assert no_budget.value.code == "NO_BUDGET" and clock.monotonic() - started < 2.0
        assert slot.lease.device_id == "device-b"  # the call keeps its slot
    stats = emulator_stats(emulator)
    assert stats["sessions_opened"] == 2 and stats["violations"] == []
