"""The one exception tree of runner-daemon.

Everything the daemon raises on purpose derives from :class:`RunnerDaemonError`. HTTP status
codes are mapped onto this tree only in :mod:`runner_daemon.core.api`: generically by
``raise_for_status``, and where one endpoint gives a status its own meaning, by that
endpoint's method (a 409 on a report is :class:`AlreadyReported`). The loops speak only in
these names and never inspect a status code::

    RunnerDaemonError
    ├── ConfigError              bad settings; the CLI exits 78 (EX_CONFIG)
    ├── JournalUnavailable       the outbox journal cannot be written (a full or failing disk)
    ├── CommandFailed            a handler's refusal, reported as {"code", "message"}
    ├── Fatal                    the server will not serve this runner again: ends the daemon
    │   (RunnerGone and Unauthorized are both ApiError and Fatal)
    ├── Abandoned                a cancelled command's worker thread stops (a signal, not a failure)
    ├── PairingExpired           nobody opened the pairing link in time; ``pair`` exits 75
    ├── InvalidInputs            a job's inputs do not fit its agent's params: the job fails
    └── ApiError                 the server answered, or could not be reached
        ├── RunnerGone           404: the runner was disconnected (or never existed)
        │   └── RunnerEvicted    410: deregistered, or replaced by a newer connection
        ├── Conflict             409 in general (e.g. runner lacks the bridge capability)
        │   └── AlreadyReported  409 on a result: the command is already terminal
        ├── RateLimited          429, with the server's Retry-After
        ├── Unauthorized         401/403: the API key or workspace is wrong
        ├── RequestRejected      any other 4xx: our request was refused as it stands
        │   └── JobGone          404 on a job's report or logs: that job expired (not the runner)
        └── RetryableError       worth trying again after a backoff
            ├── ServerError      5xx
            ├── TransportError   connect/read/write failures and timeouts
            └── UnreadableAnswer a 2xx answer we could not read (too large, undecodable, unparsable)
"""

from __future__ import annotations

from pydantic import ValidationError


class RunnerDaemonError(Exception):
    """Base of every error runner-daemon raises on purpose."""


class ConfigError(RunnerDaemonError):
    """The settings are invalid; ``str()`` is one line naming the key and the problem."""


class JournalUnavailable(RunnerDaemonError):
    """The outbox journal cannot be written now; no new command may start until it can."""


class CommandFailed(RunnerDaemonError):
    """A command could not be carried out; ``code`` is Opik's error vocabulary."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Fatal(RunnerDaemonError):
    """Retrying cannot help this runner: raised out of the loops, caught once by the daemon.

    Raising (not calling back) lets the task group's cancellation stop everything else; the
    daemon turns the first one into the exit status (69 for a gone runner, 77 for refused
    credentials).
    """


class Abandoned(RunnerDaemonError):
    """Raised inside a worker thread once its command was cancelled or timed out.

    Not an error: a signal that unwinds the thread's loop, so work nobody awaits any more
    stops burning CPU. The loop has already settled the command's outcome and nobody awaits
    the thread, so the exception ends with it. In the tree so that everything we raise on
    purpose has one root.
    """


class PairingExpired(RunnerDaemonError):
    """Nobody opened the pairing link before the session's time to live ran out."""


class InvalidInputs(RunnerDaemonError):
    """A job's inputs do not fit its agent's params; ``str()`` names the param (shown in the UI)."""


class ApiError(RunnerDaemonError):
    """A call to the Opik runner API did not succeed."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RunnerGone(ApiError, Fatal):
    """The server no longer knows this runner: it was disconnected, purged or never paired."""


class RunnerEvicted(RunnerGone):
    """The runner was deregistered, or a newer pairing for the same project replaced it."""


class Conflict(ApiError):
    """The request conflicts with the server's state."""


class AlreadyReported(Conflict):
    """The command is already terminal: reported before, or timed out by the server."""


class RateLimited(ApiError):
    """The server asks us to slow down for ``retry_after`` seconds."""

    def __init__(self, message: str, *, status: int | None = 429, retry_after: float) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class Unauthorized(ApiError, Fatal):
    """The API key or workspace was refused; retrying will not help."""


class RequestRejected(ApiError):
    """The server refused the request as malformed or too large; retrying will not help."""


class JobGone(RequestRejected):
    """Opik no longer knows this job (expired, purged, or not this runner's): drop what was
    meant for it. Unlike :class:`RunnerGone`, it ends nothing else."""


class RetryableError(ApiError):
    """A transient failure: retry after a backoff."""


class ServerError(RetryableError):
    """The server failed (5xx)."""


class TransportError(RetryableError):
    """The request did not complete on the network (connect, read, write, timeout)."""


class UnreadableAnswer(RetryableError):
    """The server answered success with a body we could not understand."""


def describe_validation_error(exc: ValidationError, *, unknown: str = "unknown field") -> str:
    """One line naming each offending key and its problem; never echoes the input value."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False):
        key = ".".join(str(item) for item in error["loc"]) or "value"
        message = unknown if error["type"] == "extra_forbidden" else error["msg"]
        parts.append(f"{key}: {message}")
    return "; ".join(parts)
