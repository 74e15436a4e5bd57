"""Several bridge processes sharing one Redis: the device limits hold across replicas, and survive a crash."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.caller import run_call
from telephony_bridge.tools.twilio_flow import run_flow
from tests.redis_server import RedisServer, free_port
from tests.support import (
    AUTH_TOKEN,
    PUBLIC_URL,
    BridgeProcess,
    bridge_settings,
    call_form,
    emulator_stats,
    leases,
    post_voice,
    signed_call,
    wait_until,
)

VOICE = (np.sin(2 * np.pi * 300 * np.arange(8000 * 4) / 8000) * 3000).astype(np.int16)


@pytest.fixture
def replicas(emulator: ServerThread, redis_server: RedisServer) -> Iterator[Callable[..., BridgeProcess]]:
    started: list[BridgeProcess] = []

    def start(**env: str) -> BridgeProcess:
        process = BridgeProcess(emulator, {"REDIS_URL": redis_server.url, **env})
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def pool_load(bridge: BridgeProcess) -> int:
    return leases(bridge)  # type: ignore[arg-type]


async def test_two_replicas_share_the_pool_and_never_exceed_it(
    emulator: ServerThread, replicas: Callable[..., BridgeProcess]
) -> None:
    """25 simultaneous calls over 2 replicas, 2 devices of 10: exactly 20 served, 5 busy, 0 violations."""
    first, second = replicas(), replicas()
    async with httpx.AsyncClient(trust_env=False, timeout=15) as http:
        flows = [
            run_flow(
                bridge.http_url,
                http=http,
                audio_in=VOICE,
                seconds=3.0,
                auth_token=AUTH_TOKEN,
                public_url=PUBLIC_URL,
            )
            for i in range(25)
            for bridge in [first if i % 2 == 0 else second]
        ]
        results = await asyncio.gather(*flows)
    outcomes = [result.outcome for result in results]
    assert outcomes.count("served") == 20, [r.reason for r in results if r.outcome != "served"]
    assert outcomes.count("busy") == 5
    stats = emulator_stats(emulator)
    assert stats["violations"] == []
    assert stats["sessions_opened"] == 20


async def test_a_killed_replica_frees_its_slots_within_the_lease_ttl(
    emulator: ServerThread, replicas: Callable[..., BridgeProcess], tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("accounting:\n  lease_ttl_s: 2\n")
    doomed, survivor = replicas(BRIDGE_CONFIG=str(config)), replicas(BRIDGE_CONFIG=str(config))
    call = asyncio.create_task(run_call(signed_call(doomed, audio_in=VOICE, seconds=10.0)))
    await asyncio.to_thread(wait_until, lambda: pool_load(survivor) == 1, 5.0, "the lease to show in Redis")
    doomed.proc.send_signal(signal.SIGKILL)
    result = await call
    assert result.ended_by == "bridge"  # the socket died with the process
    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    await asyncio.to_thread(wait_until, lambda: pool_load(survivor) == 0, 10.0, "the dead replica's slot to lapse")
    assert loop.time() - killed_at <= 2.0 + 3.0  # the TTL, plus generous slack for a loaded machine


def test_redis_unreachable_fails_closed_with_one_clear_line(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture
) -> None:
    bridge = start_bridge(bridge_settings(emulator, redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    with caplog.at_level(logging.WARNING):
        answer = post_voice(bridge, call_form())
    root = ET.fromstring(answer.text)
    assert [child.tag for child in root] == ["Say", "Hangup"]  # the busy answer: no dead air
    outage = [r for r in caplog.records if r.levelno == logging.ERROR and "did not answer" in r.getMessage()]
    assert len(outage) == 1  # the outage, said once; the refused call has its own WARNING line
    metrics = httpx.get(bridge.http_url + "/metrics").text
    [unanswered] = [line for line in metrics.splitlines() if line.startswith("bridge_accounting_unavailable_total ")]
    assert float(unanswered.split()[1]) >= 1  # each request Redis did not answer: the replay check's, admission's
    assert httpx.get(bridge.http_url + "/readyz").status_code == 503
    assert emulator_stats(emulator)["tokens_issued"] == 0


def test_redis_unreachable_answers_voice_busy_not_ai_unavailable(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture
) -> None:
    """README says a Redis outage "answers new calls busy (fail closed)". The replay check (``Admission.replayed``)
    reads the shared store before admission, and its ``StoreUnavailable`` was answered with the *unavailable*
    document and an ERROR blaming the AI (found by a review). The test above cannot tell: both documents are
    ``<Say/><Hangup/>`` and the store's message also says "did not answer"."""
    bridge = start_bridge(bridge_settings(emulator, redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    with caplog.at_level(logging.WARNING):
        post_voice(bridge, call_form())
    metrics = httpx.get(bridge.http_url + "/metrics").text
    blamed_ai = [r.getMessage() for r in caplog.records if "the AI is unavailable" in r.getMessage()]
    assert (
        'bridge_webhook_answers_total{document="busy"} 1.0' in metrics,
        'bridge_admission_refused_total{where="webhook"} 1.0' in metrics,
        blamed_ai,
    ) == (True, True, [])


async def test_calls_in_progress_continue_when_redis_goes_away(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread], own_redis_server: RedisServer
) -> None:
    bridge = start_bridge(bridge_settings(emulator, redis_url=own_redis_server.url))
    call = asyncio.create_task(run_call(signed_call(bridge, audio_in=VOICE, seconds=3.0)))
    await asyncio.to_thread(
        wait_until, lambda: len(httpx.get(bridge.http_url + "/status").json()["calls"]) == 1, 5.0, "the call"
    )
    own_redis_server.stop()
    result = await call
    assert result.ended_by == "caller" and result.heard_s > 2.0


async def test_webhook_on_one_replica_stream_on_another(
    emulator: ServerThread, replicas: Callable[..., BridgeProcess]
) -> None:
    """Behind a load balancer Twilio's webhook and its stream may reach different replicas: the stream token
    and the device reservation travel through Redis (the warm token does not: the stream starts cold)."""
    webhook_replica, stream_replica = replicas(), replicas()
    form = call_form()
    config = signed_call(webhook_replica, form, audio_in=VOICE, seconds=2.0)
    config = dataclasses.replace(config, url=stream_replica.ws_url + "/media-stream")
    result = await run_call(config)
    assert result.ended_by == "caller" and result.heard_s > 1.0
    stats = emulator_stats(emulator)
    assert (stats["tokens_issued"], stats["sessions_opened"], stats["violations"]) == (2, 1, [])
    # The same stream token again, on the replica that minted it: spent, whichever replica saw it used.
    replayed = await run_call(dataclasses.replace(config, url=webhook_replica.ws_url + "/media-stream"))
    assert replayed.ended_by == "bridge" and replayed.close_code == 1008
