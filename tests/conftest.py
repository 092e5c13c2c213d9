from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog

from runner_daemon.core import logs
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.server import DevServer, DevServerConfig
from tests.summary import write_summary_tables
from tests.support import DaemonProcesses


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings read the environment: a developer's OPIK_API_KEY or paired runner must not
    leak into tests, and no test may touch the real state directory."""
    import os

    for key in list(os.environ):
        if key.startswith(("RUNNER_DAEMON_", "OPIK_")) or key in ("STATE_DIRECTORY", "XDG_STATE_HOME"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


@pytest.fixture(autouse=True)
def _fresh_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Whatever a test configured logging with (a stream it then closes) ends with the test."""
    monkeypatch.setattr(logs, "CACHE_LOGGERS", False)
    yield
    structlog.reset_defaults()
    logging.getLogger().handlers = []


@pytest.fixture
def daemons() -> Iterator[DaemonProcesses]:
    processes = DaemonProcesses()
    yield processes
    processes.close()


@pytest.fixture
def devserver_config() -> DevServerConfig:
    return DevServerConfig(poll_hold_seconds=1.0, reaper_interval_seconds=0.2, stale_grace_seconds=1.0)


@pytest.fixture
def devserver(devserver_config: DevServerConfig) -> Iterator[DevServer]:
    with DevServer(config=devserver_config) as server:
        yield server


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "README.md").write_text("# title\nline two\nline three\n")
    (root / "src" / "main.py").write_text("print('hi')\r\nprint('bye')\r\n")
    (root / "src" / "pkg" / "mod.py").write_text("x = 1\n")
    (root / "src" / "data.bin").write_bytes(b"\x00\x01\x02")
    (root / "node_modules").mkdir()
    (root / "node_modules" / "dep.js").write_text("//\n")
    return root


@pytest.fixture
async def api(devserver: DevServer) -> AsyncIterator[DevClient]:
    async with DevClient(devserver.url) as client:
        yield client


@pytest.fixture
async def runner_id(api: DevClient) -> str:
    return await api.dev_create_runner("test-runner")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """The tables suites filled as they ran (the reliability suite's faults by outcomes)."""
    write_summary_tables(config, terminalreporter)
