"""Failures found by a fault-injection pass on the Twilio ingress, the Savants leg, accounting and ops
(stop 25), each on real sockets: what the caller hears, the log lines, and nothing held after."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

import httpx
import numpy as np
import pytest
import uvicorn
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from telephony_bridge.ops import logging as oplog
from telephony_bridge.serving import DrainingServer, ServerThread
from telephony_bridge.tools.caller import CallConfig, new_sid, run_call
from telephony_bridge.tools.emulator.faults import Selector, TokenFault
from telephony_bridge.tools.twilio_flow import Hangup, Say, parse_twiml
from telephony_bridge.twilio import protocol as tw
from tests.redis_server import RedisServer
from tests.support import (
    BridgeProcess,
    bridge_settings,
    call_form,
    emulator_stats,
    leases,
    post_voice,
    signed_call,
    stream_parameters,
    token_requests,
    upgrade_signature,
    wait_until,
)

VOICE = (np.sin(2 * np.pi * 300 * np.arange(8000 * 5) / 8000) * 3000).astype(np.int16)
TOKEN_DELAY_S = 1.5  # a slow token endpoint: the webhook is still admitting the call when SIGTERM comes


def calls_up(bridge: ServerThread) -> int:
    return len(httpx.get(bridge.http_url + "/status", timeout=5).json()["calls"])


async def test_sigterm_while_a_webhook_is_admitting_its_call_never_answers_connect_for_a_stream_nobody_serves(
    start_emulator: Callable[..., ServerThread],
) -> None:
    """The drain counts calls up and streams admitted, but not a webhook still admitting (its token request in
    flight): it found nothing to wait for and the process exited, while the webhook went on to answer
    ``<Connect>``. Twilio then opened a stream to a bridge that was gone. Either answer is right: busy (the
    replica is draining), or ``<Connect>`` to a stream the draining bridge still serves."""
    slow = TokenFault(delay_s=TOKEN_DELAY_S, select=Selector(count=1))
    emulator = start_emulator(voice="echo", token_faults=(slow,))
    bridge = BridgeProcess(emulator)
    try:
        form = call_form()
        webhook = asyncio.create_task(asyncio.to_thread(post_voice, bridge, form))
        # admission has reserved a device and waits on the token endpoint now (not a sleep: a slow machine would
        # let the signal come before the webhook, and test the early busy answer instead)
        await asyncio.to_thread(wait_until, lambda: leases(bridge) == 1, 5.0, "admission to reserve a device")
        bridge.proc.send_signal(signal.SIGTERM)
        answer = await webhook
        document = parse_twiml(answer.text)
        if document.connect is None:
            assert isinstance(document.verbs[-1], Hangup) and any(isinstance(v, Say) for v in document.verbs)
        else:
            config = CallConfig(
                url=bridge.ws_url + "/media-stream",
                call_sid=form["CallSid"],
                custom_parameters=stream_parameters(answer),
                headers=upgrade_signature(),
                seconds=1.0,
            )
            try:
                result = await run_call(config)
            except OSError as exc:
                pytest.fail(f"the bridge answered <Connect> during its drain, then exited before the stream: {exc}")
            assert result.ended_by == "caller" and result.heard_s > 0.3
        assert await asyncio.to_thread(bridge.finish, 15.0) == 0
    finally:
        bridge.kill()


async def test_the_drain_does_not_log_in_the_context_of_whichever_call_the_signal_interrupted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A signal handler runs between two bytecodes of whatever the loop's thread runs, often a call's task, and
    ``call_soon_threadsafe`` copies the context it finds. The drain's lines ("draining: ...", "drained: no
    calls left") then carried that call's call_sid, stream_sid and device_id (seen on a real ``serve`` with
    two calls up: 1 SIGTERM in 3). Here the signal lands inside a call's context on purpose."""
    logger = logging.getLogger("telephony_bridge.drain")
    drained = asyncio.Event()

    async def drain() -> None:
        logger.info("draining (test)")
        drained.set()

    oplog.install_context()
    server = DrainingServer(uvicorn.Config(app=lambda: None), drain)
    server._loop = asyncio.get_running_loop()  # as ``serve`` sets it
    with caplog.at_level(logging.INFO, logger="telephony_bridge.drain"):
        with oplog.call_context(call_sid="CA" + "0" * 32, stream_sid="MZ" + "0" * 32):
            server.handle_exit(signal.SIGTERM, None)
        async with asyncio.timeout(5):
            await drained.wait()
    line = next(r for r in caplog.records if r.getMessage() == "draining (test)")
    assert not hasattr(line, "call_sid") and not hasattr(line, "stream_sid")


@pytest.mark.parametrize("fragmented", [False, True], ids=["one-frame", "fragmented"])
async def test_an_oversized_twilio_message_gets_one_warning_naming_the_call_and_no_error(
    emulator: ServerThread, bridge: ServerThread, caplog: pytest.LogCaptureFixture, fragmented: bool
) -> None:
    """A message over 1 MiB closes the stream with 1009 (README). In one frame (picows' per-frame limit),
    picows' parser refused it with an ERROR line naming no call ("WS parser error: ..."); split over frames
    of 512 KiB (``Reassembler``), the stream closed with no line at all; either way the call ended as
    "twilio disconnected", outcome ``completed``, as if Twilio had hung up. Now: ``caller_lost``."""
    form = call_form()
    params = stream_parameters(post_voice(bridge, form))
    stream_sid = new_sid("MZ")
    huge = '{"event": "media", "junk": "' + "x" * (2 * 2**20) + '"}'
    with caplog.at_level(logging.INFO):
        async with connect(
            bridge.ws_url + "/media-stream", additional_headers=upgrade_signature(), proxy=None, max_size=None
        ) as ws:
            await ws.send(tw.Connected().to_json())
            await ws.send(tw.Start(stream_sid, form["CallSid"], form["AccountSid"], custom_parameters=params).to_json())
            await asyncio.to_thread(wait_until, lambda: calls_up(bridge) == 1, 5.0, "the call")
            with contextlib.suppress(ConnectionClosed):
                await ws.send([huge[i : i + 2**19] for i in range(0, len(huge), 2**19)] if fragmented else huge)
                async with asyncio.timeout(5):
                    async for _ in ws:
                        pass
            assert ws.close_code == 1009
        await asyncio.to_thread(wait_until, lambda: calls_up(bridge) == 0 and leases(bridge) == 0, 5.0, "release")
        wait_until(lambda: emulator_stats(emulator)["sessions_active"] == 0, what="the Savants socket to close")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    named = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and getattr(r, "call_sid", None) == form["CallSid"]
    ]
    assert named, "no warning line names the call whose stream was closed for an oversized message"
    ended = [r for r in caplog.records if r.getMessage() == "call ended"]
    assert [getattr(r, "outcome", None) for r in ended] == ["caller_lost"]  # not as if the caller had hung up


async def test_a_redis_outage_during_calls_is_counted_in_the_metric_even_when_no_new_call_comes(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread], own_redis_server: RedisServer
) -> None:
    """``bridge_accounting_unavailable_total`` ("Redis did not answer", README) was counted only where a call was
    refused for it (a webhook, a stream's start): an outage while calls went on (their heartbeats and releases
    failing, ``/readyz`` 503 "accounting unavailable", the ERROR line, the accounting's own ``unavailable_total``
    in ``/status`` all saying so) left the metric at 0, so an alert on it missed the outage."""
    settings = bridge_settings(emulator, redis_url=own_redis_server.url, **{"accounting.lease_ttl_s": 2})
    bridge = start_bridge(settings)
    call = asyncio.create_task(run_call(signed_call(bridge, audio_in=VOICE, seconds=4.0)))
    await asyncio.to_thread(wait_until, lambda: calls_up(bridge) == 1, 5.0, "the call")
    own_redis_server.stop()

    def outage_seen() -> bool:
        status = httpx.get(bridge.http_url + "/status", timeout=10).json()
        return status["accounting"].get("unavailable_total", 0) >= 2  # the snapshot's, and a heartbeat's

    await asyncio.to_thread(wait_until, outage_seen, 10.0, "the outage in /status")
    ready = httpx.get(bridge.http_url + "/readyz", timeout=10)
    assert (ready.status_code, ready.json()["reason"]) == (503, "accounting unavailable")
    result = await call
    assert result.ended_by == "caller" and result.heard_s > 3.0  # the call in progress went on
    metrics = httpx.get(bridge.http_url + "/metrics", timeout=10).text
    counted = [line for line in metrics.splitlines() if line.startswith("bridge_accounting_unavailable_total ")]
    assert counted and float(counted[0].split()[1]) >= 1, counted


async def test_a_call_gets_at_most_max_connects_per_call_voice_answers_so_replays_spend_nothing(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread]
) -> None:
    """Twilio signs no timestamp, so a captured /voice request stays valid: each replay was answered <Connect>,
    fetched a real Savants token and held a slot for the reservation's TTL, without end. Nothing in a replay tells
    it from Twilio asking again (a retry, a call update back to /voice with the same parameters), so a call's
    answers are bounded (``twilio.max_connects_per_call``): within it every request is answered, past it a bare
    <Hangup/> that spends nothing."""
    bridge = start_bridge(bridge_settings(emulator, **{"twilio.max_connects_per_call": 3}))
    form = call_form()
    retried = post_voice(bridge, form)  # a first answer lost on the way: Twilio asks again (signed_call's)
    assert parse_twiml(retried.text).connect is not None
    result = await run_call(signed_call(bridge, form, audio_in=VOICE, seconds=1.0))
    assert result.ended_by == "caller" and result.heard_s > 0.3
    await asyncio.to_thread(wait_until, lambda: calls_up(bridge) == 0 and leases(bridge) == 0, 5.0, "release")
    updated = post_voice(bridge, form)  # a call update back to /voice, the very same parameters: the third answer
    assert parse_twiml(updated.text).connect is not None
    tokens = token_requests(emulator)
    for _ in range(3):
        replay = post_voice(bridge, form)
        assert replay.status_code == 200
        assert [type(v) for v in parse_twiml(replay.text).verbs] == [Hangup]
    assert token_requests(emulator) == tokens
    metrics = httpx.get(bridge.http_url + "/metrics", timeout=5).text
    assert 'bridge_admission_refused_total{where="replay"} 3.0' in metrics
