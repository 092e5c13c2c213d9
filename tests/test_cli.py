"""The command line: exit statuses, config errors, check-config, signals in a real process."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from runner_daemon.cli import main
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.server import DevServer
from tests.support import (
    DaemonProcess,
    DaemonProcesses,
    daemon_environment,
    environ_without_settings,
    finish,
    runner_connected,
    started_in_journal,
    until,
    wait_terminal,
)

REPO = Path(__file__).resolve().parent.parent
RUNNER = "3d1f0a7e-8a67-4a53-9a70-0e3b9cfa7c10"


def _one_line_config_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 78
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("runner-daemon: config error: ")
    assert "Traceback" not in err
    return err


def test_bad_flag_value_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_config_error(capsys, ["run", "--runner-id", RUNNER, "--max-concurrency", "0"])
    assert "max_concurrency: Input should be greater than or equal to 1" in err


def test_bad_environment_value_names_the_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNNER_DAEMON_HEARTBEAT_INTERVAL_SECONDS", "often")
    err = _one_line_config_error(capsys, ["run", "--runner-id", RUNNER])
    assert "heartbeat_interval_seconds:" in err


def test_missing_runner_id_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert "runner_id: not set and no paired runner" in _one_line_config_error(capsys, ["run"])


def test_no_bridge_key_refuses_to_start(capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_config_error(capsys, ["run", "--runner-id", RUNNER])
    assert "bridge key: none for runner" in err and "allow_unsigned_commands = true" in err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("max_concurency = 3\n", "max_concurency: unknown setting"),
        ("url = \n", "is not valid TOML"),
        ('url = "ftp://example.com"\n', "url: Value error, must be an http:// or https:// URL"),
        ('workspace_root = "/nonexistent/folder"\n', "workspace_root: Value error"),
        ('log_format = "xml"\n', "log_format: Input should be 'auto', 'json' or 'console'"),
    ],
)
def test_bad_config_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str, expected: str
) -> None:
    config = tmp_path / "runner-daemon.toml"
    config.write_text(content)
    assert expected in _one_line_config_error(capsys, ["run", "--runner-id", RUNNER, "--config", str(config)])


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _one_line_config_error(capsys, ["check-config", "--config", str(tmp_path / "nope.toml")])
    assert "does not exist" in err


def test_precedence_flags_over_env_over_opik_env_over_file(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('max_concurrency = 3\nurl = "http://file.example/api"\nworkspace = "from-file"\n')
    monkeypatch.setenv("RUNNER_DAEMON_MAX_CONCURRENCY", "4")
    monkeypatch.setenv("OPIK_URL_OVERRIDE", "http://opik-env.example/api")
    monkeypatch.setenv("OPIK_WORKSPACE", "from-opik-env")
    monkeypatch.setenv("RUNNER_DAEMON_WORKSPACE", "from-our-env")
    assert main(["check-config", "--config", str(config), "--log-level", "debug"]) == 0
    out = capsys.readouterr().out
    assert "max_concurrency = 4\n" in out
    assert 'url = "http://opik-env.example/api/"\n' in out
    assert 'workspace = "from-our-env"\n' in out
    assert 'log_level = "debug"\n' in out
    assert main(["check-config", "--config", str(config), "--max-concurrency", "5"]) == 0
    assert "max_concurrency = 5\n" in capsys.readouterr().out


def test_check_config_masks_the_api_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPIK_API_KEY", "sk-very-secret-value")
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert "sk-very-secret-value" not in out
    assert 'api_key = "**********"' in out


def test_example_config_is_valid_and_documents_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    from pydantic import BaseModel

    from runner_daemon.core.settings import Settings

    example = REPO / "config" / "runner-daemon.toml"
    assert main(["check-config", "--config", str(example)]) == 0
    text = example.read_text()
    for key, field in Settings.model_fields.items():
        if isinstance(field.default, BaseModel):
            assert f"# [{key}]" in text, f"table [{key}] is not documented in {example.name}"
            for sub in type(field.default).model_fields:
                assert f"# {sub} = " in text, f"{key}.{sub} is not documented in {example.name}"
        else:
            assert f"# {key} = " in text, f"{key} is not documented in {example.name}"


def test_check_config_output_is_a_valid_config_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["check-config", "--max-concurrency", "3"]) == 0
    printed = capsys.readouterr().out
    config = tmp_path / "printed.toml"
    config.write_text(printed.replace('api_key = "**********"', ""))
    assert main(["check-config", "--config", str(config)]) == 0
    assert capsys.readouterr().out == printed


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("runner-daemon 0.")


def test_bad_config_in_a_real_process_exits_78_without_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "runner_daemon", "run", "--runner-id", "not-a-uuid"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
        env=environ_without_settings(),
    )
    assert proc.returncode == 78
    assert proc.stderr.startswith("runner-daemon: config error: runner_id: ")
    assert proc.stderr.count("\n") == 1


# --- signals, in a real daemon process --------------------------------------------------


@pytest.fixture
def spawn_daemon(devserver: DevServer, workspace: Path, daemons: DaemonProcesses) -> Any:
    def spawn(runner_id: str, **settings: object) -> DaemonProcess:
        return daemons.spawn(daemon_environment(devserver.url, runner_id, workspace, **settings))

    return spawn


async def _wait_in_flight(state_directory: Path, command_id: str) -> None:
    """Until the daemon journalled the command as started: its handler runs, so a stop
    drains it (a command still on its way in would be reported cancelled, not run)."""
    await until(lambda: command_id in started_in_journal(state_directory), 20)


def _logged_stopping(proc: DaemonProcess, reason: str) -> bool:
    """The daemon has logged that it is stopping for ``reason`` (it handled the signal)."""
    for line in proc.output()[1].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line still being written
        if str(record.get("event", "")).startswith("stopping") and record.get("reason") == reason:
            return True
    return False


async def _wait_connected(api: DevClient, runner_id: str) -> None:
    await until(lambda: runner_connected(api, runner_id), 20)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sigterm_drains_the_slow_command_and_exits_0(
    spawn_daemon: object, api: DevClient, runner_id: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    proc = spawn_daemon(runner_id, shutdown_grace_seconds=30, state_directory=state)  # type: ignore[operator]
    await _wait_connected(api, runner_id)
    command_id = await api.submit_command(runner_id, "Slow", {"seconds": 1.0, "marker": "drained.txt"})
    await _wait_in_flight(state, command_id)
    proc.send_signal(signal.SIGTERM)
    record = await wait_terminal(api, runner_id, command_id)
    _, stderr = await finish(proc)
    assert proc.returncode == 0, stderr
    assert record.status == "completed"
    lines = [json.loads(line) for line in stderr.splitlines()]
    finished = [line for line in lines if line["event"] == "command finished"]
    assert len(finished) == 1
    assert finished[0]["command_id"] == command_id
    assert finished[0]["type"] == "Slow"
    assert finished[0]["status"] == "completed"
    assert isinstance(finished[0]["duration_ms"], int)
    assert any(line["event"].startswith("stopping") and line["reason"] == "SIGTERM" for line in lines)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_second_signal_exits_at_once(
    spawn_daemon: object, api: DevClient, runner_id: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    proc = spawn_daemon(runner_id, shutdown_grace_seconds=60, state_directory=state)  # type: ignore[operator]
    await _wait_connected(api, runner_id)
    command_id = await api.submit_command(runner_id, "Slow", {"seconds": 60}, timeout_seconds=120)
    await _wait_in_flight(state, command_id)
    proc.send_signal(signal.SIGTERM)
    # Both pending at once, the kernel would deliver SIGINT first: wait until SIGTERM is handled.
    await until(lambda: _logged_stopping(proc, "SIGTERM"), 20)
    proc.send_signal(signal.SIGINT)
    await finish(proc, 10)
    assert proc.returncode == 128 + signal.SIGINT


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_disconnected_runner_process_exits_69_with_a_clear_line(
    spawn_daemon: object, api: DevClient, runner_id: str
) -> None:
    proc = spawn_daemon(runner_id)  # type: ignore[operator]
    await _wait_connected(api, runner_id)
    await api.disconnect(runner_id)
    _, stderr = await finish(proc)
    assert proc.returncode == 69
    errors = [json.loads(line) for line in stderr.splitlines() if '"level": "error"' in line]
    assert len(errors) == 1
    assert "runner-daemon pair" in errors[0]["event"]


def test_pair_against_an_unreachable_server_exits_75_and_ttl_is_checked_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    project = "0d7c8e3a-0000-4000-8000-000000000001"
    status = main(
        ["pair", "--project-id", project, "--url", "http://127.0.0.1:9/", "--state-directory", str(tmp_path)]
    )
    assert status == 75
    assert "could not start pairing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["pair", "--project-id", project, "--ttl", "30"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "30 is not between 60 and 600" in err and "61" not in err


def test_check_config_shows_the_paired_runner_and_masks_its_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from runner_daemon.bridge.signing import encode_bridge_key
    from runner_daemon.service import credentials

    runner_id = "0d7c8e3a-0000-4000-8000-000000000002"
    key = b"k" * 32
    credentials.store(tmp_path, credentials.Credentials(runner_id, key, "http://localhost:5173/api/"))
    assert main(["check-config", "--state-directory", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f'runner_id = "{runner_id}"' in out and "# bridge key: *** (from" in out
    assert encode_bridge_key(key) not in out


def test_stopping_tasks_py_devserver_stops_the_server(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    repo = Path(__file__).resolve().parent.parent
    out = (tmp_path / "out.txt").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "tasks.py", "devserver", "--port", str(port)], cwd=repo, stdout=out, stderr=out
    )
    try:
        deadline = time.monotonic() + 120
        while "listening" not in (tmp_path / "out.txt").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        with socket.socket() as client, pytest.raises(ConnectionRefusedError):
            client.connect(("127.0.0.1", port))  # the server went with the script
    finally:
        if proc.poll() is None:
            proc.kill()
        out.close()
