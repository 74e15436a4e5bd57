"""The emulator's fault switches on real sockets: each close code, an error message, a TCP reset, a stall,
a handshake never confirmed, and token endpoint faults (status, latency, next N, probability), armed from
the config, the CLI flags and the admin endpoint."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from telephony_bridge.cli import _parser, emulator_config
from telephony_bridge.errors import ConfigError
from telephony_bridge.tools.emulator import EmulatorConfig
from telephony_bridge.tools.emulator.faults import (
    Selector,
    SessionFault,
    TokenFault,
    parse_spec,
    session_fault_from_mapping,
    token_fault_from_mapping,
)
from tests.test_emulator import STEP_S, Emulator, emulator, recv_json

pytestmark = pytest.mark.timeout(30)

FAULTS = "/_emulator/faults"


def faulty(*faults: SessionFault | TokenFault, **config: Any) -> EmulatorConfig:
    return EmulatorConfig(
        session_faults=tuple(f for f in faults if isinstance(f, SessionFault)),
        token_faults=tuple(f for f in faults if isinstance(f, TokenFault)),
        **config,
    )


async def closed_by_server(ws: Any) -> ConnectionClosed:
    """Read (and drop) whatever comes until the server ends the connection; how it ended."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), STEP_S)
    return closed.value


async def settled_stats(emu: Emulator, timeout_s: float = 5.0) -> dict[str, Any]:
    """The emulator's stats once its side of every closed socket has finished (the client learns of a close
    a moment before the server's handler returns; on a loaded machine that moment can be long)."""
    deadline = time.monotonic() + timeout_s
    stats = await emu.stats()
    for _ in range(int(timeout_s / 0.02)):
        if not stats["sessions_active"] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
        stats = await emu.stats()
    return stats


async def answers_ping(ws: Any, within_s: float) -> bool:
    pong = await ws.ping()
    try:
        await asyncio.wait_for(pong, within_s)
    except TimeoutError:
        return False
    return True


async def token_statuses(emu: Emulator, n: int, device_id: str = "dev-1") -> list[int]:
    body = {"apiKey": emu.config.api_key, "deviceId": device_id}
    return [(await emu.token_response(body)).status_code for _ in range(n)]


# --- session faults -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [1000, 1001, 1011, 1012])
async def test_fault_close_with_each_code_after_the_delay(code: int) -> None:
    async with emulator(faulty(SessionFault(kind="close", close_code=code, after_s=0.3), voice="tone")) as emu:
        async with emu.session() as ws:
            started = time.monotonic()
            await closed_by_server(ws)
            lasted_s = time.monotonic() - started
            assert (ws.protocol.close_rcvd.code, ws.protocol.close_sent.code) == (code, code)
        stats = await settled_stats(emu)
    assert lasted_s >= 0.25
    assert stats["faults"]["injected"] == {f"close:{code}": 1}
    assert [s["fault"] for s in stats["sessions"]] == [f"close:{code}"]
    assert stats["sessions_active"] == 0 and stats["devices"]["dev-1"]["active_sockets"] == 0


async def test_fault_error_message_mid_call_then_close() -> None:
    fault = SessionFault(kind="error", error_code="DEVICE_INACTIVE", after_s=0.2)
    async with emulator(faulty(fault)) as emu:
        async with emu.session() as ws:
            message = await recv_json(ws)
            await closed_by_server(ws)
            assert ws.protocol.close_rcvd.code == 4500 and ws.protocol.close_rcvd.reason == "DEVICE_INACTIVE"
        stats = await emu.stats()
    assert message["type"] == "error"
    assert (message["error"]["code"], message["error"]["message"]) == ("DEVICE_INACTIVE", "injected fault")
    assert stats["errors"] == {"DEVICE_INACTIVE": 1}
    assert stats["faults"]["injected"] == {"error:DEVICE_INACTIVE": 1}


async def test_fault_reset_kills_the_connection_without_a_close_frame() -> None:
    async with emulator(faulty(SessionFault(kind="reset", after_s=0.2), voice="tone")) as emu:
        async with emu.session() as ws:
            closed = await closed_by_server(ws)
            assert ws.protocol.close_rcvd is None  # no close frame: the TCP connection just died
            assert isinstance(closed.__cause__, ConnectionResetError)  # by an RST, not a FIN
        stats = await settled_stats(emu)
    assert stats["faults"]["injected"] == {"reset": 1}
    assert stats["sessions_active"] == 0 and stats["devices"]["dev-1"]["active_sockets"] == 0


async def test_fault_stall_stops_audio_and_pongs_then_resets() -> None:
    fault = SessionFault(kind="stall", after_s=0.3, stall_s=2.0)
    async with emulator(faulty(fault, voice="tone")) as emu:
        async with emu.session() as ws:
            assert await answers_ping(ws, STEP_S)
            frame = await asyncio.wait_for(ws.recv(), STEP_S)
            assert isinstance(frame, bytes)  # the tone flows before the stall
            while (await emu.stats())["faults"]["injected"] != {"stall": 1}:
                await asyncio.wait_for(ws.recv(), STEP_S)
            await asyncio.sleep(0.1)  # frames already in flight when the stall began
            while True:
                try:
                    await asyncio.wait_for(ws.recv(), 0.05)
                except TimeoutError:
                    break
            assert not await answers_ping(ws, 0.8)  # stalled: no pong
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.2)  # and no audio
            bytes_in = (await emu.stats())["sessions"][0]["bytes_in"]
            await ws.send(bytes(640))
            closed = await closed_by_server(ws)  # after stall_s, a reset
            assert ws.protocol.close_rcvd is None and isinstance(closed.__cause__, ConnectionResetError)
        stats = await settled_stats(emu)
    assert stats["sessions"][0]["bytes_in"] == bytes_in  # nothing read while stalled
    assert stats["sessions_active"] == 0 and stats["devices"]["dev-1"]["active_sockets"] == 0


async def test_fault_no_confirm_keeps_the_socket_open_but_never_confirms() -> None:
    async with emulator(faulty(SessionFault(kind="no_confirm"), voice="echo")) as emu:
        token = await emu.token()
        async with emu.socket() as ws:
            await ws.send(token)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 1.0)
            assert await answers_ping(ws, STEP_S)  # alive, just never confirmed
            await ws.send(bytes(640))
            stats = await emu.stats()
            assert stats["sessions_active"] == 1 and stats["faults"]["injected"] == {"no_confirm": 1}
        stats = await settled_stats(emu)
    assert stats["sessions_active"] == 0 and stats["devices"]["dev-1"]["active_sockets"] == 0
    assert stats["sessions"][0]["frames_out"] == 0


async def test_fault_garbage_sends_non_json_and_goes_on() -> None:
    async with emulator(faulty(SessionFault(kind="garbage", after_s=0.1))) as emu, emu.session() as ws:
        assert await asyncio.wait_for(ws.recv(), STEP_S) == "this is not JSON"
        assert await answers_ping(ws, STEP_S)


async def test_fault_next_count_sessions_of_listed_devices_only() -> None:
    fault = SessionFault(kind="close", close_code=1012, after_s=0.1, select=Selector(devices=frozenset({"a"}), count=1))
    async with emulator(faulty(fault)) as emu:
        async with emu.session("b") as ws:  # not listed
            assert await answers_ping(ws, STEP_S)
            await asyncio.sleep(0.3)
            assert await answers_ping(ws, STEP_S)
        async with emu.session("a") as ws:  # the one
            await closed_by_server(ws)
            assert ws.protocol.close_rcvd.code == 1012
        async with emu.session("a") as ws:  # count spent
            await asyncio.sleep(0.3)
            assert await answers_ping(ws, STEP_S)
        stats = await emu.stats()
    assert stats["faults"] == {"session": [], "token": [], "injected": {"close:1012": 1}}


# --- token endpoint faults --------------------------------------------------------------------------------


async def test_token_fault_status_for_the_next_n_requests() -> None:
    async with emulator(faulty(TokenFault(status=503, select=Selector(count=2)))) as emu:
        statuses = await token_statuses(emu, 3)
        stats = await emu.stats()
    assert statuses == [503, 503, 200]
    assert stats["errors"] == {"SERVICE_UNAVAILABLE": 2}
    assert stats["devices"]["dev-1"]["token_requests_in_window"] == 3  # a 5xx still counts (spec §6.7)


async def test_token_fault_429_carries_retry_after_and_does_not_count() -> None:
    async with emulator(faulty(TokenFault(status=429, retry_after_s=7, select=Selector(count=1)))) as emu:
        refused = await emu.token_response({"apiKey": "dev-key", "deviceId": "dev-1"})
        await emu.token()
        stats = await emu.stats()
    assert refused.status_code == 429 and refused.headers["retry-after"] == "7"
    assert refused.json()["error"]["code"] == "RATE_LIMITED"
    assert refused.json()["error"]["details"]["retryAfter"] == 7
    assert stats["devices"]["dev-1"]["token_requests_in_window"] == 1
    assert stats["violations"] == []  # the client did nothing wrong


async def test_token_fault_401_device_inactive() -> None:
    fault = TokenFault(status=401, error_code="DEVICE_INACTIVE", select=Selector(devices=frozenset({"dev-2"})))
    async with emulator(faulty(fault)) as emu:
        refused = await emu.token_response({"apiKey": "dev-key", "deviceId": "dev-2"})
        assert (await token_statuses(emu, 1, "dev-1")) == [200]
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "DEVICE_INACTIVE"


async def test_token_fault_latency_then_a_normal_answer() -> None:
    async with emulator(faulty(TokenFault(delay_s=0.6, select=Selector(count=1)))) as emu:
        started = time.monotonic()
        await emu.token()
        slow_s = time.monotonic() - started
        stats = await emu.stats()
    assert slow_s >= 0.55
    assert stats["faults"]["injected"] == {"token:delay": 1}


async def test_token_fault_with_probability_hits_some_requests() -> None:
    async with emulator(faulty(TokenFault(status=500, select=Selector(probability=0.5)), fault_seed=4)) as emu:
        statuses = await token_statuses(emu, 40)
        stats = await emu.stats()
    assert set(statuses) == {200, 500}
    assert stats["faults"]["injected"] == {"token:500": statuses.count(500)}
    assert stats["errors"] == {"CONFIGURATION_ERROR": statuses.count(500)}


# --- admin endpoint and CLI -------------------------------------------------------------------------------


async def test_admin_endpoint_arms_lists_and_clears_faults() -> None:
    async with emulator(EmulatorConfig(voice="tone")) as emu:
        armed = await emu.http.post(
            FAULTS + "/session", json={"kind": "close", "close_code": 1001, "after_s": 0.1, "count": 1}
        )
        assert armed.status_code == 200
        assert armed.json()["session"] == [
            {
                "kind": "close",
                "after_s": 0.1,
                "close_code": 1001,
                "error_code": None,
                "stall_s": None,
                "devices": None,
                "count": 1,
                "probability": 1.0,
            }
        ]
        async with emu.session() as ws:
            await closed_by_server(ws)
            assert ws.protocol.close_rcvd.code == 1001
        await emu.http.post(FAULTS + "/token", json={"status": 502, "devices": ["dev-1"]})
        assert await token_statuses(emu, 2) == [502, 502]
        listed = (await emu.http.get(FAULTS)).json()
        assert listed["session"] == [] and [t["status"] for t in listed["token"]] == [502]
        assert listed["injected"] == {"close:1001": 1, "token:502": 2}
        cleared = await emu.http.delete(FAULTS)
        assert cleared.json()["token"] == []
        assert await token_statuses(emu, 1) == [200]

        bad = await emu.http.post(FAULTS + "/session", json={"kind": "close", "close_code": 1006})
        assert bad.status_code == 400 and "close_code is 1006" in bad.json()["error"]
        unknown = await emu.http.post(FAULTS + "/token", json={"status": 503, "later": 1})
        assert unknown.status_code == 400 and "unknown key 'later'" in unknown.json()["error"]
        assert (await emu.http.post(FAULTS + "/voice", json={})).status_code == 404


async def test_cli_flags_arm_the_same_faults() -> None:
    args = _parser().parse_args(
        [
            "emulator",
            "--session-fault",
            "kind=close,close_code=1012,after_s=0.1,devices=dev-1+dev-2",
            "--token-fault",
            "status=503,count=1",
            "--fault-seed",
            "9",
        ]
    )
    config = emulator_config(args)
    assert config.session_faults == (
        SessionFault(
            kind="close", close_code=1012, after_s=0.1, select=Selector(devices=frozenset({"dev-1", "dev-2"}))
        ),
    )
    assert config.token_faults == (TokenFault(status=503, select=Selector(count=1)),)
    async with emulator(config) as emu:
        assert await token_statuses(emu, 2) == [503, 200]
        async with emu.session() as ws:
            await closed_by_server(ws)
            assert ws.protocol.close_rcvd.code == 1012


def test_fault_specs_name_the_wrong_key() -> None:
    assert parse_spec("kind=stall, stall_s=3") == {"kind": "stall", "stall_s": "3"}
    assert session_fault_from_mapping(parse_spec("kind=stall,stall_s=3")).stall_s == 3.0
    cases = [
        (lambda: session_fault_from_mapping({"kind": "explode"}), "kind is 'explode'"),
        (lambda: session_fault_from_mapping({}), "incomplete"),
        (lambda: session_fault_from_mapping({"kind": "close", "probability": "2"}), "probability is 2.0"),
        (lambda: token_fault_from_mapping({"status": 404}), "status is 404"),
        (lambda: token_fault_from_mapping({}), "a status or a delay_s"),
        (lambda: token_fault_from_mapping({"status": "x"}), "status is 'x'"),
        (lambda: parse_spec("kind"), "not key=value"),
    ]
    for build, message in cases:
        with pytest.raises(ConfigError, match=message):
            build()


def test_legacy_shorthands_still_arm_faults() -> None:
    config = EmulatorConfig(fault="drop", fault_after_s=0.5, token_failure=503)
    assert config.initial_faults() == (
        SessionFault(kind="close", after_s=0.5),
        TokenFault(status=503),
    )


async def test_token_fault_for_every_device_also_fails_requests_naming_none() -> None:
    """A client's health probe (an empty body) meets an outage too, but not a fault aimed at one device."""
    for fault, expected in [
        (TokenFault(status=503), 503),
        (TokenFault(status=503, select=Selector(devices=frozenset({"dev-1"}))), 400),
    ]:
        async with emulator(faulty(fault)) as emu:
            assert (await emu.token_response({})).status_code == expected
