"""The reliability suite: under each fault, every command ends with exactly one result.

Each scenario runs a real daemon process against the dev server, submits a few hundred
commands of the ``Count`` type (which records every execution durably), injects its fault,
and then checks on the server: every command terminal, exactly one accepted report each,
none executed twice, none lost. The table of faults by outcomes is printed at the end of the
run (``pytest -m reliability -s`` shows it too).

Run alone: ``.venv/bin/pytest -m reliability``.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from runner_daemon.core.errors import ApiError
from runner_daemon.core.models import Job
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.server import DevServer, DevServerConfig
from tests.summary import SummaryTable, summary_table
from tests.support import (
    DaemonProcesses,
    daemon_environment,
    finish,
    process_gone,
    started_in_journal,
    until,
)

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.anyio,
    pytest.mark.parametrize("anyio_backend", ["asyncio"]),
]

COMMANDS = 200
TERMINAL = {"completed", "failed", "timed_out"}
SUITE_SERVER = DevServerConfig(
    poll_hold_seconds=2.0,
    reaper_interval_seconds=1.0,
    max_pending=10_000,
    submissions_per_minute=100_000,
    writes_per_minute=100_000,
)
# Retries quick enough for a test, but real backoff: capped at 1 s per wait.
DAEMON = {"retry_initial_seconds": 0.05, "retry_max_seconds": 1.0, "heartbeat_interval_seconds": 1.0}


@dataclass
class Row:
    fault: str
    submitted: int
    completed: int
    failed: int
    lost: int
    duplicated: int

    def line(self) -> str:
        """The row as the faults table shows it, under :data:`HEAD`."""
        return (
            f"{self.fault:<28} {self.submitted:>9} {self.completed:>9} {self.failed:>7} {self.lost:>5}"
            f" {self.duplicated:>10}"
        )


HEAD = f"{'fault':<28} {'submitted':>9} {'completed':>9} {'failed':>7} {'lost':>5} {'duplicated':>10}"


@pytest.fixture
def faults_table(pytestconfig: pytest.Config) -> SummaryTable:
    """The run's table of faults by outcomes, printed at its end (see tests/summary.py)."""
    return summary_table(pytestconfig, "reliability: faults x outcomes", HEAD)


@dataclass
class Harness:
    server: DevServer
    api: DevClient
    runner_id: str
    workspace: Path
    state: Path
    daemons: DaemonProcesses
    table: SummaryTable

    def start_daemon(self) -> subprocess.Popen[str]:
        env = daemon_environment(
            self.server.url, self.runner_id, self.workspace, state_directory=self.state, **DAEMON
        )
        return self.daemons.spawn(env)

    async def ready(self) -> None:
        async def bridge() -> bool:
            try:
                return (await self.api.get_runner(self.runner_id)).capabilities == ["bridge"]
            except ApiError:
                return False

        await until(bridge, 30)

    async def submit(self, count: int, seconds: float = 0.02) -> list[str]:
        ids = []
        for _ in range(count):
            args = {"token": uuid.uuid4().hex, "seconds": seconds}
            ids.append(await self.api.submit_command(self.runner_id, "Count", args, timeout_seconds=120))
        return ids

    async def commands(self) -> list[dict[str, Any]]:
        listed = await self.api.dev_get(f"runners/{self.runner_id}/commands")
        assert isinstance(listed, list)
        return listed

    async def settle(self, ids: list[str], timeout: float = 150) -> None:
        async def all_terminal() -> bool:
            return {c["command_id"] for c in await self.commands() if c["status"] in TERMINAL} >= set(ids)

        try:
            await until(all_terminal, timeout)
        except TimeoutError:
            statuses = Counter(c["status"] for c in await self.commands())
            logs = [proc.output()[1][-3000:] for proc in self.daemons.running()]
            raise AssertionError(f"not all terminal after {timeout}s: {dict(statuses)}\n{logs}") from None

    async def record(self, fault: str, ids: list[str]) -> Row:
        by_id = {c["command_id"]: c for c in await self.commands()}
        executions = Counter(self.workspace.joinpath("executions.log").read_text().split())
        tokens = {c["command_id"]: c["args"]["token"] for c in by_id.values()}
        row = Row(
            fault=fault,
            submitted=len(ids),
            completed=sum(by_id[i]["status"] == "completed" for i in ids),
            failed=sum(by_id[i]["status"] == "failed" for i in ids),
            lost=sum(
                by_id[i]["status"] not in ("completed", "failed") or by_id[i]["accepted_reports"] != 1
                for i in ids
            ),
            duplicated=sum(executions[tokens[i]] > 1 for i in ids),
        )
        self.table.add(row.line())
        completed_tokens = {tokens[i] for i in ids if by_id[i]["status"] == "completed"}
        assert all(executions[token] == 1 for token in completed_tokens)
        return row


@asynccontextmanager
async def harness(tmp_path: Path, daemons: DaemonProcesses, table: SummaryTable) -> AsyncIterator[Harness]:
    workspace = tmp_path / "ws"
    workspace.mkdir(exist_ok=True)
    server = DevServer(port=0, config=SUITE_SERVER, state_file=tmp_path / "server-state.json").start()
    try:
        async with DevClient(server.url, request_timeout=10) as api:
            runner_id = await api.dev_create_runner("reliability")
            yield Harness(server, api, runner_id, workspace, tmp_path / "state", daemons, table)
    finally:
        server.stop()


async def run_with_fault(
    tmp_path: Path, daemons: DaemonProcesses, table: SummaryTable, name: str, profile: dict[str, Any]
) -> Row:
    async with harness(tmp_path, daemons, table) as h:
        proc = h.start_daemon()
        await h.ready()
        await h.api.dev_post("faults/profile", profile)
        ids = await h.submit(COMMANDS)
        await h.settle(ids)
        await h.api.dev_post("faults/clear", {})
        proc.send_signal(signal.SIGTERM)
        await finish(proc)
        return await h.record(name, ids)


def check(row: Row, table: SummaryTable) -> None:
    assert row.lost == 0, table.render()
    assert row.duplicated == 0, table.render()
    assert row.completed + row.failed == row.submitted, table.render()


# A poll answer lost in transit after the server picked commands up is not among the resets:
# no runner can recover it, as Opik's protocol never hands a picked-up command out again (the
# server times such commands out after timeout + 10 s). Resets before the server acts hit polls
# and reports; resets after it acted hit reports (the result is stored, the daemon sees a reset,
# retries, and must take the 409 as done).
PROFILES = {
    "5xx bursts (30%)": {"error_rate": 0.3, "routes": ["heartbeat", "poll", "report"], "seed": 5},
    "connection resets (30%)": {
        "reset_rate": 0.15,
        "reset_after_processing_rate": 0.15,
        "reset_after_processing_routes": ["report"],
        "routes": ["poll", "report"],
        "seed": 7,
    },
    "429 storm (50%)": {
        "rate_limit_rate": 0.5,
        "retry_after": 0.2,
        "routes": ["heartbeat", "poll", "report"],
        "seed": 9,
    },
}


@pytest.mark.parametrize("fault", list(PROFILES))
async def test_fault_profile(
    tmp_path: Path, daemons: DaemonProcesses, faults_table: SummaryTable, fault: str
) -> None:
    row = await run_with_fault(tmp_path, daemons, faults_table, fault, PROFILES[fault])
    check(row, faults_table)
    assert row.completed == COMMANDS


async def test_thirty_second_blackout(
    tmp_path: Path, daemons: DaemonProcesses, faults_table: SummaryTable
) -> None:
    async with harness(tmp_path, daemons, faults_table) as h:
        proc = h.start_daemon()
        await h.ready()
        ids = await h.submit(COMMANDS, seconds=0.1)
        await h.api.dev_post("faults/profile", {"blackout_seconds": 30})
        await anyio.sleep(31)
        await h.settle(ids)
        proc.send_signal(signal.SIGTERM)
        await finish(proc)
        row = await h.record("30 s blackout", ids)
    check(row, faults_table)
    assert row.completed == COMMANDS


async def test_server_restart(tmp_path: Path, daemons: DaemonProcesses, faults_table: SummaryTable) -> None:
    async with harness(tmp_path, daemons, faults_table) as h:
        proc = h.start_daemon()
        await h.ready()
        ids = await h.submit(COMMANDS, seconds=0.05)
        await anyio.sleep(1.0)
        port = h.server.port
        h.server.stop()
        await anyio.sleep(2.0)
        h.server = DevServer(
            port=port, config=SUITE_SERVER, state_file=tmp_path / "server-state.json"
        ).start()
        await h.settle(ids)
        proc.send_signal(signal.SIGTERM)
        await finish(proc)
        row = await h.record("server restart", ids)
    check(row, faults_table)
    assert row.completed == COMMANDS


async def test_daemon_sigkill_mid_command_then_restart(
    tmp_path: Path, daemons: DaemonProcesses, faults_table: SummaryTable
) -> None:
    async with harness(tmp_path, daemons, faults_table) as h:
        first = h.start_daemon()
        await h.ready()
        # Mid-run at the kill: quick commands done, a few long ones running, the rest waiting.
        # Fewer long ones than half the slots, so the daemon keeps polling while they run.
        first_half = await h.submit(COMMANDS // 2)
        long_ones = await h.submit(3, seconds=600)
        ids = first_half + long_ones + await h.submit(COMMANDS - COMMANDS // 2 - len(long_ones))

        async def long_ones_started() -> bool:
            return set(long_ones) <= started_in_journal(h.state)

        await until(long_ones_started, 60)
        # Polls from now on are held before the server handles them, so the kill lands
        # mid-command and not while a poll answer is on its way: no runner can recover
        # commands the server handed to a poll whose answer it never read (they stay picked up
        # until the reaper). Answers already on their way are read and journalled first.
        await h.api.dev_post("faults/profile", {"routes": ["poll"], "latency_ms": 600_000})

        async def every_picked_up_command_journalled() -> bool:
            picked_up = {c["command_id"] for c in await h.commands() if c["status"] == "picked_up"}
            return picked_up >= set(long_ones) and picked_up <= started_in_journal(h.state)

        await until(every_picked_up_command_journalled, 60)
        first.kill()
        await finish(first)
        await h.api.dev_post("faults/clear", {})
        second = h.start_daemon()
        await h.settle(ids)
        second.send_signal(signal.SIGTERM)
        await finish(second)
        row = await h.record("daemon SIGKILL + restart", ids)
        codes = Counter(c["error"]["code"] for c in await h.commands() if c["error"])
    check(row, faults_table)
    # The commands that were running are reported interrupted, never run again.
    assert row.failed >= len(long_ones) and codes == {"interrupted": row.failed}


async def test_sigterm_drain_then_restart(
    tmp_path: Path, daemons: DaemonProcesses, faults_table: SummaryTable
) -> None:
    async with harness(tmp_path, daemons, faults_table) as h:
        first = h.start_daemon()
        await h.ready()
        ids = await h.submit(COMMANDS, seconds=0.1)
        await anyio.sleep(1.0)
        first.send_signal(signal.SIGTERM)
        await finish(first)
        assert first.returncode == 0
        second = h.start_daemon()  # picks up what was never polled
        await h.settle(ids)
        second.send_signal(signal.SIGTERM)
        await finish(second)
        row = await h.record("SIGTERM drain + restart", ids)
        errors = [c["error"] for c in await h.commands() if c["error"]]
    check(row, faults_table)
    # Whatever the first daemon's open poll returned after the stop is reported cancelled,
    # not run; everything else completes, by the first daemon or the second.
    assert all(e["code"] == "cancelled" and "not started" in e["message"] for e in errors), errors
    assert row.failed == len(errors)


# --- jobs: the same faults for the endpoint runner's jobs -----------------------------------
#
# Each jobs scenario runs JOBS jobs of one declared agent through a real daemon process. Every
# agent writes its pid and appends its token to an executions log as it starts, so the row can
# tell a job run twice, and the end can check /proc for an agent left running.

JOBS = 60
JOBS_PROJECT = "0193a5c2-0000-7000-8000-00000000feed"
JOBS_SERVER = dataclasses.replace(SUITE_SERVER, jobs_poll_hold_seconds=1.0, job_reaper_interval_seconds=1.0)
JOB_TERMINAL = {"completed", "failed", "cancelled"}
RESTARTED = "the runner restarted while this job ran"
JOB_AGENT = """
import json, os, sys, time
inputs = json.load(sys.stdin)
token, marks = inputs["token"], inputs["marks"]
with open(os.path.join(marks, "pids", token + ".tmp"), "w") as out:
    out.write(str(os.getpid()))
os.replace(os.path.join(marks, "pids", token + ".tmp"), os.path.join(marks, "pids", token))
fd = os.open(os.path.join(marks, "executions.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, (token + "\\n").encode())
os.fsync(fd)
os.close(fd)
time.sleep(float(inputs["seconds"]))
for n in range(3):
    print(token, n)
with open(os.environ["OPIK_RESULT_FILE"], "w") as out:
    json.dump({"result": {"token": token}}, out)
"""


@dataclass
class JobsHarness:
    server: DevServer
    api: DevClient
    endpoint_id: str
    workspace: Path
    state: Path
    daemons: DaemonProcesses
    table: SummaryTable

    @property
    def marks(self) -> Path:
        return self.workspace / "marks"

    def start_daemon(self) -> subprocess.Popen[str]:
        jobs = {
            "enabled": True,
            "runner_id": self.endpoint_id,
            "max_jobs": 4,
            "discover": False,
            "kill_grace_seconds": 1,
            "agents": {
                "count": {
                    "command": [sys.executable, "-S", str(self.workspace / "agent.py")],
                    "params": [
                        {"name": "token", "type": "string"},
                        {"name": "marks", "type": "string"},
                        {"name": "seconds", "type": "float"},
                    ],
                }
            },
        }
        env = daemon_environment(
            self.server.url,
            str(uuid.uuid4()),
            self.workspace,
            state_directory=self.state,
            bridge__enabled="false",
            jobs=json.dumps(jobs),
            **DAEMON,
        )
        return self.daemons.spawn(env)

    async def ready(self) -> None:
        async def registered() -> bool:
            try:
                runner = await self.api.get_runner(self.endpoint_id)
            except ApiError:
                return False
            return runner.status == "connected" and [a.name for a in runner.agents] == ["count"]

        await until(registered, 30)

    async def submit(self, count: int, seconds: float = 0.02) -> list[str]:
        ids = []
        for _ in range(count):
            inputs = {"token": uuid.uuid4().hex, "marks": str(self.marks), "seconds": seconds}
            ids.append(await self.api.create_job(JOBS_PROJECT, "count", inputs))
        return ids

    async def jobs(self, ids: list[str]) -> dict[str, Job]:
        return {job_id: await self.api.get_job(job_id) for job_id in ids}

    async def settle(self, ids: list[str], timeout: float = 120) -> None:
        async def all_terminal() -> bool:
            return all(job.status in JOB_TERMINAL for job in (await self.jobs(ids)).values())

        try:
            await until(all_terminal, timeout)
        except TimeoutError:
            statuses = Counter(job.status for job in (await self.jobs(ids)).values())
            logs = [proc.output()[1][-3000:] for proc in self.daemons.running()]
            raise AssertionError(f"not all terminal after {timeout}s: {dict(statuses)}\n{logs}") from None

    def leftover_agents(self) -> list[int]:
        """Agents still running: a pid an agent wrote whose process still runs agent.py."""
        left = []
        for pidfile in (self.marks / "pids").iterdir():
            if pidfile.suffix == ".tmp":
                continue
            pid = int(pidfile.read_text())
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"agent.py" in cmdline and not process_gone(pid):
                left.append(pid)
        return left

    async def record(self, fault: str, ids: list[str]) -> Row:
        jobs = await self.jobs(ids)
        executions = Counter(self.marks.joinpath("executions.log").read_text().split())
        tokens = {job_id: job.inputs["token"] for job_id, job in jobs.items()}

        async def lost(job: Job) -> bool:
            if job.status == "completed":
                logs = [entry.text for entry in await self.api.job_logs(job.id)]
                token = tokens[job.id]
                return job.result != {"token": token} or logs != [f"{token} {n}" for n in range(3)]
            return job.status != "failed" or not job.error

        row = Row(
            fault=fault,
            submitted=len(ids),
            completed=sum(job.status == "completed" for job in jobs.values()),
            failed=sum(job.status == "failed" for job in jobs.values()),
            lost=sum([await lost(job) for job in jobs.values()]),
            duplicated=sum(executions[tokens[i]] > 1 for i in ids),
        )
        self.table.add(row.line())
        assert [job.id for job in jobs.values() if job.status in ("pending", "running")] == []
        assert self.leftover_agents() == []
        return row


@asynccontextmanager
async def jobs_harness(
    tmp_path: Path, daemons: DaemonProcesses, table: SummaryTable
) -> AsyncIterator[JobsHarness]:
    workspace = tmp_path / "ws"
    (workspace / "marks" / "pids").mkdir(parents=True)
    (workspace / "agent.py").write_text(JOB_AGENT)
    server = DevServer(port=0, config=JOBS_SERVER).start()
    try:
        async with DevClient(server.url, request_timeout=10) as api:
            endpoint_id = await api.dev_create_runner("jobs", type="endpoint", project_id=JOBS_PROJECT)
            yield JobsHarness(server, api, endpoint_id, workspace, tmp_path / "state", daemons, table)
    finally:
        server.stop()


# No after-processing resets on jobs/next: a job the server handed to a poll whose answer was
# lost is running on the server and unknown to every runner (Opik's reaper fails it after its
# timeout), as for bridge commands.
JOB_PROFILES = {
    "jobs: 5xx bursts (30%)": {
        "error_rate": 0.3,
        "routes": ["heartbeat", "jobs_next", "job_report", "job_logs", "agents", "checklist"],
        "seed": 21,
    },
    "jobs: resets (30%)": {
        "reset_rate": 0.15,
        "reset_after_processing_rate": 0.15,
        "reset_after_processing_routes": ["job_report"],
        "routes": ["jobs_next", "job_report"],
        "seed": 23,
    },
}


def check_jobs(row: Row, table: SummaryTable) -> None:
    assert row.lost == 0, table.render()
    assert row.duplicated == 0, table.render()
    assert row.completed + row.failed == row.submitted, table.render()


@pytest.mark.parametrize("fault", list(JOB_PROFILES))
async def test_jobs_fault_profile(
    tmp_path: Path, daemons: DaemonProcesses, faults_table: SummaryTable, fault: str
) -> None:
    async with jobs_harness(tmp_path, daemons, faults_table) as h:
        proc = h.start_daemon()
        await h.ready()
        await h.api.dev_post("faults/profile", JOB_PROFILES[fault])
        ids = await h.submit(JOBS)
        await h.settle(ids)
        await h.api.dev_post("faults/clear", {})
        proc.send_signal(signal.SIGTERM)
        await finish(proc)
        assert proc.returncode == 0
        row = await h.record(fault, ids)
    check_jobs(row, faults_table)
    assert row.completed == JOBS


async def test_jobs_daemon_sigkill_mid_job_then_restart(
    tmp_path: Path, daemons: DaemonProcesses, faults_table: SummaryTable
) -> None:
    async with jobs_harness(tmp_path, daemons, faults_table) as h:
        first = h.start_daemon()
        await h.ready()
        # Fewer long jobs than slots, so the daemon keeps polling while they run.
        first_half = await h.submit(JOBS // 2)
        long_ones = await h.submit(3, seconds=600)
        ids = first_half + long_ones + await h.submit(JOBS - JOBS // 2 - len(long_ones))

        async def long_ones_started() -> bool:
            return set(long_ones) <= started_in_journal(h.state)

        await until(long_ones_started, 60)
        # As for commands: polls from now on are held before the server hands out a job, so the
        # kill lands mid-job and not while a poll's answer is on its way.
        await h.api.dev_post("faults/profile", {"routes": ["jobs_next"], "latency_ms": 600_000})

        async def every_running_job_journalled() -> bool:
            running = {i for i, job in (await h.jobs(ids)).items() if job.status == "running"}
            return running >= set(long_ones) and running <= started_in_journal(h.state)

        await until(every_running_job_journalled, 60)
        first.kill()
        await finish(first)
        await h.api.dev_post("faults/clear", {})
        second = h.start_daemon()
        await h.settle(ids)
        second.send_signal(signal.SIGTERM)
        await finish(second)
        assert second.returncode == 0
        row = await h.record("jobs: SIGKILL + restart", ids)
        errors = Counter(job.error for job in (await h.jobs(ids)).values() if job.status == "failed")
    check_jobs(row, faults_table)
    # The jobs that were running are failed by the next start, never run again.
    assert row.failed >= len(long_ones) and errors == {RESTARTED: row.failed}


async def test_jobs_sigterm_drain_then_restart(
    tmp_path: Path, daemons: DaemonProcesses, faults_table: SummaryTable
) -> None:
    async with jobs_harness(tmp_path, daemons, faults_table) as h:
        first = h.start_daemon()
        await h.ready()
        ids = await h.submit(JOBS, seconds=0.1)
        await until(lambda: len(started_in_journal(h.state)) >= 4, 60)
        first.send_signal(signal.SIGTERM)
        await finish(first)
        assert first.returncode == 0
        second = h.start_daemon()  # picks up what was never polled
        await h.settle(ids)
        second.send_signal(signal.SIGTERM)
        await finish(second)
        assert second.returncode == 0
        row = await h.record("jobs: SIGTERM drain+restart", ids)
        errors = [job.error for job in (await h.jobs(ids)).values() if job.status == "failed"]
    check_jobs(row, faults_table)
    # A job the first daemon's open poll brought after the stop is failed, not run; every
    # other one completes, by the first daemon or the second.
    assert all(error == "The runner is shutting down; the job was not started" for error in errors), errors
