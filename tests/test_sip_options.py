"""OPTIONS, the health check of a SIP dispatcher (Kamailio, OpenSIPS, an SBC), answers as ``/readyz`` does: a
replica that cannot take calls says 503 with the failing check in a ``Warning``, so the dispatcher takes it out
of rotation as a load balancer does on ``/readyz``, and puts it back once it can. Real sockets throughout: the
bridge with SIP on, a scripted fake Savants, a SIP caller, OPTIONS over UDP."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

from starlette.responses import PlainTextResponse

from telephony_bridge.savants.health import TRIP_AFTER
from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.sip_caller import SipCallConfig, place_sip_call
from tests.fake_savants import FakeSavants
from tests.support import wait_until
from tests.test_savants_faults import readyz
from tests.test_sip_calls import start_sip_bridge, status, target
from tests.test_sip_faults import RawUac, udp_socket


def options(port: int) -> tuple[int, str | None]:
    """An OPTIONS ping as a dispatcher sends it: the status, and the text of the ``Warning`` if any."""
    with udp_socket() as sock:
        sock.settimeout(5.0)
        sock.sendto(RawUac(port, sock.getsockname()[1]).request("OPTIONS"), ("127.0.0.1", port))
        answer = sock.recv(65535).decode()
    warning = re.search(r'^Warning: 399 telephony-bridge "([^"]*)"\r$', answer, re.M)
    return int(answer.split(" ", 2)[1]), warning.group(1) if warning else None


async def test_options_answers_503_naming_the_failing_check_and_200_once_it_passes(
    start_fake: Callable[..., FakeSavants], start_bridge: Callable[..., ServerThread]
) -> None:
    """The voice stream refuses every upgrade: SIP calls hear the fallback and a BYE, /readyz turns 503
    "voice stream failing", and so does OPTIONS, with Retry-After. Once the upgrade works again, a probe finds it
    and both answer 200, without a call."""
    down = True
    fake = start_fake(upgrade=lambda: PlainTextResponse("no backend", status_code=503) if down else None)
    settings = {
        "savants.probe_interval_s": 1,
        "savants.reconnect_deadline_s": 0,
        "accounting.readiness_cache_s": 0.2,
    }
    bridge = start_sip_bridge(start_bridge, fake.server, **settings)
    port = status(bridge)["sip"]["port"]
    assert options(port) == (200, None)
    calls = [place_sip_call(SipCallConfig(target(bridge), seconds=5.0)) for _ in range(TRIP_AFTER)]
    for result in await asyncio.gather(*calls):
        assert result.answered and result.ended_by == "bridge", result.summary()  # a BYE, never dead air
    assert readyz(bridge) == (503, "voice stream failing")
    await asyncio.to_thread(wait_until, lambda: options(port) == (503, "voice stream failing"), 5.0, "OPTIONS 503")
    down = False
    await asyncio.to_thread(wait_until, lambda: options(port) == (200, None), 5.0, "OPTIONS 200 again")
    assert readyz(bridge) == (200, None)
    wait_until(lambda: status(bridge)["sip"]["calls"] == 0 and fake.sessions_active == 0, 5.0, "all released")
    assert status(bridge)["sip"]["rtp_ports_in_use"] == 0


async def test_options_stays_200_while_the_device_pool_is_full_and_the_invite_hears_486(
    start_emulator: Callable[..., ServerThread], start_bridge: Callable[..., ServerThread]
) -> None:
    """A full pool is shared by every replica, so a dispatcher that took them all out would answer its own 503
    for "no bridge": OPTIONS leaves the pool out (while /readyz, for an HTTP load balancer, counts it) and the
    INVITE hears our 486 Busy Here, which a trunk handles."""
    emulator = start_emulator(voice="echo")
    settings = {"accounting.max_concurrent_per_device": 1, "accounting.readiness_cache_s": 0.2}
    bridge = start_sip_bridge(start_bridge, emulator, **settings)
    port = status(bridge)["sip"]["port"]
    calls = [asyncio.create_task(place_sip_call(SipCallConfig(target(bridge), seconds=4.0))) for _ in range(2)]
    await asyncio.to_thread(wait_until, lambda: readyz(bridge) == (503, "device pool full"), 5.0, "the pool full")
    assert options(port) == (200, None)
    refused = await place_sip_call(SipCallConfig(target(bridge), seconds=1.0))
    assert refused.status == 486 and not refused.answered, refused.summary()
    for result in await asyncio.gather(*calls):
        assert result.answered and result.ended_by == "caller", result.summary()
