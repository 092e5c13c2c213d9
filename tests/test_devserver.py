"""The dev server speaks Opik's wire format: status codes, holds, the reaper, both prefixes."""

from __future__ import annotations

import base64
import gzip
import json
import secrets
import time
import uuid

import anyio
import httpx
import pytest

from runner_daemon.core.api import RunnerApi
from runner_daemon.core.errors import (
    AlreadyReported,
    Conflict,
    RateLimited,
    RequestRejected,
    RunnerEvicted,
    RunnerGone,
)
from runner_daemon.core.models import PairingActivation, PairingSessionRequest, ResultReport
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.server import DevServer, DevServerConfig
from runner_daemon.service.pairing import activation_hmac
from tests.support import command_status_is, until

pytestmark = pytest.mark.anyio


async def polls_open(api: DevClient, runner_id: str, count: int) -> bool:
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
    api: DevClient, runner_id: str
) -> None:
    with pytest.raises(RunnerGone):
        await api.submit_command(runner_id, "ReadFile", {"path": "a"})  # never heartbeated
    await api.heartbeat(runner_id, ["jobs"])
    with pytest.raises(Conflict):
        await api.submit_command(runner_id, "ReadFile", {"path": "a"})
    await api.heartbeat(runner_id, ["bridge"])
    assert await api.submit_command(runner_id, "ReadFile", {"path": "a"})


async def test_submit_limits(devserver: DevServer, api: DevClient, runner_id: str) -> None:
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
    devserver: DevServer, api: DevClient, runner_id: str
) -> None:
    await api.heartbeat(runner_id, ["bridge"])
    started = time.monotonic()
    assert await api.poll(runner_id, 5) == []
    assert time.monotonic() - started >= 0.9  # the fixture's hold is 1 s


@pytest.mark.parametrize("devserver_config", [DevServerConfig(poll_hold_seconds=60)])
async def test_long_poll_returns_as_soon_as_a_command_arrives(api: DevClient, runner_id: str) -> None:
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


async def test_poll_honours_max_commands_and_never_hands_out_twice(api: DevClient, runner_id: str) -> None:
    await api.heartbeat(runner_id, ["bridge"])
    ids = {await api.submit_command(runner_id, "ReadFile", {"path": "a"}) for _ in range(5)}
    first = await api.poll(runner_id, 3)
    second = await api.poll(runner_id, 3)
    assert len(first) == 3 and len(second) == 2
    assert {item["command_id"] for item in first + second} == ids


async def test_report_rules(api: DevClient, runner_id: str) -> None:
    await api.heartbeat(runner_id, ["bridge"])
    command_id = await api.submit_command(runner_id, "ReadFile", {"path": "a"})
    for bad in (b'{"status": "done", "result": {}}', b'{"status": "completed"}', b"[1]", b"{not json"):
        with pytest.raises(RequestRejected):
            await api.report(runner_id, command_id, bad)
    with pytest.raises(RunnerGone):
        await api.report(runner_id, "4d0c2a0e-0000-4000-8000-000000000000", COMPLETED)
    await api.report(runner_id, command_id, COMPLETED)
    with pytest.raises(AlreadyReported):
        await api.report(runner_id, command_id, COMPLETED)
    record = await api.get_command(runner_id, command_id)
    assert (record.status, record.result, record.completed_at is not None) == (
        "completed",
        {"ok": True},
        True,
    )


async def test_unreported_commands_time_out_and_late_reports_are_409(api: DevClient, runner_id: str) -> None:
    await api.heartbeat(runner_id, ["bridge"])
    command_id = await api.submit_command(runner_id, "ReadFile", {"path": "a"}, timeout_seconds=1)
    assert len(await api.poll(runner_id, 1)) == 1
    # The fixture's stale grace is 1 s: timed out about 2 s after pick-up.
    await until(lambda: command_status_is(api, runner_id, command_id, "timed_out"), 10)
    with pytest.raises(AlreadyReported):
        await api.report(runner_id, command_id, COMPLETED)


async def test_get_with_wait_returns_when_terminal(api: DevClient, runner_id: str) -> None:
    await api.heartbeat(runner_id, ["bridge"])
    command_id = await api.submit_command(runner_id, "ReadFile", {"path": "a"})
    async with anyio.create_task_group() as tg:

        async def report_later() -> None:
            await anyio.sleep(0.3)
            await api.report(runner_id, command_id, COMPLETED)

        tg.start_soon(report_later)
        record = await api.get_command(runner_id, command_id, wait=5)
    assert record.status == "completed"


async def test_disconnect_fails_open_commands_then_404_and_410(api: DevClient, runner_id: str) -> None:
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
        async with DevClient(server.url) as client:
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
async def test_a_poll_whose_client_hung_up_picks_nothing_up(api: DevClient, runner_id: str) -> None:
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


async def heartbeat_status(devserver: DevServer, runner_id: str, workspace: str | None = None) -> int:
    headers = {"Comet-Workspace": workspace} if workspace else None
    async with httpx.AsyncClient(base_url=devserver.url, headers=headers) as raw:
        response = await raw.post(
            f"v1/private/local-runners/{runner_id}/heartbeats", json={"capabilities": ["bridge"]}
        )
    return response.status_code


async def test_a_heartbeat_for_a_runner_the_caller_does_not_own_is_410_never_404(
    devserver: DevServer, api: DevClient
) -> None:
    assert await heartbeat_status(devserver, str(uuid.uuid4())) == 410  # never existed
    deleted, evicted, theirs = [await api.dev_create_runner() for _ in range(3)]
    await api.disconnect(deleted)
    await api.dev_post(f"runners/{evicted}/evict", {})
    assert await heartbeat_status(devserver, deleted) == 410
    assert await heartbeat_status(devserver, evicted) == 410
    session = await api.create_pairing_session(
        PairingSessionRequest(
            project_id=str(uuid.uuid4()), activation_key=base64.b64encode(bytes(32)).decode()
        )
    )
    assert await heartbeat_status(devserver, session.runner_id) == 410  # not approved yet
    # Another workspace's runner: 410 to its heartbeats, 404 elsewhere, and its DELETE is a no-op.
    assert await heartbeat_status(devserver, theirs, workspace="other-team") == 410
    async with DevClient(devserver.url, workspace="other-team") as other:
        with pytest.raises(RunnerGone) as info:
            await other.get_runner(theirs)
        assert info.value.status == 404
        await other.disconnect(theirs)
        with pytest.raises(RunnerGone):
            await other.submit_command(theirs, "ReadFile", {"path": "a"})
    assert await heartbeat_status(devserver, theirs) == 200  # still the owner's, alive
    async with RunnerApi(devserver.url, workspace="default") as owner:  # the header a local Opik assumes
        assert (await owner.get_runner(theirs)).status == "connected"


@pytest.mark.parametrize(
    "content",
    [b"", b"{}", b'{"capabilities": null}', b'{"capabilities": []}'],
    ids=["none", "{}", "null", "[]"],
)
async def test_a_heartbeat_without_capabilities_keeps_the_stored_ones(
    devserver: DevServer, api: DevClient, runner_id: str, content: bytes
) -> None:
    url = f"v1/private/local-runners/{runner_id}/heartbeats"
    async with httpx.AsyncClient(base_url=devserver.url) as raw:
        assert (await raw.post(url, content=content)).status_code == 200
        assert (await api.get_runner(runner_id)).capabilities == ["jobs"]  # never sent a list
        await api.heartbeat(runner_id, ["bridge"])
        assert (await raw.post(url, content=content)).status_code == 200
        assert (await api.get_runner(runner_id)).capabilities == ["bridge"]
        assert await api.submit_command(runner_id, "ReadFile", {"path": "a"})  # 201, not 409
        for bad in ({"capabilities": "bridge"}, ["bridge"]):
            assert (await raw.post(url, json=bad)).status_code == 400
    await api.heartbeat(runner_id, ["jobs"])  # a non-empty list replaces them
    with pytest.raises(Conflict):
        await api.submit_command(runner_id, "ReadFile", {"path": "a"})


async def _paired(api: DevClient, project_id: str, kind: str = "connect") -> str:
    """A runner paired and approved as the browser does; its id."""
    key = secrets.token_bytes(32)
    request = PairingSessionRequest(project_id=project_id, activation_key=base64.b64encode(key).decode())
    session = await api.create_pairing_session(request.model_copy(update={"type": kind}))
    hmac = activation_hmac(key, session.session_id, "laptop")
    await api.activate_pairing_session(session.session_id, PairingActivation(runner_name="laptop", hmac=hmac))
    return session.runner_id


async def test_activating_a_newer_pairing_evicts_the_older_runner_of_its_type_and_project(
    devserver: DevServer, api: DevClient
) -> None:
    project = str(uuid.uuid4())
    older = await _paired(api, project)
    endpoint = await _paired(api, project, "endpoint")
    elsewhere = await _paired(api, str(uuid.uuid4()))
    await api.heartbeat(older, ["bridge"])
    command_id = await api.submit_command(older, "ReadFile", {"path": "a"})
    newer = await _paired(api, project)
    assert await heartbeat_status(devserver, older) == 410
    with pytest.raises(RunnerGone) as info:
        await api.get_runner(older)
    assert info.value.status == 404
    record = next(c for c in await api.dev_get(f"runners/{older}/commands") if c["command_id"] == command_id)
    assert record["status"] == "timed_out"
    for alive in (newer, endpoint, elsewhere):
        assert await heartbeat_status(devserver, alive) == 200
    assert (await api.get_runner(endpoint)).type == "endpoint"


async def test_pairing_activation_answers_201_with_the_runner_location(
    devserver: DevServer, api: DevClient
) -> None:
    key = secrets.token_bytes(32)
    session = await api.create_pairing_session(
        PairingSessionRequest(project_id=str(uuid.uuid4()), activation_key=base64.b64encode(key).decode())
    )
    body = {"runner_name": "laptop", "hmac": activation_hmac(key, session.session_id, "laptop")}
    async with httpx.AsyncClient(base_url=devserver.url) as raw:
        response = await raw.post(f"v1/private/pairing/sessions/{session.session_id}/activate", json=body)
        assert response.status_code == 201
        location = response.headers["Location"]
        assert location == f"{devserver.url}v1/private/local-runners/{session.runner_id}"
        assert (await raw.get(location)).json()["id"] == session.runner_id


async def post_gzip(raw: httpx.AsyncClient, url: str, body: object) -> httpx.Response:
    """POST ``body`` as Opik's client does: JSON, gzipped, ``Content-Encoding: gzip``."""
    content = gzip.compress(json.dumps(body).encode(), compresslevel=6)
    return await raw.post(url, content=content, headers={"Content-Encoding": "gzip"})


async def test_gzip_request_bodies_are_accepted_as_opik_does(
    devserver: DevServer, api: DevClient, runner_id: str
) -> None:
    """Opik's own client gzips every JSON body of 256 bytes or more."""
    base = f"v1/private/local-runners/{runner_id}"
    async with httpx.AsyncClient(base_url=devserver.url) as raw:
        response = await post_gzip(raw, f"{base}/heartbeats", {"capabilities": ["bridge"]})
        assert response.status_code == 200
        args = {"path": "a" * 400}
        response = await post_gzip(raw, f"{base}/bridge/commands", {"type": "ReadFile", "args": args})
        assert response.status_code == 201
        command_id = response.json()["command_id"]
        assert (await api.get_command(runner_id, command_id)).args == args
        assert len(await api.poll(runner_id, 1)) == 1
        report = {"status": "completed", "result": {"text": "b" * 400}}
        response = await post_gzip(raw, f"{base}/bridge/commands/{command_id}/results", report)
        assert response.status_code == 204
    assert (await api.get_command(runner_id, command_id)).result == report["result"]


def _zeros_gzip(mebibytes: int) -> bytes:
    """That many MiB of zero bytes as gzip members one after another (a valid gzip stream)."""
    return gzip.compress(bytes(1 << 20), compresslevel=9) * mebibytes


@pytest.mark.adversarial
async def test_a_gzip_bomb_is_refused_at_the_payload_cap_and_bad_gzip_is_400(
    devserver: DevServer, api: DevClient, runner_id: str
) -> None:
    await api.heartbeat(runner_id, ["bridge"])
    url = f"v1/private/local-runners/{runner_id}/bridge/commands"
    gzipped = {"Content-Encoding": "gzip"}
    bomb = _zeros_gzip(1024)  # 1 GiB inflated from about 1 MiB, under the wire limit
    async with httpx.AsyncClient(base_url=devserver.url, timeout=60) as raw:
        response = await raw.post(url, content=bomb, headers=gzipped)
        assert response.status_code == 413
        truncated = gzip.compress(b'{"type": "ReadFile", "args": {}}')[:-6]
        for bad in (b"not gzip at all", truncated):
            response = await raw.post(url, content=bad, headers=gzipped)
            assert response.status_code == 400
        response = await raw.post(url, content=b"x" * (devserver.state.config.max_body_bytes + 1))
    assert response.status_code == 413
    assert await api.submit_command(runner_id, "ReadFile", {"path": "a"})  # the server is fine
