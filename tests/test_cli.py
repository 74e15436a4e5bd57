"""The CLI and start-up policy: one sentence naming the key, and no unsigned production bridge by accident."""

from __future__ import annotations

import logging

import pytest

from telephony_bridge.app import create_app
from telephony_bridge.cli import EMULATOR_JWT_SECRET_ENV, _parser, emulator_config, main
from telephony_bridge.errors import ConfigError
from telephony_bridge.settings import load_settings

PRODUCTION = {
    "savants.base_url": "https://api.savants.example",
    "savants.api_key": "sk_live_secret",
    "savants.device_ids": ["d1"],
}


def test_cli_serve_with_a_wrong_value_exits_2_naming_the_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PORT", "eighty")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'server.port' (environment variable PORT)" in err


def test_cli_serve_production_needs_credentials(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SAVANTS_BASE_URL", "https://api.savants.example")
    assert main(["serve"]) == 2
    assert "SAVANTS_API_KEY" in capsys.readouterr().err


def test_startup_refuses_a_real_savants_url_without_an_auth_token() -> None:
    with pytest.raises(ConfigError, match="TWILIO_AUTH_TOKEN"):
        create_app(load_settings(env={}, **PRODUCTION))


def test_startup_allows_unsigned_only_when_asked_and_says_so_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        create_app(load_settings(env={}, **PRODUCTION, **{"twilio.allow_unsigned": True}))
    assert any("anyone who finds this bridge" in r.getMessage() for r in caplog.records)


def test_startup_needs_the_public_url_to_check_signatures() -> None:
    with pytest.raises(ConfigError, match="PUBLIC_URL"):
        create_app(load_settings(env={}, **PRODUCTION, **{"twilio.auth_token": "tok"}))


def test_startup_in_dev_mode_runs_unsigned_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        create_app(load_settings(env={}))
    assert any("NOT checked" in r.getMessage() for r in caplog.records)


def test_cli_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("serve", "emulator", "call", "loadtest"):
        assert command in out


def test_cli_emulator_rejects_a_bad_option_in_one_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["emulator", "--voice", "file"]) == 2  # the file voice needs --wav
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "wav_path" in err


def test_cli_emulator_takes_its_token_key_from_the_environment_so_another_process_can_share_it() -> None:
    args = _parser().parse_args(["emulator"])
    shared = "k" * 32
    assert emulator_config(args, {EMULATOR_JWT_SECRET_ENV: shared}).jwt_secret == shared
    assert emulator_config(args, {}).jwt_secret != emulator_config(args, {}).jwt_secret  # random when unset
    with pytest.raises(ConfigError, match="jwt_secret") as refused:
        emulator_config(args, {EMULATOR_JWT_SECRET_ENV: "too-short-s3cret"})
    assert "s3cret" not in str(refused.value)  # the sentence names the key, never its value
