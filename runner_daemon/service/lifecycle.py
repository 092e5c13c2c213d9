"""The daemon's life as one small state machine, and the exit status it ends with.

Every marker of "where are we, and why are we ending" lives in :class:`Lifecycle`: the
phase (starting → running → draining → stopped, forward only), the stop asked for (by a
signal, or by a :class:`~runner_daemon.core.errors.Fatal` error) and, when a second signal
forced it, that signal. Health, STATUS= and the exit status are all read from here.
"""

from __future__ import annotations

import enum

import anyio

from runner_daemon.core.errors import Fatal, RunnerGone, Unauthorized


class ExitStatus(enum.IntEnum):
    """The process exit statuses; the README and the systemd unit rely on these values."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    DISCONNECTED = 69  # EX_UNAVAILABLE: the server dropped this runner; re-pair, don't restart
    PAIRING_EXPIRED = 75  # EX_TEMPFAIL: pairing expired, or Opik unreachable; try again
    UNAUTHORIZED = 77  # EX_NOPERM: the API key or workspace was refused
    CONFIG = 78  # EX_CONFIG
    # A second signal exits at once with 128 + the signal number (130 for Ctrl-C).


class Phase(enum.StrEnum):
    STARTING = "starting"  # health listener up, first heartbeat not answered yet
    RUNNING = "running"  # polling
    DRAINING = "draining"  # no new poll; in-flight commands finish, heartbeats go on
    STOPPED = "stopped"


_ORDER = list(Phase)


class Lifecycle:
    """Where the daemon is, and why it is ending; changed only through these methods."""

    def __init__(self) -> None:
        self.phase = Phase.STARTING
        self.running = anyio.Event()  # set on entering RUNNING: the first heartbeat was answered
        self.stop_reason: str | None = None  # set once a stop was asked; shown in STATUS=
        self.drain_deadline: float | None = None  # on anyio's clock, for a graceful stop
        self.error: Fatal | None = None  # the server will not serve this runner again
        self.forced_by: int | None = None  # the signal that forced an exit
        self.lost: list[Fatal] = []  # runners gone while another capability went on

    @property
    def stopping(self) -> bool:
        return self.stop_reason is not None

    def advance(self, phase: Phase) -> None:
        """Forward only: a phase is never entered twice, or after a later one."""
        if _ORDER.index(phase) < _ORDER.index(self.phase):
            raise RuntimeError(f"the daemon cannot go from {self.phase} back to {phase}")
        self.phase = phase
        if phase is Phase.RUNNING:
            self.running.set()

    def ask_stop(self, reason: str, grace: float) -> bool:
        """A graceful stop; False if one was asked already (the first reason stands)."""
        if self.stopping:
            return False
        self.stop_reason = reason
        self.drain_deadline = anyio.current_time() + grace
        return True

    def fail(self, error: Fatal) -> bool:
        """The first fatal error ends the daemon; False for any later one."""
        if self.error is not None:
            return False
        self.error = error
        self.stop_reason = "Opik refused this runner" if isinstance(error, Unauthorized) else "runner gone"
        return True

    def lose(self, error: Fatal) -> None:
        """One capability's runner is gone; the daemon goes on, and ends with 69 when it ends."""
        self.lost.append(error)

    def force(self, signum: int) -> None:
        self.forced_by = signum

    def drain_time_left(self, default: float) -> float:
        """What is left of the grace period since the stop was asked (all of it otherwise)."""
        if self.drain_deadline is None:
            return default
        return max(0.0, self.drain_deadline - anyio.current_time())

    def exit_status(self) -> ExitStatus | int:
        if self.forced_by is not None:
            return 128 + self.forced_by
        if isinstance(self.error, RunnerGone):
            return ExitStatus.DISCONNECTED
        if isinstance(self.error, Unauthorized):
            return ExitStatus.UNAUTHORIZED
        if self.lost:
            return ExitStatus.DISCONNECTED
        return ExitStatus.OK
