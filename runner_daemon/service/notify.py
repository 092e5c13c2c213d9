"""systemd's notify protocol in pure Python: READY, STATUS, WATCHDOG, STOPPING.

Messages are datagrams to the unix socket named by ``$NOTIFY_SOCKET`` (a leading ``@``
means the abstract namespace). Without that variable every call is a no-op, so the same
code runs in a terminal, a container and under systemd.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)


class Notifier:
    """One daemon's line to systemd; its socket lives as long as the process."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = "\0" + address[1:] if address and address.startswith("@") else address
        # systemd wants a ping at least every WATCHDOG_USEC; half of it leaves room for a hiccup.
        self.watchdog_interval = watchdog_usec / 2_000_000 if watchdog_usec else None
        self._socket: socket.socket | None = None
        self._failed = False
        if self.address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        """Read systemd's variables once, at start; a watchdog meant for another PID is ignored."""
        usec: int | None = None
        pid = environ.get("WATCHDOG_PID")
        if environ.get("WATCHDOG_USEC", "").isdigit() and (not pid or pid == str(os.getpid())):
            usec = int(environ["WATCHDOG_USEC"]) or None
        return cls(environ.get("NOTIFY_SOCKET") or None, usec)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, **fields: str) -> None:
        """Send ``KEY=value`` lines in one datagram; failures are logged once, never raised."""
        if self._socket is None or self.address is None:
            return
        message = "\n".join(f"{key}={value.replace(chr(10), ' ')}" for key, value in fields.items())
        try:
            self._socket.sendto(message.encode(), self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify systemd", error=str(exc))
            self._failed = True

    def ready(self, status: str) -> None:
        self.send(READY="1", STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def watchdog(self) -> None:
        self.send(WATCHDOG="1")

    def stopping(self, status: str) -> None:
        self.send(STOPPING="1", STATUS=status)
