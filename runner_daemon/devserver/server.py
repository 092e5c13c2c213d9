"""Running the dev server: in the foreground (the CLI) or on a background thread (demo, tests)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from types import TracebackType
from typing import Self

import uvicorn

from runner_daemon.devserver.app import make_app
from runner_daemon.devserver.state import DevServerConfig, DevState


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


class DevServer:
    """The dev server on a socket bound up front, so its port is known before it starts."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, config: DevServerConfig | None = None) -> None:
        app, self.state = make_app(config)
        self._socket = _bind(host, port)
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        self._server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_level="warning",
                access_log=False,
                lifespan="on",
                timeout_graceful_shutdown=2,
            )
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The API base URL, as a user would configure it for a local Opik."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/api/"

    def serve_forever(self) -> None:
        """Serve in the foreground until SIGINT/SIGTERM (uvicorn handles both)."""
        asyncio.run(self._server.serve(sockets=[self._socket]))

    def start(self, timeout: float = 10.0) -> Self:
        """Serve on a daemon thread with its own event loop; returns once it accepts requests."""
        self._thread = threading.Thread(target=self.serve_forever, name="devserver", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the dev server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
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
