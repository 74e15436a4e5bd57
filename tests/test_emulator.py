"""The Savants emulator over real sockets: token endpoint, handshake, limits, voices, stats.

Servers run in a thread (``serving.running``); clients are httpx and websockets. Waiting happens only on
the socket or, where real-time audio is the subject, on audio arriving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect

from telephony_bridge.clock import Clock, FakeClock, SystemClock
from telephony_bridge.errors import ConfigError
from telephony_bridge.serving import ServerThread, running
from telephony_bridge.tools.emulator import EmulatorConfig, EmulatorState, create_emulator_app
from telephony_bridge.tools.emulator.limits import RollingWindow
from telephony_bridge.tools.emulator.protocol import Refusal, WsErrorCode
from telephony_bridge.tools.emulator.tokens import JtiLedger, mint_token, verify_token

pytestmark = pytest.mark.timeout(20)

TOKEN_PATH = "/api/websocket-voice/token"
NO_CACHE = "no-cache, no-store, must-revalidate"
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
STEP_S = 5.0  # bound on any single socket or HTTP step
SECRET = "s" * 32


@dataclass
class Emulator:
    server: ServerThread
    state: EmulatorState
    config: EmulatorConfig
    http: httpx.AsyncClient

    async def token_response(self, body: Any = None, *, content: bytes | None = None) -> httpx.Response:
        if content is not None:
            return await self.http.post(TOKEN_PATH, content=content, headers={"Content-Type": "application/json"})
        return await self.http.post(TOKEN_PATH, json=body)

    async def token(self, device_id: str = "dev-1") -> str:
        response = await self.token_response({"apiKey": self.config.api_key, "deviceId": device_id})
        assert response.status_code == 200, response.text
        return str(response.json()["token"])

    async def stats(self) -> dict[str, Any]:
        response = await self.http.get("/_emulator/stats")
        assert response.status_code == 200
        return dict(response.json())

    @contextlib.asynccontextmanager
    async def socket(self) -> AsyncIterator[ClientConnection]:
        async with connect(
            f"{self.server.ws_url}/voice-stream", proxy=None, compression=None, open_timeout=STEP_S
        ) as ws:
            yield ws

    @contextlib.asynccontextmanager
    async def session(self, device_id: str = "dev-1") -> AsyncIterator[ClientConnection]:
        """A socket that has sent a fresh token and received the confirmation."""
        token = await self.token(device_id)
        async with self.socket() as ws:
            await ws.send(token)
            confirmation = await recv_json(ws)
            assert confirmation["type"] == self.config.connected_type
            yield ws


@contextlib.asynccontextmanager
async def emulator(config: EmulatorConfig | None = None, *, clock: Clock | None = None) -> AsyncIterator[Emulator]:
    config = config or EmulatorConfig()
    app = create_emulator_app(config, clock=clock)
    with running(app) as server:
        async with httpx.AsyncClient(base_url=server.http_url, trust_env=False, timeout=STEP_S) as http:
            yield Emulator(server, app.state.emulator, config, http)


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.recv(), STEP_S)
    assert isinstance(message, str), f"expected a text frame, got {len(message)} bytes"
    return dict(json.loads(message))


async def refusal(ws: ClientConnection) -> tuple[str, int | None, str | None]:
    """(error code, close code, close reason) of a socket the server refuses; checks the error shape."""
    message = await recv_json(ws)
    assert message["type"] == "error"
    assert set(message["error"]) == {"code", "message", "timestamp"}
    assert ISO_MS.match(message["error"]["timestamp"])
    await asyncio.wait_for(ws.wait_closed(), STEP_S)
    return message["error"]["code"], ws.close_code, ws.close_reason


def noise_pcm(seconds: float, seed: int = 1) -> bytes:
    samples = np.random.default_rng(seed).normal(0, 3000, int(16_000 * seconds))
    return np.clip(samples, -32768, 32767).astype("<i2").tobytes()


def tone_pcm(seconds: float, hz: float = 300.0, dbfs: float = -10.0) -> bytes:
    t = np.arange(int(16_000 * seconds)) / 16_000
    return (32768 * 10 ** (dbfs / 20) * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()


def as_samples(pcm: bytes) -> np.ndarray[Any, np.dtype[np.float64]]:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64)


# --- token endpoint ---------------------------------------------------------------------------------------


async def test_token_success_is_a_signed_one_minute_jwt_for_the_device() -> None:
    async with emulator() as emu:
        response = await emu.token_response({"apiKey": "dev-key", "deviceId": "dev-1"})
    assert response.status_code == 200
    assert response.headers["cache-control"] == NO_CACHE
    assert response.headers["content-type"] == "application/json"
    assert set(response.json()) == {"token"}
    token = response.json()["token"]
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    claims = jwt.decode(token, emu.config.jwt_secret, algorithms=["HS256"], audience="voice-api")
    assert set(claims) == {"sub", "iat", "exp", "aud", "iss", "jti"}
    assert (claims["sub"], claims["aud"], claims["iss"]) == ("dev-1", "voice-api", "thesavants.ai")
    assert claims["exp"] - claims["iat"] == 60
    assert abs(claims["iat"] - time.time()) < 5
    assert emu.state.tokens_issued == 1


OK_KEY = "dev-key"
BAD_REQUESTS: list[tuple[Any, str, str, str]] = [  # body, message, details.field, details.expected
    ({"deviceId": "d"}, "Missing required field: apiKey", "apiKey", "string"),
    ({"apiKey": OK_KEY}, "Missing required field: deviceId", "deviceId", "string"),
    ({"apiKey": None, "deviceId": "d"}, "Missing required field: apiKey", "apiKey", "string"),
    ({"apiKey": "", "deviceId": "d"}, "Field must not be empty: apiKey", "apiKey", "non-empty string"),
    ({"apiKey": OK_KEY, "deviceId": ""}, "Field must not be empty: deviceId", "deviceId", "non-empty string"),
    ({"apiKey": OK_KEY, "deviceId": 7}, "Field must be a string: deviceId", "deviceId", "string"),
    (b"{not json", "Request body is not valid JSON", "body", "JSON object"),
    (b"", "Request body is not valid JSON", "body", "JSON object"),
    (b'["dev-key", "d"]', "Request body must be a JSON object", "body", "JSON object"),
]


async def test_token_bad_request_is_400_invalid_request_naming_the_field() -> None:
    answers = []
    async with emulator() as emu:
        for body, *_ in BAD_REQUESTS:
            if isinstance(body, bytes):
                response = await emu.token_response(content=body)
            else:
                response = await emu.token_response(body)
            answers.append((response.status_code, response.json()))
        stats = await emu.stats()
    assert answers == [
        (400, {"error": {"code": "INVALID_REQUEST", "message": message, "details": {"field": f, "expected": e}}})
        for _, message, f, e in BAD_REQUESTS
    ]
    assert stats["errors"] == {"INVALID_REQUEST": len(BAD_REQUESTS)}
    assert stats["devices"] == {}  # a malformed request names no device to count against


async def test_token_wrong_key_or_unknown_device_is_401_authentication_failed() -> None:
    config = EmulatorConfig(device_ids=frozenset({"dev-1"}))
    async with emulator(config) as emu:
        wrong_key = await emu.token_response({"apiKey": "nope", "deviceId": "dev-1"})
        unknown_device = await emu.token_response({"apiKey": "dev-key", "deviceId": "dev-2"})
    expected = {"error": {"code": "AUTHENTICATION_FAILED", "message": "Invalid API key or device ID"}}
    assert (wrong_key.status_code, wrong_key.json()) == (401, expected)
    assert (unknown_device.status_code, unknown_device.json()) == (401, expected)


async def test_token_inactive_device_is_401_device_inactive_with_details() -> None:
    clock = FakeClock(wall_offset=1_705_314_600.0 - 1000.0)  # wall() == 2024-01-15T10:30:00Z
    async with emulator(EmulatorConfig(inactive_device_ids=frozenset({"old"})), clock=clock) as emu:
        response = await emu.token_response({"apiKey": "dev-key", "deviceId": "old"})
    assert response.status_code == 401
    assert response.json() == {
        "error": {
            "code": "DEVICE_INACTIVE",
            "message": "Device has been deactivated",
            "details": {"deviceId": "old", "deactivatedAt": "2024-01-15T10:30:00Z"},
        }
    }


async def test_token_rate_is_limited_per_device_over_a_rolling_minute_and_recorded() -> None:
    clock = FakeClock()
    body = {"apiKey": "dev-key", "deviceId": "busy"}
    async with emulator(clock=clock) as emu:
        for _ in range(60):  # one every 0.5 s: 60 requests in 29.5 s
            assert (await emu.token_response(body)).status_code == 200
            clock.advance(0.5)
        clock.advance(-0.5)  # back to the 60th request's time; FakeClock has no sleepers here
        refused = await emu.token_response(body)
        other_device = await emu.token_response({"apiKey": "dev-key", "deviceId": "calm"})
        clock.advance(30.5)  # the first request has now left the window
        admitted = await emu.token_response(body)
        refused_again = await emu.token_response(body)
        stats = await emu.stats()
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "31"  # the oldest leaves at 60 s, 30.5 s from now
    assert refused.json() == {
        "error": {
            "code": "RATE_LIMITED",
            "message": "Too many requests. Try again later.",
            "details": {"retryAfter": 31, "limit": 60, "window": "1 minute"},
        }
    }
    assert other_device.status_code == 200
    assert admitted.status_code == 200
    assert refused_again.json()["error"]["details"]["retryAfter"] == 1  # 0.5 s, rounded up
    assert [(v["kind"], v["device_id"]) for v in stats["violations"]] == [("token_rate", "busy")] * 2
    assert stats["devices"]["busy"] == {"token_requests_in_window": 60, "active_sockets": 0}
    assert stats["tokens_issued"] == 62
    assert stats["errors"] == {"RATE_LIMITED": 2}


@pytest.mark.parametrize(
    ("status", "code"), [(500, "CONFIGURATION_ERROR"), (503, "SERVICE_UNAVAILABLE"), (502, "INTERNAL_ERROR")]
)
async def test_token_forced_failure_answers_the_configured_status(status: int, code: str) -> None:
    async with emulator(EmulatorConfig(token_failure=status)) as emu:
        response = await emu.token_response({"apiKey": "dev-key", "deviceId": "dev-1"})
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert set(response.json()["error"]) == {"code", "message"}
    if status == 500:
        assert response.json()["error"]["message"].startswith("Server configuration error.")


# --- handshake --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("connected_type", ["savant_voice_connected", "vapi_connected"])
async def test_session_confirmation_has_the_reference_fields(connected_type: str) -> None:
    async with emulator(EmulatorConfig(connected_type=connected_type)) as emu:
        token = await emu.token()
        async with emu.socket() as ws:
            await ws.send(token)
            confirmation = await recv_json(ws)
            stats = await emu.stats()
    assert set(confirmation) == {"type", "message", "timestamp", "sessionId"}
    assert confirmation["type"] == connected_type
    assert confirmation["message"] == "Voice API connection established successfully"
    assert ISO_MS.match(confirmation["timestamp"])
    assert re.fullmatch(r"sess_[0-9a-f]{12}", confirmation["sessionId"])
    assert stats["sessions_opened"] == stats["sessions_active"] == 1
    assert stats["devices"]["dev-1"] == {"token_requests_in_window": 1, "active_sockets": 1}


async def test_session_expired_token_is_refused_with_token_expired() -> None:
    async with emulator() as emu:
        stale = mint_token(emu.config.jwt_secret, "dev-1", issued_at_s=time.time() - 61)
        async with emu.socket() as ws:
            await ws.send(stale)
            assert await refusal(ws) == ("TOKEN_EXPIRED", 4401, "TOKEN_EXPIRED")


async def test_session_short_ttl_token_expires_on_the_emulator_clock() -> None:
    clock = FakeClock()
    async with emulator(EmulatorConfig(token_ttl_s=5), clock=clock) as emu:
        token = await emu.token()
        clock.advance(5)
        async with emu.socket() as ws:
            await ws.send(token)
            assert (await refusal(ws))[0] == "TOKEN_EXPIRED"


async def test_session_reused_token_is_refused_with_token_reused() -> None:
    async with emulator() as emu:
        token = await emu.token()
        async with emu.socket() as first:
            await first.send(token)
            assert (await recv_json(first))["type"] == "savant_voice_connected"
            async with emu.socket() as second:
                await second.send(token)
                assert await refusal(second) == ("TOKEN_REUSED", 4409, "TOKEN_REUSED")


async def test_session_bad_token_is_refused_with_invalid_token() -> None:
    first_frames: list[str | bytes] = [
        "not-a-jwt",
        mint_token("x" * 32, "dev-1", issued_at_s=time.time()),  # signed with another secret
        jwt.encode({"sub": "dev-1", "iat": 1, "exp": 4_000_000_000}, SECRET, algorithm="HS256"),  # no aud/iss/jti
        mint_token(SECRET, "old", issued_at_s=time.time()),  # a device deactivated since
        b"\x00\x01",  # the token must be a text frame
    ]
    verdicts = []
    config = EmulatorConfig(jwt_secret=SECRET, inactive_device_ids=frozenset({"old"}))
    async with emulator(config) as emu:
        for first_frame in first_frames:
            async with emu.socket() as ws:
                await ws.send(first_frame)
                verdicts.append(await refusal(ws))
    assert verdicts == [("INVALID_TOKEN", 4403, "INVALID_TOKEN")] * len(first_frames)


async def test_session_without_a_token_in_time_is_refused_with_auth_timeout() -> None:
    async with emulator(EmulatorConfig(auth_timeout_s=0.2)) as emu:
        async with emu.socket() as ws:
            assert await refusal(ws) == ("AUTH_TIMEOUT", 4408, "AUTH_TIMEOUT")
        stats = await emu.stats()
    assert stats["errors"] == {"AUTH_TIMEOUT": 1}
    assert stats["sessions_opened"] == 0


async def test_session_eleventh_concurrent_socket_is_refused_and_recorded() -> None:
    async with emulator() as emu, contextlib.AsyncExitStack() as stack:
        for _ in range(10):
            await stack.enter_async_context(emu.session("dev-1"))
        async with emu.session("dev-2"):  # the cap is per device
            pass
        token = await emu.token("dev-1")
        async with emu.socket() as eleventh:
            await eleventh.send(token)
            assert await refusal(eleventh) == ("CONCURRENCY_LIMIT", 4429, "CONCURRENCY_LIMIT")
        stats = await emu.stats()
    assert [(v["kind"], v["device_id"]) for v in stats["violations"]] == [("concurrency", "dev-1")]
    assert ISO_MS.match(stats["violations"][0]["at"])
    assert stats["devices"]["dev-1"]["active_sockets"] == 10
    assert stats["errors"] == {"CONCURRENCY_LIMIT": 1}


# --- streaming --------------------------------------------------------------------------------------------


async def test_session_invalid_audio_frame_is_refused_with_invalid_audio() -> None:
    cases = [(641, "even"), (0, "non-empty"), (8194, "at most 8192")]
    async with emulator(EmulatorConfig(echo_delay_s=0)) as emu:
        async with emu.session() as ws:
            await ws.send(bytes(8192))  # the largest valid frame comes back as 640-byte frames
            echoed = [await asyncio.wait_for(ws.recv(), STEP_S) for _ in range(8192 // 640)]
        assert [len(frame) for frame in echoed] == [640] * 12
        for size, problem in cases:
            async with emu.session() as ws:
                await ws.send(bytes(size))
                message = await recv_json(ws)
                await asyncio.wait_for(ws.wait_closed(), STEP_S)
            assert message["error"]["code"] == "INVALID_AUDIO"
            assert problem in message["error"]["message"]
            assert (ws.close_code, ws.close_reason) == (4415, "INVALID_AUDIO")
        stats = await emu.stats()
    assert stats["errors"] == {"INVALID_AUDIO": 3}


async def test_session_invalid_text_message_is_refused_with_invalid_message() -> None:
    texts = ["not json", "[1]", '{"type": 1}', "{}"]
    verdicts = []
    async with emulator() as emu:
        for text in texts:
            async with emu.session() as ws:
                await ws.send('{"type": "status", "extra": true}')  # well-formed JSON is ignored
                await ws.send(text)
                verdicts.append(await refusal(ws))
    assert verdicts == [("INVALID_MESSAGE", 4400, "INVALID_MESSAGE")] * len(texts)


async def pace(ws: ClientConnection, pcm: bytes, chunk: int) -> float:
    """Send ``pcm`` in ``chunk``-byte frames in real time; return when the first frame went out."""
    start = time.monotonic()
    for i, offset in enumerate(range(0, len(pcm), chunk)):
        await asyncio.sleep(max(0.0, start + i * chunk / 32_000 - time.monotonic()))
        await ws.send(pcm[offset : offset + chunk])
    return start


async def test_echo_returns_what_it_heard_after_the_delay_in_640_byte_frames() -> None:
    sent = noise_pcm(1.0)
    async with emulator(EmulatorConfig(echo_delay_s=0.2)) as emu, emu.session() as ws:
        sender = asyncio.create_task(pace(ws, sent, 400))  # 12.5 ms frames: the echo must re-cut them
        frames: list[bytes] = []
        arrivals: list[float] = []
        while sum(map(len, frames)) < len(sent):
            frames.append(await asyncio.wait_for(ws.recv(), STEP_S))  # type: ignore[arg-type]
            arrivals.append(time.monotonic())
        started = await sender
        session = (await emu.stats())["sessions"][0]
    received = b"".join(frames)
    assert {len(frame) for frame in frames} == {640}
    assert received == sent
    correlation = np.correlate(as_samples(received), as_samples(sent[:3200]), mode="valid")
    assert int(np.argmax(correlation)) == 0
    assert 0.18 <= arrivals[0] - started <= 0.8  # 200 ms, plus a tick and scheduling on a loaded machine
    # Paced in real time, not burst: the last frame sent at ~0.99 s, said back 0.2 s later (counted from the
    # sender's first send, so a late reader here only adds time)
    assert arrivals[-1] - started >= 1.1
    assert (session["bytes_in"], session["bytes_out"], session["frames_out"]) == (32_000, 32_000, 50)


class LateOnce(SystemClock):
    """The real clock, but the first wait for a deadline past ``after`` returns ``by`` seconds late: a stall of
    the emulator's loop, as its speaker sees one."""

    def __init__(self, after: float, by: float) -> None:
        super().__init__()
        self._after, self._by = after, by

    async def sleep_until(self, deadline: float) -> None:
        await super().sleep_until(deadline)
        if deadline > self._after:
            self._after = float("inf")
            await super().sleep_until(deadline + self._by)


async def test_a_speaker_tick_more_than_a_frame_late_is_counted() -> None:
    """What a bridge in front counts as the AI's frames coming late may be the emulator's own stall: its stats
    count the ticks that ran more than a frame late (bench/capacity.py reports them with ``--ai emulator``)."""
    clock = LateOnce(after=time.monotonic() + 0.3, by=0.1)
    async with emulator(EmulatorConfig(voice="tone"), clock=clock) as emu, emu.session() as ws:
        for _ in range(30):  # 0.6 s of tone: past the stall
            await asyncio.wait_for(ws.recv(), STEP_S)
        stats = await emu.stats()
    assert stats["ticks_late_over_a_frame"] >= 1  # the stall's; a loaded runner may add one of its own


async def test_tone_has_the_configured_frequency_and_level_in_real_time() -> None:
    async with emulator(EmulatorConfig(voice="tone", tone_hz=1000.0, tone_dbfs=-12)) as emu, emu.session() as ws:
        started = time.monotonic()  # the tone began about now (with the session), or a little before
        frames = [await asyncio.wait_for(ws.recv(), STEP_S) for _ in range(50)]
        elapsed = time.monotonic() - started
    samples = as_samples(b"".join(frames))  # type: ignore[arg-type]
    spectrum = np.abs(np.fft.rfft(samples))
    peak_hz = float(np.argmax(spectrum)) * 16_000 / len(samples)
    assert abs(peak_hz - 1000.0) <= 2.0
    assert abs(np.max(np.abs(samples)) / (32768 * 10 ** (-12 / 20)) - 1) < 0.01
    # The last of 50 frames goes 0.98 s after the first: less here only by however late this loop saw the
    # session open (room for ~0.2 s); a clock 1.5 times too fast would take 0.65 s.
    assert elapsed >= 0.75


async def test_talker_speaks_for_the_reply_time_after_an_utterance() -> None:
    utterance = tone_pcm(0.3) + bytes(32_000 // 2)  # 300 ms of speech, then 500 ms of silence
    async with emulator(EmulatorConfig(voice="talker", talker_reply_s=0.4)) as emu, emu.session() as ws:
        for offset in range(0, len(utterance), 640):
            await ws.send(utterance[offset : offset + 640])
        frames = [await asyncio.wait_for(ws.recv(), STEP_S) for _ in range(20)]
        with pytest.raises(TimeoutError):  # the reply is 20 frames long, then the talker is quiet
            await asyncio.wait_for(ws.recv(), 0.15)
    levels = [20 * math.log10(np.sqrt(np.mean(as_samples(f) ** 2)) / 32768 + 1e-12) for f in frames]  # type: ignore[arg-type]
    assert -24 <= max(levels) <= -17


async def test_file_voice_plays_the_recording_once(tmp_path: Path) -> None:
    pcm = noise_pcm(0.1) + b"\x01\x02" * 50  # 5 frames and 100 bytes
    path = tmp_path / "reply.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16_000)
        wav.writeframes(pcm)
    async with emulator(EmulatorConfig(voice="file", wav_path=str(path))) as emu, emu.session() as ws:
        frames = [await asyncio.wait_for(ws.recv(), STEP_S) for _ in range(6)]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.1)
    assert b"".join(frames) == pcm + bytes(640 - 100)  # type: ignore[arg-type]


def test_file_voice_with_a_wrong_wav_format_fails_at_start(tmp_path: Path) -> None:
    path = tmp_path / "8k.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(bytes(160))
    with pytest.raises(ConfigError, match="8000 Hz"):
        create_emulator_app(EmulatorConfig(voice="file", wav_path=str(path)))


async def test_session_logs_one_line_without_secrets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="telephony_bridge")
    async with emulator(EmulatorConfig(api_key="super-secret-key")) as emu:
        async with emu.session() as ws:
            await ws.send(bytes(640))
            token = await emu.token()
        async with emu.socket() as ws:
            await ws.send(token)
            await recv_json(ws)
        # the close line is written after the client sees the close; the server stopping waits for it
    text = caplog.text
    assert "super-secret-key" not in text
    assert token not in text and token.split(".")[2] not in text
    closed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("session closed")]
    assert len(closed) == 2
    assert any("device dev-1" in line and "in 640 bytes (1 frames)" in line for line in closed)


# --- pure parts: config, tokens, window -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"voice": "robot"}, "voice"),
        ({"voice": "file"}, "wav_path"),
        ({"connected_type": "connected"}, "connected_type"),
        ({"token_failure": 404}, "token_failure"),
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"tone_hz": 9000.0}, "tone_hz"),
        ({"jwt_secret": "short"}, "jwt_secret"),
    ],
)
def test_config_rejects_a_wrong_value_naming_the_key(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        EmulatorConfig(**overrides)


def test_config_repr_hides_secrets() -> None:
    assert "hunter2" not in repr(EmulatorConfig(api_key="hunter2", jwt_secret="hunter2" * 5))


def test_tokens_verify_checks_audience_expiry_and_single_use() -> None:
    token = mint_token(SECRET, "dev-1", issued_at_s=1000.5, jti="j1")
    claims = verify_token(token, SECRET, now_s=1059.9)
    assert not isinstance(claims, Refusal)
    assert (claims.device_id, claims.issued_at_s, claims.expires_at_s, claims.jti) == ("dev-1", 1000, 1060, "j1")
    assert verify_token(token, SECRET, now_s=1060.0) == Refusal(
        WsErrorCode.TOKEN_EXPIRED, "Token has expired; request a new token and reconnect"
    )
    foreign_audience = jwt.encode(
        {"sub": "d", "iat": 1, "exp": 2, "aud": "other", "iss": "thesavants.ai", "jti": "j"}, SECRET
    )
    verdict = verify_token(foreign_audience, SECRET, now_s=1)
    assert isinstance(verdict, Refusal) and verdict.code is WsErrorCode.INVALID_TOKEN
    ledger = JtiLedger()
    assert ledger.first_use(claims, now_s=1001) is True
    assert ledger.first_use(claims, now_s=1002) is False
    assert ledger.first_use(claims, now_s=1061) is True  # forgotten once expired (expiry is checked first)


def test_tokens_fractional_ttl_counts_from_the_precise_issue_time() -> None:
    claims = verify_token(mint_token(SECRET, "d", issued_at_s=1000.75, ttl_s=0.5), SECRET, now_s=1000.8)
    assert not isinstance(claims, Refusal)
    assert (claims.issued_at_s, claims.expires_at_s) == (1000, 1001.25)


def test_rolling_window_admits_again_exactly_when_the_oldest_leaves() -> None:
    window = RollingWindow(limit=2, window_s=60)
    assert [window.admit("d", t) for t in (0.0, 10.0)] == [None, None]
    assert window.admit("d", 20.0) == 40.0
    assert window.admit("d", 60.0) is None
    assert window.count("d", 60.0) == 2
    assert window.count("d", 200.0) == 0
    assert window.keys() == []
