"""The reliability suite: under each fault, every command ends with exactly one result.

Each scenario runs a real daemon process against the dev server, submits a few hundred
commands of the ``Count`` type (which records every execution durably), injects its fault,
and then checks on the server: every command terminal, exactly one accepted report each,
none executed twice, none lost. The table of faults by outcomes is printed at the end of the
run (``pytest -m reliability -s`` shows it too).

Run alone: ``.venv/bin/pytest -m reliability``.
"""

from __future__ import annotations

import signal
import subprocess
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
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.server import DevServer, DevServerConfig
from tests.summary import SummaryTable, summary_table
from tests.support import DaemonProcesses, daemon_environment, finish, started_in_journal, until

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
