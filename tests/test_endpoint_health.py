"""The Savants endpoints' health for ``/readyz`` (``savants/health.py``): a probe's verdict never undoes a newer one
that a real request brought while the probe ran, and which failed voice sessions count against the voice stream
(over real sockets: test_admission.py, test_savants_faults.py)."""

from __future__ import annotations

import asyncio

import pytest

from telephony_bridge.clock import FakeClock
from telephony_bridge.errors import SessionError
from telephony_bridge.ops.readiness import CAPACITY, Readiness
from telephony_bridge.savants.client import SavantsConnection
from telephony_bridge.savants.health import MAX_BACKOFF, EndpointHealth, stream_failure, watch_voice_stream

pytestmark = pytest.mark.timeout(10)


async def probe_meanwhile(verdict: str | None, real: str | None) -> EndpointHealth:
    """A failing endpoint's probe starts; while it waits, a real request's result comes (``real``: its error, or
    None for an answer); then the probe returns ``verdict``."""
    clock = FakeClock()
    health = EndpointHealth("Savants token endpoint", clock, probe_interval_s=1.0, trip_after=1)
    release = asyncio.Event()

    async def probe() -> str | None:
        await release.wait()
        return verdict

    health.attach_probe(probe)
    health.record_failure("HTTP 503 SERVICE_UNAVAILABLE")
    clock.advance(1.0)
    assert not health.healthy()  # the probe starts
    probing = health._probing
    assert probing is not None
    await asyncio.sleep(0)  # it is waiting
    if real is None:
        health.record_success()
    else:
        health.record_failure(real)
    release.set()
    await probing
    return health


async def test_a_real_answer_while_a_probe_runs_is_not_undone_by_the_probes_timeout() -> None:
    health = await probe_meanwhile("TIMEOUT: no answer within 5 s", real=None)
    assert (health.healthy(), health.last_error) == (True, None)


async def test_a_real_failure_while_a_probe_runs_is_not_undone_by_the_probes_answer() -> None:
    health = await probe_meanwhile(None, real="UNREACHABLE: connection refused")
    assert (health.healthy(), health.last_error) == (False, "UNREACHABLE: connection refused")


async def test_a_probe_alone_decides_when_no_real_request_came() -> None:
    clock = FakeClock()
    alone = EndpointHealth("Savants token endpoint", clock, probe_interval_s=1.0, trip_after=1)

    async def answers() -> str | None:
        return None

    alone.attach_probe(answers)
    alone.record_failure("HTTP 500")
    clock.advance(1.0)
    assert not alone.healthy()
    assert alone._probing is not None
    await alone._probing
    assert (alone.healthy(), alone.last_error) == (True, None)


@pytest.mark.parametrize(
    ("error", "failing"),
    [
        (SessionError("x", code="CONNECT_FAILED"), True),
        (SessionError("x", code="HTTP_503"), True),
        (SessionError("x", code="HTTP_404"), True),  # a wrong path: no session can open
        (SessionError("x", code="HTTP_429"), False),  # a rate: about us, as retry.py reads it
        (SessionError("x", code="HTTP_403"), False),  # access: a device over its sockets may hear so (spec §8)
        (SessionError("x", code="CLOSED", close_code=4500), True),  # 4000 + 500: Savants failing
        (SessionError("x", code="SERVICE_UNAVAILABLE"), True),  # said in-band, but about Savants itself
        (SessionError("x", code="CLOSED", close_code=1011), True),
        (SessionError("x", code="CLOSED", close_code=None), True),  # no close frame
        (SessionError("x", code="CLOSED", close_code=4408), False),  # an application's close: it judged us
        (SessionError("x", code="TOKEN_EXPIRED"), False),
        (SessionError("x", code="AUTH_TIMEOUT"), False),  # Savants': our token came late
        (SessionError("x", code="CONCURRENCY_LIMIT"), False),
    ],
)
def test_which_failed_session_opens_count_against_the_voice_stream(error: SessionError, failing: bool) -> None:
    assert stream_failure(error, 5.0, 5.0) is failing


@pytest.mark.parametrize("code", ["CONNECT_TIMEOUT", "CONFIRM_TIMEOUT"])
def test_a_timeout_counts_only_at_the_configured_timeout(code: str) -> None:
    """A reconnect near its deadline opens with less time than configured: its timeout is the call's haste."""
    timed_out = SessionError("x", code=code)
    assert (stream_failure(timed_out, 5.0, 5.0), stream_failure(timed_out, 1.2, 5.0)) == (True, None)


async def test_the_watched_connector_reports_each_open_and_nothing_for_a_cancelled_one() -> None:
    health = EndpointHealth("Savants voice stream", FakeClock(), probe_interval_s=1.0, trip_after=1)
    answers: list[BaseException | None] = [SessionError("refused", code="HTTP_503"), None, asyncio.CancelledError()]
    connection = SavantsConnection.__new__(SavantsConnection)  # never used: only passed through

    async def connect(url: str, token: str, timeout_s: float) -> SavantsConnection:
        answer = answers.pop(0)
        if answer is not None:
            raise answer
        return connection

    watched = watch_voice_stream(connect, health, 5.0)
    with pytest.raises(SessionError):
        await watched("ws://savants/voice-stream", "a.b.c", 5.0)
    assert health.last_error == "HTTP_503: refused"
    assert await watched("ws://savants/voice-stream", "a.b.c", 5.0) is connection
    assert health.last_error is None
    health.record_failure("CONNECT_FAILED: down")
    with pytest.raises(asyncio.CancelledError):
        await watched("ws://savants/voice-stream", "a.b.c", 5.0)
    assert health.last_error == "CONNECT_FAILED: down"


def test_it_takes_trip_after_failures_in_a_row_to_be_failing() -> None:
    """A lone failure among successes is no outage: the replica stays in rotation."""
    health = EndpointHealth("Savants voice stream", FakeClock(), trip_after=3)
    for _ in range(5):
        health.record_failure("CONNECT_FAILED: reset")
        health.record_failure("CONNECT_FAILED: reset")
        health.record_success()
    assert health.up
    for _ in range(3):
        health.record_failure("CONNECT_FAILED: refused")
    assert (health.up, health.last_error) == (False, "CONNECT_FAILED: refused")


async def test_the_probe_interval_doubles_each_time_its_all_clear_proves_wrong() -> None:
    """The voice stream's probe passes while Savants fails after the upgrade: each all-clear that real sessions
    then contradict doubles the wait for the next probe (up to MAX_BACKOFF times); a real success resets it."""
    clock = FakeClock()
    health = EndpointHealth("Savants voice stream", clock, probe_interval_s=1.0, trip_after=1)

    async def passes() -> str | None:
        return None

    async def wait_for_probe() -> float:
        failed_at = clock.monotonic()
        while True:
            clock.advance(0.5)
            health.healthy()
            if health._probing is not None and not health._probing.done():
                await health._probing
                assert health.up
                return clock.monotonic() - failed_at

    health.attach_probe(passes)
    health.record_failure("SERVER_ERROR: busy")
    waits = []
    for _ in range(5):
        waits.append(await wait_for_probe())
        health.record_failure("SERVER_ERROR: busy")  # the all-clear proves wrong
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0] and MAX_BACKOFF == 8
    health.record_success()
    health.record_failure("SERVER_ERROR: busy")
    assert await wait_for_probe() == 1.0


async def test_readiness_lets_a_failing_endpoint_probe_while_an_earlier_check_fails() -> None:
    """A failing endpoint is probed only when someone asks after it: with the pool full (or Redis down), the check
    stopped before asking, so the voice stream stayed "failing" (and its gauge 0, its alert firing) long after
    Savants had recovered, for as long as the pool stayed full."""

    class FullPool:
        async def snapshot(self) -> dict[str, object]:
            return {"limits": {"max_concurrent": 1, "max_token_requests": 60}, "devices": {}}

    clock = FakeClock()
    token = EndpointHealth("Savants token endpoint", clock, trip_after=1)
    voice = EndpointHealth("Savants voice stream", clock, probe_interval_s=1.0, trip_after=1)

    async def passes() -> str | None:
        return None

    voice.attach_probe(passes)
    voice.record_failure("HTTP_503: voice stream upgrade refused with HTTP 503")
    readiness = Readiness(FullPool(), token, voice, clock)  # type: ignore[arg-type]
    clock.advance(1.0)
    assert (await readiness.check(draining=False)).reason == CAPACITY
    assert voice._probing is not None
    await voice._probing
    assert voice.up
