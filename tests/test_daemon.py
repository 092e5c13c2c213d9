"""The daemon end to end against the dev server on 127.0.0.1 (asyncio and trio; some on uvloop too)."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import anyio
import pytest

from runner_daemon.bridge import loop as bridge_loop
from runner_daemon.bridge.handlers.base import HandlerServices
from runner_daemon.bridge.loop import BridgeLoop
from runner_daemon.bridge.stats import LoopStats
from runner_daemon.core.errors import Conflict
from runner_daemon.core.models import ResultReport
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.server import DevServer, DevServerConfig
from runner_daemon.service.daemon import ExitStatus
from tests.support import (
    EVERY_LOOP,
    GateHandler,
    bare_loop,
    command_status_is,
    make_settings,
    open_outbox,
    registry_for_tests,
    running_daemon,
    until,
    wait_terminal,
)

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("anyio_backend", EVERY_LOOP)
async def test_read_file_and_list_files_happy_path(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path
) -> None:
    async with running_daemon(make_settings(devserver.url, runner_id, workspace)):
        read = await api.submit_command(runner_id, "ReadFile", {"path": "README.md", "offset": 1})
        listing = await api.submit_command(runner_id, "ListFiles", {"depth": 3})
        read_record = await wait_terminal(api, runner_id, read)
        list_record = await wait_terminal(api, runner_id, listing)
    assert read_record.status == "completed"
    assert read_record.result == {
        "content": "line two\nline three\n",
        "total_lines": 3,
        "truncated": False,
        "encoding": "utf-8",
    }
    assert isinstance(read_record.duration_ms, int)
    assert read_record.error is None
    assert list_record.status == "completed"
    assert list_record.result == {
        "files": ["src/", "src/pkg/", "README.md", "src/data.bin", "src/main.py", "src/pkg/mod.py"],
        "total": 6,
        "truncated": False,
    }


async def test_what_start_up_built_is_frozen_out_of_the_collectors_sight(
    devserver: DevServer, runner_id: str, workspace: Path
) -> None:
    """A full collection over start-up's objects took 10-20 ms: the latency of whichever
    command it landed on. Frozen once the first heartbeat is answered."""
    gc.unfreeze()
    try:
        assert gc.get_freeze_count() == 0
        async with running_daemon(make_settings(devserver.url, runner_id, workspace)):
            assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()


async def test_unknown_type_and_invalid_args_fail_with_codes(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path
) -> None:
    async with running_daemon(make_settings(devserver.url, runner_id, workspace)):
        unknown = await api.submit_command(runner_id, "Teleport", {"path": "x"})
        invalid = await api.submit_command(runner_id, "ReadFile", {"path": "README.md", "offset": "many"})
        boom = await api.submit_command(runner_id, "Boom", {})
        unknown_record = await wait_terminal(api, runner_id, unknown)
        invalid_record = await wait_terminal(api, runner_id, invalid)
        boom_record = await wait_terminal(api, runner_id, boom)
    assert unknown_record.status == "failed"
    assert unknown_record.error is not None and unknown_record.error.code == "unknown_type"
    assert unknown_record.duration_ms is None
    assert invalid_record.error is not None and invalid_record.error.code == "invalid_args"
    assert invalid_record.error.message.startswith("offset: ")
    assert boom_record.error is not None
    assert (boom_record.error.code, boom_record.error.message) == ("internal", "Internal error")


# The server's reaper must not time the command out before the daemon does.
@pytest.mark.parametrize("anyio_backend", EVERY_LOOP)
@pytest.mark.parametrize(
    "devserver_config",
    [DevServerConfig(poll_hold_seconds=1.0, reaper_interval_seconds=0.2, stale_grace_seconds=30)],
)
async def test_timeout_really_cancels_the_handler(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path
) -> None:
    async with running_daemon(make_settings(devserver.url, runner_id, workspace)):
        command_id = await api.submit_command(
            runner_id, "Slow", {"seconds": 2.0, "marker": "late.txt"}, timeout_seconds=1
        )
        record = await wait_terminal(api, runner_id, command_id, timeout=30)
        assert record.status == "failed"
        assert record.error is not None and record.error.code == "timeout"
        assert record.error.message == "Command timed out after 1s"
        assert record.duration_ms is not None and record.duration_ms >= 900
        # The handler started before this report, so a handler left running would have
        # written its marker 2 s after it started at the latest: nothing was written.
        await anyio.sleep(2.5)
    assert not (workspace / "late.txt").exists()


async def test_never_more_than_max_concurrency_handlers(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path
) -> None:
    probe = GateHandler()
    settings = make_settings(devserver.url, runner_id, workspace, max_concurrency=3)
    async with running_daemon(settings, registry_for_tests(probe)) as running:
        ids = [await api.submit_command(runner_id, "Gate", {}) for _ in range(12)]
        # Three handlers held at the gate and the loop parked for a free slot: no fourth starts.
        await until(lambda: probe.running == 3 and running.daemon.liveness.parked)
        probe.gate.set()
        records = [await wait_terminal(api, runner_id, command_id) for command_id in ids]
    assert [r.status for r in records] == ["completed"] * 12
    assert probe.peak == 3  # the bound holds, and it is really used
    stats = await api.dev_get(f"runners/{runner_id}/stats")
    assert max(stats["max_commands_asked"]) <= 3


async def test_duplicate_report_is_treated_as_done(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path
) -> None:
    gated = GateHandler()
    settings = make_settings(devserver.url, runner_id, workspace)
    async with running_daemon(settings, registry_for_tests(gated)) as running:
        command_id = await api.submit_command(runner_id, "Gate", {})
        with anyio.fail_after(10):
            await gated.entered.wait()
        # Someone else (a previous run of the daemon, say) reports first.
        body = ResultReport(status="completed", result={"by": "test"}).model_dump_json().encode()
        await api.report(runner_id, command_id, body)
        gated.gate.set()
        await until(lambda: running.daemon.stats.already_reported > 0)
    record = await api.get_command(runner_id, command_id)
    assert record.result == {"by": "test"}
    stats = await api.dev_get(f"runners/{runner_id}/stats")
    assert (stats["reports_accepted"], stats["reports_conflict"]) == (1, 1)
    assert running.daemon.stats.report_retries == 0
    assert running.daemon.stats.dropped == 0
    assert running.exit_status == ExitStatus.OK


async def test_retries_429_and_5xx_until_stored_exactly_once(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path
) -> None:
    for status, count, retry_after in [(503, 2, None), (429, 1, 0.3), (500, 1, None), (502, 1, None)]:
        payload = {"route": "report", "status": status, "count": count, "retry_after": retry_after}
        await api.dev_post("faults", payload)
    async with running_daemon(make_settings(devserver.url, runner_id, workspace)) as running:
        started = time.monotonic()
        command_id = await api.submit_command(runner_id, "ReadFile", {"path": "README.md"})
        record = await wait_terminal(api, runner_id, command_id)
        elapsed = time.monotonic() - started
    assert record.status == "completed"
    assert record.result is not None and record.result["total_lines"] == 3
    assert running.daemon.stats.report_retries == 5
    assert elapsed >= 0.3  # the 429's Retry-After was honoured
    stats = await api.dev_get(f"runners/{runner_id}/stats")
    assert (stats["reports_accepted"], stats["reports_conflict"]) == (1, 0)


async def test_the_next_poll_waits_for_the_reports_of_the_last_polls_commands(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poll sent while the commands it just returned run goes ahead of their reports, in
    the daemon and in the server. The wait is capped (30 ms); lifted here, so that the
    order does not depend on this machine's speed."""
    monkeypatch.setattr(bridge_loop, "POLL_GATHER_SECONDS", 30.0)
    async with running_daemon(make_settings(devserver.url, runner_id, workspace)):
        for _ in range(5):
            command_id = await api.submit_command(runner_id, "ReadFile", {"path": "README.md"})
            assert (await wait_terminal(api, runner_id, command_id)).status == "completed"
        stats = await api.dev_get(f"runners/{runner_id}/stats")
    arrivals = [(kind, detail) for kind, detail in stats["arrivals"] if kind != "answered" or detail]
    # What came right after each answer that carried a command: its report, never a poll.
    answered = [index for index, (kind, _) in enumerate(arrivals) if kind == "answered"]
    assert len(answered) == 5
    for index in answered:
        (command_id,) = arrivals[index][1]
        assert arrivals[index + 1] == ("report", command_id)


async def test_a_command_still_running_does_not_hold_up_the_next_poll(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path
) -> None:
    settings = make_settings(devserver.url, runner_id, workspace, shutdown_grace_seconds=0.1)
    async with running_daemon(settings) as running:
        slow = await api.submit_command(runner_id, "Slow", {"seconds": 30, "marker": "slow.txt"})
        await until(lambda: running.daemon.loop.in_flight > 0, 5)
        quick = await api.submit_command(runner_id, "ReadFile", {"path": "README.md"})
        record = await wait_terminal(api, runner_id, quick)
        assert record.status == "completed"
        assert (await api.get_command(runner_id, slow)).status == "picked_up"


async def test_polling_really_resumes_after_an_outage(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path
) -> None:
    async with running_daemon(make_settings(devserver.url, runner_id, workspace)) as running:
        await api.dev_post("faults", {"route": "poll", "status": 503, "count": 6})
        await until(lambda: running.daemon.stats.poll_errors >= 6, 10)
        command_id = await api.submit_command(runner_id, "ReadFile", {"path": "README.md"})
        record = await wait_terminal(api, runner_id, command_id)
    assert record.status == "completed"


async def test_disconnect_mid_run_stops_with_the_documented_status(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path
) -> None:
    async with running_daemon(make_settings(devserver.url, runner_id, workspace)) as running:
        await api.disconnect(runner_id)
        await until(lambda: running.daemon.state == "stopped", 10)
    assert running.exit_status == ExitStatus.DISCONNECTED
    assert int(ExitStatus.DISCONNECTED) == 69
    assert running.daemon.fatal_error is not None


async def test_unknown_runner_at_start_exits_disconnected(devserver: DevServer, workspace: Path) -> None:
    from runner_daemon.service.daemon import Daemon

    settings = make_settings(devserver.url, "7f1c2a52-0d6a-4a4e-9d0b-5a4a4f6d8e11", workspace)
    with anyio.fail_after(10):
        status = await Daemon(settings, registry_for_tests()).run()
    assert status == ExitStatus.DISCONNECTED


async def test_stop_lets_in_flight_commands_finish(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path
) -> None:
    async with running_daemon(make_settings(devserver.url, runner_id, workspace)) as running:
        command_id = await api.submit_command(runner_id, "Slow", {"seconds": 0.5, "marker": "done.txt"})
        await until(lambda: running.daemon.loop.in_flight > 0, 5)
        running.daemon.request_stop("test")
        with anyio.fail_after(10):
            await running.daemon.loop.wait_idle()
    record = await api.get_command(runner_id, command_id)
    assert record.status == "completed"
    assert (workspace / "done.txt").exists()
    assert running.exit_status == ExitStatus.OK


async def test_grace_expiry_cancels_and_reports_cancelled(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path
) -> None:
    settings = make_settings(devserver.url, runner_id, workspace, shutdown_grace_seconds=0.3)
    async with running_daemon(settings) as running:
        command_id = await api.submit_command(runner_id, "Slow", {"seconds": 30, "marker": "never.txt"})
        await until(lambda: running.daemon.loop.in_flight > 0, 5)
        await anyio.sleep(0.1)  # let it start executing
    record = await api.get_command(runner_id, command_id)
    assert record.status == "failed"
    assert record.error is not None and record.error.code == "cancelled"
    assert record.duration_ms is not None
    assert not (workspace / "never.txt").exists()
    assert running.exit_status == ExitStatus.OK


async def test_commands_returned_while_stopping_get_a_final_report(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path
) -> None:
    await api.heartbeat(runner_id, ["bridge"])
    loop = bare_loop(make_settings(devserver.url, runner_id, workspace), api)
    ids = [await api.submit_command(runner_id, "ReadFile", {"path": "README.md"}) for _ in range(2)]
    items = await loop.poll(5)  # a poll that was open when the stop came
    loop.stop_polling()
    async with anyio.create_task_group() as work:
        loop.dispatch(items, work)
    for command_id in ids:
        record = await api.get_command(runner_id, command_id)
        assert record.status == "failed"
        assert record.error is not None and record.error.code == "cancelled"
        assert "not started" in record.error.message


async def test_malformed_poll_items_are_answered_or_logged(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path
) -> None:
    await api.heartbeat(runner_id, ["bridge"])
    stats = LoopStats()
    settings = make_settings(devserver.url, runner_id, workspace)
    loop = BridgeLoop(
        settings, api, registry_for_tests(), stats, open_outbox(settings), services=HandlerServices()
    )
    command_id = await api.submit_command(runner_id, "ReadFile", {"path": "README.md"})
    assert len(await loop.poll(5)) == 1
    items = [
        {"command_id": command_id, "type": "ReadFile", "args": "not an object"},
        {"type": "ReadFile", "args": {}},  # no id: cannot be answered
        "garbage",
        {"command_id": "../../escape", "type": "ReadFile", "args": {}},
    ]
    async with anyio.create_task_group() as work:
        loop.dispatch(items, work)
    record = await api.get_command(runner_id, command_id)
    assert record.status == "failed"
    assert record.error is not None and record.error.code == "invalid_args"
    assert record.error.message.startswith("Malformed command from server: args:")
    assert stats.dropped == 3


async def test_the_daemon_survives_every_malformed_poll_answer_of_the_dev_server(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path
) -> None:
    """Each kind on the dev server's menu: logged, answered failed where an id is usable, and
    the loop goes on (a good command after each one still completes)."""
    async with running_daemon(make_settings(devserver.url, runner_id, workspace)) as running:
        stats = running.daemon.stats
        for kind in ("not_json", "unknown_status"):
            errors = stats.poll_errors
            await api.dev_post(f"runners/{runner_id}/malformed", {"kind": kind})
            await until(lambda errors=errors: stats.poll_errors > errors)  # type: ignore[misc]
        spoiled: dict[str, str] = {}
        settles = {"wrong_types": "failed", "huge_args": "failed", "no_command_id": "picked_up"}
        for kind, settled in settles.items():
            await api.dev_post(f"runners/{runner_id}/malformed", {"kind": kind})
            command_id = await api.submit_command(runner_id, "ReadFile", {"path": "README.md"})
            spoiled[kind] = command_id
            await until(lambda c=command_id, s=settled: command_status_is(api, runner_id, c, s))  # type: ignore[misc]
        good = await api.submit_command(runner_id, "ReadFile", {"path": "README.md"})
        assert (await wait_terminal(api, runner_id, good)).status == "completed"
        records = {kind: await api.get_command(runner_id, cid) for kind, cid in spoiled.items()}
    for kind in ("wrong_types", "huge_args"):
        error = records[kind].error
        assert records[kind].status == "failed"
        assert error is not None and error.code == "invalid_args"
        assert error.message.startswith("Malformed command from server: args:")
    assert "over the 1048576 limit" in str(records["huge_args"].error)
    # Without its id the command cannot be answered: it stays picked up until the server's reaper.
    assert records["no_command_id"].status == "picked_up"
    assert stats.dropped == 2  # the id-less item and the "not a command" one of wrong_types
    assert running.exit_status == ExitStatus.OK


@pytest.mark.parametrize("devserver_config", [DevServerConfig(poll_hold_seconds=60)])
async def test_a_poll_open_at_the_stop_may_still_answer_and_its_commands_are_reported(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path
) -> None:
    """Opik's server cannot tell that a client hung up on a held poll: the daemon keeps the
    poll open until Opik confirmed it takes no more bridge commands (or the grace period
    ends), and what it returns is reported, not lost. A submission after that is refused."""

    async def polls() -> int:
        return int((await api.dev_get(f"runners/{runner_id}/stats"))["polls"])

    settings = make_settings(devserver.url, runner_id, workspace, shutdown_grace_seconds=30)
    async with running_daemon(settings) as running:
        await until(polls)
        running.daemon.request_stop("test")
        try:
            command_id = await api.submit_command(runner_id, "ReadFile", {"path": "README.md"})
        except Conflict:
            return  # the stop's heartbeat came first: refused, and the submitter was told
        record = await wait_terminal(api, runner_id, command_id)
    assert record.status == "failed"
    assert record.error is not None and record.error.code == "cancelled"
    assert "not started" in record.error.message
    assert running.exit_status == ExitStatus.OK


async def test_a_stop_during_the_poll_back_off_is_not_delayed_by_it(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path
) -> None:
    """Only an open poll is waited for at a stop; a back-off between polls ends at once."""
    settings = make_settings(
        devserver.url, runner_id, workspace, retry_initial_seconds=60.0, retry_max_seconds=60.0
    )
    await api.dev_post("faults", {"route": "poll", "status": 503, "count": 1})
    async with running_daemon(settings) as running:
        await until(lambda: running.daemon.stats.poll_errors == 1)
        started = time.monotonic()
        running.daemon.request_stop("test")
        await until(lambda: running.daemon.state == "stopped", timeout=25)  # the back-off: 30-60 s
    assert time.monotonic() - started < 25
    assert running.exit_status == ExitStatus.OK
