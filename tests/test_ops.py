"""systemd notify over a real datagram socket, and the health listener over a real TCP socket."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest

from runner_daemon.bridge.handlers.base import Args, Handler, HandlerContext
from runner_daemon.core.transport import probe
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.server import DevServer
from runner_daemon.service.daemon import ExitStatus
from runner_daemon.service.notify import Notifier
from tests.support import (
    DaemonProcesses,
    GateHandler,
    daemon_environment,
    environ_without_settings,
    finish,
    make_settings,
    registry_for_tests,
    running_daemon,
    until,
    wait_terminal,
)

REPO = Path(__file__).resolve().parent.parent


class Listener:
    """A NOTIFY_SOCKET stand-in: collects datagrams with the time they arrived."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def drain(self) -> list[tuple[float, dict[str, str]]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return self.messages
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def with_key(self, key: str) -> list[tuple[float, dict[str, str]]]:
        return [(at, fields) for at, fields in self.drain() if key in fields]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, Listener]]:
    path = str(tmp_path / "notify.sock")
    listener = Listener(path)
    yield path, listener
    listener.sock.close()


def test_notifier_sends_datagrams(notify_socket: tuple[str, Listener]) -> None:
    path, listener = notify_socket
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000"})
    assert notifier.watchdog_interval == 1.5
    notifier.ready("up\nand running")
    notifier.watchdog()
    notifier.stopping("bye")
    messages = [fields for _, fields in listener.drain()]
    assert messages == [
        {"READY": "1", "STATUS": "up and running"},
        {"WATCHDOG": "1"},
        {"STOPPING": "1", "STATUS": "bye"},
    ]


def test_notifier_abstract_namespace() -> None:
    name = f"runner-daemon-test-{time.monotonic_ns()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(1)
    try:
        Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}).send(READY="1")
        assert server.recv(100) == b"READY=1"
    finally:
        server.close()


def test_notifier_without_socket_is_a_no_op() -> None:
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert not notifier.enabled and notifier.watchdog_interval is None  # a watchdog for another PID
    notifier.ready("x")  # nothing to send to, nothing raised


class WedgeArgs(Args):
    seconds: float


@dataclass
class WedgeHandler(Handler[WedgeArgs]):
    """Blocks the whole event loop, as a bug in a handler might, and counts the watchdog pings
    sent meanwhile: the socket queues them, so a ping from any other thread would show."""

    command_type: ClassVar[str] = "Wedge"
    args_model = WedgeArgs
    listener: Listener

    async def run(self, args: WedgeArgs, ctx: HandlerContext) -> dict[str, Any]:
        before = len(self.listener.drain())
        time.sleep(args.seconds)  # noqa: ASYNC251 - the point of this handler
        during = self.listener.drain()[before:]
        return {"pings": sum("WATCHDOG" in fields for _, fields in during)}


@pytest.mark.anyio
async def test_ready_after_first_contact_then_watchdog_pings_and_silence_when_wedged(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path, notify_socket: tuple[str, Listener]
) -> None:
    path, listener = notify_socket
    notifier = Notifier(path, watchdog_usec=200_000)  # a ping every 0.1 s
    settings = make_settings(devserver.url, runner_id, workspace)
    from runner_daemon.service.daemon import Daemon

    daemon = Daemon(settings, registry_for_tests(WedgeHandler(listener)), notifier=notifier)
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        await until(lambda: daemon.state == "running")
        ready = listener.with_key("READY")
        assert len(ready) == 1 and ready[0][1]["STATUS"].startswith("starting: 0 commands run")
        await until(lambda: len(listener.with_key("WATCHDOG")) >= 2)
        command_id = await api.submit_command(runner_id, "Wedge", {"seconds": 1.5})
        record = await wait_terminal(api, runner_id, command_id)
        assert record.result == {"pings": 0}  # no ping while the loop was wedged
        after = len(listener.with_key("WATCHDOG"))
        await until(lambda: len(listener.with_key("WATCHDOG")) > after)  # and pings again after
        daemon.request_stop("test")
    stopping = listener.with_key("STOPPING")
    assert len(stopping) == 1 and stopping[0][1]["STATUS"].startswith("stopping (test)")
    statuses = [fields["STATUS"] for _, fields in listener.drain() if "STATUS" in fields]
    assert any(": 1 commands run, 0 in flight" in status for status in statuses), statuses


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sigterm_sends_stopping_from_a_real_process(
    devserver: DevServer,
    runner_id: str,
    workspace: Path,
    notify_socket: tuple[str, Listener],
    daemons: DaemonProcesses,
) -> None:
    path, listener = notify_socket
    env = daemon_environment(devserver.url, runner_id, workspace)
    env.update(NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000")
    proc = daemons.spawn(env, "runner_daemon", "run")
    await until(lambda: bool(listener.with_key("READY")), 20)
    await until(lambda: bool(listener.with_key("WATCHDOG")), 20)
    proc.send_signal(signal.SIGTERM)
    await finish(proc)
    assert proc.returncode == 0
    assert len(listener.with_key("STOPPING")) == 1


async def _get(port: int, path: str) -> int | None:
    return await probe(f"http://127.0.0.1:{port}{path}")


@pytest.mark.anyio
async def test_health_endpoints_through_the_daemons_life(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path
) -> None:
    settings = make_settings(
        devserver.url, runner_id, workspace, health={"listen": "127.0.0.1:0"}, shutdown_grace_seconds=30
    )
    await api.dev_post("faults", {"route": "heartbeat", "status": 503, "count": 1000})
    gated = GateHandler()
    from runner_daemon.service.daemon import Daemon

    daemon = Daemon(settings, registry_for_tests(gated))
    status: list[int] = []
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            status.append(int(await daemon.run()))

        tg.start_soon(run)
        await until(lambda: daemon.health_port is not None)
        port = daemon.health_port
        assert port is not None
        # Before the server ever answered: alive, not ready.
        assert (await _get(port, "/healthz"), await _get(port, "/readyz")) == (200, 503)
        await api.dev_post("faults/clear", {})
        await until(lambda: daemon.state == "running", 15)
        assert (await _get(port, "/healthz"), await _get(port, "/readyz")) == (200, 200)
        command_id = await api.submit_command(runner_id, "ReadFile", {"path": "README.md"})
        await wait_terminal(api, runner_id, command_id)
        slow = await api.submit_command(runner_id, "Gate", {})
        with anyio.fail_after(10):
            await gated.entered.wait()
        daemon.request_stop("test")
        # Draining: alive, no longer ready.
        assert (await _get(port, "/healthz"), await _get(port, "/readyz")) == (200, 503)
        metrics = await _metrics(port)
        gated.gate.set()
        assert (await wait_terminal(api, runner_id, slow)).status == "completed"
    assert status == [ExitStatus.OK]
    assert port is not None
    assert await _get(port, "/healthz") is None  # the listener closed with the daemon
    assert 'runner_daemon_commands_total{status="completed",type="ReadFile"} 1.0' in metrics
    assert 'runner_daemon_command_duration_seconds_count{type="ReadFile"} 1.0' in metrics
    assert "runner_daemon_commands_in_flight 1.0" in metrics
    assert "runner_daemon_ready 0.0" in metrics


async def _metrics(port: int) -> str:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    async with stream:
        await stream.send(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = b""
        with anyio.fail_after(5):
            while True:
                try:
                    data += await stream.receive()
                except anyio.EndOfStream:
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK")
    assert b"text/plain; version=0.0.4" in head
    return body.decode()


@pytest.mark.anyio
async def test_health_after_disconnect(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path
) -> None:
    settings = make_settings(devserver.url, runner_id, workspace, health={"listen": "127.0.0.1:0"})
    async with running_daemon(settings) as running:
        port = running.daemon.health_port
        assert port is not None and await _get(port, "/readyz") == 200
        await api.disconnect(runner_id)
        await until(lambda: running.daemon.state == "stopped")
    assert running.exit_status == ExitStatus.DISCONNECTED
    assert await _get(port, "/healthz") is None


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_health_command_exit_status(devserver: DevServer, runner_id: str, workspace: Path) -> None:
    settings = make_settings(devserver.url, runner_id, workspace, health={"listen": "127.0.0.1:0"})

    def health(*args: str) -> int:
        return subprocess.run(
            [sys.executable, "-m", "runner_daemon", "health", *args],
            cwd=REPO,
            env=environ_without_settings(),
            capture_output=True,
            timeout=30,
            check=False,
        ).returncode

    async with running_daemon(settings) as running:
        url = f"http://127.0.0.1:{running.daemon.health_port}"
        assert await anyio.to_thread.run_sync(health, "--url", url) == 0
        assert await anyio.to_thread.run_sync(health, "--ready", "--url", url) == 0
    assert await anyio.to_thread.run_sync(health, "--url", url) == 1
    assert await anyio.to_thread.run_sync(health) == 2  # no listener configured


def test_health_listen_must_be_host_port() -> None:
    from runner_daemon.core.errors import ConfigError
    from runner_daemon.core.settings import load_settings

    with pytest.raises(ConfigError, match=r"health\.listen: Value error, expected host:port"):
        load_settings(None, {"health": {"listen": "9464"}})


def _statuses(listener: Listener) -> list[str]:
    return [fields["STATUS"] for _, fields in listener.drain() if "STATUS" in fields]


@pytest.mark.anyio
async def test_status_says_what_is_true_now(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path, notify_socket: tuple[str, Listener]
) -> None:
    """An error leaves STATUS= once Opik answers again; a stop is not overwritten while draining."""
    path, listener = notify_socket
    notifier = Notifier(path, watchdog_usec=200_000)  # a status check every 0.1 s
    settings = make_settings(devserver.url, runner_id, workspace, shutdown_grace_seconds=30)
    await api.dev_post("faults", {"route": "poll", "status": 503, "count": 2})
    gated = GateHandler()
    from runner_daemon.service.daemon import Daemon

    daemon = Daemon(settings, registry_for_tests(gated), notifier=notifier)
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        await until(lambda: any("last error: HTTP 503" in status for status in _statuses(listener)))
        await until(lambda: "last error" not in _statuses(listener)[-1])  # answered since
        await api.submit_command(runner_id, "Gate", {})
        with anyio.fail_after(20):
            await gated.entered.wait()
        pings = len(listener.with_key("WATCHDOG"))
        daemon.request_stop("test")
        stop_at = len(_statuses(listener))
        await until(lambda: len(listener.with_key("WATCHDOG")) >= pings + 3)  # it looked again since
        gated.gate.set()
    after_stop = _statuses(listener)[stop_at - 1 :]
    assert after_stop and all(status.startswith("stopping (test)") for status in after_stop), after_stop


@pytest.mark.anyio
async def test_an_outage_shows_in_status_and_metrics_not_as_a_silent_watchdog(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path, notify_socket: tuple[str, Listener]
) -> None:
    """A restart cannot fix an unreachable Opik: the watchdog keeps being pinged through it."""
    path, listener = notify_socket
    notifier = Notifier(path, watchdog_usec=200_000)
    # Contact counts as lost after 3 heartbeats and a request's time: about 1.4 s here.
    settings = make_settings(devserver.url, runner_id, workspace, request_timeout_seconds=0.5)
    from runner_daemon.service.daemon import Daemon

    daemon = Daemon(settings, registry_for_tests(), notifier=notifier)
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        await until(lambda: daemon.state == "running")
        for route in ("heartbeat", "poll"):
            await api.dev_post("faults", {"route": route, "status": 503, "count": 1_000_000})
        await until(lambda: "server not answering" in (_statuses(listener) or [""])[-1], 30)
        assert daemon.seconds_since_contact() > 1
        pings = len(listener.with_key("WATCHDOG"))
        await until(lambda: len(listener.with_key("WATCHDOG")) >= pings + 5)  # still pinged
        await api.dev_post("faults/clear", {})
        await until(lambda: "server not answering" not in _statuses(listener)[-1], 30)
        daemon.request_stop("test")
