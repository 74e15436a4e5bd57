"""What an emulator instance does, fixed at start-up and checked once so a typo fails before any call."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Literal, get_args

from telephony_bridge.errors import ConfigError
from telephony_bridge.tools.emulator.faults import Fault, Selector, SessionFault, TokenFault

VoiceName = Literal["echo", "tone", "file", "talker"]
FaultName = Literal["none", "drop", "error", "garbage"]
ConnectedType = Literal["savant_voice_connected", "vapi_connected"]

VOICES: tuple[str, ...] = get_args(VoiceName)
# Spec §11.1: the docs use both strings; the prose and schema use the first.
CONNECTED_TYPES: tuple[str, ...] = get_args(ConnectedType)
# PyJWT warns below this for HS256 (RFC 7518 §3.2 asks for a key at least as long as the hash).
MIN_JWT_SECRET_BYTES = 32


def _random_secret() -> str:
    return secrets.token_urlsafe(MIN_JWT_SECRET_BYTES)


@dataclass(frozen=True)
class EmulatorConfig:
    """Settings of one emulator; secrets stay out of ``repr`` so a logged config leaks nothing."""

    api_key: str = field(default="dev-key", repr=False)
    device_ids: frozenset[str] | None = None  # None: any non-empty device id is accepted
    inactive_device_ids: frozenset[str] = frozenset()
    voice: VoiceName = "echo"
    echo_delay_s: float = 0.2
    tone_hz: float = 440.0
    tone_dbfs: float = -12
    wav_path: str | None = None
    talker_reply_s: float = 3.0
    connected_type: str = "savant_voice_connected"
    token_ttl_s: float = 60
    auth_timeout_s: float = 30
    max_token_requests: int = 60  # per device, rolling 60 s
    max_concurrent: int = 10  # open authenticated sockets per device
    token_failure: int | None = None  # force the token endpoint to answer this 5xx status
    jwt_secret: str = field(default_factory=_random_secret, repr=False)
    # Fault injection, to see how a client copes: `fault_after_s` into each session (of `fault_device_ids`,
    # or of every device when None) the socket is dropped without a close handshake reason ("drop", close
    # code 1011), sent an error message and closed ("error", code SERVER_ERROR), or sent non-JSON ("garbage").
    # Simulated server latency, for measuring what a client's set-up costs against a distant Savants:
    # the token endpoint answers `token_delay_s` late, and the confirmation comes `confirm_delay_s` late.
    token_delay_s: float = 0.0
    confirm_delay_s: float = 0.0
    # Like a TTS engine: send the voice's audio as fast as it is made instead of in real time (file voice).
    burst: bool = False
    # Hang up: close each session normally (1000) this long after its confirmation, as an AI ending a call.
    close_after_s: float | None = None
    fault: FaultName = "none"
    fault_after_s: float = 1.0
    fault_device_ids: frozenset[str] | None = None
    # The general switches (faults.py): armed at start-up after the two shorthands above (`fault`,
    # `token_failure`); more can be armed and all cleared at run time through POST/DELETE /_emulator/faults.
    session_faults: tuple[SessionFault, ...] = ()
    token_faults: tuple[TokenFault, ...] = ()
    fault_seed: int | None = None  # seeds the draws of faults with a probability, for repeatable runs

    def __post_init__(self) -> None:
        if not self.api_key:
            raise ConfigError("emulator api_key must be a non-empty string")
        if self.voice not in VOICES:
            raise ConfigError(f"emulator voice is {self.voice!r}; allowed: {', '.join(VOICES)}")
        if self.voice == "file" and not self.wav_path:
            raise ConfigError("emulator voice 'file' needs wav_path (a 16 kHz mono 16-bit WAV file)")
        if self.connected_type not in CONNECTED_TYPES:
            raise ConfigError(
                f"emulator connected_type is {self.connected_type!r}; allowed: {', '.join(CONNECTED_TYPES)}"
            )
        _require(self.fault in get_args(FaultName), "fault", self.fault, ", ".join(get_args(FaultName)))
        _require(self.token_delay_s >= 0, "token_delay_s", self.token_delay_s, "a number >= 0")
        _require(self.confirm_delay_s >= 0, "confirm_delay_s", self.confirm_delay_s, "a number >= 0")
        _require(
            self.close_after_s is None or self.close_after_s >= 0, "close_after_s", self.close_after_s, "None or >= 0"
        )
        _require(self.fault_after_s >= 0, "fault_after_s", self.fault_after_s, "a number >= 0")
        _require(self.echo_delay_s >= 0, "echo_delay_s", self.echo_delay_s, "a number >= 0")
        _require(0 < self.tone_hz < 8000, "tone_hz", self.tone_hz, "0 < Hz < 8000 (the Nyquist limit)")
        _require(self.tone_dbfs <= 0, "tone_dbfs", self.tone_dbfs, "a level <= 0 dBFS")
        _require(self.talker_reply_s > 0, "talker_reply_s", self.talker_reply_s, "a number > 0")
        _require(self.token_ttl_s > 0, "token_ttl_s", self.token_ttl_s, "a number > 0")
        _require(self.auth_timeout_s > 0, "auth_timeout_s", self.auth_timeout_s, "a number > 0")
        _require(self.max_token_requests >= 1, "max_token_requests", self.max_token_requests, "an integer >= 1")
        _require(self.max_concurrent >= 1, "max_concurrent", self.max_concurrent, "an integer >= 1")
        _require(
            self.token_failure is None or 500 <= self.token_failure <= 599,
            "token_failure",
            self.token_failure,
            "None or an HTTP status from 500 to 599",
        )
        _require(
            all(isinstance(f, SessionFault) for f in self.session_faults),
            "session_faults",
            self.session_faults,
            "SessionFault values",
        )
        _require(
            all(isinstance(f, TokenFault) for f in self.token_faults),
            "token_faults",
            self.token_faults,
            "TokenFault values",
        )
        if len(self.jwt_secret.encode()) < MIN_JWT_SECRET_BYTES:
            raise ConfigError(f"emulator jwt_secret must be at least {MIN_JWT_SECRET_BYTES} bytes long")

    def initial_faults(self) -> tuple[Fault, ...]:
        """The faults armed at start-up: the shorthands first, then the general switches."""
        shorthand: list[Fault] = []
        select = Selector(devices=self.fault_device_ids)
        if self.fault != "none":
            kind = "close" if self.fault == "drop" else self.fault
            shorthand.append(SessionFault(kind=kind, after_s=self.fault_after_s, select=select))
        if self.token_failure is not None:
            shorthand.append(TokenFault(status=self.token_failure))
        return (*shorthand, *self.session_faults, *self.token_faults)


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"emulator {key} is {value!r}; allowed: {allowed}")
