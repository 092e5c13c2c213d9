"""The ``event_loop`` setting: the daemon runs on uvloop by default, on asyncio or trio when
asked, says which in ``--version`` and its "runner connected" line, and refuses a loop that
is not installed."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from runner_daemon.core import eventloop
from runner_daemon.core.errors import ConfigError
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.server import DevServer
from tests.support import (
    EVERY_LOOP,
    REPO,
    DaemonProcess,
    DaemonProcesses,
    daemon_environment,
    environ_without_settings,
    finish,
    until,
    wait_terminal,
)

pytestmark = pytest.mark.anyio

UVLOOP = f"uvloop {importlib.metadata.version('uvloop')}"


def without_uvloop(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    """``env`` for a Python in which ``import uvloop`` fails, as where it is not installed."""
    hide = tmp_path / "no-uvloop"
    hide.mkdir(exist_ok=True)
    (hide / "uvloop.py").write_text("raise ImportError('uvloop hidden by a test')\n")
    return {**env, "PYTHONPATH": str(hide)}


def connected_event(proc: DaemonProcess) -> dict[str, Any] | None:
    for line in proc.output()[1].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line still being written
        if str(record.get("event", "")).startswith("runner connected"):
            return dict(record)
    return None


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    ("setting", "hidden", "expected"),
    [
        ("auto", False, UVLOOP),
        ("uvloop", False, UVLOOP),
        ("asyncio", False, "asyncio"),
        ("trio", False, "trio "),
        ("auto", True, "asyncio"),
    ],
    ids=["auto", "uvloop", "asyncio", "trio", "auto-without-uvloop"],
)
async def test_the_daemon_runs_on_the_loop_asked_for_and_logs_it(
    devserver: DevServer,
    api: DevClient,
    runner_id: str,
    workspace: Path,
    daemons: DaemonProcesses,
    tmp_path: Path,
    setting: str,
    hidden: bool,
    expected: str,
) -> None:
    env = daemon_environment(devserver.url, runner_id, workspace, event_loop=setting)
    proc = daemons.spawn(without_uvloop(tmp_path, env) if hidden else env)
    await until(lambda: connected_event(proc) is not None or proc.poll() is not None, 30)
    connected = connected_event(proc)
    assert connected is not None, proc.output()[1]
    assert connected["event_loop"].startswith(expected)
    # A file read and a child process (each loop spawns and reaps it its own way).
    read = await api.submit_command(runner_id, "ReadFile", {"path": "README.md"})
    run = await api.submit_command(runner_id, "Exec", {"command": "echo ran"})
    assert (await wait_terminal(api, runner_id, read, 30)).status == "completed"
    record = await wait_terminal(api, runner_id, run, 30)
    assert record.status == "completed", record.error
    assert record.result is not None and record.result["stdout"] == "ran\n"
    proc.terminate()
    await finish(proc)
    assert proc.returncode == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_uvloop_asked_for_but_not_installed_is_a_config_error(
    devserver: DevServer, runner_id: str, workspace: Path, daemons: DaemonProcesses, tmp_path: Path
) -> None:
    env = daemon_environment(devserver.url, runner_id, workspace, event_loop="uvloop")
    proc = daemons.spawn(without_uvloop(tmp_path, env))
    _, err = await finish(proc)
    assert proc.returncode == 78
    assert "uvloop is not installed" in err


def test_version_names_the_loop_auto_picks(tmp_path: Path) -> None:
    def version(env: dict[str, str]) -> str:
        command = [sys.executable, "-m", "runner_daemon", "--version"]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=60, check=True, cwd=REPO, env=env
        )
        return done.stdout

    env = environ_without_settings()
    assert version(env).endswith(f"(event loop: {UVLOOP})\n")
    assert version(without_uvloop(tmp_path, env)).endswith("(event loop: asyncio)\n")


def test_choose_maps_each_setting_to_anyio_run_arguments() -> None:
    assert eventloop.choose("auto") == eventloop.EventLoop("asyncio", UVLOOP, {"use_uvloop": True})
    assert eventloop.choose("uvloop") == eventloop.choose("auto")
    assert eventloop.choose("asyncio") == eventloop.EventLoop("asyncio", "asyncio")
    trio = eventloop.choose("trio")
    assert (trio.backend, trio.options) == ("trio", {})


def test_a_loop_that_does_not_import_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    monkeypatch.setitem(sys.modules, "trio", None)
    assert eventloop.choose("auto") == eventloop.EventLoop("asyncio", "asyncio")
    for setting in ("uvloop", "trio"):
        with pytest.raises(ConfigError, match=f"{setting} is not installed"):
            eventloop.choose(setting)


@pytest.mark.parametrize("anyio_backend", EVERY_LOOP)
async def test_running_names_the_loop_of_the_caller(anyio_backend: Any) -> None:
    expected = {"asyncio": "asyncio", "uvloop": UVLOOP, "trio": "trio "}
    name = "uvloop" if isinstance(anyio_backend, tuple) else anyio_backend
    assert eventloop.running().startswith(expected[name])
