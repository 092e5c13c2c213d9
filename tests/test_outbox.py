"""The durable outbox: journal recovery, and nothing lost across a daemon crash."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from runner_daemon.core import outbox as outbox_module
from runner_daemon.core.errors import ConfigError
from runner_daemon.core.outbox import JOURNAL_FILE, Outbox, OwedResult, Recovered, StartedCommand
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.server import DevServer
from tests.support import (
    DaemonProcesses,
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
    outbox = Outbox.open(tmp_path)
    recovered = outbox.recovered
    assert recovered == Recovered([], [])
    await outbox.started("r1", "c-done", "ReadFile")
    await outbox.result(OwedResult("r1", "c-done", "ReadFile", BODY, 1.0))
    await outbox.done("c-done")
    await outbox.started("r1", "c-owed", "ReadFile")
    await outbox.result(OwedResult("r1", "c-owed", "ReadFile", BODY, 2.0))
    await outbox.started("r1", "c-running", "Exec")
    await outbox.close()
    outbox = Outbox.open(tmp_path)
    recovered = outbox.recovered
    assert recovered.results == [OwedResult("r1", "c-owed", "ReadFile", BODY, 2.0)]
    assert recovered.interrupted == [StartedCommand("r1", "c-running", "Exec")]
    # Every id claimed before is known after the restart, the finished one included.
    assert all(outbox.known(key) for key in ("c-done", "c-owed", "c-running"))
    assert not outbox.known("c-new")
    lines = (tmp_path / JOURNAL_FILE).read_text().splitlines()
    assert len(lines) == 3  # rewritten with what is live: one done, one started, one result
    await outbox.close()


@pytest.mark.anyio
async def test_jobs_keep_their_kind_and_trace_id_across_restarts(tmp_path: Path) -> None:
    """A job's entries come back as a job's (its loop delivers them), with the trace id its
    running report carried, after a restart and after the journal was rewritten."""
    job_body = b'{"status":"completed","result":{"ok":true},"trace_id":"t-1"}'
    outbox = Outbox.open(tmp_path)
    await outbox.started("e1", "j-running", "agent", kind="job", trace_id="t-2")
    await outbox.started("e1", "j-owed", "agent", kind="job", trace_id="t-1")
    await outbox.result(OwedResult("e1", "j-owed", "agent", job_body, 3.0, "job"))
    await outbox.close()
    for _ in range(2):  # the second open reads the journal the first one rewrote
        outbox = Outbox.open(tmp_path)
        assert outbox.recovered.results == [OwedResult("e1", "j-owed", "agent", job_body, 3.0, "job")]
        assert outbox.recovered.interrupted == [StartedCommand("e1", "j-running", "agent", "job", "t-2")]
        await outbox.close()


@pytest.mark.anyio
async def test_a_job_report_that_is_not_one_is_skipped(tmp_path: Path) -> None:
    (tmp_path / JOURNAL_FILE).write_bytes(
        b'{"op":"result","id":"j","runner":"e","type":"a","at":1,"kind":"job","body":"{\\"status\\":\\"odd\\"}"}\n'
        b'{"op":"started","id":"k","runner":"e","type":"a","kind":"elsewhere"}\n'
    )
    outbox = Outbox.open(tmp_path)
    assert outbox.recovered == Recovered([], [])
    await outbox.close()


@pytest.mark.anyio
async def test_torn_and_corrupt_lines_are_tolerated(tmp_path: Path) -> None:
    outbox = Outbox.open(tmp_path)
    await outbox.result(OwedResult("r1", "c1", "ReadFile", BODY, 1.0))
    await outbox.close()
    with open(tmp_path / JOURNAL_FILE, "ab") as stream:
        stream.write(b'garbage\n{"op": "result", "id": "c2", "runner"')  # a crash mid-write
    outbox = Outbox.open(tmp_path)
    recovered = outbox.recovered
    assert [entry.command_id for entry in recovered.results] == ["c1"]
    await outbox.close()


# Lines that are JSON, some even objects, yet no valid journal entry: each must be skipped,
# never written back, never able to stop a start.
INVALID_ENTRIES = [
    b"\xff\xfe\x00garbage bytes",
    b"[1, 2]",
    b'"a string"',
    b"null",
    b'{"op": "result"}',
    b'{"op": "teleport", "id": "x"}',
    b'{"op": "started", "id": {"nested": 1}, "runner": "r1", "type": "ReadFile"}',
    b'{"op": "started", "id": "", "runner": "r1", "type": "ReadFile"}',
    b'{"op": "result", "id": "bad-body", "runner": "r1", "type": "ReadFile", "at": 1, "body": "not json"}',
    b'{"op": "result", "id": "bad-status", "runner": "r1", "type": "T", "at": 1, '
    b'"body": "{\\"status\\":\\"odd\\"}"}',
    b'{"op": "result", "id": "bad-at", "runner": "r1", "type": "ReadFile", "at": "soon", "body": "{}"}',
    b'{"op": "result", "id": "inf-at", "runner": "r1", "type": "ReadFile", "at": 1e999, "body": "{}"}',
    b'{"op": "result", "id": "bool-at", "runner": "r1", "type": "ReadFile", "at": true, "body": "{}"}',
    b'{"op": "sig", "sig": 5, "at": 1}',
]


@pytest.mark.anyio
@pytest.mark.adversarial
async def test_a_damaged_journal_starts_skips_what_it_cannot_use_and_heals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outbox = Outbox.open(tmp_path)
    await outbox.result(OwedResult("r1", "good", "ReadFile", BODY, 1.0))
    await outbox.close()
    with open(tmp_path / JOURNAL_FILE, "ab") as stream:
        stream.write(b"\n".join(INVALID_ENTRIES) + b"\n")
    for _ in range(2):  # the second start finds nothing left to skip: nothing was written back
        outbox = Outbox.open(tmp_path)
        recovered = outbox.recovered
        assert [entry.command_id for entry in recovered.results] == ["good"]
        assert recovered.interrupted == []
        await outbox.close()
    assert b"bad-body" not in (tmp_path / JOURNAL_FILE).read_bytes()


@pytest.mark.anyio
async def test_journal_is_compacted_past_its_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_module, "MAX_REMEMBERED", 100)
    outbox = Outbox.open(tmp_path, max_bytes=64 * 1024)
    for i in range(2000):
        await outbox.started("r1", f"c{i}", "ReadFile")
        await outbox.result(OwedResult("r1", f"c{i}", "ReadFile", BODY, 1.0))
        await outbox.done(f"c{i}")
    await outbox.result(OwedResult("r1", "last", "ReadFile", BODY, 1.0))
    await outbox.close()
    # Only what is live is kept: the last done ids (to refuse a redelivery) and the one result.
    assert (tmp_path / JOURNAL_FILE).stat().st_size < 64 * 1024 + 8 * 1024
    reopened = Outbox.open(tmp_path)
    recovered = reopened.recovered
    assert [entry.command_id for entry in recovered.results] == ["last"]
    assert reopened.known("c1999") and not reopened.known("c0")
    await reopened.close()


@pytest.mark.anyio
async def test_the_journal_stays_bounded_when_every_result_is_delivered_by_its_first_send(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bridge's usual path (``started``, ``write_result``, ``done``) fsyncs only by the
    group commit of its "done" lines: the journal must be compacted on it all the same."""
    monkeypatch.setattr(outbox_module, "MAX_REMEMBERED", 100)
    outbox = Outbox.open(tmp_path, max_bytes=64 * 1024)
    for i in range(2000):
        await outbox.started("r1", f"c{i}", "ReadFile")
        outbox.write_result(OwedResult("r1", f"c{i}", "ReadFile", BODY, 1.0))
        await outbox.done(f"c{i}")
    await outbox.close()
    assert (tmp_path / JOURNAL_FILE).stat().st_size < 64 * 1024 + 8 * 1024
    reopened = Outbox.open(tmp_path)
    assert reopened.recovered.results == [] and reopened.known("c1999")
    await reopened.close()


@pytest.mark.anyio
async def test_started_lines_outlive_a_crash_also_while_the_journal_is_compacted(tmp_path: Path) -> None:
    """``started`` is written without an fsync or a thread; a compaction must not drop it.

    Each compaction is held open (its rewrite waits on a gate) while commands start, so every
    round has lines written during the swap, whatever this machine's fsync batching does.
    """
    outbox = Outbox.open(tmp_path)
    entered, gate = threading.Event(), threading.Event()
    rewrite = outbox._rewrite

    def gated_rewrite(data: bytes) -> None:
        entered.set()
        assert gate.wait(30)
        rewrite(data)

    outbox._rewrite = gated_rewrite  # type: ignore[method-assign]
    expected: list[str] = []

    async def running(name: str) -> None:
        await outbox.started("r1", name, "Exec")

    async def finished(name: str) -> None:
        await outbox.started("r1", name, "ReadFile")
        await outbox.result(OwedResult("r1", name, "ReadFile", BODY, 1.0))
        await outbox.done(name)

    for round_ in range(8):
        entered.clear()
        gate.clear()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(outbox.compact)
            assert await anyio.to_thread.run_sync(entered.wait, 30)
            for i in range(25):  # all of them start while the compaction is in its rewrite
                expected.append(f"r{round_}-{i}")
                tasks.start_soon(running, f"r{round_}-{i}")
                tasks.start_soon(finished, f"f{round_}-{i}")
            await anyio.wait_all_tasks_blocked()
            gate.set()
    os.close(outbox._fd)  # a crash: no close(), the lock goes with the descriptor
    reopened = Outbox.open(tmp_path)
    recovered = reopened.recovered
    assert sorted(entry.command_id for entry in recovered.interrupted) == sorted(expected)
    await reopened.close()


@pytest.mark.anyio
async def test_compaction_and_journal_files_are_private(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        modes: list[int] = []
        outbox = Outbox.open(tmp_path)
        rewrite = outbox._rewrite

        def watching_rewrite(data: bytes) -> None:
            real_open = os.open

            def spy(path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
                fd = real_open(path, flags, mode, **kwargs)
                if stat.S_ISREG(info := os.fstat(fd).st_mode):
                    modes.append(stat.S_IMODE(info))
                return fd

            os.open = spy
            try:
                rewrite(data)
            finally:
                os.open = real_open

        outbox._rewrite = watching_rewrite  # type: ignore[method-assign]
        await outbox.started("r1", "c1", "ReadFile")
        await outbox.compact()
        await outbox.close()
    finally:
        os.umask(old)
    assert modes and all(mode == 0o600 for mode in modes)
    assert (tmp_path / JOURNAL_FILE).stat().st_mode & 0o777 == 0o600


@pytest.mark.anyio
async def test_remembered_ids_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_module, "MAX_REMEMBERED", 100)
    outbox = Outbox.open(tmp_path)
    for i in range(300):
        await outbox.started("r1", f"c{i}", "ReadFile")
        await outbox.result(OwedResult("r1", f"c{i}", "ReadFile", BODY, 1.0))
        await outbox.done(f"c{i}")
    assert not outbox.known("c0") and outbox.known("c299")
    assert outbox.delivered_body("c299") == BODY
    await outbox.close()
    reopened = Outbox.open(tmp_path)
    assert not reopened.known("c199") and reopened.known("c200")
    await reopened.close()


def test_one_daemon_per_journal(tmp_path: Path) -> None:
    first = Outbox.open(tmp_path)
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
    daemon_process: Callable[[str], subprocess.Popen[str]],
    api: DevClient,
    runner_id: str,
    workspace: Path,
    tmp_path: Path,
) -> None:
    first = daemon_process(runner_id)
    await until(lambda: _bridge(api, runner_id), 20)
    command_id = await api.submit_command(runner_id, "Slow", {"seconds": 30, "marker": "ran.txt"})
    journal = tmp_path / "s" / JOURNAL_FILE
    await until(lambda: journal.exists() and command_id in journal.read_text(), 20)  # it runs
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
    daemon_process: Callable[[str], subprocess.Popen[str]], api: DevClient, runner_id: str, workspace: Path
) -> None:
    first = daemon_process(runner_id)
    await until(lambda: _bridge(api, runner_id), 20)
    await api.dev_post("faults", {"route": "report", "status": 503, "count": 100000})
    command_id = await api.submit_command(runner_id, "WriteFile", {"path": "once.txt", "content": "1"})
    stats_url = f"runners/{runner_id}/stats"
    await until((workspace / "once.txt").exists, 20)
    await until(lambda: _report_attempts(api, runner_id, command_id), 20)  # journalled, sent, refused
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
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path, tmp_path: Path
) -> None:
    outbox = Outbox.open(tmp_path / "state")
    await outbox.result(OwedResult(runner_id, "0d7c8e3a-0000-4000-8000-000000000001", "ReadFile", BODY, 1e12))
    await outbox.close()
    settings = make_settings(devserver.url, runner_id, workspace, state_directory=tmp_path / "state")
    from runner_daemon.service.daemon import Daemon
    from tests.support import registry_for_tests

    daemon = Daemon(settings, registry_for_tests())
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        await until(lambda: daemon.stats.dropped == 1)
        command_id = await api.submit_command(runner_id, "ReadFile", {"path": "README.md"})
        record = await wait_terminal(api, runner_id, command_id)
        daemon.request_stop("test")
    assert record.status == "completed"
    assert daemon.fatal_error is None


async def _report_attempts(api: DevClient, runner_id: str, command_id: str) -> int:
    records = await api.dev_get(f"runners/{runner_id}/commands")
    return int(next(r for r in records if r["command_id"] == command_id)["report_attempts"])


async def _bridge(api: DevClient, runner_id: str) -> bool:
    return (await api.get_runner(runner_id)).capabilities == ["bridge"]
