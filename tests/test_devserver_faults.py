"""The dev server's fault injection, seen from a real client, and its stop/restart with state kept."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from runner_daemon.core.errors import (
    AlreadyReported,
    ApiError,
    RateLimited,
    RequestRejected,
    ServerError,
    TransportError,
)
from runner_daemon.core.models import ResultReport
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.server import DevServer, DevServerConfig
from tests.support import REPO, command_status_is, environ_without_settings, until

pytestmark = pytest.mark.anyio

COMPLETED = ResultReport(status="completed", result={"ok": True}).model_dump_json().encode()


async def set_profile(api: DevClient, **profile: Any) -> dict[str, Any]:
    view = await api.dev_post("faults/profile", profile)
    assert isinstance(view, dict)
    return view


async def fault_counters(api: DevClient) -> dict[str, Any]:
    view = await api.dev_get("faults")
    assert isinstance(view, dict)
    counters = view["counters"]
    assert isinstance(counters, dict)
    return counters


async def picked_up_command(api: DevClient, runner_id: str, timeout: int = 60) -> str:
    await api.heartbeat(runner_id, ["bridge"])
    command_id = await api.submit_command(runner_id, "ReadFile", {"path": "a"}, timeout_seconds=timeout)
    assert [item["command_id"] for item in await api.poll(runner_id, 1)] == [command_id]
    return command_id


async def listed(api: DevClient, runner_id: str) -> dict[str, dict[str, Any]]:
    commands = await api.dev_get(f"runners/{runner_id}/commands")
    assert isinstance(commands, list)
    return {command["command_id"]: command for command in commands}


def raw_request(port: int, path: str, body: bytes = b"{}") -> tuple[str, bytes]:
    """One request on a plain socket: ("reset", bytes read) on an RST, ("eof", bytes) on a FIN."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except ConnectionResetError:
            return "reset", received
        return "eof", received


# --- the profile and its control routes ------------------------------------------------------


async def test_no_profile_by_default_and_profile_round_trips(api: DevClient, runner_id: str) -> None:
    view = await api.dev_get("faults")
    assert view["profile"] is None and view["queued"] == []
    assert not any(v for k, v in view["counters"].items() if k != "errors_by_status")
    view = await set_profile(api, error_rate=0.25, seed=3, routes=["heartbeat"])
    assert view["profile"]["error_rate"] == 0.25 and view["profile"]["routes"] == ["heartbeat"]
    assert (await api.dev_get("faults"))["profile"] == view["profile"]
    await api.dev_post("faults/clear", {})
    assert (await api.dev_get("faults"))["profile"] is None
    await api.heartbeat(runner_id, ["bridge"])


@pytest.mark.parametrize(
    "profile",
    [
        {"error_rate": 0.6, "reset_rate": 0.6},  # rates add up to more than 1
        {"routes": ["heartbeats"]},  # unknown route
        {"error_rate": 1.5},
        {"error_rate": 0.1, "typo_rate": 0.1},  # unknown field
        {"error_statuses": [404]},
        {"blackout_seconds": 1, "blackout_until": 2e9},
    ],
)
async def test_bad_profiles_are_400(api: DevClient, profile: dict[str, Any]) -> None:
    with pytest.raises(RequestRejected):
        await api.dev_post("faults/profile", profile)
    assert (await api.dev_get("faults"))["profile"] is None


async def test_faults_only_on_the_profiled_routes(api: DevClient, runner_id: str) -> None:
    await set_profile(api, error_rate=1.0)  # default routes: heartbeat, poll, report
    with pytest.raises(ServerError):
        await api.heartbeat(runner_id, ["bridge"])
    await api.get_runner(runner_id)  # GET of a runner is not a profiled route by default
    await set_profile(api, error_rate=1.0, routes=["runner"])
    await api.heartbeat(runner_id, ["bridge"])
    with pytest.raises(ServerError):
        await api.get_runner(runner_id)


# --- each kind of fault, as a client sees it -------------------------------------------------


async def test_errors_are_500_502_or_503(api: DevClient, runner_id: str) -> None:
    await set_profile(api, error_rate=1.0, seed=1, routes=["heartbeat"])
    statuses = []
    for _ in range(30):
        with pytest.raises(ServerError) as info:
            await api.heartbeat(runner_id, ["bridge"])
        statuses.append(info.value.status)
    assert set(statuses) == {500, 502, 503}
    counters = await fault_counters(api)
    assert counters["error"] == 30
    assert {int(k): v for k, v in counters["errors_by_status"].items()} == {
        s: statuses.count(s) for s in (500, 502, 503)
    }


async def test_error_rate_with_a_seed_gives_the_fraction_reproducibly(api: DevClient, runner_id: str) -> None:
    async def outcomes() -> list[int]:
        seen = []
        for _ in range(200):
            try:
                await api.heartbeat(runner_id, ["bridge"])
                seen.append(200)
            except ServerError as exc:
                assert exc.status is not None
                seen.append(exc.status)
        return seen

    await set_profile(api, error_rate=0.3, seed=42, routes=["heartbeat"])
    first = await outcomes()
    failed = sum(status != 200 for status in first)
    assert 30 <= failed <= 90  # 60 expected; a loose band
    assert (await fault_counters(api))["error"] == failed
    await set_profile(api, error_rate=0.3, seed=42, routes=["heartbeat"])
    assert await outcomes() == first  # same seed, same requests: same faults
    await set_profile(api, error_rate=0.3, seed=43, routes=["heartbeat"])
    assert await outcomes() != first


async def test_429_carries_retry_after(api: DevClient, runner_id: str) -> None:
    await set_profile(api, rate_limit_rate=1.0, retry_after=2.5, routes=["heartbeat", "poll"])
    with pytest.raises(RateLimited) as info:
        await api.heartbeat(runner_id, ["bridge"])
    assert info.value.retry_after == 2.5
    with pytest.raises(RateLimited):
        await api.poll(runner_id, 1)
    assert (await fault_counters(api))["rate_limit"] == 2


async def test_latency_is_added_before_handling(api: DevClient, runner_id: str) -> None:
    await api.heartbeat(runner_id, ["bridge"])
    await set_profile(api, latency_ms=300, routes=["heartbeat", "poll"])
    started = time.monotonic()
    await api.heartbeat(runner_id, ["bridge"])
    assert time.monotonic() - started >= 0.29
    # A poll with a command already waiting answers at once, but only after the latency.
    command_id = await api.submit_command(runner_id, "ReadFile", {"path": "a"})
    started = time.monotonic()
    assert [item["command_id"] for item in await api.poll(runner_id, 1)] == [command_id]
    assert time.monotonic() - started >= 0.29
    assert (await fault_counters(api))["latency"] == 2


async def test_a_reset_is_a_real_tcp_reset(devserver: DevServer, api: DevClient, runner_id: str) -> None:
    path = f"/api/v1/private/local-runners/{runner_id}/heartbeats"
    await set_profile(api, reset_rate=1.0, routes=["heartbeat"])
    assert await anyio.to_thread.run_sync(raw_request, devserver.port, path) == ("reset", b"")
    await set_profile(api, reset_after_processing_rate=1.0, routes=["heartbeat"])
    how, received = await anyio.to_thread.run_sync(raw_request, devserver.port, path)
    # Mid-response: the status line may arrive before the RST, the end of the headers never.
    assert how == "reset" and b"\r\n\r\n" not in received
    assert received in (b"", b"HTTP/1.1 200 OK\r\n")
    stats = await api.dev_get(f"runners/{runner_id}/stats")
    assert stats["heartbeats"] == 1  # only the after-processing one was handled


async def test_reset_before_processing_stores_nothing(api: DevClient, runner_id: str) -> None:
    command_id = await picked_up_command(api, runner_id)
    await set_profile(api, reset_rate=1.0, routes=["report"])
    with pytest.raises(TransportError):
        await api.report(runner_id, command_id, COMPLETED)
    assert (await api.get_command(runner_id, command_id)).status == "picked_up"
    await api.dev_post("faults/clear", {})
    await api.report(runner_id, command_id, COMPLETED)  # the retry is accepted
    record = (await listed(api, runner_id))[command_id]
    assert (record["status"], record["report_attempts"], record["accepted_reports"]) == ("completed", 2, 1)
    assert (await fault_counters(api))["reset_before_processing"] == 1


async def test_reset_after_processing_stores_the_result_and_the_retry_is_409(
    api: DevClient, runner_id: str
) -> None:
    command_id = await picked_up_command(api, runner_id)
    await set_profile(api, reset_after_processing_rate=1.0, routes=["report"])
    with pytest.raises(TransportError):
        await api.report(runner_id, command_id, COMPLETED)
    record = await api.get_command(runner_id, command_id)
    assert (record.status, record.result) == ("completed", {"ok": True})
    with pytest.raises(TransportError):  # still resetting: the 409 is processed, then reset too
        await api.report(runner_id, command_id, COMPLETED)
    await api.dev_post("faults/clear", {})
    with pytest.raises(AlreadyReported):
        await api.report(runner_id, command_id, COMPLETED)
    record_listed = (await listed(api, runner_id))[command_id]
    assert (record_listed["report_attempts"], record_listed["accepted_reports"]) == (3, 1)
    stats = await api.dev_get(f"runners/{runner_id}/stats")
    assert (stats["reports_accepted"], stats["reports_conflict"]) == (1, 2)
    assert (await fault_counters(api))["reset_after_processing"] == 2


async def test_poll_resets_before_and_after_the_pick_up(api: DevClient, runner_id: str) -> None:
    await api.heartbeat(runner_id, ["bridge"])
    command_id = await api.submit_command(runner_id, "ReadFile", {"path": "a"})
    await set_profile(api, reset_rate=1.0, routes=["poll"])
    with pytest.raises(TransportError):
        await api.poll(runner_id, 1)
    assert (await api.get_command(runner_id, command_id)).status == "pending"
    await set_profile(api, reset_after_processing_rate=1.0, routes=["poll"])
    with pytest.raises(TransportError):
        await api.poll(runner_id, 1)
    # Picked up, but the runner never saw it: only the server's reaper can end it now.
    assert (await api.get_command(runner_id, command_id)).status == "picked_up"


async def test_after_processing_resets_can_be_limited_to_some_routes(api: DevClient, runner_id: str) -> None:
    await set_profile(
        api,
        reset_after_processing_rate=1.0,
        routes=["heartbeat", "report"],
        reset_after_processing_routes=["report"],
    )
    for _ in range(5):
        await api.heartbeat(runner_id, ["bridge"])
    command_id = await api.submit_command(runner_id, "ReadFile", {"path": "a"})
    await api.poll(runner_id, 1)
    with pytest.raises(TransportError):
        await api.report(runner_id, command_id, COMPLETED)


async def test_blackout_fails_everything_but_dev_routes_then_recovers(api: DevClient, runner_id: str) -> None:
    await api.heartbeat(runner_id, ["bridge"])
    command_id = await api.submit_command(runner_id, "ReadFile", {"path": "a"})
    view = await set_profile(api, blackout_seconds=1.0)
    assert view["blackout_remaining_seconds"] > 0
    calls = (
        lambda: api.heartbeat(runner_id, ["bridge"]),
        lambda: api.poll(runner_id, 1),
        lambda: api.get_runner(runner_id),
        lambda: api.get_command(runner_id, command_id),
        lambda: api.submit_command(runner_id, "ReadFile", {"path": "b"}),
        lambda: api.disconnect(runner_id),
    )
    for call in calls:
        with pytest.raises(TransportError):
            await call()
    assert (await api.dev_get("faults"))["counters"]["blackout"] == len(calls)  # /dev still answers

    async def recovered() -> bool:
        try:
            await api.heartbeat(runner_id, ["bridge"])
        except TransportError:
            return False
        return True

    await until(recovered, 5)
    assert (await api.get_command(runner_id, command_id)).status == "pending"  # nothing happened


async def test_blackout_can_answer_503(api: DevClient, runner_id: str) -> None:
    await set_profile(api, blackout_seconds=30, blackout_mode="503")
    with pytest.raises(ServerError) as info:
        await api.get_runner(runner_id)
    assert info.value.status == 503
    await api.dev_post("faults/clear", {})
    await api.get_runner(runner_id)


async def test_clear_can_zero_the_counters(api: DevClient, runner_id: str) -> None:
    await set_profile(api, error_rate=1.0, routes=["heartbeat"])
    with pytest.raises(ServerError):
        await api.heartbeat(runner_id, ["bridge"])
    await api.dev_post("faults/clear", {})
    assert (await fault_counters(api))["error"] == 1  # counters outlive the profile
    await api.dev_post("faults/clear", {"counters": True})
    assert (await fault_counters(api))["error"] == 0


async def test_the_queue_of_single_faults_still_wins(api: DevClient, runner_id: str) -> None:
    await set_profile(api, error_rate=0.0, routes=["heartbeat"])
    await api.dev_post("faults", {"route": "heartbeat", "status": 429, "retry_after": 3})
    with pytest.raises(RateLimited) as info:
        await api.heartbeat(runner_id, ["bridge"])
    assert info.value.retry_after == 3
    await api.heartbeat(runner_id, ["bridge"])
    assert (await fault_counters(api))["queued"] == 1


async def test_commands_listing(api: DevClient, runner_id: str) -> None:
    await api.heartbeat(runner_id, ["bridge"])
    first = await api.submit_command(runner_id, "ReadFile", {"path": "a"})
    second = await api.submit_command(runner_id, "ReadFile", {"path": "b"})
    await api.poll(runner_id, 1)
    await api.report(runner_id, first, COMPLETED)
    commands = await api.dev_get(f"runners/{runner_id}/commands")
    assert [c["command_id"] for c in commands] == [first, second]
    assert [(c["status"], c["accepted_reports"], c["report_attempts"]) for c in commands] == [
        ("completed", 1, 1),
        ("pending", 0, 0),
    ]
    assert commands[0]["result"] == {"ok": True} and commands[0]["error"] is None
    with pytest.raises(ApiError):
        await api.dev_get("runners/4d0c2a0e-0000-4000-8000-000000000000/commands")


# --- stop and restart with the state kept ----------------------------------------------------

RESTART_CONFIG = DevServerConfig(poll_hold_seconds=30.0, reaper_interval_seconds=0.1, stale_grace_seconds=0.5)


async def test_restart_keeps_runners_commands_and_results(tmp_path: Path) -> None:
    state_file = tmp_path / "devserver.json"
    server = DevServer(config=RESTART_CONFIG, state_file=state_file).start()
    port = server.port
    try:
        async with DevClient(server.url, request_timeout=5, poll_timeout=40) as api:
            runner_id = await api.dev_create_runner("kept", bridge_key=b"k" * 32)
            await api.heartbeat(runner_id, ["bridge"])
            quick = await api.submit_command(runner_id, "ReadFile", {"path": "q"}, timeout_seconds=1)
            done = await api.submit_command(runner_id, "ReadFile", {"path": "d"}, timeout_seconds=60)
            assert len(await api.poll(runner_id, 2)) == 2
            await api.report(runner_id, done, COMPLETED)
            pending = await api.submit_command(runner_id, "ReadFile", {"path": "p"})
            await set_profile(api, error_rate=0.5, seed=11, routes=["heartbeat"])
            held: list[object] = []

            async def hold_a_poll() -> None:  # nothing pending: held until the server stops
                held.append(await api.poll(runner_id, 1))

            await api.poll(runner_id, 1)  # takes `pending`
            async with anyio.create_task_group() as tg:
                tg.start_soon(hold_a_poll)
                await anyio.sleep(0.3)
                started = time.monotonic()
                await anyio.to_thread.run_sync(server.stop)
                assert time.monotonic() - started < 5  # the held poll did not hold the stop
            assert held == [[]]  # it was answered, empty, as the server stopped
            assert json.loads(state_file.read_text())["runners"][0]["bridge_key"]
            assert state_file.stat().st_mode & 0o777 == 0o600

            with pytest.raises(TransportError):  # nobody listens in between
                await api.get_runner(runner_id)

            server = DevServer("127.0.0.1", port, RESTART_CONFIG, state_file=state_file).start()
            assert server.loaded
            runner = await api.get_runner(runner_id)  # the same client carries on
            assert (runner.name, runner.capabilities) == ("kept", ["bridge"])
            record = await api.get_command(runner_id, done)
            assert (record.status, record.result) == ("completed", {"ok": True})
            with pytest.raises(AlreadyReported):
                await api.report(runner_id, done, COMPLETED)
            await api.report(runner_id, pending, COMPLETED)
            # The picked-up command's timeout kept running across the restart: the reaper ends it.
            await until(lambda: command_status_is(api, runner_id, quick, "timed_out"), 10)
            # Later commands are still signed with the kept bridge key.
            later = await api.submit_command(runner_id, "ReadFile", {"path": "l"})
            later_args = (await api.get_command(runner_id, later)).args
            assert later_args is not None and "_hmac" in later_args
            commands = await listed(api, runner_id)
            assert [commands[c]["status"] for c in (quick, done, pending, later)] == [
                "timed_out",
                "completed",
                "completed",
                "pending",
            ]
            assert commands[done]["accepted_reports"] == 1 and commands[done]["report_attempts"] == 2
            stats = await api.dev_get(f"runners/{runner_id}/stats")
            assert stats["reports_accepted"] == 2 and stats["polls"] >= 3
            view = await api.dev_get("faults")
            assert view["profile"]["error_rate"] == 0.5  # the fault profile is kept too
    finally:
        server.stop()


async def test_an_unreadable_state_file_fails_the_start_and_is_kept(tmp_path: Path) -> None:
    state_file = tmp_path / "devserver.json"
    state_file.write_text("{not json")
    server = DevServer(state_file=state_file)
    with pytest.raises(RuntimeError):
        server.start()
    server.stop()
    assert state_file.read_text() == "{not json"


def start_cli_devserver(*flags: str) -> subprocess.Popen[str]:
    """``runner-daemon devserver`` in a process of its own; its stdout is read by the test."""
    command = [sys.executable, "-m", "runner_daemon", "devserver", "--port", "0", *flags]
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=environ_without_settings(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_cli_flags_and_state_file(tmp_path: Path) -> None:
    state_file = tmp_path / "cli-state.json"
    flags = ["--create-runner", "1", "--state-file", str(state_file), "--fault-error-rate", "1"]
    proc = start_cli_devserver(*flags, "--fault-routes", "heartbeat", "--fault-seed", "4")
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while not lines or "listening on" not in lines[-1]:
            line = await anyio.to_thread.run_sync(proc.stdout.readline)
            assert line, f"the dev server exited: {proc.poll()}"
            lines.append(line)
        runner_id = lines[0].split()[-1]
        url = lines[-1].split()[-1]
        async with DevClient(url) as api:
            with pytest.raises(ServerError):
                await api.heartbeat(runner_id, ["bridge"])
            view = await api.dev_get("faults")
            assert (view["profile"]["error_rate"], view["profile"]["seed"]) == (1.0, 4)
            await api.get_runner(runner_id)
        proc.send_signal(signal.SIGTERM)
        await anyio.to_thread.run_sync(lambda: proc.communicate(timeout=30))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    saved = json.loads(state_file.read_text())
    assert [r["id"] for r in saved["runners"]] == [runner_id]
    assert saved["injector"]["counters"]["error"] == 1


async def test_bad_fault_flags_are_a_usage_error() -> None:
    proc = start_cli_devserver("--fault-routes", "nope")
    _, err = await anyio.to_thread.run_sync(lambda: proc.communicate(timeout=30))
    assert proc.returncode == 2 and "routes" in err


async def test_raw_httpx_sees_a_reset_as_a_read_error(
    devserver: DevServer, api: DevClient, runner_id: str
) -> None:
    await set_profile(api, reset_rate=1.0, routes=["runner"])
    async with httpx.AsyncClient(base_url=devserver.url) as raw:
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            await raw.get(f"v1/private/local-runners/{runner_id}")
