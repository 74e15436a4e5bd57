"""The token endpoint's health for ``/readyz`` (``savants/health.py``): a probe's verdict never undoes a newer one
that a real token request brought while the probe ran (over real sockets: test_admission.py, test_savants_faults.py)."""

from __future__ import annotations

import asyncio

import pytest

from telephony_bridge.clock import FakeClock
from telephony_bridge.savants.health import TokenEndpointHealth

pytestmark = pytest.mark.timeout(10)


async def probe_meanwhile(verdict: str | None, real: str | None) -> TokenEndpointHealth:
    """A failing endpoint's probe starts; while it waits, a real request's result comes (``real``: its error, or
    None for an answer); then the probe returns ``verdict``."""
    clock = FakeClock()
    health = TokenEndpointHealth(clock, probe_interval_s=1.0)
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
    alone = TokenEndpointHealth(clock, probe_interval_s=1.0)

    async def answers() -> str | None:
        return None

    alone.attach_probe(answers)
    alone.record_failure("HTTP 500")
    clock.advance(1.0)
    assert not alone.healthy()
    assert alone._probing is not None
    await alone._probing
    assert (alone.healthy(), alone.last_error) == (True, None)
