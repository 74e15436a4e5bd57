"""Settings: the only reader of config.yaml and the environment.

Precedence: built-in defaults < the YAML file (``--config`` or ``BRIDGE_CONFIG``) < environment variables.
A wrong value fails at start-up with one sentence naming the key, the value and what is allowed. Secrets are
``SecretStr`` so they never show in a repr, a log line or ``/status``.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from telephony_bridge.errors import ConfigError
from telephony_bridge.ops.gc_tuning import YOUNG_THRESHOLD


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_url(value: str, schemes: tuple[str, ...], *, base: bool = False) -> str:
    """An absolute URL of one of ``schemes``, refused at start-up rather than at each request where it would
    fail: a space, a control or non-ASCII character, or a port that is no number. ``base``: a path is appended
    to it, so it has no query or fragment (they would be dropped, or end up before the path)."""
    if value == "":
        return value
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.netloc:
        raise ValueError(f"expected an absolute {' or '.join(s + '://' for s in schemes)} URL")
    if any(c.isspace() or not c.isprintable() or not c.isascii() for c in value):
        raise ValueError("expected a URL of ASCII characters without spaces (percent-encode the rest)")
    try:
        parts.port  # noqa: B018 (raises for a port that is no number, or out of range)
    except ValueError:
        raise ValueError("expected the URL's port to be a number from 0 to 65535") from None
    if base and (parts.query or parts.fragment or value.endswith(("?", "#"))):
        raise ValueError("expected a base URL without a query (?...) or fragment (#...): paths are appended to it")
    return value.rstrip("/")


class ServerSettings(_Frozen):
    host: str = ""  # empty: 127.0.0.1 in dev mode, 0.0.0.0 otherwise (see Settings.listen_host)
    port: int = Field(8080, ge=0, le=65535)
    ops_port: int | None = Field(None, ge=0, le=65535)
    public_url: str = ""
    drain_timeout_s: float = Field(30.0, ge=0)
    drain_pending_streams_s: float = Field(10.0, ge=0)
    workers: int = Field(1, ge=1, le=64)
    # Worker k's own ops listener is worker_ops_port + k (``serve --workers``: the shared ops port reaches any).
    worker_ops_port: int | None = Field(None, ge=1, le=65535)
    gc_tuning: bool = True
    gc_young_threshold: int = Field(YOUNG_THRESHOLD, ge=100, le=1_000_000)
    websocket: Literal["picows", "uvicorn"] = "picows"

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, v: str) -> str:
        return _check_url(v, ("https", "http"))

    @field_validator("ops_port")
    @classmethod
    def _ops_port(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and v == info.data.get("port"):
            raise ValueError("expected a port other than server.port (the ops listener is a separate one)")
        return v

    @field_validator("worker_ops_port")
    @classmethod
    def _worker_ops_port(cls, v: int | None, info: ValidationInfo) -> int | None:
        # A field validator (not a model one) so the error names the key; it reads port, ops_port and workers,
        # which are declared above it.
        if v is None:
            return v
        last = v + info.data.get("workers", 1) - 1
        if last > 65535:
            raise ValueError(f"expected a first port that leaves one for each worker (the last would be {last})")
        taken = [p for p in (info.data.get("port"), info.data.get("ops_port")) if p and v <= p <= last]
        if taken:
            raise ValueError(
                f"expected the workers' ports ({v}-{last}) apart from server.port and server.ops_port ({taken[0]})"
            )
        return v

    def worker_ops_ports(self) -> range:
        """Each worker's own ops port, worker k's at index k (empty without ``worker_ops_port``)."""
        first = self.worker_ops_port
        return range(0) if first is None else range(first, first + self.workers)


class SavantsSettings(_Frozen):
    base_url: str = ""
    ws_url: str = ""
    api_key: SecretStr = SecretStr("")
    device_ids: tuple[str, ...] = ()
    token_timeout_s: float = Field(5.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    warm_token: bool = True
    preconnect: bool = False
    reconnect_deadline_s: float = Field(10.0, ge=0, le=120)
    max_reconnects_per_minute: int = Field(3, ge=1, le=60)
    reconnect_fill: Literal["comfort_noise", "silence"] = "comfort_noise"
    stall_timeout_s: float = Field(5.0, ge=1, le=120)
    token_deadline_s: float = Field(2.5, gt=0, le=14)
    device_suspend_s: float = Field(300.0, ge=1, le=86_400)
    probe_interval_s: float = Field(10.0, ge=1, le=600)  # once token_probe_interval_s (RENAMED)

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        return _check_url(v, ("https", "http"), base=True)

    @field_validator("ws_url")
    @classmethod
    def _ws_url(cls, v: str) -> str:
        return _check_url(v, ("wss", "ws"))

    @field_validator("device_ids", mode="before")
    @classmethod
    def _device_ids(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [part.strip() for part in v.split(",") if part.strip()]
        if isinstance(v, list | tuple) and len(set(v)) != len(v):
            raise ValueError("expected distinct device ids")
        return v

    @property
    def voice_stream_url(self) -> str:
        """The documented derivation (spec §2): http→ws, https→wss, then ``/voice-stream``."""
        if self.ws_url:
            return self.ws_url
        return "ws" + self.base_url.removeprefix("http") + "/voice-stream"


class TwilioSettings(_Frozen):
    auth_token: SecretStr = SecretStr("")
    allow_unsigned: bool = False
    start_timeout_s: float = Field(10.0, gt=0)
    require_stream_token: bool = True
    stream_token_ttl_s: float = Field(60.0, gt=0, le=600)
    max_connects_per_call: int = Field(10, ge=1, le=1000)
    connect_window_s: float = Field(4 * 3600.0, ge=60, le=24 * 3600)
    busy_response: Literal["say", "reject"] = "say"
    busy_message: str = "All of our assistants are busy right now. Please call again in a few minutes."
    unavailable_message: str = "Sorry, the assistant is not available right now. Please try again later."
    fallback_message: str = "Sorry, we lost the connection to the assistant. Please call again."
    drain_message: str = Field(
        "Sorry, we have to end this call for maintenance. Please call again in a minute.", min_length=1
    )
    say_voice: str = ""
    say_language: str = ""
    dtmf_action: Literal["log", "ignore"] = "log"
    log_digits: bool = False
    inactivity_timeout_s: float = Field(5.0, ge=0, le=300)
    max_call_s: float = Field(0.0, ge=0)
    paired_reads: bool = True


class AccountingSettings(_Frozen):
    max_concurrent_per_device: int = Field(10, ge=1, le=10)
    max_token_requests_per_minute: int = Field(60, ge=1, le=60)
    reservation_ttl_s: float = Field(10.0, gt=0, le=300)
    lease_ttl_s: float = Field(30.0, ge=2, le=600)
    sticky_callers: bool = False
    not_ready_when_full: bool = True
    readiness_cache_s: float = Field(1.0, ge=0, le=60)


class AudioSettings(_Frozen):
    pre_connect_buffer_ms: int = Field(2000, ge=0, le=10_000)
    outbound_lead_ms: int = Field(100, ge=20, le=2000)
    playout_prebuffer_ms: int = Field(60, ge=0, le=500)
    adaptive_prebuffer: bool = True
    outbound_batch_ms: int = Field(40, ge=20, le=200)
    upstream_message_ms: int = Field(40, ge=20, le=40, multiple_of=20)
    mark_interval_ms: int = Field(500, ge=20, le=5000)
    reconnect_buffer_ms: int = Field(5000, ge=0, le=30_000)
    max_ai_ahead_s: float = Field(10.0, ge=1, le=120)
    kernels: Literal["auto", "compiled", "numpy"] = "auto"


class BargeInSettings(_Frozen):
    enabled: bool = True
    sensitivity: int = Field(2, ge=0, le=3)
    min_speech_ms: int = Field(160, ge=20, le=2000)
    min_ai_audible_ms: int = Field(200, ge=0, le=5000)
    utterance_end_ms: int = Field(500, ge=100, le=5000)
    min_level_dbfs: float = Field(-45.0, ge=-90, le=0)
    max_hold_s: float = Field(8.0, ge=0, le=600)


class SipSettings(_Frozen):
    """Native SIP ingress (spec: sip-rtp.md). Off unless ``port`` is set."""

    port: int | None = Field(None, ge=0, le=65535)
    host: str = ""  # empty: server.host
    advertised_host: str = ""
    rtp_ports: str = "20000-20999"
    allowed_sources: tuple[str, ...] = ()
    media_sources: tuple[str, ...] = ()
    realm: str = "telephony-bridge"
    nonce_ttl_s: float = Field(300.0, ge=1, le=3600)
    users: dict[str, dict[str, str]] = {}
    allow_pcma: bool = True
    media_timeout_s: float = Field(30.0, gt=0)
    min_session_expires_s: int = Field(90, ge=90)
    retry_after_s: int = Field(30, ge=0, le=3600)
    fallback_wav: str = ""
    drain_wav: str = ""  # empty: fallback_wav
    t1_ms: int = Field(500, ge=10, le=5000)

    @field_validator("rtp_ports")
    @classmethod
    def _rtp_ports(cls, v: str) -> str:
        first, sep, last = v.partition("-")
        if not (sep and first.strip().isdigit() and last.strip().isdigit()):
            raise ValueError("expected a range 'FIRST-LAST' such as '20000-20999'")
        lo, hi = int(first), int(last)
        if not (1024 <= lo < hi <= 65535) or hi - lo < 1:
            raise ValueError("expected 1024 <= FIRST < LAST <= 65535 with room for one even/odd pair")
        return f"{lo}-{hi}"

    @field_validator("allowed_sources", "media_sources", mode="before")
    @classmethod
    def _sources(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [part.strip() for part in v.split(",") if part.strip()]
        for item in v or ():
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"expected CIDR networks such as 192.0.2.0/24, got {item!r}") from None
        return v

    @field_validator("users")
    @classmethod
    def _users(cls, v: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        for user, hashes in v.items():
            for alg, digest in hashes.items():
                size = {"SHA-256": 64, "MD5": 32}.get(alg)
                if size is None:
                    raise ValueError(f"user {user!r}: expected algorithm SHA-256 or MD5, got {alg!r}")
                if len(digest) != size or any(c not in "0123456789abcdef" for c in digest.lower()):
                    raise ValueError(f"user {user!r}: expected a {size}-digit hex {alg} HA1")
        return v

    @field_validator("fallback_wav", "drain_wav")
    @classmethod
    def _wav(cls, v: str) -> str:
        if v and not Path(v).is_file():
            raise ValueError("expected the path of an existing WAV file")
        return v

    @property
    def rtp_range(self) -> tuple[int, int]:
        first, last = self.rtp_ports.split("-")
        return int(first), int(last)


class LoggingSettings(_Frozen):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "text"] = "auto"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


class OpsSettings(_Frozen):
    token: SecretStr = SecretStr("")


class Settings(_Frozen):
    dev: bool = False
    server: ServerSettings = ServerSettings()
    savants: SavantsSettings = SavantsSettings()
    twilio: TwilioSettings = TwilioSettings()
    audio: AudioSettings = AudioSettings()
    accounting: AccountingSettings = AccountingSettings()
    barge_in: BargeInSettings = BargeInSettings()
    sip: SipSettings = SipSettings()
    logging: LoggingSettings = LoggingSettings()
    ops: OpsSettings = OpsSettings()
    redis_url: str = ""
    # Set by ``serve`` when it starts the embedded emulator (no Savants URL configured); not a config.yaml key.
    embedded_emulator: bool = False

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        return _check_url(v, ("redis", "rediss", "unix"))

    @model_validator(mode="after")
    def _workers_share_redis(self) -> Settings:
        if self.server.workers > 1 and not self.redis_url:
            raise ValueError(
                f"server.workers is {self.server.workers}, but worker processes share device accounting only "
                "through Redis: set redis_url (REDIS_URL) or run 1 worker"
            )
        return self

    @property
    def dev_mode(self) -> bool:
        """No Savants URL configured: the bridge runs (or is about to run) against its embedded emulator."""
        return self.embedded_emulator or self.savants.base_url == ""

    @property
    def listen_host(self) -> str:
        """``server.host`` when given; else loopback in dev mode (a developer's machine), all interfaces otherwise."""
        return self.server.host or ("127.0.0.1" if self.dev_mode else "0.0.0.0")


# Environment variable -> dotted key. Other tooling drives the bridge through these names: keep them.
ENVIRONMENT: dict[str, str] = {
    "SAVANTS_BASE_URL": "savants.base_url",
    "SAVANTS_WS_URL": "savants.ws_url",
    "SAVANTS_API_KEY": "savants.api_key",
    "SAVANTS_DEVICE_IDS": "savants.device_ids",
    "TWILIO_AUTH_TOKEN": "twilio.auth_token",
    "PUBLIC_URL": "server.public_url",
    "REDIS_URL": "redis_url",
    "HOST": "server.host",
    "PORT": "server.port",
    "OPS_PORT": "server.ops_port",
    "WORKER_OPS_PORT": "server.worker_ops_port",
    "OPS_TOKEN": "ops.token",
    "BRIDGE_DEV": "dev",
    "LOG_LEVEL": "logging.level",
    "BARGE_IN": "barge_in.enabled",
    "SIP_PORT": "sip.port",
    "SIP_HOST": "sip.host",
    "SIP_ADVERTISED_HOST": "sip.advertised_host",
    "RTP_PORTS": "sip.rtp_ports",
    "SIP_ALLOWED_SOURCES": "sip.allowed_sources",
    "SIP_MEDIA_SOURCES": "sip.media_sources",
}
SECRET_KEYS = frozenset({"savants.api_key", "twilio.auth_token", "ops.token"})
# Any key, named or not above, can also be set as BRIDGE__<SECTION>__<KEY>, e.g. BRIDGE__AUDIO__OUTBOUND_LEAD_MS.
GENERIC_PREFIX = "BRIDGE__"
# Keys that were renamed: the old name still reads, in the config file and the environment alike, unless the new
# one is given in the same place (then the new one wins).
RENAMED = {"savants.token_probe_interval_s": "savants.probe_interval_s"}


def env_name(key: str) -> str:
    """The environment variable that sets a dotted key: its documented name, else the generic form."""
    named = [var for var, k in ENVIRONMENT.items() if k == key]
    return named[0] if named else GENERIC_PREFIX + key.upper().replace(".", "__")


def _key_of(loc: tuple[int | str, ...]) -> str:
    """A validation error's location as a dotted key; list positions are not keys of their own."""
    return ".".join(str(part) for part in loc if not isinstance(part, int))


def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build the settings; ``overrides`` take dotted keys (``{"server.port": 0}``) and win over everything."""
    env = os.environ if env is None else env
    path = path or env.get("BRIDGE_CONFIG") or None
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
        _rename_in(data)
    sources: dict[str, str] = {}  # key -> the environment variable that set it, for error messages
    generic = {
        var.removeprefix(GENERIC_PREFIX).lower().replace("__", "."): var
        for var, value in sorted(env.items())
        if var.startswith(GENERIC_PREFIX) and value != ""
    }
    for key, var in generic.items():
        if RENAMED.get(key) in generic:
            continue  # an old name, with the new one given too
        key = RENAMED.get(key, key)
        sources[key] = var
        _assign(data, key, env[var], var)
    for var, key in ENVIRONMENT.items():
        if env.get(var, "") != "":
            sources[key] = var
            _assign(data, key, env[var], var)
    for key, value in overrides.items():
        _assign(data, RENAMED.get(key, key), value)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, sources)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist (from --config or BRIDGE_CONFIG)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(loaded).__name__}")
    return loaded


def _rename_in(data: dict[str, Any]) -> None:
    """The config file's old key names as their new ones (``RENAMED``), unless the new one is there too."""
    for old, new in RENAMED.items():
        *parents, leaf = old.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            value = node.pop(leaf)
            node.setdefault(new.rsplit(".", 1)[1], value)


def _assign(data: dict[str, Any], dotted: str, value: Any, var: str | None = None) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            origin = f"environment variable {var} sets {dotted!r}, but " if var else ""
            raise ConfigError(f"{origin}config key {part!r} is not a section; see config.yaml for the keys")
    node[leaf] = value


def _explain(exc: ValidationError, sources: Mapping[str, str]) -> str:
    """One sentence for the first problem: key, environment variable, value (never a secret's), what is allowed."""
    err = exc.errors()[0]
    key = _key_of(err["loc"])
    if not key:  # a rule across keys (a model validator): its message names them
        return str(err["msg"]).removeprefix("Value error, ")
    deeper = next(((k, var) for k, var in sources.items() if k.startswith(key + ".")), None)
    if deeper is not None:  # e.g. BRIDGE__REDIS_URL__X: a variable that treats a setting as a section
        return f"environment variable {deeper[1]} sets {deeper[0]!r}, but {key!r} is a setting, not a section"
    if err["type"] == "extra_forbidden":
        if key in sources:
            return (
                f"environment variable {sources[key]} names config key {key!r}, which this bridge does not know; "
                "see config.yaml for the keys"
            )
        return f"config key {key!r} is not a setting this bridge knows; see config.yaml for the keys"
    where = f"config key {key!r} (environment variable {sources.get(key, env_name(key))})"
    shown = "<hidden>" if key in SECRET_KEYS else repr(err.get("input"))[:80]
    return f"{where} has value {shown}, which is not allowed: {err['msg'].removeprefix('Value error, ')}"
