"""The report phase alone: a Reporter against the dev server, with no loop or daemon around it."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import pytest

from runner_daemon.bridge.reporter import SYNC_GRACE_SECONDS, Reporter
from runner_daemon.bridge.results import Outcome
from runner_daemon.bridge.stats import LoopStats
from runner_daemon.core.api import RunnerApi
from runner_daemon.core.errors import RunnerGone, Unauthorized
from runner_daemon.core.outbox import JOURNAL_FILE, Outbox, StartedCommand
from runner_daemon.core.settings import Settings
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.server import DevServer
from tests.support import command_status_is, make_settings, until

pytestmark = pytest.mark.anyio

DONE = Outcome.completed({"content": "x"}, 3)


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    box = Outbox.open(tmp_path / "state")
    yield box
    await box.close()


async def _picked_up(api: DevClient, runner_id: str) -> str:
    """A command the runner holds as picked up, as the loop would after a poll."""
    await api.heartbeat(runner_id, ["bridge"])
    command_id = await api.submit_command(runner_id, "ReadFile", {"path": "README.md"})
    assert [item["command_id"] for item in await api.poll(runner_id, 1)] == [command_id]
    return command_id


def _before_journal_fsyncs(monkeypatch: pytest.MonkeyPatch, before: Callable[[], object]) -> None:
    """``before()`` runs ahead of each fsync of the journal (other files' fsyncs go on)."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(JOURNAL_FILE):
            before()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.fixture
def held_fsync(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The journal's fsyncs wait until the event is set."""
    release = threading.Event()
    _before_journal_fsyncs(monkeypatch, lambda: release.wait(30))
    yield release
    release.set()


def _reporter(settings: Settings, api: RunnerApi, stats: LoopStats, outbox: Outbox) -> Reporter:
    return Reporter(api, settings, stats, outbox, known_types=frozenset({"ReadFile"}))


async def test_a_result_is_journalled_delivered_and_counted(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path, outbox: Outbox
) -> None:
    command_id = await _picked_up(api, runner_id)
    stats = LoopStats()
    await api.dev_post("faults", {"route": "report", "status": 503, "count": 2})
    reporter = _reporter(make_settings(devserver.url, runner_id, workspace), api, stats, outbox)
    assert await reporter.report(command_id, "ReadFile", DONE) is True
    record = await api.get_command(runner_id, command_id)
    assert record.status == "completed" and record.result == {"content": "x"}
    assert (stats.completed, stats.report_retries, outbox.undelivered) == (1, 2, 0)
    assert stats.outcomes == {("ReadFile", "completed"): 1}


async def test_a_409_is_success_never_an_error(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path, outbox: Outbox
) -> None:
    command_id = await _picked_up(api, runner_id)
    stats = LoopStats()
    reporter = _reporter(make_settings(devserver.url, runner_id, workspace), api, stats, outbox)
    assert await reporter.report(command_id, "ReadFile", DONE) is True
    assert await reporter.report(command_id, "ReadFile", Outcome.failed("x", "late")) is True
    assert stats.already_reported == 1
    assert (stats.dropped, stats.report_retries, stats.poll_errors, outbox.undelivered) == (0, 0, 0, 0)
    assert (await api.get_command(runner_id, command_id)).status == "completed"


async def test_a_404_ends_a_live_report_but_only_drops_one_owed_from_before(
    devserver: DevServer, api: DevClient, workspace: Path, outbox: Outbox
) -> None:
    gone = str(uuid.uuid4())  # a runner the server does not know
    stats = LoopStats()
    reporter = _reporter(make_settings(devserver.url, gone, workspace), api, stats, outbox)
    with pytest.raises(RunnerGone):
        await reporter.report(str(uuid.uuid4()), "ReadFile", DONE)
    entry = reporter.entry(str(uuid.uuid4()), "ReadFile", DONE)
    await outbox.result(entry)
    assert await reporter.deliver(entry, recovered=True) is False
    # Neither can ever be delivered: both left the outbox, both counted as dropped.
    assert (stats.dropped, outbox.undelivered) == (2, 0)


async def test_refused_credentials_raise_and_keep_the_result_owed(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path, outbox: Outbox
) -> None:
    command_id = await _picked_up(api, runner_id)
    await api.dev_post("faults", {"route": "report", "status": 401, "count": 1})
    stats = LoopStats()
    reporter = _reporter(make_settings(devserver.url, runner_id, workspace), api, stats, outbox)
    with pytest.raises(Unauthorized):
        await reporter.report(command_id, "ReadFile", DONE)
    assert outbox.undelivered == 1  # sent again by the next start
    assert (await api.get_command(runner_id, command_id)).status == "picked_up"


async def test_owed_from_before_reports_interrupted_commands_and_keeps_owed_results(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path, tmp_path: Path
) -> None:
    settings = make_settings(devserver.url, runner_id, workspace, state_directory=tmp_path / "state")
    first = Outbox.open(settings.state_directory)
    stats = LoopStats()
    owed = _reporter(settings, api, stats, first).entry("c-owed", "ReadFile", DONE)
    await first.result(owed)
    await first.started(runner_id, "c-running", "Exec")
    await first.close()
    second = Outbox.open(settings.state_directory)
    try:
        assert second.recovered.interrupted == [StartedCommand(runner_id, "c-running", "Exec")]
        entries = await _reporter(settings, api, stats, second).owed_from_before()
        assert [entry.command_id for entry in entries] == ["c-owed", "c-running"]
        assert entries[0].body == owed.body
        interrupted = Outcome.failed("interrupted", "The daemon restarted while the command ran")
        assert entries[1].body == _reporter(settings, api, stats, second).entry("c", "Exec", interrupted).body
        assert second.undelivered == 2  # journalled before any delivery is tried
    finally:
        await second.close()


async def test_the_first_send_does_not_wait_for_the_fsync_but_a_second_one_does(
    devserver: DevServer,
    api: DevClient,
    runner_id: str,
    workspace: Path,
    outbox: Outbox,
    held_fsync: threading.Event,
) -> None:
    command_id = await _picked_up(api, runner_id)
    await api.dev_post("faults", {"route": "report", "status": 503, "count": 1})
    settings = make_settings(devserver.url, runner_id, workspace, retry_initial_seconds=0.01)
    reporter = _reporter(settings, api, LoopStats(), outbox)
    delivered: list[bool] = []

    async def first_send_answered() -> bool:
        return bool((await api.dev_get("faults"))["counters"]["queued"])

    async with anyio.create_task_group() as group:

        async def report() -> None:
            delivered.append(await reporter.report(command_id, "ReadFile", DONE))

        group.start_soon(report)
        await until(first_send_answered)
        # The line was in the journal file before that send, though not yet fsynced.
        assert command_id in outbox.path.read_text()
        # Many retry intervals pass: no second send while the result is not on disk.
        await anyio.sleep(0.5)
        assert await command_status_is(api, runner_id, command_id, "picked_up")
        held_fsync.set()
    assert delivered == [True]
    assert await command_status_is(api, runner_id, command_id, "completed")


async def test_a_result_delivered_by_its_first_send_is_never_fsynced(
    devserver: DevServer,
    api: DevClient,
    runner_id: str,
    workspace: Path,
    outbox: Outbox,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    command_id = await _picked_up(api, runner_id)
    journal_fsyncs: list[None] = []
    _before_journal_fsyncs(monkeypatch, lambda: journal_fsyncs.append(None))
    reporter = _reporter(make_settings(devserver.url, runner_id, workspace), api, LoopStats(), outbox)
    assert await reporter.report(command_id, "ReadFile", DONE) is True
    assert await command_status_is(api, runner_id, command_id, "completed")
    assert command_id in outbox.path.read_text()  # written all the same: a crash keeps it
    assert journal_fsyncs == []


async def test_a_first_send_left_unanswered_gets_its_result_fsynced_meanwhile(
    devserver: DevServer,
    api: DevClient,
    runner_id: str,
    workspace: Path,
    outbox: Outbox,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    command_id = await _picked_up(api, runner_id)
    synced_while_unanswered: list[bool] = []

    def note() -> None:
        synced_while_unanswered.append(devserver.state.command(runner_id, command_id).status == "picked_up")

    _before_journal_fsyncs(monkeypatch, note)
    # The server holds each report far longer than the grace before it answers.
    await api.dev_post("faults/profile", {"routes": ["report"], "latency_ms": 60 * SYNC_GRACE_SECONDS * 1000})
    reporter = _reporter(make_settings(devserver.url, runner_id, workspace), api, LoopStats(), outbox)
    assert await reporter.report(command_id, "ReadFile", DONE) is True
    assert synced_while_unanswered[:1] == [True]
