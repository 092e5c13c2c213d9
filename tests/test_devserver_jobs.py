"""The dev server speaks jobs as Opik does (../shared/JOBS.md): one test per semantic."""

from __future__ import annotations

import base64
import gzip
import json
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from runner_daemon.core.errors import Conflict, JobGone, RateLimited, RequestRejected, RunnerGone, ServerError
from runner_daemon.core.ids import uuid7, uuid7_millis
from runner_daemon.core.models import (
    Agent,
    AgentParam,
    JobReport,
    LogEntry,
    PairingActivation,
    PairingSessionRequest,
)
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.server import DevServer, DevServerConfig
from runner_daemon.service.pairing import activation_hmac
from tests.support import until

pytestmark = pytest.mark.anyio

# Read at import: the suite's autouse fixture clears RUNNER_DAEMON_* before each test.
OPIK_PYTHON = Path(os.environ.get("RUNNER_DAEMON_TEST_OPIK_PYTHON", "/tmp/opikvenv/bin/python"))
ECHO = {"echo": Agent(description="echoes", params=[AgentParam(name="text", type="string")])}


class FakeClock:
    """The monotonic clock, plus however far a test moved it on (the TTL, the reaper)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def devserver_config() -> DevServerConfig:
    return DevServerConfig(
        poll_hold_seconds=1.0,
        reaper_interval_seconds=0.2,
        stale_grace_seconds=1.0,
        jobs_poll_hold_seconds=0.3,
        job_reaper_interval_seconds=0.05,
    )


@pytest.fixture
def devserver(devserver_config: DevServerConfig, clock: FakeClock) -> Iterator[DevServer]:
    with DevServer(config=devserver_config, clock=clock) as server:
        yield server


@pytest.fixture
async def raw(devserver: DevServer) -> AsyncIterator[httpx.AsyncClient]:
    """The wire itself, for what DevClient hides: status codes, headers, literal bodies."""
    async with httpx.AsyncClient(base_url=devserver.url, timeout=10) as client:
        yield client


async def endpoint_runner(
    api: DevClient, agents: dict[str, Agent] | None = None, project_id: str | None = None
) -> tuple[str, str]:
    """An endpoint runner with agents, alive; its id and project."""
    project_id = project_id or str(uuid.uuid4())
    runner_id = await api.dev_create_runner("jobs", type="endpoint", project_id=project_id)
    await api.put_agents(runner_id, ECHO if agents is None else agents)
    await api.heartbeat(runner_id, ["jobs"])
    return runner_id, project_id


def errors(answer: httpx.Response) -> list[str]:
    body: list[str] = answer.json()["errors"]
    return body


def report(status: str, **fields: Any) -> bytes:
    return JobReport.model_validate({"status": status, **fields}).model_dump_json(exclude_none=True).encode()


async def test_uuid7_carries_version_variant_and_now() -> None:
    value = uuid7()
    parsed = uuid.UUID(value)
    assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
    assert abs(uuid7_millis(value) - time.time() * 1000) < 60_000
    assert uuid7_millis(uuid7(unix_ms=1234)) == 1234
    with pytest.raises(ValueError):
        uuid7_millis(str(uuid.uuid4()))


async def test_dev_runners_take_a_type(api: DevClient) -> None:
    assert (await api.get_runner(await api.dev_create_runner())).type == "connect"
    assert (await api.get_runner(await api.dev_create_runner(type="endpoint"))).type == "endpoint"
    with pytest.raises(RequestRejected):
        await api.dev_create_runner(type="bridge")


async def test_create_answers_201_with_location_and_no_body(api: DevClient, raw: httpx.AsyncClient) -> None:
    runner_id, project = await endpoint_runner(api)
    answer = await raw.post(
        "v1/private/local-runners/jobs",
        json={"agent_name": "echo", "project_id": project, "inputs": {"a": 1}},
    )
    assert (answer.status_code, answer.content) == (201, b"")
    prefix = str(raw.base_url.join("v1/private/local-runners/jobs/"))
    assert answer.headers["Location"].startswith(prefix)
    job_id = answer.headers["Location"].removeprefix(prefix)
    assert uuid.UUID(job_id).version == 7
    job = await api.get_job(job_id)
    assert (job.status, job.runner_id, job.inputs, job.project_id) == (
        "pending",
        runner_id,
        {"a": 1},
        project,
    )
    assert job.started_at is None and job.created_at is not None
    assert await api.create_job(project, "echo") != job_id  # DevClient reads the same Location


async def test_create_errors_come_in_opik_order(api: DevClient, raw: httpx.AsyncClient) -> None:
    project = str(uuid.uuid4())
    url = "v1/private/local-runners/jobs"
    for invalid in ({"agent_name": " ", "project_id": project}, {"agent_name": "echo", "project_id": "x"}):
        assert (await raw.post(url, json=invalid)).status_code == 422
    body = {"agent_name": "nope", "project_id": project}
    await api.dev_create_runner(type="connect", project_id=project)  # a connect runner gets no jobs
    answer = await raw.post(url, json=body)
    assert (answer.status_code, errors(answer)) == (
        404,
        ["No runner configured. Pair one from the Runners page."],
    )
    runner_id = await api.dev_create_runner(type="endpoint", project_id=project)
    answer = await raw.post(url, json=body)  # never beat: not alive, whatever the agent
    assert (answer.status_code, errors(answer)) == (
        409,
        ["Your runner is not connected. Start it with: opik connect"],
    )
    await api.heartbeat(runner_id, ["jobs"])
    answer = await raw.post(url, json=body)
    assert (answer.status_code, errors(answer)) == (400, ["Agent 'nope' is not registered on this runner"])
    await api.put_agents(runner_id, ECHO)
    for _ in range(100):
        await api.create_job(project, "echo")
    answer = await raw.post(url, json={**body, "agent_name": "echo"})
    assert (answer.status_code, errors(answer)) == (429, ["Too many pending jobs for this runner"])
    with pytest.raises(RateLimited):
        await api.create_job(project, "echo")


async def test_job_timeout_is_the_agents_else_1800(api: DevClient) -> None:
    agents = {"quick": Agent(timeout=5), "plain": Agent()}
    _, project = await endpoint_runner(api, agents)
    assert (await api.get_job(await api.create_job(project, "quick"))).timeout == 5
    assert (await api.get_job(await api.create_job(project, "plain"))).timeout == 1800


async def test_next_holds_then_answers_literal_null(api: DevClient, raw: httpx.AsyncClient) -> None:
    runner_id, _ = await endpoint_runner(api)
    answer = await raw.post(f"v1/private/local-runners/{runner_id}/jobs/next")
    assert (answer.status_code, answer.content) == (200, b"null")
    assert await api.next_job(runner_id) is None
    with pytest.raises(RunnerGone):
        await api.next_job(str(uuid.uuid4()))


async def test_next_hands_out_the_oldest_job_already_running(api: DevClient) -> None:
    runner_id, project = await endpoint_runner(api)
    first, second = [await api.create_job(project, "echo", {"text": str(n)}) for n in range(2)]
    job = await api.next_job(runner_id)
    assert job is not None and (job.id, job.status, job.inputs) == (first, "running", {"text": "0"})
    assert job.started_at is not None and job.timeout == 1800
    assert (await api.get_job(first)).status == "running"
    assert (await api.get_job(second)).status == "pending"


async def test_next_wakes_up_when_a_job_is_queued(devserver: DevServer) -> None:
    config = DevServerConfig(jobs_poll_hold_seconds=60)
    with DevServer(config=config) as server:
        async with DevClient(server.url) as api:
            runner_id, project = await endpoint_runner(api)
            taken: list[Any] = []
            async with anyio.create_task_group() as tg:

                async def poll() -> None:
                    taken.append(await api.next_job(runner_id))

                tg.start_soon(poll)
                job_id = await api.create_job(project, "echo")
        assert taken[0] is not None and taken[0].id == job_id


async def test_an_older_server_answers_204(clock: FakeClock) -> None:
    with DevServer(config=DevServerConfig(jobs_poll_hold_seconds=0.1, jobs_next_answers_204=True)) as server:
        async with httpx.AsyncClient(base_url=server.url) as raw, DevClient(server.url) as api:
            runner_id, _ = await endpoint_runner(api)
            answer = await raw.post(f"v1/private/local-runners/{runner_id}/jobs/next")
            assert (answer.status_code, answer.content) == (204, b"")
            assert await api.next_job(runner_id) is None


async def test_a_connect_runner_never_gets_jobs_nor_cancels(api: DevClient, raw: httpx.AsyncClient) -> None:
    runner_id = await api.dev_create_runner()
    assert (await api.heartbeat(runner_id, ["jobs"])).cancelled_job_ids == []
    answer = await raw.post(f"v1/private/local-runners/{runner_id}/jobs/next")
    assert (answer.status_code, answer.content) == (200, b"null")


async def test_a_running_report_keeps_the_status_and_a_late_one_is_ignored(
    api: DevClient, raw: httpx.AsyncClient
) -> None:
    runner_id, project = await endpoint_runner(api)
    job_id = await api.create_job(project, "echo")
    await api.next_job(runner_id)
    trace = uuid7()
    await api.report_job(job_id, report("running", trace_id=trace))
    job = await api.get_job(job_id)
    assert (job.status, job.trace_id, job.completed_at) == ("running", trace, None)
    await api.report_job(job_id, report("completed", result={"answer": 42}))
    job = await api.get_job(job_id)
    assert (job.status, job.result, job.trace_id) == ("completed", {"answer": 42}, trace)  # the trace stays
    assert job.completed_at is not None
    await api.report_job(job_id, report("failed", error="late"))  # 204, and nothing changes
    assert await api.get_job(job_id) == job
    for status in ("pending", "cancelled"):
        answer = await raw.post(f"v1/private/local-runners/jobs/{job_id}/results", json={"status": status})
        assert answer.status_code == 400
        assert errors(answer)[0].startswith("Invalid result status. Must be one of: [")
    with pytest.raises(JobGone):  # that job, not the runner: nothing else ends
        await api.report_job(uuid7(), report("completed"))


async def test_logs_append_in_order_and_read_from_an_offset(api: DevClient, raw: httpx.AsyncClient) -> None:
    runner_id, project = await endpoint_runner(api)
    job_id = await api.create_job(project, "echo")
    lines = [LogEntry(stream="stdout", text="one"), LogEntry(stream="stderr", text="two")]
    await api.post_job_logs(job_id, lines[:1])  # pending: no status check
    await api.next_job(runner_id)
    await api.post_job_logs(job_id, lines[1:])
    assert await api.job_logs(job_id) == lines
    assert await api.job_logs(job_id, 1) == lines[1:]
    assert await api.job_logs(job_id, 5) == []
    await api.report_job(job_id, report("completed", result={}))
    await api.post_job_logs(job_id, [LogEntry(stream="stdout", text="after")])  # finished: still kept
    assert [entry.text for entry in await api.job_logs(job_id)] == ["one", "two", "after"]
    url = f"v1/private/local-runners/jobs/{job_id}/logs"
    blank = [{"stream": "stdout", "text": "ok"}, {"stream": "stdout", "text": "  "}]
    assert (await raw.post(url, json=blank)).status_code == 422
    answer = await raw.post(url, json=[{"stream": "stdout", "text": "x"}] * 1001)
    assert (answer.status_code, errors(answer)) == (400, ["Too many log entries. Maximum per batch is 1000"])
    assert len(await api.job_logs(job_id)) == 3  # a refused batch adds nothing
    assert (await raw.get(url, params={"offset": "-1"})).status_code == 400


async def test_cancel_of_a_pending_job_is_never_delivered(api: DevClient) -> None:
    runner_id, project = await endpoint_runner(api)
    job_id = await api.create_job(project, "echo")
    await api.cancel_job(job_id)
    job = await api.get_job(job_id)
    assert (job.status, job.completed_at is not None) == ("cancelled", True)
    assert await api.next_job(runner_id) is None
    assert (await api.heartbeat(runner_id, ["jobs"])).cancelled_job_ids == []


async def test_cancel_of_a_running_job_reaches_exactly_one_heartbeat(api: DevClient) -> None:
    runner_id, project = await endpoint_runner(api)
    job_id = await api.create_job(project, "echo")
    await api.next_job(runner_id)
    await api.cancel_job(job_id)
    await api.cancel_job(job_id)  # a no-op on a terminal job
    assert (await api.get_job(job_id)).status == "cancelled"
    assert (await api.heartbeat(runner_id, ["jobs"])).cancelled_job_ids == [job_id]
    assert (await api.heartbeat(runner_id, ["jobs"])).cancelled_job_ids == []
    await api.report_job(job_id, report("completed", result={}))  # ignored
    await api.post_job_logs(job_id, [LogEntry(stream="stdout", text="bye")])  # accepted
    assert (await api.get_job(job_id)).status == "cancelled"
    assert len(await api.job_logs(job_id)) == 1
    with pytest.raises(RunnerGone):
        await api.cancel_job(uuid7())


async def test_agents_are_replaced_whole_and_capped_at_50(api: DevClient, raw: httpx.AsyncClient) -> None:
    runner_id, _ = await endpoint_runner(api, {"a": Agent(), "b": Agent(timeout=7)})
    agents = (await api.get_runner(runner_id)).agents
    assert [(a.name, a.timeout) for a in agents] == [("a", 0), ("b", 7)]
    await api.put_agents(runner_id, {"c": Agent(params=[AgentParam(name="q", type="string")])})
    runner = await api.get_runner(runner_id)
    assert [a.name for a in runner.agents] == ["c"]
    assert runner.agents[0].params == [AgentParam(name="q", type="string")]  # no presence: none read back
    await api.put_agents(runner_id, {})
    assert (await api.get_runner(runner_id)).agents == []
    answer = await raw.put(
        f"v1/private/local-runners/{runner_id}/agents", json={f"a{n}": {} for n in range(51)}
    )
    assert (answer.status_code, errors(answer)) == (400, ["Too many agents. Maximum is 50"])
    with pytest.raises(RunnerGone):
        await api.put_agents(str(uuid.uuid4()), {})


async def test_agents_are_listed_only_while_the_runner_is_connected(api: DevClient, clock: FakeClock) -> None:
    runner_id, _ = await endpoint_runner(api)
    assert [a.name for a in (await api.get_runner(runner_id)).agents] == ["echo"]
    clock.advance(16)  # past the 15 s heartbeat TTL
    runner = await api.get_runner(runner_id)
    assert (runner.status, runner.agents) == ("disconnected", [])
    await api.heartbeat(runner_id, ["jobs"])
    assert [a.name for a in (await api.get_runner(runner_id)).agents] == ["echo"]  # kept, no TTL


async def test_checklist_deep_merges_and_is_capped(api: DevClient, raw: httpx.AsyncClient) -> None:
    runner_id, _ = await endpoint_runner(api)
    await api.patch_checklist(runner_id, {"a": {"b": 1, "c": [1, 2]}, "x": "keep"})
    await api.patch_checklist(runner_id, {"a": {"c": [3], "d": None}})
    expected = {"a": {"b": 1, "c": [3], "d": None}, "x": "keep"}
    assert (await api.get_runner(runner_id)).checklist == expected

    def nested(depth: int, leaf: dict[str, Any]) -> dict[str, Any]:
        return leaf if depth == 0 else {"n": nested(depth - 1, leaf)}

    await api.patch_checklist(runner_id, nested(12, {"old": 1}))
    await api.patch_checklist(runner_id, nested(12, {"new": 2}))
    deep: Any = (await api.get_runner(runner_id)).checklist
    for _ in range(9):
        deep = deep["n"]
    assert deep == {"n": nested(2, {"new": 2})}  # merged 10 levels down, then replaced
    url = f"v1/private/local-runners/{runner_id}/checklist"
    answer = await raw.patch(url, json=["not", "an", "object"])
    assert (answer.status_code, errors(answer)) == (400, ["Checklist must be a JSON object"])
    before = (await api.get_runner(runner_id)).checklist
    answer = await raw.patch(url, json={"big": "x" * 1_048_576})
    assert answer.status_code == 400
    assert errors(answer)[0].startswith("Checklist too large: ") and errors(answer)[0].endswith(
        " bytes (max 1048576)"
    )
    assert (await api.get_runner(runner_id)).checklist == before  # refused whole


async def test_the_reaper_fails_a_running_job_past_its_timeout(api: DevClient, clock: FakeClock) -> None:
    runner_id, project = await endpoint_runner(api, {"slow": Agent(timeout=30)})
    job_id = await api.create_job(project, "slow")
    pending = await api.create_job(project, "slow")
    await api.next_job(runner_id)
    clock.advance(31)
    await until(lambda: _status_is(api, job_id, "failed"))
    job = await api.get_job(job_id)
    assert (job.error, job.completed_at is not None) == ("Job timed out after 30s", True)
    assert (await api.get_job(pending)).status == "pending"  # the timeout runs from the start


async def test_a_lapsed_heartbeat_fails_nothing(api: DevClient, clock: FakeClock) -> None:
    runner_id, project = await endpoint_runner(api)
    running = await api.create_job(project, "echo")
    pending = await api.create_job(project, "echo")
    await api.next_job(runner_id)
    clock.advance(16)
    with pytest.raises(Conflict):
        await api.create_job(project, "echo")
    assert (await api.get_job(running)).status == "running"
    assert (await api.get_job(pending)).status == "pending"
    await api.heartbeat(runner_id, ["jobs"])  # the same runner id comes back
    job = await api.next_job(runner_id)
    assert job is not None and job.id == pending


async def test_a_new_endpoint_pairing_evicts_only_the_older_endpoint_runner(api: DevClient) -> None:
    runner_id, project = await endpoint_runner(api)
    connect = await api.dev_create_runner(type="connect", project_id=project)
    running = await api.create_job(project, "echo")
    pending = await api.create_job(project, "echo")
    await api.next_job(runner_id)
    newer, _ = await endpoint_runner(api, project_id=project)
    for job_id in (running, pending):
        job = await api.get_job(job_id)
        assert (job.status, job.error) == ("failed", "Runner disconnected")
    with pytest.raises(RunnerGone):
        await api.next_job(runner_id)
    assert (await api.get_runner(connect)).type == "connect"  # never evicted by an endpoint
    assert (await api.get_job(await api.create_job(project, "echo"))).runner_id == newer


async def test_headless_endpoint_pairing_activates_without_a_bridge_key(
    devserver: DevServer, api: DevClient
) -> None:
    """The runner activates its own session (no browser); no bridge key; the connect runner stays."""
    project = str(uuid.uuid4())
    sessions = []
    for kind in ("connect", "endpoint", "endpoint"):
        key = secrets.token_bytes(32)
        request = PairingSessionRequest(
            project_id=project, activation_key=base64.b64encode(key).decode(), type=kind
        )
        session = await api.create_pairing_session(request)
        hmac = activation_hmac(key, session.session_id, "laptop")
        await api.activate_pairing_session(
            session.session_id, PairingActivation(runner_name="laptop", hmac=hmac)
        )
        sessions.append(session.runner_id)
    connect, older, newer = sessions
    runner = await api.get_runner(newer)
    assert (runner.type, runner.status) == ("endpoint", "connected")
    assert devserver.state.runners[newer].bridge_key is None
    assert devserver.state.runners[connect].bridge_key is not None
    assert (await api.get_runner(connect)).type == "connect"
    with pytest.raises(RunnerGone):
        await api.get_runner(older)


async def test_list_jobs_newest_first_by_project_and_page(api: DevClient, raw: httpx.AsyncClient) -> None:
    runner_id, project = await endpoint_runner(api)
    created = [await api.create_job(project, "echo") for _ in range(3)]
    page = await api.list_jobs(runner_id, project)
    assert ([job.id for job in page.content], page.total) == (created[::-1], 3)
    page = await api.list_jobs(runner_id, page=1, size=2)
    assert ([job.id for job in page.content], page.page, page.size, page.total) == ([created[0]], 1, 2, 3)
    assert (await api.list_jobs(runner_id, str(uuid.uuid4()))).total == 0
    assert (
        await raw.get(f"v1/private/local-runners/{runner_id}/jobs", params={"size": "0"})
    ).status_code == 400
    with pytest.raises(RunnerGone):
        await api.list_jobs(str(uuid.uuid4()))


async def test_jobs_belong_to_their_workspace(devserver: DevServer, api: DevClient) -> None:
    runner_id, project = await endpoint_runner(api)
    job_id = await api.create_job(project, "echo")
    async with DevClient(devserver.url, workspace="other-team") as theirs:
        for call in (theirs.get_job(job_id), theirs.cancel_job(job_id), theirs.job_logs(job_id)):
            with pytest.raises(RunnerGone):
                await call
        with pytest.raises(RunnerGone):
            await theirs.create_job(project, "echo")  # their (workspace, project) has no runner
        with pytest.raises(RunnerGone):
            await theirs.next_job(runner_id)


async def test_fault_injection_covers_the_jobs_routes(api: DevClient) -> None:
    runner_id, project = await endpoint_runner(api)
    job_id = await api.create_job(project, "echo")
    await api.dev_post("faults", {"route": "jobs_next", "status": 503})
    with pytest.raises(ServerError):
        await api.next_job(runner_id)
    assert (await api.get_job(job_id)).status == "pending"  # the faulted poll took nothing
    await api.dev_post("faults/profile", {"routes": ["job_report", "job_logs"], "error_rate": 1.0})
    await api.next_job(runner_id)
    with pytest.raises(ServerError):
        await api.report_job(job_id, report("completed", result={}))
    with pytest.raises(ServerError):
        await api.post_job_logs(job_id, [LogEntry(stream="stdout", text="x")])
    await api.put_agents(runner_id, ECHO)  # not in this profile
    assert (await api.get_job(job_id)).status == "running"
    with pytest.raises(RequestRejected):
        await api.dev_post("faults/profile", {"routes": ["no_such_route"]})


async def test_opik_sdk_ingestion_is_accepted_and_read_back(api: DevClient, raw: httpx.AsyncClient) -> None:
    """What Opik's SDK sends: a ping, then gzipped batches of traces and spans (204 each)."""
    ping = await raw.get("is-alive/ping")
    assert (ping.status_code, ping.json()) == (200, {"message": "Healthy Server", "healthy": True})
    trace_id, span_id = uuid7(), uuid7()
    span = {"id": span_id, "trace_id": trace_id, "name": "inner", "project_name": "p"}
    answer = await raw.post(
        "v1/private/spans/batch",  # a span may come before its trace
        content=gzip.compress(json.dumps({"spans": [span]}).encode()),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert answer.status_code == 204
    trace = {"id": trace_id, "name": "agent", "project_name": "p", "input": {"q": "x" * 300}}
    assert (await raw.post("v1/private/traces/batch", json={"traces": [trace]})).status_code == 204
    assert await api.dev_trace(trace_id) == {"trace": trace, "spans": [span]}
    assert await api.dev_trace(uuid7()) is None
    answer = await raw.post("v1/private/traces/batch", json={"traces": [{**trace, "id": str(uuid.uuid4())}]})
    assert answer.status_code == 400  # Opik ingests only version-7 ids
    assert (await raw.post("v1/private/traces/batch", json={"traces": [trace, trace]})).status_code == 422


SDK_AGENT = """
import opik

@opik.track(name="agent")
def agent(question: str) -> str:
    return inner(question)

@opik.track
def inner(question: str) -> str:
    return "answer to " + question * 100  # over 256 bytes: the SDK gzips the batch

agent("why")
opik.flush_tracker()
print(opik.opik_context.get_current_trace_data() is None)
"""


@pytest.mark.skipif(not OPIK_PYTHON.exists(), reason=f"no Python with Opik's SDK at {OPIK_PYTHON}")
async def test_opiks_own_sdk_logs_a_trace_to_the_dev_server(
    devserver: DevServer, api: DevClient, tmp_path: Path
) -> None:
    script = tmp_path / "agent.py"
    script.write_text(SDK_AGENT)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "OPIK_URL_OVERRIDE": devserver.url.rstrip("/"),
        "OPIK_PROJECT_NAME": "dev",
    }
    with anyio.fail_after(120):
        done = await anyio.run_process([str(OPIK_PYTHON), str(script)], env=env, check=False)
    assert done.returncode == 0, done.stderr.decode()
    traces = devserver.state.traces
    trace_ids = list(traces.ids())
    assert len(trace_ids) == 1
    view = await api.dev_trace(trace_ids[0])
    assert (
        view is not None
        and view["trace"]["name"] == "agent"
        and view["trace"]["input"] == {"question": "why"}
    )
    assert sorted(span["name"] for span in view["spans"]) == ["agent", "inner"]  # the SDK spans its root too


async def _status_is(api: DevClient, job_id: str, status: str) -> bool:
    return (await api.get_job(job_id)).status == status


async def test_a_restart_keeps_jobs_logs_agents_and_checklist(tmp_path: Path) -> None:
    """What an outage test needs: stop the server mid-job, start it again, the job is there."""
    state_file = tmp_path / "devserver.json"
    config = DevServerConfig(jobs_poll_hold_seconds=0.1)
    with DevServer(config=config, state_file=state_file) as server:
        port = server.port
        async with DevClient(server.url) as api:
            runner_id, project = await endpoint_runner(api)
            await api.patch_checklist(runner_id, {"runner_type": "endpoint"})
            running = await api.create_job(project, "echo", {"text": "hi"})
            pending = await api.create_job(project, "echo")
            await api.next_job(runner_id)
            await api.post_job_logs(running, [LogEntry(stream="stdout", text="line")])
            await api.cancel_job(running)  # its id waits for the next heartbeat
            before = [await api.get_job(job_id) for job_id in (running, pending)]
    with DevServer(port=port, config=config, state_file=state_file) as server:
        async with DevClient(server.url) as api:
            assert [await api.get_job(job_id) for job_id in (running, pending)] == before
            assert [entry.text for entry in await api.job_logs(running)] == ["line"]
            assert (await api.heartbeat(runner_id, ["jobs"])).cancelled_job_ids == [running]
            runner = await api.get_runner(runner_id)
            assert ([a.name for a in runner.agents], runner.checklist) == (
                ["echo"],
                {"runner_type": "endpoint"},
            )
            job = await api.next_job(runner_id)
            assert job is not None and job.id == pending
