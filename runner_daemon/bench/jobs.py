"""``bench --jobs``: how soon a created job's agent runs, and how soon a cancelled one is gone.

The dev server child keeps Opik's 10 s ``jobs/next`` hold: an idle runner long-polls, so a
created job is handed at once to the poll the daemon holds (with ``max_jobs`` 2 one poll is
open while a job runs), as in production. The daemon child serves an endpoint runner only
(``[bridge] enabled = false``), with one declared agent, :data:`AGENT_SOURCE`, a Python script
in the bench's scratch folder whose first statement reads the clock.

- **Start**: ``-n`` short jobs, one at a time, each waited for until it ends. Its latency is
  the agent's own first timestamp (``time.time_ns()``) minus the job's ``created_at`` on the
  server: one machine, one wall clock. It includes the agent's interpreter start-up. From
  the server's ``started_at`` (the poll took the job) on, it is the daemon's and the agent's.
- **Cancel**: ``-n`` long jobs (the agent sleeps), one at a time; once the agent runs, the
  bench waits a random part of a heartbeat interval (a user clicks at any moment, not just
  after a beat), cancels it as the UI does, and polls ``/proc/<pid>`` every
  :data:`GONE_POLL_SECONDS` until the agent is gone. The cancel reaches the daemon in the
  endpoint runner's next heartbeat, then the group gets SIGTERM and SIGKILL after the kill
  grace: the bound is heartbeat interval + grace (this agent dies at SIGTERM).
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread

from runner_daemon import __version__
from runner_daemon.bench.children import clean_environ
from runner_daemon.bench.load_client import RUNNERS, create_job
from runner_daemon.bench.probes import process_exited
from runner_daemon.bench.records import BenchError, JobsRun, Latency, Options
from runner_daemon.core.settings import JobsSettings, Settings
from runner_daemon.devserver.records import DevServerConfig

if TYPE_CHECKING:
    from runner_daemon.bench.run import Bench

# The bench's one project: jobs are routed by project to its endpoint runner.
PROJECT_ID = "0193a5c2-0000-7000-8000-0000000be4c5"
AGENT_NAME = "bench-agent"
# The clock first; then the marker (timestamp and pid) is written whole, by a rename.
AGENT_SOURCE = """\
import time
started = time.time_ns()
import json, os, sys
inputs = json.load(sys.stdin)
marker = inputs["marker"]
with open(marker + ".tmp", "w") as out:
    out.write(f"{started} {os.getpid()}")
os.replace(marker + ".tmp", marker)
time.sleep(float(inputs.get("sleep", 0)))
"""
LONG_JOB_SECONDS = 3600.0
MARKER_POLL_SECONDS = 0.002
GONE_POLL_SECONDS = 0.002
STATUS_POLL_SECONDS = 0.01
# Any one step (an agent starting, a job ending, the agents registered) gives up after this.
STEP_SECONDS = 30.0

T = TypeVar("T")


def jobs_heartbeat(options: Options) -> float:
    """The daemon's heartbeat interval for this run: --heartbeat, else the daemon's default."""
    if options.heartbeat is not None:
        return options.heartbeat
    return float(Settings.model_fields["heartbeat_interval_seconds"].default)


async def _poll(check: Callable[[], T | None], seconds: float, interval: float) -> T | None:
    """``check()`` every ``interval`` until it answers, or None after ``seconds``; in a thread,
    so that a few-millisecond cadence neither blocks the event loop nor waits on it."""

    def loop() -> T | None:
        deadline = time.monotonic() + seconds
        while (found := check()) is None and time.monotonic() < deadline:
            time.sleep(interval)
        return found

    return await anyio.to_thread.run_sync(loop, abandon_on_cancel=True)


def _nanoseconds(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1e9)


class JobsBench:
    """The jobs run: an endpoint runner, its daemon, the short jobs, then the long ones."""

    def __init__(self, bench: Bench, heartbeat: float) -> None:
        self.bench = bench
        self.heartbeat = heartbeat
        self.client = bench.client
        self.markers = bench.scratch / "markers"
        self.agent = bench.scratch / "bench_agent.py"
        self.defaults = JobsSettings()
        self.statuses: dict[str, int] = {}

    def _command(self, endpoint_id: str, address: str) -> tuple[list[str], dict[str, str]]:
        bench = self.bench
        jobs = {
            "enabled": True,
            "runner_id": endpoint_id,
            "discover": False,
            "agents": {
                AGENT_NAME: {
                    "command": [sys.executable, "-I", str(self.agent)],
                    "description": "runner-daemon bench: notes when it starts, then sleeps",
                    "params": [
                        {"name": "marker", "type": "string"},
                        {"name": "sleep", "type": "float", "presence": "optional"},
                    ],
                }
            },
        }
        env = {
            **clean_environ(),
            "RUNNER_DAEMON_URL": bench.url,
            "RUNNER_DAEMON_WORKSPACE_ROOT": str(bench.workspace),
            "RUNNER_DAEMON_STATE_DIRECTORY": str(bench.scratch / "state-jobs"),
            "RUNNER_DAEMON_BRIDGE__ENABLED": "false",
            "RUNNER_DAEMON_JOBS": json.dumps(jobs),
            "RUNNER_DAEMON_HEARTBEAT_INTERVAL_SECONDS": str(self.heartbeat),
            "RUNNER_DAEMON_LOG_LEVEL": "warning",
            "RUNNER_DAEMON_LOG_FORMAT": "json",
            # Nothing runs when the bench stops it: the grace only bounds its open poll.
            "RUNNER_DAEMON_SHUTDOWN_GRACE_SECONDS": "2",
            "NOTIFY_SOCKET": address,
        }
        return [bench.options.daemon_python, "-m", "runner_daemon", "run"], env

    async def run(self) -> JobsRun:
        self.agent.write_text(AGENT_SOURCE)
        self.markers.mkdir()
        body = {"name": "bench-jobs", "type": "endpoint", "project_id": PROJECT_ID}
        endpoint_id = str((await self.client.request("POST", "dev/runners", body))["runner_id"])
        runner = await self.bench.spawn_runner(
            "runner-daemon", endpoint_id, lambda address: self._command(endpoint_id, address)
        )
        count = self.bench.options.count
        try:
            await self._registered(endpoint_id)
            starts, in_daemon = [], []
            for i in range(count):
                start, share = await self.short_job(i)
                starts.append(start)
                in_daemon.append(share)
            cancels = [await self.cancelled_job(i) for i in range(count)]
        finally:
            status = runner.stop()
        return JobsRun(
            version=__version__,
            count=count,
            heartbeat_seconds=self.heartbeat,
            kill_grace_seconds=self.defaults.kill_grace_seconds,
            max_jobs=self.defaults.max_jobs,
            poll_hold_seconds=DevServerConfig().jobs_poll_hold_seconds,
            start_ms=Latency.of(starts),
            start_in_daemon_ms=Latency.of(in_daemon),
            cancel_ms=Latency.of(cancels),
            completed=self.statuses.get("completed", 0),
            cancelled=self.statuses.get("cancelled", 0),
            statuses=self.statuses,
            ready_seconds=runner.ready_seconds,
            exit_status=status,
        )

    async def _registered(self, endpoint_id: str) -> None:
        """Until the daemon's agent is registered: a job for it is refused (400) before."""
        try:
            with anyio.fail_after(STEP_SECONDS):
                while True:
                    runner = await self.client.request("GET", f"{RUNNERS}/{endpoint_id}")
                    if any(agent.get("name") == AGENT_NAME for agent in runner.get("agents", [])):
                        return
                    await anyio.sleep(0.05)
        except TimeoutError:
            raise BenchError(f"the daemon did not register its agent within {STEP_SECONDS:g} s") from None

    async def short_job(self, i: int) -> tuple[float, float]:
        """One job that ends at once: (created → agent, started_at → agent) in ms."""
        marker = self.markers / f"short-{i}"
        job_id = await create_job(self.client, PROJECT_ID, AGENT_NAME, {"marker": str(marker)})
        started, _ = await self._agent_started(marker, job_id)
        job = await self._final(job_id)
        created, polled = _nanoseconds(str(job["created_at"])), _nanoseconds(str(job["started_at"]))
        return (started - created) / 1e6, (started - polled) / 1e6

    async def cancelled_job(self, i: int) -> float:
        """One long job cancelled while its agent runs: cancel → agent gone, in ms."""
        marker = self.markers / f"long-{i}"
        inputs = {"marker": str(marker), "sleep": LONG_JOB_SECONDS}
        job_id = await create_job(self.client, PROJECT_ID, AGENT_NAME, inputs)
        _, pid = await self._agent_started(marker, job_id)
        await anyio.sleep(random.uniform(0, self.heartbeat))
        await self.client.request("POST", f"{RUNNERS}/jobs/{job_id}/cancel")
        cancelled = time.monotonic()

        def gone() -> float | None:
            return time.monotonic() if process_exited(pid) else None

        bound = self.heartbeat + self.defaults.kill_grace_seconds + STEP_SECONDS
        when = await _poll(gone, bound, GONE_POLL_SECONDS)
        if when is None:
            raise BenchError(f"job {job_id}: its agent still ran {bound:g} s after the cancel")
        await self._final(job_id)
        return (when - cancelled) * 1000

    async def _agent_started(self, marker: Path, job_id: str) -> tuple[int, int]:
        """The agent's first timestamp (ns) and its pid, from its marker file."""

        def read() -> tuple[int, int] | None:
            try:
                started, pid = marker.read_text().split()
            except FileNotFoundError:
                return None
            return int(started), int(pid)

        found = await _poll(read, STEP_SECONDS, MARKER_POLL_SECONDS)
        if found is None:
            job = await self.client.request("GET", f"{RUNNERS}/jobs/{job_id}")
            raise BenchError(
                f"job {job_id}: the agent did not start within {STEP_SECONDS:g} s (job {job.get('status')}, "
                f"error {job.get('error')!r})"
            )
        return found

    async def _final(self, job_id: str) -> dict[str, Any]:
        """The job once it is terminal on the server; its status is counted."""
        try:
            with anyio.fail_after(STEP_SECONDS):
                while True:
                    job: dict[str, Any] = await self.client.request("GET", f"{RUNNERS}/jobs/{job_id}")
                    if job.get("status") in ("completed", "failed", "cancelled"):
                        break
                    await anyio.sleep(STATUS_POLL_SECONDS)
        except TimeoutError:
            raise BenchError(f"job {job_id} did not end within {STEP_SECONDS:g} s") from None
        status = str(job["status"])
        self.statuses[status] = self.statuses.get(status, 0) + 1
        return job
