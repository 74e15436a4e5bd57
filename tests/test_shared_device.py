"""Another client shares a device and spends its token budget: the bridge honours Savants' 429."""

from __future__ import annotations

import httpx
import numpy as np

from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.caller import run_call
from tests.support import emulator_stats, signed_call

VOICE = (np.sin(2 * np.pi * 500 * np.arange(8000 * 2) / 8000) * 3000).astype(np.int16)


def exhaust_device(emulator: ServerThread, device_id: str) -> None:
    """What another client of the same device does: 60 token requests in a minute."""
    for _ in range(60):
        response = httpx.post(
            emulator.http_url + "/api/websocket-voice/token",
            json={"apiKey": "test-key", "deviceId": device_id},
            timeout=5,
        )
        assert response.status_code == 200


async def test_a_429_marks_the_device_exhausted_and_the_call_goes_to_another(
    emulator: ServerThread, bridge: ServerThread
) -> None:
    exhaust_device(emulator, "device-a")
    result = await run_call(signed_call(bridge, audio_in=VOICE, seconds=2.0))
    assert result.heard_s > 1.0
    devices = httpx.get(bridge.http_url + "/status").json()["accounting"]["devices"]
    assert devices["device-a"]["exhausted_for_s"] > 30  # retryAfter honoured
    assert devices["device-b"]["tokens_in_window"] == 1
    # The one refused request was ours, before we knew; the next call does not touch device-a at all.
    assert [v["device_id"] for v in emulator_stats(emulator)["violations"]] == ["device-a"]
    await run_call(signed_call(bridge, seconds=0.5))
    assert len(emulator_stats(emulator)["violations"]) == 1
    assert 'bridge_token_requests_total{result="RATE_LIMITED"} 1.0' in httpx.get(bridge.http_url + "/metrics").text
