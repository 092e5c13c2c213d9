"""The dev server speaks Opik's wire format: status codes, holds, the reaper, both prefixes."""

from __future__ import annotations

import time

import anyio
import httpx
import pytest

from runner_daemon.client import RunnerApi
from runner_daemon.devserver.server import DevServer, DevServerConfig
from runner_daemon.errors import (
    AlreadyReported,
    Conflict,
    RateLimited,
    RequestRejected,
    RunnerEvicted,
    RunnerGone,
)
from runner_daemon.models import ResultReport
from tests.support import command_status_is, until

pytestmark = pytest.mark.anyio


async def polls_open(api: RunnerApi, runner_id: str, count: int) -> bool:
    """Whether the server is handling ``count`` polls of the runner right now."""
    return bool((await api.dev_get(f"runners/{runner_id}/stats"))["polls_open"] == count)


COMPLETED = ResultReport(status="completed", result={"ok": True}).model_dump_json().encode()


async def test_routes_answer_with_and_without_the_api_prefix(devserver: DevServer, runner_id: str) -> None:
    bare = devserver.url.removesuffix("api/")
    async with RunnerApi(bare) as client:
        await client.heartbeat(runner_id, ["bridge"])
        assert (await client.get_runner(runner_id)).status == "connected"
    async with RunnerApi(devserver.url) as client:
        runner = await client.get_runner(runner_id)
    assert (runner.status, runner.capabilities) == ("connected", ["bridge"])


async def test_submit_needs_an_alive_runner_with_the_bridge_capability(
    api: RunnerApi, runner_id: str
) -> None:
    with pytest.raises(RunnerGone):
        await api.submit_command(runner_id, "ReadFile", {"path": "a"})  # never heartbeated
    await api.heartbeat(runner_id, ["jobs"])
    with pytest.raises(Conflict):
        await api.submit_command(runner_id, "ReadFile", {"path": "a"})
    await api.heartbeat(runner_id, ["bridge"])
    assert await api.submit_command(runner_id, "ReadFile", {"path": "a"})


async def test_submit_limits(devserver: DevServer, api: RunnerApi, runner_id: str) -> None:
    await api.heartbeat(runner_id, ["bridge"])
    with pytest.raises(RequestRejected):
        await api.submit_command(runner_id, "WriteFile", {"content": "x" * 1_048_577})
    command_id = await api.submit_command(runner_id, "ReadFile", {"path": "a"}, timeout_seconds=999)
    record = await api.get_command(runner_id, command_id)
    assert (record.status, record.timeout_seconds) == ("pending", 120)
    assert (
        await api.get_command(runner_id, await api.submit_command(runner_id, "X", {}))
    ).timeout_seconds == 30
    for _ in range(48):
        await api.submit_command(runner_id, "ReadFile", {"path": "a"})
    with pytest.raises(RateLimited):
        await api.submit_command(runner_id, "ReadFile", {"path": "a"})


async def test_long_poll_holds_then_answers_empty(
    devserver: DevServer, api: RunnerApi, runner_id: str
) -> None:
    await api.heartbeat(runner_id, ["bridge"])
    started = time.monotonic()
    assert await api.poll(runner_id, 5) == []
    assert time.monotonic() - started >= 0.9  # the fixture's hold is 1 s


@pytest.mark.parametrize("devserver_config", [DevServerConfig(poll_hold_seconds=60)])
async def test_long_poll_returns_as_soon_as_a_command_arrives(api: RunnerApi, runner_id: str) -> None:
    await api.heartbeat(runner_id, ["bridge"])
    items: list[object] = []

    async def poll() -> None:
        items.extend(await api.poll(runner_id, 5))

    with anyio.fail_after(30):  # well before the hold ends
        async with anyio.create_task_group() as tg:
            tg.start_soon(poll)
            await until(lambda: polls_open(api, runner_id, 1))
            command_id = await api.submit_command(runner_id, "ReadFile", {"path": "a"}, timeout_seconds=7)
    assert len(items) == 1
    item = items[0]
    assert isinstance(item, dict)
    assert set(item) == {"command_id", "type", "args", "timeout_seconds", "submitted_at"}
    assert (item["command_id"], item["type"], item["args"], item["timeout_seconds"]) == (
        command_id,
        "ReadFile",
        {"path": "a"},
        7,
    )
    assert (await api.get_command(runner_id, command_id)).status == "picked_up"


async def test_poll_honours_max_commands_and_never_hands_out_twice(api: RunnerApi, runner_id: str) -> None:
    await api.heartbeat(runner_id, ["bridge"])
    ids = {await api.submit_command(runner_id, "ReadFile", {"path": "a"}) for _ in range(5)}
    first = await api.poll(runner_id, 3)
    second = await api.poll(runner_id, 3)
    assert len(first) == 3 and len(second) == 2
    assert {item["command_id"] for item in first + second} == ids


async def test_report_rules(api: RunnerApi, runner_id: str) -> None:
    await api.heartbeat(runner_id, ["bridge"])
    command_id = await api.submit_command(runner_id, "ReadFile", {"path": "a"})
    for bad in (b'{"status": "done", "result": {}}', b'{"status": "completed"}', b"[1]", b"{not json"):
        with pytest.raises(RequestRejected):
            await api.report(runner_id, command_id, bad, conflict=AlreadyReported)
    with pytest.raises(RunnerGone):
        await api.report(
            runner_id, "4d0c2a0e-0000-4000-8000-000000000000", COMPLETED, conflict=AlreadyReported
        )
    await api.report(runner_id, command_id, COMPLETED, conflict=AlreadyReported)
    with pytest.raises(AlreadyReported):
        await api.report(runner_id, command_id, COMPLETED, conflict=AlreadyReported)
    record = await api.get_command(runner_id, command_id)
    assert (record.status, record.result, record.completed_at is not None) == (
        "completed",
        {"ok": True},
        True,
    )


async def test_unreported_commands_time_out_and_late_reports_are_409(api: RunnerApi, runner_id: str) -> None:
    await api.heartbeat(runner_id, ["bridge"])
    command_id = await api.submit_command(runner_id, "ReadFile", {"path": "a"}, timeout_seconds=1)
    assert len(await api.poll(runner_id, 1)) == 1
    # The fixture's stale grace is 1 s: timed out about 2 s after pick-up.
    await until(lambda: command_status_is(api, runner_id, command_id, "timed_out"), 10)
    with pytest.raises(AlreadyReported):
        await api.report(runner_id, command_id, COMPLETED, conflict=AlreadyReported)


async def test_get_with_wait_returns_when_terminal(api: RunnerApi, runner_id: str) -> None:
    await api.heartbeat(runner_id, ["bridge"])
    command_id = await api.submit_command(runner_id, "ReadFile", {"path": "a"})
    async with anyio.create_task_group() as tg:

        async def report_later() -> None:
            await anyio.sleep(0.3)
            await api.report(runner_id, command_id, COMPLETED, conflict=AlreadyReported)

        tg.start_soon(report_later)
        record = await api.get_command(runner_id, command_id, wait=5)
    assert record.status == "completed"


async def test_disconnect_fails_open_commands_then_404_and_410(api: RunnerApi, runner_id: str) -> None:
    await api.heartbeat(runner_id, ["bridge"])
    command_id = await api.submit_command(runner_id, "ReadFile", {"path": "a"})
    await api.disconnect(runner_id)
    await api.disconnect(runner_id)  # idempotent 204
    with pytest.raises(RunnerEvicted):
        await api.heartbeat(runner_id, ["bridge"])
    for call in (api.get_runner(runner_id), api.poll(runner_id, 1), api.get_command(runner_id, command_id)):
        with pytest.raises(RunnerGone) as info:
            await call
        assert info.value.status == 404


class FakeClock:
    """A monotonic clock that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_heartbeat_revives_a_runner_whose_ttl_lapsed() -> None:
    clock = FakeClock()
    with DevServer(config=DevServerConfig(heartbeat_ttl_seconds=15), clock=clock) as server:
        async with RunnerApi(server.url) as client:
            runner_id = await client.dev_create_runner()
            await client.heartbeat(runner_id, ["bridge"])
            assert (await client.get_runner(runner_id)).status == "connected"
            clock.now += 16
            assert (await client.get_runner(runner_id)).status == "disconnected"
            with pytest.raises(RunnerGone):
                await client.submit_command(runner_id, "ReadFile", {"path": "a"})
            await client.heartbeat(runner_id, ["bridge"])
            assert (await client.get_runner(runner_id)).status == "connected"


@pytest.mark.parametrize("devserver_config", [DevServerConfig(poll_hold_seconds=60)])
async def test_a_poll_whose_client_hung_up_picks_nothing_up(api: RunnerApi, runner_id: str) -> None:
    await api.heartbeat(runner_id, ["bridge"])
    async with anyio.create_task_group() as tg:
        tg.start_soon(api.poll, runner_id, 5)
        await until(lambda: polls_open(api, runner_id, 1))
        tg.cancel_scope.cancel()  # the client hangs up while the server holds its poll
    await until(lambda: polls_open(api, runner_id, 0))  # the server saw it and ended the poll
    command_id = await api.submit_command(runner_id, "ReadFile", {"path": "a"})
    assert (await api.get_command(runner_id, command_id)).status == "pending"
    assert (await api.dev_get(f"runners/{runner_id}/stats"))["polls"] == 1


async def test_bad_capabilities_are_400(devserver: DevServer, runner_id: str) -> None:
    async with httpx.AsyncClient(base_url=devserver.url) as raw:
        response = await raw.post(
            f"v1/private/local-runners/{runner_id}/heartbeats", json={"capabilities": ["Bridge!"]}
        )
    assert response.status_code == 400
    assert response.json() == {"errors": ["capabilities must be names matching [a-z_]+"]}
