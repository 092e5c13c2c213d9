"""The settings sources and how they merge (pure logic: environments are given as dicts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner_daemon.core.errors import ConfigError
from runner_daemon.core.settings import DEFAULT_DENY_PATHS, load_settings


def test_nested_tables_merge_file_and_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[exec]\nallow_prefixes = ["git "]\nmax_background = 2\n')
    env = {"RUNNER_DAEMON_EXEC__ENABLED": "false", "runner_daemon_exec__max_background": "3"}
    settings = load_settings(config, {"workspace_root": tmp_path}, env)
    assert settings.exec.enabled is False
    assert settings.exec.allow_prefixes == ("git ",)  # kept from the file
    assert settings.exec.max_background == 3  # the environment wins, in any case
    assert settings.health.listen is None


def test_lists_and_tables_come_as_json(tmp_path: Path) -> None:
    env = {
        "RUNNER_DAEMON_DENY_PATHS": '[".env", "*.secret"]',
        "RUNNER_DAEMON_HEALTH": '{"listen": "127.0.0.1:9464"}',
        "RUNNER_DAEMON_EXEC__SECRET_ENV": '["TOKEN"]',
    }
    settings = load_settings(None, {"workspace_root": tmp_path}, env)
    assert settings.deny_paths == (".env", "*.secret")
    assert settings.health.listen == "127.0.0.1:9464"
    assert settings.exec.secret_env == ("TOKEN",)


def test_bad_json_in_the_environment_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^RUNNER_DAEMON_DENY_PATHS: expected JSON"):
        load_settings(None, {"workspace_root": tmp_path}, {"RUNNER_DAEMON_DENY_PATHS": ".env"})


def test_empty_variables_are_ignored_and_unknown_ones_refused(tmp_path: Path) -> None:
    env = {"RUNNER_DAEMON_MAX_CONCURRENCY": "", "OPIK_WORKSPACE": ""}
    settings = load_settings(None, {"workspace_root": tmp_path}, env)
    assert settings.max_concurrency == 10
    assert settings.workspace is None
    assert settings.deny_paths == DEFAULT_DENY_PATHS
    for name in ("RUNNER_DAEMON_EXEC__NO_SUCH_KEY", "RUNNER_DAEMON_URL__X", "RUNNER_DAEMON_NOPE"):
        with pytest.raises(ConfigError, match=f"{name}: no such setting"):
            load_settings(None, {"workspace_root": tmp_path}, {name: "1"})


def test_unknown_keys_in_the_file_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("max_concurency = 3\n")
    with pytest.raises(ConfigError, match="max_concurency: unknown setting"):
        load_settings(config, {"workspace_root": tmp_path}, {})


def test_values_from_the_environment_are_validated_like_any_other(tmp_path: Path) -> None:
    env = {"RUNNER_DAEMON_EXEC__MAX_BACKGROUND": "many"}
    with pytest.raises(ConfigError, match=r"^exec\.max_background: "):
        load_settings(None, {"workspace_root": tmp_path}, env)
    settings = load_settings(None, {"workspace_root": tmp_path}, {"RUNNER_DAEMON_READ_ONLY": "yes"})
    assert settings.read_only is True


def test_a_password_in_the_url_is_a_secret_to_scrub() -> None:
    settings = load_settings(None, {"url": "https://user:hunter2-long-password@opik.example/api/"})
    assert "hunter2-long-password" in settings.secret_values()


def test_check_config_masks_a_password_in_the_url(capsys: pytest.CaptureFixture[str]) -> None:
    from runner_daemon.cli import main

    assert main(["check-config", "--url", "https://user:hunter2-long-password@opik.example/api/"]) == 0
    printed = capsys.readouterr().out
    assert "hunter2-long-password" not in printed and "opik.example" in printed


def test_a_mistyped_environment_variable_is_an_error_with_a_suggestion() -> None:
    with pytest.raises(
        ConfigError,
        match="RUNNER_DAEMON_MAX_CONCURENCY: no such setting; did you mean RUNNER_DAEMON_MAX_CONCURRENCY",
    ):
        load_settings(None, environ={"RUNNER_DAEMON_MAX_CONCURENCY": "3"})
    with pytest.raises(ConfigError, match="RUNNER_DAEMON_EXEC__SANDBOXX: no such setting; did you mean"):
        load_settings(None, environ={"RUNNER_DAEMON_EXEC__SANDBOXX": "off"})
    settings = load_settings(None, environ={"RUNNER_DAEMON_EXEC__SANDBOX": "off", "RUNNER_DAEMON_EMPTY": ""})
    assert settings.exec.sandbox == "off"
