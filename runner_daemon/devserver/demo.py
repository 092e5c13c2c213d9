"""``runner-daemon demo``: the dev server and the daemon in one process, commands and jobs flowing.

It creates a small workspace with two agents in it, starts the dev server on a free port, runs
the daemon against it serving both capabilities (a ``connect`` runner for the bridge, an
``endpoint`` runner for jobs), submits a handful of commands as Opik's UI would, then runs one
job to its result and cancels a second, long one, checking its process is gone. It prints one
row per command and per job with its duration (a job's log lines under its row), then stops
the daemon gracefully. Exit 0 when every command and job ended as expected.

Stdout is the table alone and then one summary line: the daemon's and the dev server's log
lines go to a file the summary names (they interleaved with the rows, and a row's own
"command finished" line could come after it), or to stderr with ``--verbose``.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import anyio
import structlog

from runner_daemon.bridge.handlers import discover
from runner_daemon.core.logs import Secret, configure_logging
from runner_daemon.core.models import CommandRecord, Job, LogEntry
from runner_daemon.core.settings import LogFormat, load_settings
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.server import DevServer, DevServerConfig
from runner_daemon.service.daemon import Daemon, ExitStatus

# (type, args, expected status, expected error code), run one after the other.
DEMO_COMMANDS: list[tuple[str, dict[str, Any], str, str | None]] = [
    ("ListFiles", {"path": "", "depth": 2}, "completed", None),
    ("ReadFile", {"path": "README.md"}, "completed", None),
    ("ReadFile", {"path": "src/app.py", "offset": 1, "limit": 2}, "completed", None),
    (
        "WriteFile",
        {"path": "src/greet.py", "content": "def greet(name):\n    return 'hi ' + name\n"},
        "completed",
        None,
    ),
    (
        "EditFile",
        {"path": "src/greet.py", "edits": [{"old_string": "'hi '", "new_string": "'hello '"}]},
        "completed",
        None,
    ),
    ("SearchFiles", {"pattern": "def \\w+", "glob": "*.py"}, "completed", None),
    ("Exec", {"command": "python3 -c 'import sys; print(sys.version_info[0])' && ls src"}, "completed", None),
    ("ReadFile", {"path": "missing.txt"}, "failed", "file_not_found"),
    ("ReadFile", {"path": "../../etc/passwd"}, "failed", "path_traversal"),
    ("WriteFile", {"path": ".env", "content": "TOKEN=stolen"}, "failed", "permission_denied"),
    ("Exec", {"command": "sudo rm -rf /"}, "failed", "blocked"),
    ("ReadFile", {"path": "README.md", "_hmac": "Zm9yZ2Vk"}, "failed", "auth_failed"),
    ("ReadFile", {"offset": 3}, "failed", "invalid_args"),
    ("Frobnicate", {}, "failed", "unknown_type"),
]

# The project the endpoint runner serves: jobs are routed by it, as in Opik.
DEMO_PROJECT = "0193a5c2-0000-7000-8000-00000000de70"

# A discovered agent: found by reading the source, called with the inputs as keyword arguments.
GREET_AGENT = '''import opik


@opik.track(entrypoint=True)
def greet(name: str, times: int = 1) -> dict[str, object]:
    """Greet someone, one log line per greeting."""
    for n in range(1, times + 1):
        print(f"hello {name} ({n}/{times})")
    return {"greeting": f"hello {name}", "times": times}
'''
# Opik's SDK is not installed for the demo: this stand-in lets ``greet`` import it.
OPIK_STAND_IN = "def track(*args, **kwargs):\n    return lambda function: function\n"
# A declared agent (any program; its inputs come as JSON on stdin): it naps until cancelled.
NAP_AGENT = """import json, os, sys, time

inputs = json.load(sys.stdin)
print(f"napping for {inputs['seconds']} s")
with open(inputs["pidfile"] + ".tmp", "w") as out:
    out.write(str(os.getpid()))
os.replace(inputs["pidfile"] + ".tmp", inputs["pidfile"])
time.sleep(inputs["seconds"])
"""
GREET_INPUTS = {"name": "Ada", "times": 3}
GREET_RESULT = {"greeting": "hello Ada", "times": 3}
GREET_LOGS = [f"hello Ada ({n}/3)" for n in (1, 2, 3)]
NAP_INPUTS = {"seconds": 600, "pidfile": "nap.pid"}  # the pid file is in the workspace (its cwd)
DEMO_JOBS = 2  # greet, then nap
# Generous bounds for a busy machine; the demo takes a few seconds.
JOB_WAIT_SECONDS = 30.0
CHECK_INTERVAL_SECONDS = 0.05


@dataclass
class _JobRow:
    """What the table shows of one job."""

    ok: bool
    agent: str
    inputs: dict[str, Any]
    status: str
    duration_ms: int | None
    summary: str
    logs: list[LogEntry] = field(default_factory=list)


def _make_workspace(root: Path) -> None:
    (root / "src").mkdir()
    (root / "README.md").write_text("# demo project\nA workspace made up by runner-daemon demo.\n")
    (root / "src" / "app.py").write_text("import sys\n\ndef main():\n    print('hello')\n")
    (root / "src" / "notes.txt").write_text("not python\n")
    (root / "agents").mkdir()
    (root / "agents" / "greet.py").write_text(GREET_AGENT)
    (root / "agents" / "opik.py").write_text(OPIK_STAND_IN)
    (root / "agents" / "nap.py").write_text(NAP_AGENT)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _summary(record: CommandRecord) -> str:
    payload = (
        record.result if record.status == "completed" else record.error.model_dump() if record.error else None
    )
    return _clip(json.dumps(payload, ensure_ascii=False), 110)


def _row(ok: bool, kind: str, shown: str, status: str, took: int | None, summary: str) -> None:
    mark = "ok " if ok else "BAD"
    millis = "-" if took is None else str(took)
    print(f"{mark} {kind:<11} {_clip(shown, 38):<38} -> {status:<9} {millis:>4} ms  {summary}", flush=True)


def _print_job(row: _JobRow) -> None:
    _row(row.ok, f"Job {row.agent}", json.dumps(row.inputs), row.status, row.duration_ms, row.summary)
    for entry in row.logs:
        print(f"      {entry.stream} | {entry.text}", flush=True)


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = JOB_WAIT_SECONDS) -> bool:
    """Whether ``check`` came true within ``timeout`` seconds (server state, another process:
    nothing to be notified by)."""
    with anyio.move_on_after(timeout):
        while True:
            if await check():
                return True
            await anyio.sleep(CHECK_INTERVAL_SECONDS)
    return False


def _duration_ms(job: Job) -> int | None:
    if job.started_at is None or job.completed_at is None:
        return None
    return int((job.completed_at - job.started_at).total_seconds() * 1000)


def _process_gone(pid: int) -> bool:
    """No such process, or a zombie left for its (new) parent to reap: it runs no more."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(b")") + 2 :].split()[0] in (b"Z", b"X")


async def _finished(api: DevClient, job_id: str) -> Job:
    """The job once terminal (or as it is when the wait ran out)."""

    async def terminal() -> bool:
        return (await api.get_job(job_id)).terminal

    await _until(terminal)
    return await api.get_job(job_id)


async def _greet_job(api: DevClient) -> _JobRow:
    """A job to its end: its result, and its log lines all there once the result is."""
    job = await _finished(api, await api.create_job(DEMO_PROJECT, "greet", GREET_INPUTS))
    logs = await api.job_logs(job.id)
    ok = job.status == "completed" and job.result == GREET_RESULT and [e.text for e in logs] == GREET_LOGS
    summary = json.dumps(job.result if job.status == "completed" else job.error, ensure_ascii=False)
    return _JobRow(ok, "greet", GREET_INPUTS, job.status, _duration_ms(job), _clip(summary, 110), logs)


async def _cancelled_job(api: DevClient, daemon: Daemon, workspace: Path) -> _JobRow:
    """A long job cancelled from the "UI" once it runs: its process must be gone."""
    job_id = await api.create_job(DEMO_PROJECT, "nap", NAP_INPUTS)
    pidfile = workspace / str(NAP_INPUTS["pidfile"])

    async def napping() -> bool:
        return pidfile.exists() and bool(await api.job_logs(job_id))

    if not await _until(napping):
        job = await api.get_job(job_id)
        return _JobRow(False, "nap", NAP_INPUTS, job.status, _duration_ms(job), "never started napping")
    pid = int(pidfile.read_text())
    cancelled_at = time.monotonic()
    await api.cancel_job(job_id)

    async def gone() -> bool:
        return _process_gone(pid)

    process_gone = await _until(gone)
    took = time.monotonic() - cancelled_at

    async def released() -> bool:  # the daemon let the job go: its last log lines were sent
        return daemon.jobs.in_flight == 0

    await _until(released)
    job = await api.get_job(job_id)
    summary = (
        f"process {pid} gone {took:.1f} s after the cancel"
        if process_gone
        else f"process {pid} still running {took:.0f} s after the cancel"
    )
    ok = job.status == "cancelled" and process_gone
    return _JobRow(ok, "nap", NAP_INPUTS, job.status, _duration_ms(job), summary, await api.job_logs(job_id))


async def _demo(
    server: DevServer, workspace: Path, state: Path, log_format: LogFormat, log_stream: TextIO
) -> int:
    """Print a row for each command and job; return how many did not end as expected."""
    async with DevClient(server.url) as api:
        # The dev server signs this runner's commands with the key, as Opik's UI does.
        bridge_key = secrets.token_bytes(32)
        runner_id = await api.dev_create_runner("runner-daemon demo", bridge_key=bridge_key)
        endpoint_id = await api.dev_create_runner(
            "runner-daemon demo agents", type="endpoint", project_id=DEMO_PROJECT
        )
        settings = load_settings(
            None,
            {
                "url": server.url,
                "runner_id": runner_id,
                "workspace_root": workspace,
                "log_format": log_format,
                "state_directory": state,
                "shutdown_grace_seconds": 5,
                # A cancel reaches the daemon in the endpoint runner's next heartbeat.
                "heartbeat_interval_seconds": 1,
                "jobs": {
                    "enabled": True,
                    "runner_id": endpoint_id,
                    "python": sys.executable,
                    "kill_grace_seconds": 1,
                    "agents": {
                        "nap": {
                            "command": [sys.executable, str(workspace / "agents" / "nap.py")],
                            "description": "Naps until cancelled.",
                            "params": [
                                {"name": "seconds", "type": "integer"},
                                {"name": "pidfile", "type": "string"},
                            ],
                        }
                    },
                },
            },
        )
        secrets_to_scrub: list[Secret] = [*settings.secret_values(), bridge_key]
        configure_logging(settings.log_level, settings.log_format, secrets_to_scrub, log_stream)
        structlog.get_logger(__name__).info(
            "demo started",
            dev_server=server.url,
            workspace=str(workspace),
            runner_id=runner_id,
            endpoint_runner_id=endpoint_id,
        )
        daemon = Daemon(settings, discover(), bridge_key=bridge_key)
        failures = 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            with anyio.fail_after(10):
                await daemon.running.wait()
            for kind, args, status, code in DEMO_COMMANDS:
                command_id = await api.submit_command(runner_id, kind, args)
                record = await api.get_command(runner_id, command_id, wait=30)
                got_code = record.error.code if record.error else None
                ok = record.status == status and got_code == code
                failures += not ok
                _row(ok, kind, json.dumps(args), record.status, record.duration_ms, _summary(record))
            with anyio.fail_after(JOB_WAIT_SECONDS):  # jobs are refused for an agent not registered
                await daemon.jobs.agents_ready.wait()
            for row in (await _greet_job(api), await _cancelled_job(api, daemon, workspace)):
                failures += not row.ok
                _print_job(row)
            daemon.request_stop("demo finished")
        return failures


def _run(log_format: LogFormat, log_stream: TextIO) -> int:
    with tempfile.TemporaryDirectory(prefix="runner-daemon-demo-") as tmp:
        workspace, state = Path(tmp) / "workspace", Path(tmp) / "state"
        workspace.mkdir()
        _make_workspace(workspace)
        # Configured before the dev server starts, so its own log lines go the same way.
        configure_logging("info", log_format, (), log_stream)
        config = DevServerConfig(poll_hold_seconds=1, jobs_poll_hold_seconds=1)
        with DevServer(config=config) as server:
            return anyio.run(_demo, server, workspace, state, log_format, log_stream)


def run_demo(log_format: LogFormat = "auto", verbose: bool = False) -> int:
    """The table on stdout, then a summary naming where the log lines went."""
    total = len(DEMO_COMMANDS) + DEMO_JOBS
    if verbose:
        failures = _run(log_format, sys.stderr)
        print(f"{total - failures} of {total} commands and jobs ended as expected", flush=True)
        return ExitStatus.OK if failures == 0 else ExitStatus.FAILURE
    # Kept after the demo (mode 0600, in the temp folder) for reading; named in the summary.
    fd, log_path = tempfile.mkstemp(prefix="runner-daemon-demo-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8", buffering=1) as log_file:
        try:
            failures = _run(log_format, log_file)
        except BaseException:
            print(f"runner-daemon demo: failed; the daemon's log: {log_path}", file=sys.stderr, flush=True)
            raise
    print(
        f"{total - failures} of {total} commands and jobs ended as expected; the daemon's log: {log_path}",
        flush=True,
    )
    return ExitStatus.OK if failures == 0 else ExitStatus.FAILURE
