"""Test-only handlers and helpers shared by the test modules and the subprocess daemon."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest

from runner_daemon.bridge.executor import Executor
from runner_daemon.bridge.handlers import HandlerRegistry, discover
from runner_daemon.bridge.handlers.base import Args, Handler, HandlerContext, HandlerServices
from runner_daemon.bridge.loop import BridgeLoop
from runner_daemon.bridge.stats import LoopStats
from runner_daemon.core.outbox import Outbox
from runner_daemon.core.settings import Settings, load_settings
from runner_daemon.devserver.client import DevClient
from runner_daemon.service.daemon import Daemon

# anyio_backend values of the tests that run on every loop the daemon may run on: the
# conftest's asyncio and trio, and asyncio with uvloop (the daemon's default where installed).
EVERY_LOOP = [
    pytest.param("asyncio", id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    pytest.param("trio", id="trio"),
]

# Short timings so failures and retries take milliseconds, not seconds.
FAST = {
    "heartbeat_interval_seconds": 0.3,
    "retry_initial_seconds": 0.02,
    "retry_max_seconds": 0.2,
    "shutdown_grace_seconds": 30,
    "request_timeout_seconds": 5,
    "poll_timeout_seconds": 10,
}


class SlowArgs(Args):
    seconds: float
    marker: str | None = None


class SlowHandler(Handler[SlowArgs]):
    """Sleeps, then leaves a side effect: a file named ``marker`` in the workspace."""

    command_type = "Slow"
    args_model = SlowArgs

    async def run(self, args: SlowArgs, ctx: HandlerContext) -> dict[str, Any]:
        await anyio.sleep(args.seconds)
        if args.marker:
            (ctx.workspace.root / args.marker).write_text("done")
        return {"slept": args.seconds}


class CountArgs(Args):
    token: str
    seconds: float = 0.0


class CountHandler(Handler[CountArgs]):
    """Records each execution durably (one line per run), so a test can spot a re-run."""

    command_type = "Count"
    args_model = CountArgs
    mutating = True

    async def run(self, args: CountArgs, ctx: HandlerContext) -> dict[str, Any]:
        await anyio.sleep(args.seconds)
        line = (args.token + "\n").encode()
        fd = os.open(ctx.workspace.root / "executions.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return {"token": args.token}


@dataclass
class GateHandler(Handler[Args]):
    """Stays in flight until the test opens the gate: no guess at how long a test needs.

    Create it inside the test's event loop (it holds anyio events).
    """

    command_type: ClassVar[str] = "Gate"
    args_model = Args
    entered: anyio.Event = field(default_factory=anyio.Event)
    gate: anyio.Event = field(default_factory=anyio.Event)
    running: int = 0
    peak: int = 0

    async def run(self, args: Args, ctx: HandlerContext) -> dict[str, Any]:
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.entered.set()
        try:
            with anyio.fail_after(60):
                await self.gate.wait()
        finally:
            self.running -= 1
        return {"gated": True}


class BoomHandler(Handler[Args]):
    command_type = "Boom"
    args_model = Args

    async def run(self, args: Args, ctx: HandlerContext) -> dict[str, Any]:
        raise RuntimeError("secret internals that must not reach the result")


def registry_for_tests(*extra: Handler[Any]) -> HandlerRegistry:
    return discover().with_handlers(SlowHandler(), BoomHandler(), CountHandler(), *extra)


def executor_for(root: Path, registry: HandlerRegistry | None = None, **settings: Any) -> Executor:
    """An Executor over ``root`` with the default handlers, as the loop builds it."""
    loaded = load_settings(None, {"workspace_root": root, **settings})
    return Executor(registry or discover(), loaded, HandlerServices())


def open_outbox(settings: Settings) -> Outbox:
    """The outbox in the settings' state directory (the daemon given it closes it)."""
    outbox = Outbox.open(settings.state_directory)
    return outbox


def make_settings(url: str, runner_id: str, workspace: Path, **overrides: Any) -> Settings:
    return load_settings(
        None, {"url": url, "runner_id": runner_id, "workspace_root": workspace, **FAST, **overrides}
    )


def jobs_settings(url: str, endpoint_id: str, root: Path, agents: dict[str, Any], **jobs: Any) -> Settings:
    """A jobs-only daemon's settings: the endpoint runner, these declared agents, fast kills."""
    return make_settings(
        url,
        str(uuid.uuid4()),
        root,
        bridge={"enabled": False},
        jobs={
            "enabled": True,
            "runner_id": endpoint_id,
            "python": sys.executable,
            "kill_grace_seconds": 1,
            "agents": agents,
            **jobs,
        },
    )


@dataclass
class Running:
    daemon: Daemon
    exit_status: int | None = None


@asynccontextmanager
async def running_daemon(
    settings: Settings, registry: HandlerRegistry | None = None, bridge_key: bytes | None = None
) -> AsyncIterator[Running]:
    """Run a daemon in this event loop; on exit, stop it gracefully and record its status."""
    daemon = Daemon(settings, registry or registry_for_tests(), bridge_key=bridge_key)
    running = Running(daemon)

    async def run() -> None:
        running.exit_status = int(await daemon.run())

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        with anyio.fail_after(10):
            await daemon.running.wait()
        yield running
        daemon.request_stop("test over")


async def wait_terminal(api: DevClient, runner_id: str, command_id: str, timeout: float = 10) -> Any:
    record = await api.get_command(runner_id, command_id, wait=timeout)
    assert record.terminal, f"command {command_id} still {record.status}"
    return record


REPO = Path(__file__).resolve().parent.parent


def daemon_environment(url: str, runner_id: str, workspace: Path, **settings: object) -> dict[str, str]:
    """The environment of a daemon process: fast timings, unsigned commands, JSON logs."""
    env = environ_without_settings()
    values: dict[str, object] = {
        **FAST,
        "allow_unsigned_commands": "true",
        "log_format": "json",
        "url": url,
        "runner_id": runner_id,
        "workspace_root": workspace,
        **settings,
    }
    env.update({f"RUNNER_DAEMON_{key.upper()}": str(value) for key, value in values.items()})
    return env


class DaemonProcess(subprocess.Popen[str]):
    """A process DaemonProcesses started; it owns the files its stdout and stderr go to.

    Files, not pipes: a pipe nobody reads fills up after 64 KiB of logs and then blocks the
    daemon's every log line. The process writes them through descriptors of its own, opened
    to append, and :meth:`output` reads them through new ones: sharing one file offset, a read
    (a seek to the start) moved where the daemon's next line went, over the lines before it.
    """

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="daemon-output-")
        self._paths = (Path(self._folder.name) / "stdout", Path(self._folder.name) / "stderr")
        with open(self._paths[0], "ab") as out, open(self._paths[1], "ab") as err:
            super().__init__(command, cwd=REPO, env=env, stdout=out, stderr=err, text=True)

    def output(self) -> tuple[str, str]:
        """What the process has written so far (stdout, stderr)."""
        out, err = (path.read_text(errors="replace") for path in self._paths)
        return out, err

    def close_output(self) -> None:
        self._folder.cleanup()


class DaemonProcesses:
    """Starts daemon processes for a test and kills whatever is left when it ends."""

    def __init__(self) -> None:
        self._procs: list[DaemonProcess] = []

    def spawn(self, env: dict[str, str], *argv: str) -> DaemonProcess:
        """``python -m tests.slow_daemon`` (the test handlers), or ``python -m <argv...>``."""
        proc = DaemonProcess([sys.executable, "-m", *(argv or ("tests.slow_daemon",))], env)
        self._procs.append(proc)
        return proc

    @property
    def last(self) -> DaemonProcess:
        return self._procs[-1]

    def running(self) -> list[DaemonProcess]:
        return [proc for proc in self._procs if proc.poll() is None]

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.close_output()


async def finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[str, str]:
    """Wait for a process to exit (off the event loop); its stdout and stderr."""
    if not isinstance(proc, DaemonProcess):
        return await anyio.to_thread.run_sync(lambda: proc.communicate(timeout=timeout))
    await anyio.to_thread.run_sync(lambda: proc.wait(timeout))
    return proc.output()


def environ_without_settings() -> dict[str, str]:
    return {
        key: value for key, value in os.environ.items() if not key.startswith(("RUNNER_DAEMON_", "OPIK_"))
    }


async def until(check: Callable[[], Any], timeout: float = 10.0) -> None:
    """Wait for a condition we cannot be notified of (server state, another process)."""
    with anyio.fail_after(timeout):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await anyio.sleep(0.02)


async def command_status_is(api: DevClient, runner_id: str, command_id: str, status: str) -> bool:
    return (await api.get_command(runner_id, command_id)).status == status


async def runner_connected(api: DevClient, runner_id: str) -> bool:
    return (await api.get_runner(runner_id)).status == "connected"


def started_in_journal(state_directory: Path) -> set[str]:
    """Ids of the commands a daemon journalled as started (before their handlers ran).

    Read while the daemon appends: a line still being written is skipped.
    """
    try:
        data = (state_directory / "outbox.jsonl").read_bytes()
    except FileNotFoundError:
        return set()
    ids = set()
    for line in data.split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("op") == "started":
            ids.add(str(record["id"]))
    return ids


def bare_loop(settings: Settings, api: DevClient) -> BridgeLoop:
    """The loop's phases without a daemon around them."""
    outbox = open_outbox(settings)
    return BridgeLoop(settings, api, registry_for_tests(), LoopStats(), outbox, services=HandlerServices())


def process_gone(pid: int) -> bool:
    """Not running: no such process, or a zombie waiting for its (new) parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(b")") + 2 :].split()[0] in (b"Z", b"X")


def git(root: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false", *args],
        cwd=root,
        check=True,
        capture_output=True,
    )


def bench(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``runner-daemon bench ARGS`` as a process of its own, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "runner_daemon", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
