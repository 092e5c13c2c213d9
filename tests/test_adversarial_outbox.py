"""Attacks on "nothing accepted is lost": refused credentials, redelivery, replays, full disks.

Each test runs real daemon processes against the dev server, which plays the hostile or
broken server (``/dev/faults`` for refusals, ``/dev/runners/{id}/redeliver`` for at-least-once
delivery), or the outbox alone on a tiny tmpfs that a co-tenant fills up.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from runner_daemon.core.errors import Conflict
from runner_daemon.core.outbox import JOURNAL_FILE, Outbox, OwedResult
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.server import DevServer, DevServerConfig
from tests.support import (
    DaemonProcess,
    DaemonProcesses,
    bare_loop,
    command_status_is,
    daemon_environment,
    finish,
    make_settings,
    until,
    wait_terminal,
)

pytestmark = [pytest.mark.anyio, pytest.mark.adversarial]
BODY = b'{"status":"completed","result":{"ok":true},"duration_ms":3}'
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # real daemon processes: one backend for the test itself is enough


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


Spawn = Callable[..., DaemonProcess]


@pytest.fixture
def spawn(devserver: DevServer, workspace: Path, state: Path, daemons: DaemonProcesses) -> Spawn:
    def start(runner_id: str, **settings: object) -> DaemonProcess:
        return daemons.spawn(
            daemon_environment(devserver.url, runner_id, workspace, state_directory=state, **settings)
        )

    return start


def events(proc: DaemonProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.output()[1].splitlines()]


def executions(workspace: Path) -> list[str]:
    log = workspace / "executions.log"
    return log.read_text().split() if log.exists() else []


def ready(proc: DaemonProcess) -> bool:
    """The daemon process said it polls (its signal handling is up by then)."""
    return any(e["event"].startswith("runner connected") for e in events(proc))


def journalled(state: Path, command_id: str) -> bool:
    """The daemon recorded the command as started: it runs its handler now."""
    journal = state / JOURNAL_FILE
    return journal.exists() and command_id in journal.read_text(errors="replace")


async def stop(proc: DaemonProcess) -> None:
    proc.send_signal(signal.SIGTERM)
    _, err = await finish(proc)
    assert proc.returncode == 0, err


# --- 1. a 401/403 on a report keeps the result owed ---------------------------------------


@pytest.mark.parametrize("refusal", [401, 403])
async def test_refused_credentials_on_a_report_keep_the_result_and_exit_77(
    spawn: Spawn, api: DevClient, runner_id: str, workspace: Path, refusal: int
) -> None:
    first = spawn(runner_id)
    await until(lambda: ready(first), 20)
    await api.dev_post("faults", {"route": "report", "status": refusal, "count": 1})
    command_id = await api.submit_command(runner_id, "Count", {"token": "once"})
    _, err = await finish(first)
    assert first.returncode == 77, err
    assert await command_status_is(api, runner_id, command_id, "picked_up")  # nothing reported yet
    second = spawn(runner_id)  # the key is fixed: the result owed is sent on the next start
    record = await wait_terminal(api, runner_id, command_id, timeout=20)
    await stop(second)
    assert record.status == "completed"
    assert record.result == {"token": "once"}
    assert executions(workspace) == ["once"]  # re-sent, not re-run


# --- 2. a command id is never run twice -----------------------------------------------------


async def _report_attempts(api: DevClient, runner_id: str, command_id: str) -> int:
    records = await api.dev_get(f"runners/{runner_id}/commands")
    return int(next(r for r in records if r["command_id"] == command_id)["report_attempts"])


async def _redeliver(api: DevClient, runner_id: str, command_id: str) -> int:
    """Hand ``command_id`` out again; returns the report attempts the server saw before."""
    before = await _report_attempts(api, runner_id, command_id)
    await api.dev_post(f"runners/{runner_id}/redeliver", {"command_id": command_id})
    return before


async def _answered_again(api: DevClient, runner_id: str, command_id: str, before: int) -> bool:
    return await _report_attempts(api, runner_id, command_id) > before


async def test_a_command_delivered_twice_in_one_run_runs_once(
    spawn: Spawn, api: DevClient, runner_id: str, workspace: Path
) -> None:
    daemon = spawn(runner_id)
    await until(lambda: ready(daemon), 20)
    done = await api.submit_command(runner_id, "Count", {"token": "done"})
    await wait_terminal(api, runner_id, done, timeout=20)
    running = await api.submit_command(runner_id, "Count", {"token": "slow", "seconds": 1.5})
    await until(lambda: command_status_is(api, runner_id, running, "picked_up"), 20)
    before_done = await _redeliver(api, runner_id, done)
    await _redeliver(api, runner_id, running)  # while it still runs
    await until(lambda: _answered_again(api, runner_id, done, before_done), 20)
    record = await wait_terminal(api, runner_id, running, timeout=20)
    await stop(daemon)
    assert record.status == "completed"
    assert sorted(executions(workspace)) == ["done", "slow"]
    assert any(e["event"].startswith("the server delivered a command") for e in events(daemon))


async def test_a_command_delivered_again_after_a_restart_or_a_crash_is_not_run_again(
    spawn: Spawn, api: DevClient, runner_id: str, workspace: Path, state: Path
) -> None:
    first = spawn(runner_id)
    await until(lambda: ready(first), 20)
    done = await api.submit_command(runner_id, "Count", {"token": "done"})
    await wait_terminal(api, runner_id, done, timeout=20)
    cut = await api.submit_command(runner_id, "Count", {"token": "cut", "seconds": 30})
    await until(lambda: journalled(state, cut), 20)  # inside its handler
    first.kill()
    await finish(first)
    second = spawn(runner_id)
    record = await wait_terminal(api, runner_id, cut, timeout=20)
    assert record.error is not None and record.error.code == "interrupted"
    for command_id in (done, cut):
        before = await _redeliver(api, runner_id, command_id)
        await until(lambda c=command_id, b=before: _answered_again(api, runner_id, c, b), 20)  # type: ignore[misc]
    await stop(second)
    third = spawn(runner_id)  # and once more after a graceful restart
    await until(lambda: ready(third), 20)
    before = await _redeliver(api, runner_id, done)
    await until(lambda: _answered_again(api, runner_id, done, before), 20)
    await stop(third)
    assert executions(workspace) == ["done"]  # "cut" was killed before its line; nothing re-ran


# --- 12. replayed signatures ----------------------------------------------------------------


@pytest.mark.parametrize("reject", [True, False])
async def test_a_replayed_signature_is_refused_when_asked_across_restarts(
    devserver: DevServer,
    api: DevClient,
    workspace: Path,
    state: Path,
    daemons: DaemonProcesses,
    tmp_path: Path,
    reject: bool,
) -> None:
    key = os.urandom(32)
    runner_id = await api.dev_create_runner("signed", bridge_key=key)
    key_file = tmp_path / "bridge.key"
    key_file.write_text(base64.b64encode(key).decode())
    env = daemon_environment(
        devserver.url,
        runner_id,
        workspace,
        state_directory=state,
        allow_unsigned_commands="false",
        bridge_key_file=key_file,
        reject_replayed_signatures=str(reject).lower(),
    )
    records = []
    for restart in range(2):
        daemon = daemons.spawn(env)
        await until(functools.partial(ready, daemon), 20)
        for _ in range(1 if restart else 2):  # the dev server signs identical args identically
            command_id = await api.submit_command(runner_id, "Count", {"token": "t"})
            records.append(await wait_terminal(api, runner_id, command_id, timeout=20))
        await stop(daemon)
    if reject:
        assert [r.status for r in records] == ["completed", "failed", "failed"]
        for record in records[1:]:
            assert record.error is not None and record.error.code == "auth_failed"
            assert "already accepted" in record.error.message
        assert executions(workspace) == ["t"]
    else:  # what the protocol alone gives: a verbatim replay runs again
        assert [r.status for r in records] == ["completed"] * 3
        assert executions(workspace) == ["t", "t", "t"]


# --- 3 and 9. a damaged journal, a full disk ------------------------------------------------


async def test_a_damaged_journal_starts_with_one_warning_in_the_log_format(
    spawn: Spawn, api: DevClient, runner_id: str, state: Path
) -> None:
    state.mkdir()  # noqa: ASYNC240 - set-up, before any daemon runs
    (state / JOURNAL_FILE).write_bytes(
        b'\xff\xfegarbage\n{"op": "result", "id": "x", "runner": "r", "type": "T", "at": 1, "body": "nope"}\n'
        b'{"op": "started", "id": 7}\n{"op": "result", "id": "torn", "runner"'
    )
    for _ in range(2):  # and again: nothing unusable was written back
        daemon = spawn(runner_id)
        await until(functools.partial(ready, daemon), 20)
        await stop(daemon)
        lines = daemon.output()[1].splitlines()
        parsed = [json.loads(line) for line in lines]  # every line in the configured format
        warnings = [e for e in parsed if e["event"].startswith("skipped unusable outbox")]
        assert len(warnings) == (1 if _ == 0 else 0)
        assert warnings == [] or warnings[0]["lines"] == 4


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str = "64k") -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _stuff(path: Path, byte: bytes) -> None:
    with open(path, "ab", buffering=0) as stream:
        for size in (65536, 4096, 512, 64, 1):
            with contextlib.suppress(OSError):
                while stream.write(byte * size):
                    pass


def fill(folder: Path, *, journal_too: bool = False) -> Path:
    """Take every free byte of ``folder``'s file system, as a co-tenant filling the disk would.

    With ``journal_too`` the slack in the journal's last page goes as well (with empty lines,
    which a journal may hold), so not even a small append fits.
    """
    filler = folder / "filler"
    _stuff(filler, b"\0")
    if journal_too:
        _stuff(folder / JOURNAL_FILE, b"\n")
    return filler


@ROOT_ONLY
async def test_a_full_disk_is_detected_kept_in_memory_and_healed(tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path / "tiny") as folder:
        outbox = Outbox.open(folder)
        await outbox.started("r1", "before", "ReadFile")
        filler = fill(folder)
        big = json.dumps({"status": "completed", "result": {"content": "x" * 20000}}).encode()
        await outbox.result(OwedResult("r1", "before", "ReadFile", big, 1.0))  # a short write, then ENOSPC
        assert outbox.failure is not None
        with pytest.raises(Exception, match="cannot write its state directory"):
            await outbox.started("r1", "refused", "ReadFile")
        assert outbox.undelivered == 1  # kept in memory, to be delivered all the same
        filler.unlink()
        assert await outbox.retry()
        await outbox.started("r1", "after", "Exec")
        await outbox.close()
        reopened = Outbox.open(folder)
        recovered = reopened.recovered
        assert [entry.body for entry in recovered.results] == [big]  # whole, though once torn
        assert [entry.command_id for entry in recovered.interrupted] == ["after"]
        await reopened.close()


@ROOT_ONLY
async def test_a_full_state_directory_applies_back_pressure_and_loses_nothing(
    spawn: Spawn, api: DevClient, runner_id: str, workspace: Path, state: Path
) -> None:
    with tiny_tmpfs(state, "128k"):
        daemon = spawn(runner_id)
        await until(functools.partial(ready, daemon), 20)
        filler = fill(state, journal_too=True)
        first = await api.submit_command(runner_id, "Count", {"token": "first"})
        record = await wait_terminal(api, runner_id, first, timeout=20)
        # Claimed, so answered: failed without running, since it could not be recorded.
        assert record.status == "failed" and record.error is not None
        assert "cannot write its state directory" in record.error.message
        assert daemon.poll() is None  # a full disk is not a crash
        # While the disk stays full no new command is taken (back-pressure, not failures).
        await until(lambda: any(e["event"].startswith("polling paused") for e in events(daemon)), 20)
        later = await api.submit_command(runner_id, "Count", {"token": "later"})
        await anyio.sleep(1)
        assert await command_status_is(api, runner_id, later, "pending")
        filler.unlink()
        record = await wait_terminal(api, runner_id, later, timeout=30)
        assert record.status == "completed"
        await stop(daemon)
    assert executions(workspace) == ["later"]
    errors = [e for e in events(daemon) if "cannot write the outbox" in e["event"]]
    assert len(errors) == 1  # one clear line, not one per attempt


# --- signals at awkward moments -------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_stop_while_a_result_cannot_be_delivered_keeps_it_for_the_next_start(
    spawn: Spawn, api: DevClient, runner_id: str, workspace: Path, signum: int
) -> None:
    first = spawn(runner_id, shutdown_grace_seconds=0.5)
    await until(lambda: ready(first), 20)
    await api.dev_post("faults", {"route": "report", "status": 503, "count": 1_000_000})
    command_id = await api.submit_command(runner_id, "Count", {"token": "once"})
    await until(lambda: _report_attempts(api, runner_id, command_id), 20)  # journalled, refused
    first.send_signal(signum)
    _, err = await finish(first, 60)
    assert first.returncode == 0, err
    await api.dev_post("faults/clear", {})
    second = spawn(runner_id)
    record = await wait_terminal(api, runner_id, command_id, timeout=20)
    await stop(second)
    assert record.status == "completed" and record.result == {"token": "once"}
    assert executions(workspace) == ["once"]


# --- a server that sends more than asked -----------------------------------------------------


async def test_commands_beyond_what_was_asked_are_answered_without_running(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path
) -> None:
    await api.heartbeat(runner_id, ["bridge"])
    loop = bare_loop(make_settings(devserver.url, runner_id, workspace), api)
    ids = [await api.submit_command(runner_id, "Count", {"token": f"t{i}"}) for i in range(3)]
    items = await loop.poll(5)  # all three, as a server ignoring max_commands would send them
    async with anyio.create_task_group() as work:
        loop.dispatch(items, work, asked=1)
    records = [await wait_terminal(api, runner_id, command_id) for command_id in ids]
    assert [r.status for r in records] == ["completed", "failed", "failed"]
    for record in records[1:]:
        assert record.error is not None and record.error.code == "cancelled"
        assert "more commands than this runner asked for" in record.error.message
    assert executions(workspace) == ["t0"]


async def test_an_unreachable_opik_at_start_is_one_line_naming_the_url_then_one_on_recovery(
    devserver: DevServer,
    api: DevClient,
    runner_id: str,
    workspace: Path,
    state: Path,
    daemons: DaemonProcesses,
) -> None:
    await api.dev_post("faults", {"route": "heartbeat", "status": 503, "count": 8})
    daemon = daemons.spawn(daemon_environment(devserver.url, runner_id, workspace, state_directory=state))
    await until(lambda: ready(daemon), 30)
    await stop(daemon)
    lines = events(daemon)
    failing = [e for e in lines if "reach Opik" in e["event"]]
    assert len(failing) == 1 and devserver.url.rstrip("/") in failing[0]["error"]
    recovered = [e for e in lines if e["event"] == "Opik answered"]
    assert len(recovered) == 1 and recovered[0]["after_attempts"] == 8


# --- a fast stop that loses nothing -------------------------------------------------------------


@pytest.mark.parametrize(
    "devserver_config", [DevServerConfig(poll_hold_seconds=60, reaper_interval_seconds=0.2)]
)
async def test_an_idle_daemon_stops_without_waiting_out_the_held_poll_and_loses_no_racing_command(
    spawn: Spawn, api: DevClient, runner_id: str
) -> None:
    daemon = spawn(runner_id, shutdown_grace_seconds=60)
    await until(lambda: ready(daemon), 20)
    await until(lambda: _polls_open(api, runner_id), 20)  # a poll is held (for up to 60 s)
    daemon.send_signal(signal.SIGTERM)
    raced: list[str] = []
    refused = 0
    for _ in range(20):  # commands submitted while the stop is under way
        try:
            raced.append(await api.submit_command(runner_id, "ReadFile", {"path": "README.md"}))
        except Conflict:
            refused += 1  # the runner said it takes no more: the submitter knows at once
    await finish(daemon, 30)  # well inside the 60 s hold and grace the old stop waited out
    assert daemon.returncode == 0
    assert refused > 0  # the stop withdrew the bridge capability
    for command_id in raced:  # every command the server accepted got a final report
        record = await wait_terminal(api, runner_id, command_id, timeout=20)
        assert record.status in ("completed", "failed") and record.status != "timed_out"
    assert any(e["event"] == "runner-daemon stopped" for e in events(daemon))


async def _polls_open(api: DevClient, runner_id: str) -> bool:
    return int((await api.dev_get(f"runners/{runner_id}/stats"))["polls_open"]) > 0
