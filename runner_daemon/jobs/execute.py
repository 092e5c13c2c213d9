"""One job of one agent, run in a process group of its own, never in the daemon.

The agent's argv starts in a new session (its own process group) in the workspace root,
with the inputs as one JSON object on its stdin (then closed) and this environment: the
daemon's, without its secrets (:func:`job_environment`), plus

- ``OPIK_AGENT``: the agent's name; ``OPIK_JOB_ID``: the job's id;
- ``OPIK_TRACE_ID``: the trace id reported for the job (a discovered agent's trace gets it);
- ``OPIK_RESULT_FILE``: an empty file in a private folder made for this job (mode 0700),
  for the agent's result (the names Opik's runner used when it ran jobs as subprocesses).

**The result file.** Read after the agent exited, as UTF-8 JSON of at most
:data:`MAX_RESULT_BYTES`, never through a symbolic link:

- absent or empty: the result is ``null``;
- an object with a ``"result"`` key: the result is that key's value (``{"result": ...}``
  is what :mod:`bootstrap <runner_daemon.jobs.bootstrap>` and Opik's old runner write);
- an object with an ``"error"`` string and no ``"result"``: the job fails with that text;
- any other JSON value: the result is that value.

Exit status 0 is ``completed`` (unless the file holds an error or cannot be read); any
other is ``failed`` with the file's error, else ``"Process exited with code N"``. Once the
agent exits, whatever it left running in its group is terminated, so the pipes reach their
end and nothing outlives the job. After ``job.timeout`` seconds the whole group gets
SIGTERM, then SIGKILL after ``[jobs] kill_grace_seconds``: ``"Job timed out after <t>s"``
(Opik's text). A cancellation of the caller (a cancel from the UI, the daemon stopping)
ends the group the same way, shielded and bounded, and then propagates. The group watcher
ends the group if the daemon dies first.

stdout and stderr go line by line to the job's :class:`~runner_daemon.jobs.logs.LogShipper`,
and every line read has been sent (or given up after :data:`LOG_FLUSH_SECONDS`) before
:func:`run_job` returns: the final report always follows the last log line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.abc
import structlog

from runner_daemon.core.errors import InvalidInputs
from runner_daemon.core.models import Job
from runner_daemon.core.settings import Settings
from runner_daemon.jobs.agents import BOOTSTRAP, AgentSpec
from runner_daemon.jobs.inputs import validate_inputs
from runner_daemon.jobs.logs import LogShipper
from runner_daemon.system.environment import child_environment
from runner_daemon.system.processes import GroupWatcher, group_alive, kill_process_group
from runner_daemon.system.sandbox import SandboxPolicy
from runner_daemon.system.workspace import Workspace

RESULT_FILE_NAME = "result.json"
MAX_RESULT_BYTES = 4 * 1024 * 1024
# Opik's job timeout when none is set (a job always carries one; this guards a 0).
DEFAULT_TIMEOUT_SECONDS = 1800
# How long the last log lines may take to reach Opik before run_job returns (the loop then
# journals the result and waits on for the lines, still sending them before the result).
LOG_FLUSH_SECONDS = 30.0
# The same when the job is cancelled: the daemon may be stopping.
CANCEL_FLUSH_SECONDS = 2.0
# Once the group is gone, how long a process that left it (setsid) may hold the pipes open.
PIPE_DRAIN_SECONDS = 5.0
# Variables of the daemon itself, and of Opik's runner (in OPIK_RUNNER_MODE, importing an
# entrypoint would start Opik's own runner loop inside the job).
DAEMON_ENV_PREFIX = "RUNNER_DAEMON_"
RUNNER_ENV_NAMES = ("OPIK_RUNNER_MODE", "OPIK_RUNNER_ID")
SANDBOX_MISSING = "This agent runs in the sandbox ([jobs] sandbox), which this runner has not set up"

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class JobOutcome:
    """How a job ended, as its final report says it."""

    status: Literal["completed", "failed"]
    result: Any = None
    error: str | None = None


async def run_job(
    spec: AgentSpec,
    job: Job,
    trace_id: str,
    *,
    settings: Settings,
    logs: LogShipper,
    sandbox: SandboxPolicy | None = None,
    watcher: GroupWatcher | None = None,
    bridge_key: bytes | None = None,
) -> JobOutcome:
    """Run ``job`` of ``spec`` to its end; its outcome (never raises for the agent's sake).

    Invalid inputs fail the job before anything starts. ``sandbox`` is the Exec policy,
    used when ``spec.sandbox`` (a sandboxed agent without one fails). ``watcher`` is the
    daemon's group watcher (without one, the job starts its own). ``bridge_key`` is kept
    out of the agent's environment in any encoding. A cancellation propagates once the
    process group is gone.
    """
    try:
        inputs = validate_inputs(spec, job.inputs)
    except InvalidInputs as exc:
        return JobOutcome("failed", error=str(exc))
    if spec.sandbox and sandbox is None:
        return JobOutcome("failed", error=SANDBOX_MISSING)
    own_watcher = watcher is None
    watcher = watcher or GroupWatcher(settings.jobs.kill_grace_seconds)
    folder = Path(await anyio.to_thread.run_sync(_private_folder))
    try:
        result_file = folder / RESULT_FILE_NAME
        env = job_environment(settings, spec, job, trace_id, result_file, bridge_key=bridge_key)
        argv = list(spec.argv)
        if spec.sandbox:
            assert sandbox is not None
            argv = await anyio.to_thread.run_sync(confine, sandbox, settings, folder, argv)
            env["TMPDIR"] = str(folder)
        run = _Run(argv, env, settings, logs, watcher)
        try:
            returncode = await run.run(json.dumps(inputs).encode(), _timeout(job))
        except BaseException:
            with anyio.CancelScope(shield=True):
                await logs.flush(CANCEL_FLUSH_SECONDS)
            raise
        await logs.flush(LOG_FLUSH_SECONDS)
        if run.start_error is not None:
            return JobOutcome("failed", error=f"Could not start {spec.argv[0]}: {run.start_error}")
        if returncode is None:
            log.info("job timed out", job_id=job.id, agent=spec.name, timeout=_timeout(job))
            return JobOutcome("failed", error=f"Job timed out after {_timeout(job)}s")
        return await anyio.to_thread.run_sync(read_outcome, returncode, result_file)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(shutil.rmtree, folder, True)
        if own_watcher:
            watcher.close()


def job_environment(
    settings: Settings,
    spec: AgentSpec,
    job: Job,
    trace_id: str,
    result_file: Path,
    *,
    bridge_key: bytes | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The agent's environment: the daemon's without its secrets, then what it needs.

    Dropped: the bridge key, the API key and the names ``[exec] secret_env`` lists, by name
    and by value in any encoding (:func:`child_environment`), the daemon's own
    ``RUNNER_DAEMON_*`` settings and Opik's runner mode. Kept: the user's other variables
    (an agent's own keys, such as ``OPENAI_API_KEY``, are its to use). Given back from the
    settings, so the agent's traces go where the job is: ``OPIK_URL_OVERRIDE``,
    ``OPIK_WORKSPACE`` and ``OPIK_API_KEY`` (the agent logs traces with the daemon's key).
    """
    env = {
        name: value
        for name, value in child_environment(settings, environ, bridge_key).items()
        if not name.startswith(DAEMON_ENV_PREFIX) and name not in RUNNER_ENV_NAMES
    }
    env["OPIK_URL_OVERRIDE"] = settings.url.rstrip("/")
    for name, value in (
        ("OPIK_WORKSPACE", settings.workspace),
        ("OPIK_API_KEY", settings.api_key.get_secret_value() if settings.api_key else None),
    ):
        if value:
            env[name] = value
        else:
            env.pop(name, None)
    env.setdefault("PYTHONUNBUFFERED", "1")  # a Python agent's prints reach the log as they happen
    env.update(
        OPIK_AGENT=spec.name,
        OPIK_JOB_ID=job.id,
        OPIK_TRACE_ID=trace_id,
        OPIK_RESULT_FILE=str(result_file),
    )
    return env


def confine(policy: SandboxPolicy, settings: Settings, folder: Path, argv: Sequence[str]) -> list[str]:
    """``argv`` under the Exec policy, with the job's folder writable and the bootstrap
    readable (it lives with the daemon's code, which the policy may not cover). Blocking."""
    workspace = Workspace(settings.workspace_root, settings.deny_paths, settings.deny_write_paths)
    confined = policy.for_command(workspace, folder)
    return replace(confined, read=(*confined.read, str(BOOTSTRAP))).wrap(argv)


def read_outcome(returncode: int, result_file: Path) -> JobOutcome:
    """The outcome an exited agent left: its exit status and its result file. Blocking."""
    try:
        payload = _read_result(result_file)
    except ValueError as exc:
        if returncode == 0:
            return JobOutcome("failed", error=str(exc))
        payload = None
    error = _error_of(payload)
    if returncode != 0:
        return JobOutcome("failed", error=error or _exit_text(returncode))
    if error is not None:
        return JobOutcome("failed", error=error)
    if isinstance(payload, dict) and "result" in payload:
        return JobOutcome("completed", result=payload["result"])
    return JobOutcome("completed", result=payload)


def _read_result(path: Path) -> Any:
    """The file's JSON value (None when absent or empty); ValueError saying what is wrong."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"The result file could not be read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as stream:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("The result file is not a regular file")
        data = stream.read(MAX_RESULT_BYTES + 1)
    if len(data) > MAX_RESULT_BYTES:
        raise ValueError(f"The result file is larger than {MAX_RESULT_BYTES // (1024 * 1024)} MiB")
    if not data.strip():
        return None
    try:
        return json.loads(data)
    except ValueError as exc:  # bad UTF-8 too
        raise ValueError(f"The result file is not valid JSON: {exc}") from None


def _error_of(payload: Any) -> str | None:
    if isinstance(payload, dict) and "result" not in payload and isinstance(payload.get("error"), str):
        return str(payload["error"])
    return None


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"Process was killed by signal {name}"
    return f"Process exited with code {returncode}"


def _timeout(job: Job) -> int:
    return job.timeout if job.timeout > 0 else DEFAULT_TIMEOUT_SECONDS


def _private_folder() -> str:
    folder = tempfile.mkdtemp(prefix="runner-daemon-job-")  # mode 0700
    fd = os.open(Path(folder) / RESULT_FILE_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.close(fd)
    return folder


class _Run:
    """The agent's process, from start to a group that is gone and pipes read to the end."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        settings: Settings,
        logs: LogShipper,
        watcher: GroupWatcher,
    ) -> None:
        self._argv = argv
        self._env = env
        self._cwd = settings.workspace_root
        self._grace = settings.jobs.kill_grace_seconds
        self._logs = logs
        self._watcher = watcher
        self.start_error: str | None = None

    async def run(self, stdin: bytes, timeout: float) -> int | None:
        """The exit status, or None when the time ran out (or the agent could not start)."""
        with anyio.CancelScope(shield=True):  # never lose the handle of a child just spawned
            try:
                process = await anyio.open_process(
                    self._argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=self._cwd,
                    env=self._env,
                    start_new_session=True,
                )
            except OSError as exc:
                self.start_error = exc.strerror or str(exc)
                return None
            self._watcher.watch(process.pid)
        exit_code: int | None = None
        try:
            assert process.stdin is not None and process.stdout is not None and process.stderr is not None
            async with anyio.create_task_group() as readers:
                readers.start_soon(_feed, process.stdin, stdin)
                readers.start_soon(self._logs.pump, "stdout", process.stdout)
                readers.start_soon(self._logs.pump, "stderr", process.stderr)
                with anyio.move_on_after(timeout):
                    exit_code = await process.wait()
                # Done or out of time: the group goes, then its pipes reach their end.
                await kill_process_group(process, self._grace)
                readers.cancel_scope.deadline = anyio.current_time() + PIPE_DRAIN_SECONDS
        finally:
            if process.returncode is None or group_alive(process.pid):  # cancelled from outside
                await kill_process_group(process, self._grace)
            if not group_alive(process.pid):
                self._watcher.forget(process.pid)
            await _release(process)
        return exit_code


async def _feed(stream: anyio.abc.ByteSendStream, data: bytes) -> None:
    """Write the inputs and close stdin; an agent that does not read them is no error."""
    try:
        async with stream:
            await stream.send(data)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass


async def _release(process: anyio.abc.Process) -> None:
    """Close our ends of the pipes (shielded, never blocks on a live child)."""
    with anyio.CancelScope(shield=True):
        if process.returncode is not None:
            await process.aclose()
            return
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                await stream.aclose()
