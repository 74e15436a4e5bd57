"""Settings: defaults, YAML, environment overrides, one-sentence errors, secrets hidden."""

from __future__ import annotations

from pathlib import Path

import pytest

from telephony_bridge.errors import ConfigError
from telephony_bridge.settings import ENVIRONMENT, load_settings

ROOT = Path(__file__).parent.parent


def test_settings_with_nothing_configured_are_dev_mode() -> None:
    settings = load_settings(env={})
    assert settings.dev_mode
    assert settings.server.port == 8080


def test_settings_shipped_config_yaml_loads_and_documents_every_env_var() -> None:
    text = (ROOT / "config.yaml").read_text()
    settings = load_settings(ROOT / "config.yaml", env={})
    assert settings == load_settings(env={})  # the file documents the defaults
    for var in ENVIRONMENT:
        assert var in text, f"config.yaml does not mention {var}"


def test_settings_environment_overrides_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  port: 9000\nsavants:\n  base_url: https://a.example\n")
    settings = load_settings(
        path, env={"PORT": "9100", "SAVANTS_DEVICE_IDS": "dev-a, dev-b", "SAVANTS_API_KEY": "sk_live_x"}
    )
    assert settings.server.port == 9100
    assert settings.savants.device_ids == ("dev-a", "dev-b")
    assert settings.savants.voice_stream_url == "wss://a.example/voice-stream"
    assert not settings.dev_mode


def test_settings_bridge_config_env_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  port: 9001\n")
    assert load_settings(env={"BRIDGE_CONFIG": str(path)}).server.port == 9001


def test_settings_ws_url_derivation_and_override() -> None:
    assert load_settings(env={"SAVANTS_BASE_URL": "http://h:1"}).savants.voice_stream_url == "ws://h:1/voice-stream"
    env = {"SAVANTS_BASE_URL": "http://h:1", "SAVANTS_WS_URL": "wss://other/vs"}
    assert load_settings(env=env).savants.voice_stream_url == "wss://other/vs"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"PORT": "eighty"}, "config key 'server.port' (environment variable PORT) has value 'eighty'"),
        ({"SAVANTS_BASE_URL": "ftp://x"}, "expected an absolute https:// or http:// URL"),
        ({"SAVANTS_WS_URL": "https://x"}, "expected an absolute wss:// or ws:// URL"),
        ({"SAVANTS_BASE_URL": "https://api.example/v 1"}, "expected a URL of ASCII characters without spaces"),
        ({"SAVANTS_BASE_URL": "https://api.example/vé"}, "expected a URL of ASCII characters without spaces"),
        ({"SAVANTS_BASE_URL": "https://api.example:443x"}, "expected the URL's port to be a number from 0 to 65535"),
        ({"SAVANTS_WS_URL": "wss://api.example:99999/vs"}, "expected the URL's port to be a number from 0 to 65535"),
        ({"SAVANTS_BASE_URL": "https://api.example/?region=eu"}, "expected a base URL without a query"),
        ({"SAVANTS_BASE_URL": "https://api.example/#x"}, "expected a base URL without a query"),
        ({"REDIS_URL": "localhost:6379"}, "config key 'redis_url' (environment variable REDIS_URL)"),
        ({"SAVANTS_DEVICE_IDS": "a,a"}, "expected distinct device ids"),
    ],
)
def test_settings_wrong_value_is_one_sentence_naming_the_key(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_settings_unknown_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  prot: 1\n")
    with pytest.raises(ConfigError, match=r"'server\.prot' is not a setting"):
        load_settings(path, env={})


def test_settings_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.yaml", env={})


def test_settings_secrets_never_show_in_repr_or_errors() -> None:
    settings = load_settings(env={"SAVANTS_API_KEY": "sk_live_secret", "TWILIO_AUTH_TOKEN": "tw_secret"})
    assert "sk_live_secret" not in repr(settings) and "tw_secret" not in repr(settings)
    assert settings.savants.api_key.get_secret_value() == "sk_live_secret"


def test_settings_every_key_has_a_generic_environment_variable() -> None:
    env = {"BRIDGE__AUDIO__OUTBOUND_LEAD_MS": "140", "BRIDGE__BARGE_IN__ENABLED": "false"}
    settings = load_settings(env=env)
    assert (settings.audio.outbound_lead_ms, settings.barge_in.enabled) == (140, False)


def test_settings_documented_names_win_over_the_generic_form() -> None:
    assert load_settings(env={"BRIDGE__SERVER__PORT": "9000", "PORT": "9100"}).server.port == 9100


def test_settings_generic_variable_errors_name_it() -> None:
    with pytest.raises(ConfigError, match="BRIDGE__AUDIO__OUTBOUND_LEAD_MS"):
        load_settings(env={"BRIDGE__AUDIO__OUTBOUND_LEAD_MS": "5"})


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"BRIDGE__DEBUG": "1"},
            "environment variable BRIDGE__DEBUG names config key 'debug', which this bridge does not know",
        ),
        ({"BRIDGE__REDIS_URL__X": "1"}, "BRIDGE__REDIS_URL__X sets 'redis_url.x', but 'redis_url' is a setting"),
    ],
)
def test_settings_a_stray_generic_variable_is_named_in_the_error(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    assert expected in str(info.value)


def test_settings_listen_host_is_loopback_in_dev_mode_unless_given() -> None:
    assert load_settings(env={}).listen_host == "127.0.0.1"
    assert load_settings(env={"HOST": "0.0.0.0"}).listen_host == "0.0.0.0"
    assert load_settings(env={"SAVANTS_BASE_URL": "https://a.example"}).listen_host == "0.0.0.0"


def test_settings_ops_port_must_differ_from_the_public_port() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"PORT": "9000", "OPS_PORT": "9000"})
    assert "config key 'server.ops_port' (environment variable OPS_PORT) has value '9000'" in str(info.value)
    assert load_settings(env={"OPS_PORT": "9090"}).server.ops_port == 9090


def test_settings_worker_ops_ports_are_one_a_worker_apart_from_the_other_ports() -> None:
    redis = {"REDIS_URL": "redis://127.0.0.1:6379/0", "BRIDGE__SERVER__WORKERS": "3"}
    assert load_settings(env={**redis, "WORKER_OPS_PORT": "9100"}).server.worker_ops_ports() == range(9100, 9103)
    assert load_settings(env={}).server.worker_ops_ports() == range(0)
    for env, why in (
        ({"WORKER_OPS_PORT": "9100", "PORT": "9102"}, "apart from server.port and server.ops_port (9102)"),
        ({"WORKER_OPS_PORT": "9100", "OPS_PORT": "9101"}, "apart from server.port and server.ops_port (9101)"),
        ({"WORKER_OPS_PORT": "65534"}, "leaves one for each worker (the last would be 65536)"),
    ):
        with pytest.raises(ConfigError) as info:
            load_settings(env={**redis, **env})
        message = str(info.value)
        assert "config key 'server.worker_ops_port' (environment variable WORKER_OPS_PORT)" in message, message
        assert why in message, message


def test_settings_the_ops_token_is_a_secret() -> None:
    settings = load_settings(env={"OPS_TOKEN": "ops_secret_123"})
    assert "ops_secret_123" not in repr(settings)
    assert settings.ops.token.get_secret_value() == "ops_secret_123"


def test_settings_the_drain_message_may_not_be_empty() -> None:
    with pytest.raises(ConfigError, match=r"'twilio\.drain_message'"):
        load_settings(env={"BRIDGE__TWILIO__DRAIN_MESSAGE": " "}, **{"twilio.drain_message": ""})


def test_settings_the_probe_interval_still_reads_under_its_first_name(tmp_path: Path) -> None:
    """``savants.token_probe_interval_s`` became ``probe_interval_s`` when the voice stream got a probe too. The
    old name reads in the config file and the environment; the new one wins where both are given, and the old
    variable still overrides the shipped config.yaml (which has the new key), as the image runs it."""
    old_file = tmp_path / "old.yaml"
    old_file.write_text("savants:\n  token_probe_interval_s: 3\n")
    assert load_settings(old_file, env={}).savants.probe_interval_s == 3
    both = tmp_path / "both.yaml"
    both.write_text("savants:\n  token_probe_interval_s: 3\n  probe_interval_s: 6\n")
    assert load_settings(both, env={}).savants.probe_interval_s == 6
    old_var = {"BRIDGE__SAVANTS__TOKEN_PROBE_INTERVAL_S": "4"}
    assert load_settings(env=old_var).savants.probe_interval_s == 4
    assert load_settings(ROOT / "config.yaml", env=old_var).savants.probe_interval_s == 4
    new_var = {"BRIDGE__SAVANTS__PROBE_INTERVAL_S": "5"}
    assert load_settings(env={**old_var, **new_var}).savants.probe_interval_s == 5
    assert load_settings(env={}, **{"savants.token_probe_interval_s": 7}).savants.probe_interval_s == 7
