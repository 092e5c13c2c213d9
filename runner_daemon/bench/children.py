"""The bench's child processes: how they are spawned, configured and always killed.

The dev server, the daemon and Opik's runner each run in a process of their own so their CPU
and memory never mix with the bench's; this module owns their life (none outlives the bench,
whatever ends it), the environments they get, and the dev server child's own entry point.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Self

STOP_TIMEOUT_SECONDS = 10.0

_DEVSERVER_ENV = "RD_BENCH_DEVSERVER"
LISTENING = "Opik-compatible dev server listening on "
# Opik's own hold; the bench keeps it so an idle runner long-polls as it would in production.
POLL_HOLD_SECONDS = 30.0
# Finished commands are forgotten this soon: the dev server scans its whole table on every
# submission and poll, and each result is read the moment it is stored (a held GET).
FINISHED_TTL_SECONDS = 3.0

_PR_SET_PDEATHSIG = 1


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to SIGTERM the child when the bench dies (even by SIGKILL)."""
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return hook


class Children:
    """The bench's child processes; every one still running is killed when the block ends."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        self._hook = _die_with_parent_hook()

    def spawn(
        self,
        argv: list[str],
        env: Mapping[str, str],
        *,
        stdout: IO[bytes] | int | None,
        stderr: IO[bytes] | int | None,
        cwd: Path,
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            argv,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            preexec_fn=self._hook,  # noqa: PLW1509 (one prctl call, resolved before the fork)
        )
        self._procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_SECONDS) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait(STOP_TIMEOUT_SECONDS)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs:
            with suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT_SECONDS)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


@contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP end the bench as Ctrl-C does, so the children are cleaned up."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def clean_environ() -> dict[str, str]:
    """This environment without settings meant for a real daemon or a real Opik."""
    prefixes = ("RUNNER_DAEMON_", "OPIK_")
    names = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "STATE_DIRECTORY")
    return {
        key: value for key, value in os.environ.items() if not key.startswith(prefixes) and key not in names
    }


def opik_environ(url: str | None, compress: bool = True) -> dict[str, str]:
    """For the opik child: no error reports or usage analytics sent anywhere, the dev server as Opik."""
    env = {**clean_environ(), "OPIK_SENTRY_ENABLE": "false", "OPIK_ANALYTICS_ENABLE": "false"}
    # The client Opik's runner uses (``Opik().rest_client``, the driver's "sdk") gzips request
    # bodies of 256 bytes or more, as runner-daemon does, and the dev server inflates them as
    # Opik's server does. A bare OpikApi (the driver's "rest") sends them plain whatever this says.
    env["OPIK_ENABLE_JSON_REQUEST_COMPRESSION"] = "true" if compress else "false"
    if url:
        env["OPIK_URL_OVERRIDE"] = url
    return env


# --- the dev server child ---------------------------------------------------------------------


def devserver_command(max_pending: int, heartbeat_ttl: float = 15.0) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the dev server child, its limits raised for the bench.

    ``heartbeat_ttl``: raised with a slow heartbeat (``--jobs --heartbeat``), so that the
    runner stays alive and jobs can be created for it. The jobs poll keeps Opik's 10 s hold.
    It prints :data:`LISTENING` and its URL as its first line of output."""
    config = {
        "heartbeat_ttl_seconds": heartbeat_ttl,
        "poll_hold_seconds": POLL_HOLD_SECONDS,
        "max_pending": max_pending,
        "submissions_per_minute": 1_000_000_000,
        "finished_ttl_seconds": FINISHED_TTL_SECONDS,
        "reaper_interval_seconds": 0.5,
        "max_timeout_seconds": 300,
    }
    env = {**clean_environ(), _DEVSERVER_ENV: json.dumps(config)}
    entry = "from runner_daemon.bench.children import serve_devserver; serve_devserver()"
    return [sys.executable, "-c", entry], env


def serve_devserver() -> None:
    """Entry point of the bench's dev server process: ``DevServerConfig`` from the environment."""
    from runner_daemon.devserver.server import DevServer, DevServerConfig

    config = DevServerConfig(**json.loads(os.environ.get(_DEVSERVER_ENV, "{}")))
    server = DevServer("127.0.0.1", 0, config)
    # Without TCP_NODELAY on the connections it accepts, every answer written in two pieces
    # (head, then body) waits out the client's delayed ACK, about 40 ms a request. asyncio
    # sets it only when the listening socket's proto says TCP (server.py binds it so now);
    # accepted sockets inherit it from the listening one, so this holds either way.
    listening = getattr(server, "_socket", None)
    if isinstance(listening, socket.socket):
        listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # As the daemon does once it is up: the dev server's full collections would otherwise add
    # their 10-20 ms pauses to whichever runner's latency tail they land in.
    gc.freeze()
    print(LISTENING + server.url, flush=True)
    server.serve_forever()
