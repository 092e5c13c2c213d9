"""The durable outbox: journal recovery, and nothing lost across a daemon crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from runner_daemon.client import RunnerApi
from runner_daemon.devserver.server import DevServer
from runner_daemon.errors import ConfigError
from runner_daemon.outbox import JOURNAL_FILE, Interrupted, Outbox, OwedResult
from tests.support import (
    DaemonProcesses,
    command_status_is,
    daemon_environment,
    finish,
    make_settings,
    until,
    wait_terminal,
)

REPO = Path(__file__).resolve().parent.parent
BODY = b'{"status":"completed","result":{"ok":true},"duration_ms":3}'


@pytest.mark.anyio
async def test_journal_round_trip_and_recovery(tmp_path: Path) -> None:
    outbox, owed, interrupted = Outbox.open(tmp_path)
    assert (owed, interrupted) == ([], [])
    await outbox.started("r1", "c-done", "ReadFile")
    await outbox.result(OwedResult("r1", "c-done", "ReadFile", BODY, 1.0))
    await outbox.done("c-done")
    await outbox.started("r1", "c-owed", "ReadFile")
    await outbox.result(OwedResult("r1", "c-owed", "ReadFile", BODY, 2.0))
    await outbox.started("r1", "c-running", "Exec")
    await outbox.close()
    outbox, owed, interrupted = Outbox.open(tmp_path)
    assert owed == [OwedResult("r1", "c-owed", "ReadFile", BODY, 2.0)]
    assert interrupted == [Interrupted("r1", "c-running", "Exec")]
    lines = (tmp_path / JOURNAL_FILE).read_text().splitlines()
    assert len(lines) == 2  # rewritten with only what is still owed
    await outbox.close()


@pytest.mark.anyio
async def test_torn_and_corrupt_lines_are_tolerated(tmp_path: Path) -> None:
    outbox, _, _ = Outbox.open(tmp_path)
    await outbox.result(OwedResult("r1", "c1", "ReadFile", BODY, 1.0))
    await outbox.close()
    with open(tmp_path / JOURNAL_FILE, "ab") as stream:
        stream.write(b'garbage\n{"op": "result", "id": "c2", "runner"')  # a crash mid-write
    outbox, owed, _ = Outbox.open(tmp_path)
    assert [entry.command_id for entry in owed] == ["c1"]
    await outbox.close()


@pytest.mark.anyio
async def test_journal_is_compacted_past_its_bound(tmp_path: Path) -> None:
    outbox, _, _ = Outbox.open(tmp_path, max_bytes=4096)
    for i in range(200):
        await outbox.started("r1", f"c{i}", "ReadFile")
        await outbox.result(OwedResult("r1", f"c{i}", "ReadFile", BODY, 1.0))
        await outbox.done(f"c{i}")
    await outbox.result(OwedResult("r1", "last", "ReadFile", BODY, 1.0))
    await outbox.close()
    assert (tmp_path / JOURNAL_FILE).stat().st_size < 4096 + 1024
    reopened, owed, _ = Outbox.open(tmp_path)
    assert [entry.command_id for entry in owed] == ["last"]
    await reopened.close()


@pytest.mark.anyio
async def test_started_lines_outlive_a_crash_also_while_the_journal_is_compacted(tmp_path: Path) -> None:
    """``started`` is written without an fsync or a thread; a compaction must not drop it."""
    outbox, _, _ = Outbox.open(tmp_path, max_bytes=2048)
    compactions = 0
    rewrite = outbox._rewrite

    def counting_rewrite(data: bytes) -> None:
        nonlocal compactions
        compactions += 1
        rewrite(data)

    outbox._rewrite = counting_rewrite  # type: ignore[method-assign]

    async def finished(i: int) -> None:
        await outbox.started("r1", f"f{i}", "ReadFile")
        await outbox.result(OwedResult("r1", f"f{i}", "ReadFile", BODY, 1.0))
        await outbox.done(f"f{i}")

    async def running(i: int) -> None:
        await anyio.sleep(i * 0.0005)  # spread over the compactions the others cause
        await outbox.started("r1", f"r{i}", "Exec")

    async with anyio.create_task_group() as tasks:
        for i in range(200):
            tasks.start_soon(finished, i)
            tasks.start_soon(running, i)
    os.close(outbox._fd)  # a crash: no close(), the lock goes with the descriptor
    assert compactions > 5
    reopened, _, interrupted = Outbox.open(tmp_path)
    assert sorted(entry.command_id for entry in interrupted) == sorted(f"r{i}" for i in range(200))
    await reopened.close()


def test_one_daemon_per_journal(tmp_path: Path) -> None:
    first, _, _ = Outbox.open(tmp_path)
    with pytest.raises(ConfigError, match="in use by another runner-daemon"):
        Outbox.open(tmp_path)
    os.close(first._fd)


@pytest.fixture
def daemon_process(
    devserver: DevServer, workspace: Path, tmp_path: Path, daemons: DaemonProcesses
) -> Callable[[str], subprocess.Popen[str]]:
    def spawn(runner_id: str) -> subprocess.Popen[str]:
        return daemons.spawn(
            daemon_environment(devserver.url, runner_id, workspace, state_directory=tmp_path / "s")
        )

    return spawn


async def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = await finish(proc)
    assert proc.returncode == 0, err
    return err


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sigkill_mid_command_is_reported_interrupted_after_restart(
    daemon_process: Callable[[str], subprocess.Popen[str]], api: RunnerApi, runner_id: str, workspace: Path
) -> None:
    first = daemon_process(runner_id)
    await until(lambda: _bridge(api, runner_id), 20)
    command_id = await api.submit_command(runner_id, "Slow", {"seconds": 30, "marker": "ran.txt"})
    await until(lambda: command_status_is(api, runner_id, command_id, "picked_up"), 20)
    await anyio.sleep(0.3)
    first.kill()
    await finish(first)
    second = daemon_process(runner_id)
    record = await wait_terminal(api, runner_id, command_id, timeout=20)
    err = await _stop(second)
    assert record.status == "failed"
    assert record.error is not None
    assert (record.error.code, record.error.message) == (
        "interrupted",
        "The daemon restarted while the command ran",
    )
    assert not (workspace / "ran.txt").exists()  # never run a second time
    commands = {line["event"] for line in map(json.loads, err.splitlines())}
    assert "delivering results owed from before the restart" in commands


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_undelivered_result_survives_a_crash(
    daemon_process: Callable[[str], subprocess.Popen[str]], api: RunnerApi, runner_id: str, workspace: Path
) -> None:
    first = daemon_process(runner_id)
    await until(lambda: _bridge(api, runner_id), 20)
    await api.dev_post("faults", {"route": "report", "status": 503, "count": 100000})
    command_id = await api.submit_command(runner_id, "WriteFile", {"path": "once.txt", "content": "1"})
    stats_url = f"runners/{runner_id}/stats"
    await until((workspace / "once.txt").exists, 20)
    await anyio.sleep(0.5)  # a few failed report attempts
    first.kill()
    await finish(first)
    await api.dev_post("faults/clear", {})
    second = daemon_process(runner_id)
    record = await wait_terminal(api, runner_id, command_id, timeout=20)
    await _stop(second)
    assert record.status == "completed"
    assert record.result is not None and record.result["bytes_written"] == 1
    stats = await api.dev_get(stats_url)
    assert stats["reports_accepted"] == 1


@pytest.mark.anyio
async def test_a_404_on_re_send_is_dropped_not_fatal(
    devserver: DevServer, api: RunnerApi, runner_id: str, workspace: Path, tmp_path: Path
) -> None:
    outbox, _, _ = Outbox.open(tmp_path / "state")
    await outbox.result(OwedResult(runner_id, "0d7c8e3a-0000-4000-8000-000000000001", "ReadFile", BODY, 1e12))
    await outbox.close()
    outbox, owed, interrupted = Outbox.open(tmp_path / "state")
    settings = make_settings(devserver.url, runner_id, workspace)
    from runner_daemon.daemon import Daemon
    from tests.support import registry_for_tests

    async with RunnerApi.from_settings(settings) as client:
        daemon = Daemon(settings, client, registry_for_tests(), outbox=outbox, owed=(owed, interrupted))
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            await until(lambda: daemon.stats.dropped == 1)
            command_id = await api.submit_command(runner_id, "ReadFile", {"path": "README.md"})
            record = await wait_terminal(api, runner_id, command_id)
            daemon.request_stop("test")
    assert record.status == "completed"
    assert daemon.fatal_error is None


async def _bridge(api: RunnerApi, runner_id: str) -> bool:
    return (await api.get_runner(runner_id)).capabilities == ["bridge"]
