"""Twilio-facing surface on real sockets: signed webhooks, TwiML answers, signed upgrades, stream tokens."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from telephony_bridge.serving import ServerThread
from telephony_bridge.tools.caller import CallConfig, new_sid, run_call
from tests.support import (
    PUBLIC_URL,
    bridge_settings,
    call_form,
    emulator_stats,
    leases,
    post_voice,
    sign,
    stream_parameters,
    token_requests,
    upgrade_signature,
    wait_until,
)

# --- /voice -------------------------------------------------------------------------------------------------


def test_voice_signed_webhook_connects_with_a_stream_token(emulator: ServerThread, bridge: ServerThread) -> None:
    response = post_voice(bridge, call_form())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/xml")
    root = ET.fromstring(response.text)
    stream = root.find("Connect/Stream")
    assert stream is not None
    assert stream.attrib["url"] == "wss://bridge.example.test/media-stream"
    assert stream.attrib["statusCallback"] == "https://bridge.example.test/stream-status"
    assert root.find("Connect").attrib["action"] == "https://bridge.example.test/stream-ended"  # type: ignore[union-attr]
    params = stream_parameters(response)
    assert len(params["token"]) >= 32 and params["from"] == "+15551230000" and params["to"] == "+15559870000"
    assert token_requests(emulator) == 1  # warm start: the call's token is fetched at admission


def test_voice_get_signed_over_the_query_string(emulator: ServerThread, bridge: ServerThread) -> None:
    form = call_form()
    query = str(httpx.QueryParams(form))
    signature = sign(f"{PUBLIC_URL}/voice?{query}", {})
    response = httpx.get(f"{bridge.http_url}/voice?{query}", headers={"X-Twilio-Signature": signature}, timeout=10)
    assert response.status_code == 200 and "<Connect" in response.text


@pytest.mark.parametrize(
    "signature",
    [None, "AAAAAAAAAAAAAAAAAAAAAAAAAAA=", "internal-url"],
    ids=["missing", "wrong", "signed-over-the-internal-url"],
)
def test_voice_bad_signature_is_403_before_any_work(
    emulator: ServerThread, bridge: ServerThread, signature: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    form = call_form()
    if signature == "internal-url":
        signature = sign(bridge.http_url + "/voice", form)
    with caplog.at_level(logging.WARNING):
        response = post_voice(bridge, form, signature)
    assert response.status_code == 403
    assert token_requests(emulator) == 0 and leases(bridge) == 0
    assert any("refused /voice from 127.0.0.1" in r.getMessage() for r in caplog.records)
    metrics = httpx.get(bridge.http_url + "/metrics", timeout=5).text
    assert 'bridge_signature_failures_total{path="/voice"} 1.0' in metrics


def test_voice_changed_parameter_is_refused(emulator: ServerThread, bridge: ServerThread) -> None:
    form = call_form()
    signature = sign(PUBLIC_URL + "/voice", form)
    assert post_voice(bridge, {**form, "From": "+15550000000"}, signature).status_code == 403


def test_voice_busy_when_no_device_can_take_the_call(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread]
) -> None:
    bridge = start_bridge(
        bridge_settings(emulator, **{"savants.device_ids": ["only"], "accounting.max_concurrent_per_device": 1})
    )
    assert "<Connect" in post_voice(bridge, call_form()).text
    busy = post_voice(bridge, call_form())
    root = ET.fromstring(busy.text)
    assert [child.tag for child in root] == ["Say", "Hangup"]
    assert "busy" in (root.find("Say").text or "")  # type: ignore[union-attr]
    assert 'bridge_admission_refused_total{where="webhook"} 1.0' in httpx.get(bridge.http_url + "/metrics").text
    ready = httpx.get(bridge.http_url + "/readyz")
    assert (ready.status_code, ready.json()) == (
        503,
        {"ready": False, "reason": "device pool full", "detail": "no device has both a free slot and token budget"},
    )


def test_readyz_ready_when_the_pool_has_room_and_configurable_when_full(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread]
) -> None:
    bridge = start_bridge(
        bridge_settings(
            emulator,
            **{
                "savants.device_ids": ["only"],
                "accounting.max_concurrent_per_device": 1,
                "accounting.not_ready_when_full": False,
            },
        )
    )
    assert httpx.get(bridge.http_url + "/readyz").json() == {"ready": True}
    post_voice(bridge, call_form())
    assert httpx.get(bridge.http_url + "/readyz").status_code == 200
    assert httpx.get(bridge.http_url + "/healthz").json() == {"status": "ok", "mode": "production"}


def test_voice_busy_as_a_reject(emulator: ServerThread, start_bridge: Callable[..., ServerThread]) -> None:
    bridge = start_bridge(
        bridge_settings(
            emulator,
            **{
                "savants.device_ids": ["only"],
                "accounting.max_concurrent_per_device": 1,
                "twilio.busy_response": "reject",
            },
        )
    )
    post_voice(bridge, call_form())
    assert '<Reject reason="busy" />' in post_voice(bridge, call_form()).text


def test_voice_unavailable_when_the_token_endpoint_fails(
    start_emulator: Callable[..., ServerThread], start_bridge: Callable[..., ServerThread]
) -> None:
    emulator = start_emulator(token_failure=500)
    bridge = start_bridge(bridge_settings(emulator))
    root = ET.fromstring(post_voice(bridge, call_form()).text)
    assert [child.tag for child in root] == ["Say", "Hangup"]
    assert "not available" in (root.find("Say").text or "")  # type: ignore[union-attr]
    assert leases(bridge) == 0  # the reservation was given back


# --- /stream-status and /stream-ended -----------------------------------------------------------------------


def test_stream_status_callbacks_are_validated_logged_and_counted(
    emulator: ServerThread, bridge: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    form = {
        "AccountSid": new_sid("AC"),
        "CallSid": new_sid("CA"),
        "StreamSid": new_sid("MZ"),
        "StreamEvent": "stream-error",
        "StreamError": "Connection to wss://bridge.example.test/media-stream failed",
        "Timestamp": "2026-11-22T04:00:00Z",
    }
    url = bridge.http_url + "/stream-status"
    assert httpx.post(url, data=form, timeout=5).status_code == 403
    with caplog.at_level(logging.WARNING):
        signed = {"X-Twilio-Signature": sign(PUBLIC_URL + "/stream-status", form)}
        assert httpx.post(url, data=form, headers=signed, timeout=5).status_code == 204
    assert any("stream error: Connection to wss://" in r.getMessage() for r in caplog.records)
    assert 'bridge_stream_status_total{event="stream-error"} 1.0' in httpx.get(bridge.http_url + "/metrics").text


def test_stream_ended_apologises_when_the_outcome_is_unknown(emulator: ServerThread, bridge: ServerThread) -> None:
    form = {"CallSid": new_sid("CA"), "AccountSid": new_sid("AC"), "CallStatus": "in-progress"}
    headers = {"X-Twilio-Signature": sign(PUBLIC_URL + "/stream-ended", form)}
    root = ET.fromstring(httpx.post(bridge.http_url + "/stream-ended", data=form, headers=headers).text)
    assert [child.tag for child in root] == ["Say", "Hangup"]


# --- the media-stream upgrade and the stream token ----------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Twilio-Signature": "AAAAAAAAAAAAAAAAAAAAAAAAAAA="},
        upgrade_signature(PUBLIC_URL + "/media-stream"),  # https://, not wss://
    ],
    ids=["unsigned", "wrongly-signed", "signed-over-https"],
)
async def test_upgrade_refused_before_accept(
    emulator: ServerThread, bridge: ServerThread, headers: dict[str, str]
) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with connect(bridge.ws_url + "/media-stream", additional_headers=headers, proxy=None):
            pass
    assert info.value.response.status_code == 403


async def test_upgrade_signed_over_wss_with_a_valid_stream_token_is_bridged(
    emulator: ServerThread, bridge: ServerThread
) -> None:
    form = call_form()
    params = stream_parameters(post_voice(bridge, form))
    result = await run_call(
        CallConfig(
            url=bridge.ws_url + "/media-stream",
            call_sid=form["CallSid"],
            custom_parameters=params,
            headers=upgrade_signature(),
            seconds=1.0,
        )
    )
    assert result.ended_by == "caller" and result.violations == []
    wait_until(lambda: emulator_stats(emulator)["sessions_opened"] == 1, what="the AI session")
    assert token_requests(emulator) == 1  # the warm token was used; no second request


async def test_stream_with_replayed_or_foreign_token_is_closed_before_any_savants_work(
    emulator: ServerThread, bridge: ServerThread
) -> None:
    form = call_form()
    params = stream_parameters(post_voice(bridge, form))
    url = bridge.ws_url + "/media-stream"

    async def stream(call_sid: str, parameters: dict[str, Any]) -> Any:
        return await run_call(
            CallConfig(url=url, call_sid=call_sid, custom_parameters=parameters, headers=upgrade_signature(), seconds=2)
        )

    foreign = await stream(new_sid("CA"), params)  # a real token, presented for another call
    assert foreign.ended_by == "bridge" and foreign.close_code == 1008
    assert token_requests(emulator) == 1  # only the webhook's
    missing = await stream(form["CallSid"], {"from": "+15551230000"})
    assert missing.ended_by == "bridge" and missing.close_code == 1008
    assert token_requests(emulator) == 1 and emulator_stats(emulator)["sessions_opened"] == 0
    assert "bridge_stream_token_refused_total 2.0" in httpx.get(bridge.http_url + "/metrics").text
