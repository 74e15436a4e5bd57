"""SIP settings: validated at start-up with one sentence naming the key; production refuses an open trunk."""

from __future__ import annotations

import pytest

from telephony_bridge.errors import ConfigError
from telephony_bridge.settings import load_settings
from telephony_bridge.sip.server import require_sip_security

PRODUCTION = {"SAVANTS_BASE_URL": "https://api.example.test", "SAVANTS_API_KEY": "k", "SAVANTS_DEVICE_IDS": "d"}


def test_sip_is_off_by_default_and_env_vars_set_it() -> None:
    assert load_settings(env={}).sip.port is None
    settings = load_settings(
        env={"SIP_PORT": "5060", "RTP_PORTS": "30000-30099", "SIP_ALLOWED_SOURCES": "192.0.2.0/24, 10.0.0.1"}
    )
    assert settings.sip.port == 5060 and settings.sip.rtp_range == (30000, 30099)
    assert settings.sip.allowed_sources == ("192.0.2.0/24", "10.0.0.1")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RTP_PORTS": "2000"}, "config key 'sip.rtp_ports' (environment variable RTP_PORTS) has value '2000'"),
        ({"RTP_PORTS": "30000-30000"}, "1024 <= FIRST < LAST"),
        ({"SIP_ALLOWED_SOURCES": "10.0.0.0/33"}, "expected CIDR networks such as 192.0.2.0/24, got '10.0.0.0/33'"),
        ({"SIP_PORT": "70000"}, "config key 'sip.port' (environment variable SIP_PORT)"),
        ({"BRIDGE__SIP__FALLBACK_WAV": "/nonexistent.wav"}, "expected the path of an existing WAV file"),
    ],
)
def test_sip_wrong_values_are_one_sentence(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    assert expected in str(info.value)


def test_sip_users_hold_ha1_hex_only() -> None:
    with pytest.raises(ConfigError, match="expected a 64-digit hex SHA-256 HA1"):
        load_settings(env={}, **{"sip.users": {"pbx": {"SHA-256": "password"}}})
    with pytest.raises(ConfigError, match="expected algorithm SHA-256 or MD5"):
        load_settings(env={}, **{"sip.users": {"pbx": {"SHA-1": "0" * 40}}})


def test_production_sip_needs_an_allow_list_or_users_and_an_advertised_host() -> None:
    open_trunk = load_settings(env={**PRODUCTION, "SIP_PORT": "5060"})
    with pytest.raises(ConfigError, match=r"'sip.allowed_sources' .* or 'sip.users' must be set"):
        require_sip_security(open_trunk)
    wildcard = load_settings(env={**PRODUCTION, "SIP_PORT": "5060", "SIP_ALLOWED_SOURCES": "192.0.2.0/24"})
    with pytest.raises(ConfigError, match=r"'sip.advertised_host' .* must be set"):
        require_sip_security(wildcard)
    good = load_settings(
        env={**PRODUCTION, "SIP_PORT": "5060", "SIP_ALLOWED_SOURCES": "192.0.2.0/24", "SIP_ADVERTISED_HOST": "x.test"}
    )
    require_sip_security(good)
    require_sip_security(load_settings(env={"SIP_PORT": "5060"}))  # dev mode: 127.0.0.0/8 by default


def test_sip_refuses_worker_processes() -> None:
    with pytest.raises(ConfigError, match=r"cannot be used with server\.workers = 2"):
        require_sip_security(
            load_settings(env={"SIP_PORT": "5060", "BRIDGE__SERVER__WORKERS": "2", "REDIS_URL": "redis://x:6379/0"})
        )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "::0", "0:0:0:0:0:0:0:0"])
def test_production_sip_on_any_spelling_of_a_wildcard_needs_an_advertised_host(host: str) -> None:
    """``::0`` binds every interface like ``::``, but peers were told ``::0`` in our Contact and SDP."""
    settings = load_settings(env={**PRODUCTION, "SIP_PORT": "5060", "SIP_ALLOWED_SOURCES": "::/0", "SIP_HOST": host})
    with pytest.raises(ConfigError, match=r"'sip.advertised_host' .* must be set"):
        require_sip_security(settings)
