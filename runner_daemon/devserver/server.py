"""Running the dev server: in the foreground (the CLI) or on a background thread (demo, tests).

With a ``state_file``, the server loads its state from that file when it starts (if the file
exists) and writes it there when it stops, so a test can stop it and start a new one on the
same port with the same runners, commands and results.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

import uvicorn

from runner_daemon.devserver.app import make_app
from runner_daemon.devserver.faults import FaultProfile
from runner_daemon.devserver.persistence import load_state, save_state
from runner_daemon.devserver.records import DevServerConfig
from runner_daemon.devserver.state import DevState


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it every keep-alive answer (headers and body written apart) waits ~40 ms for
    # the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    """uvicorn, releasing the dev server's held requests as its shutdown begins and calling
    ``on_stopped`` once every connection is closed (still on the loop: in the foreground,
    uvicorn re-raises the SIGTERM it caught right after, which ends the process)."""

    def __init__(self, config: uvicorn.Config, state: DevState, on_stopped: Callable[[], None]) -> None:
        super().__init__(config)
        self._state = state
        self._on_stopped = on_stopped

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Held polls answer [] (picking nothing up) and waits answer at once, so the
        # connections finish before uvicorn's grace period instead of being cancelled.
        self._state.begin_close()
        try:
            await super().shutdown(sockets)
        finally:
            self._on_stopped()


class DevServer:
    """The dev server on a socket bound up front, so its port is known before it starts.

    ``state_file``: load the state from it when serving starts (if it exists), write the
    state to it (atomically) when serving ends. ``faults``: a fault profile to start with
    (replaces one loaded from the state file). ``clock``: the monotonic clock the state's
    deadlines use (a test may pass a fake one).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        config: DevServerConfig | None = None,
        *,
        state_file: Path | None = None,
        faults: FaultProfile | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        app, self.state = make_app(config, clock)
        self.state_file = state_file
        self._faults = faults
        self.loaded = False  # whether serving started from a state file
        self._state_read = False
        self._socket = _bind(host, port)
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        self._server = _Server(
            uvicorn.Config(
                app,
                log_level="warning",
                access_log=False,
                lifespan="on",
                timeout_graceful_shutdown=2,
            ),
            self.state,
            self._save,
        )
        app.connections = lambda: self._server.server_state.connections
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """The API base URL, as a user would configure it for a local Opik."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/api/"

    def serve_forever(self) -> None:
        """Serve in the foreground until SIGINT/SIGTERM (uvicorn handles both).

        The state file is read on the server's event loop (its events belong to that loop),
        and written at the end of uvicorn's shutdown, once no connection is left to change it."""
        asyncio.run(self._serve())

    def _save(self) -> None:
        if self.state_file is not None and self._state_read:  # a file that failed to load stays
            save_state(self.state, self.state_file)

    async def _serve(self) -> None:
        if self.state_file is not None:
            self.loaded = load_state(self.state, self.state_file)
            self._state_read = True
        if self._faults is not None:
            self.state.injector.set_profile(self._faults)
        await self._server.serve(sockets=[self._socket])

    def _run_thread(self) -> None:
        try:
            self.serve_forever()
        except BaseException as exc:
            self._error = exc
            if self._server.started:
                raise
            # else start() raises it, chained to its RuntimeError

    def start(self, timeout: float = 10.0) -> Self:
        """Serve on a daemon thread with its own event loop; returns once it accepts requests."""
        self._thread = threading.Thread(target=self._run_thread, name="devserver", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the dev server did not start") from self._error
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving; returns once the port is free and the state file (if any) written.

        Held requests answer at once, idle keep-alive connections are closed, and anything
        still running after uvicorn's 2 s grace is cancelled."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


__all__ = ["DevServer", "DevServerConfig", "DevState"]
