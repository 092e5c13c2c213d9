"""The jobs capability across outages, faults, pairing and processes, against the dev server.

A job that ends while Opik is down reports (and ships its logs) once Opik is back; reports and
logs survive 5xx and resets; ``pair --type endpoint`` then ``run`` serve jobs with no bridge;
a gone bridge runner leaves the jobs running; the checklist reaches Opik; a real Opik SDK in
the agent logs its trace under the job's trace id; every report carries that one trace id.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from runner_daemon.core.models import Job, LogEntry
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.records import DevServerConfig
from runner_daemon.devserver.server import DevServer
from runner_daemon.jobs.execute import LOG_FLUSH_SECONDS
from runner_daemon.service import credentials
from tests.support import (
    FAST,
    REPO,
    DaemonProcess,
    DaemonProcesses,
    Running,
    daemon_environment,
    environ_without_settings,
    finish,
    jobs_settings,
    process_gone,
    running_daemon,
    until,
)

pytestmark = pytest.mark.anyio

PROJECT = "0193a5c2-0000-7000-8000-0000000000b2"
OPIK_VENV_PYTHON = Path("/tmp/opikvenv/bin/python")
CONFIG = DevServerConfig(
    poll_hold_seconds=1.0,
    reaper_interval_seconds=0.2,
    stale_grace_seconds=1.0,
    jobs_poll_hold_seconds=1.0,
    job_reaper_interval_seconds=0.5,
)

# A declared agent that says it started (its pid and the trace id it was given, in
# marks/TOKEN.json), waits for its gate file if it has one, prints its lines, then returns.
GATED_AGENT = """
import json, os, sys, time
inputs = json.load(sys.stdin)
token, marks = inputs["token"], inputs["marks"]
seen = os.path.join(marks, token + ".tmp")
with open(seen, "w") as out:
    json.dump({"pid": os.getpid(), "trace": os.environ["OPIK_TRACE_ID"]}, out)
os.replace(seen, os.path.join(marks, token + ".json"))
gate = inputs.get("gate")
deadline = time.monotonic() + 300
while gate and not os.path.exists(gate):
    if time.monotonic() > deadline:
        sys.exit("the gate never opened")
    time.sleep(0.02)
for n in range(int(inputs.get("lines", 0))):
    print(token, n)
with open(os.environ["OPIK_RESULT_FILE"], "w") as out:
    json.dump({"result": {"token": token, "trace": os.environ["OPIK_TRACE_ID"]}}, out)
"""

# A discovered agent; ``opik`` in the workspace is a stand-in (the real SDK has its own test).
DISCOVERED = '''
import opik


@opik.track(entrypoint=True, name="shout")
def shout(text: str) -> str:
    """Shout the text."""
    return text.upper() + "!"
'''
FAKE_OPIK = "def track(*args, **kwargs):\n    return lambda function: function\n"

TRACED = '''
import opik


@opik.track(entrypoint=True)
def traced(question: str) -> str:
    """Answer with a trace of the call."""
    print("thinking about", question)
    return "answer to " + question
'''


@pytest.fixture
def devserver_config() -> DevServerConfig:
    return CONFIG


@pytest.fixture
async def endpoint_id(api: DevClient) -> str:
    return await api.dev_create_runner("jobs", type="endpoint", project_id=PROJECT)


@pytest.fixture
def marks(tmp_path: Path) -> Path:
    folder = tmp_path / "marks"
    folder.mkdir()
    return folder


@pytest.fixture
def agents_root(workspace: Path) -> Path:
    (workspace / "gated_agent.py").write_text(GATED_AGENT)
    (workspace / "opik").mkdir()
    (workspace / "opik" / "__init__.py").write_text(FAKE_OPIK)
    (workspace / "shouting.py").write_text(DISCOVERED)
    return workspace


def declared_agents(root: Path) -> dict[str, Any]:
    return {
        "gated": {
            "command": [sys.executable, str(root / "gated_agent.py")],
            "params": [
                {"name": "token", "type": "string"},
                {"name": "marks", "type": "string"},
                {"name": "gate", "type": "string", "presence": "optional"},
                {"name": "lines", "type": "integer", "presence": "optional"},
            ],
        }
    }


def gated(marks: Path, token: str, *, lines: int = 0, gate: bool = True) -> dict[str, Any]:
    """The inputs of a ``gated`` job; its gate is ``marks/TOKEN.gate``."""
    inputs: dict[str, Any] = {"token": token, "marks": str(marks), "lines": lines}
    if gate:
        inputs["gate"] = str(marks / f"{token}.gate")
    return inputs


@dataclass
class Started:
    pid: int
    trace: str


async def started(marks: Path, token: str, timeout: float = 30) -> Started:
    """What the ``gated`` agent of ``token`` wrote once it ran."""
    path = marks / f"{token}.json"
    await until(path.exists, timeout)
    seen = json.loads(path.read_text())
    return Started(int(seen["pid"]), str(seen["trace"]))


def expected_lines(token: str, lines: int) -> list[str]:
    return [f"{token} {n}" for n in range(lines)]


def stdout_of(logs: list[LogEntry]) -> list[str]:
    return [entry.text for entry in logs if entry.stream == "stdout"]


async def finished(api: DevClient, job_id: str, timeout: float = 60) -> Job:
    async def terminal() -> bool:
        return (await api.get_job(job_id)).terminal

    await until(terminal, timeout)
    return await api.get_job(job_id)


async def agent_registered(api: DevClient, runner_id: str, name: str) -> bool:
    runner = await api.get_runner(runner_id)
    return runner.status == "connected" and name in {agent.name for agent in runner.agents}


@pytest.fixture
async def serving(devserver: DevServer, endpoint_id: str, agents_root: Path) -> AsyncIterator[Running]:
    async with running_daemon(
        jobs_settings(devserver.url, endpoint_id, agents_root, declared_agents(agents_root))
    ) as running:
        await until(lambda: "gated" in running.daemon.jobs.agents, 20)
        yield running


# --- 1. a server outage while a job runs, and faults on reports and logs ----------------------


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[list[DevServer]]:
    """A dev server that keeps its state in a file; the list's last one is the one serving."""
    servers = [DevServer(config=CONFIG, state_file=tmp_path / "server-state.json").start()]
    yield servers
    servers[-1].stop()


async def job_across_an_outage(
    servers: list[DevServer], agents_root: Path, marks: Path, outage_seconds: float
) -> None:
    """A job ends while the dev server is down for ``outage_seconds``; once it is back (same
    port, same state), the job's logs and its result land, complete."""
    first = servers[0]
    async with DevClient(first.url) as api:
        endpoint_id = await api.dev_create_runner("jobs", type="endpoint", project_id=PROJECT)
        async with running_daemon(
            jobs_settings(first.url, endpoint_id, agents_root, declared_agents(agents_root))
        ) as running:
            await until(lambda: "gated" in running.daemon.jobs.agents, 20)
            job_id = await api.create_job(PROJECT, "gated", gated(marks, "out", lines=300))
            agent = await started(marks, "out")

            async def running_reported() -> bool:
                return (await api.get_job(job_id)).trace_id == agent.trace

            await until(running_reported, 20)
            await anyio.to_thread.run_sync(first.stop)  # Opik is down ...
            (marks / "out.gate").touch()
            await until(lambda: process_gone(agent.pid), 20)  # ... while the job ends
            await anyio.sleep(outage_seconds)  # the daemon meets the outage with its logs and report
            servers.append(DevServer(port=first.port, config=CONFIG, state_file=first.state_file).start())
            job = await finished(api, job_id, 60 + outage_seconds)
            logs = await api.job_logs(job_id)
    assert job.status == "completed", job.error
    assert job.result == {"token": "out", "trace": agent.trace}
    assert job.trace_id == agent.trace
    assert stdout_of(logs) == expected_lines("out", 300)


async def test_a_job_that_ends_during_a_server_outage_reports_and_logs_after_it(
    restartable: list[DevServer], agents_root: Path, marks: Path
) -> None:
    await job_across_an_outage(restartable, agents_root, marks, 1.0)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_outage_longer_than_the_log_flush_bound_loses_no_log_line(
    restartable: list[DevServer], agents_root: Path, marks: Path
) -> None:
    """The final report is journalled before the job's last lines wait out the outage, so
    waiting for them longer than a bound costs no result on a crash."""
    await job_across_an_outage(restartable, agents_root, marks, LOG_FLUSH_SECONDS + 5)


JOB_FAULTS = {
    "5xx": {"error_rate": 0.4, "routes": ["job_report", "job_logs"], "seed": 11},
    "resets": {
        "reset_rate": 0.2,
        "reset_after_processing_rate": 0.2,
        "routes": ["job_report", "job_logs"],
        "seed": 13,
    },
}


def in_order(expected: list[str], received: list[str]) -> bool:
    """Every expected line arrived, in order (a batch whose answer was lost may come twice)."""
    remaining = iter(received)
    return all(line in remaining for line in expected)


@pytest.mark.parametrize("fault", list(JOB_FAULTS))
async def test_reports_and_logs_survive_errors_and_resets(
    api: DevClient, serving: Running, marks: Path, fault: str
) -> None:
    await api.dev_post("faults/profile", JOB_FAULTS[fault])
    lines = 1500  # at least two batches each
    tokens = [f"{fault}{n}" for n in range(4)]
    jobs = {
        token: await api.create_job(PROJECT, "gated", gated(marks, token, lines=lines, gate=False))
        for token in tokens
    }
    for token, job_id in jobs.items():
        job = await finished(api, job_id)
        assert job.status == "completed", job.error
        agent = await started(marks, token)
        assert job.result == {"token": token, "trace": agent.trace} and job.trace_id == agent.trace
        received = stdout_of(await api.job_logs(job_id))
        assert in_order(expected_lines(token, lines), received), (token, len(received))
        assert set(received) == set(expected_lines(token, lines))
    await api.dev_post("faults/clear", {})
    assert serving.daemon.job_stats.report_retries > 0  # the faults did hit the reports


# --- 3. pair --type endpoint, then run, as a user does ----------------------------------------


def cli(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runner_daemon", *argv],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_pair_endpoint_headless_then_run_serves_jobs_with_that_runner(
    devserver: DevServer, api: DevClient, agents_root: Path, tmp_path: Path, daemons: DaemonProcesses
) -> None:
    state = tmp_path / "state"
    connect_id = await api.dev_create_runner("laptop", project_id=PROJECT)
    connect_file = credentials.store(
        state, credentials.Credentials(connect_id, os.urandom(32), devserver.url), PROJECT
    )
    connect_before = connect_file.read_bytes()
    env = environ_without_settings()
    env.update(
        RUNNER_DAEMON_URL=devserver.url,
        RUNNER_DAEMON_STATE_DIRECTORY=str(state),
        RUNNER_DAEMON_LOG_FORMAT="json",
    )
    paired = await anyio.to_thread.run_sync(
        lambda: cli("pair", "--type", "endpoint", "--project-id", PROJECT, "--name", "box", env=env)
    )
    assert paired.returncode == 0, paired.stderr
    assert "/opik/pair/v1" not in paired.stdout + paired.stderr  # no link: no browser step
    assert "Open this link" not in paired.stdout
    endpoint_file = state / credentials.ENDPOINT_FILE
    assert stat.S_IMODE(endpoint_file.stat().st_mode) == 0o600
    stored = json.loads(endpoint_file.read_text())
    assert stored["bridge_key"] is None and stored["project_id"] == PROJECT
    endpoint_id = stored["runner_id"]
    assert f"paired endpoint runner {endpoint_id}" in paired.stdout
    # The connect runner's credentials, and the runner itself, are untouched.
    assert connect_file.read_bytes() == connect_before
    assert (await api.get_runner(connect_id)).id == connect_id
    assert (await api.get_runner(endpoint_id)).type == "endpoint"

    env.update({f"RUNNER_DAEMON_{key.upper()}": str(value) for key, value in FAST.items()})
    env.update(
        RUNNER_DAEMON_WORKSPACE_ROOT=str(agents_root),
        RUNNER_DAEMON_JOBS__ENABLED="true",
        RUNNER_DAEMON_BRIDGE__ENABLED="false",
        RUNNER_DAEMON_JOBS__PYTHON=sys.executable,
    )
    proc = daemons.spawn(env, "runner_daemon", "run")
    await until(lambda: agent_registered(api, endpoint_id, "shout"), 30)
    runner = await api.get_runner(endpoint_id)
    assert runner.capabilities == ["jobs"]
    job = await finished(api, await api.create_job(PROJECT, "shout", {"text": "hey"}))
    assert (job.status, job.result) == ("completed", {"result": "HEY!"}), job.error
    proc.send_signal(signal.SIGTERM)
    _, stderr = await finish(proc)
    assert proc.returncode == 0, stderr
    assert connect_file.read_bytes() == connect_before


# --- 4. the bridge runner gone while jobs run -------------------------------------------------


def logged(proc: DaemonProcess, event: str) -> bool:
    return any(event in json.loads(line).get("event", "") for line in _json_lines(proc.output()[1]))


def _json_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_gone_bridge_runner_stops_the_bridge_while_the_jobs_go_on_and_exits_69(
    devserver: DevServer,
    api: DevClient,
    endpoint_id: str,
    agents_root: Path,
    marks: Path,
    daemons: DaemonProcesses,
) -> None:
    connect_id = await api.dev_create_runner("laptop", project_id=PROJECT)
    jobs = jobs_settings(devserver.url, endpoint_id, agents_root, declared_agents(agents_root)).jobs
    env = daemon_environment(
        devserver.url, connect_id, agents_root, jobs=json.dumps(jobs.model_dump(mode="json"))
    )
    proc = daemons.spawn(env)
    await until(lambda: agent_registered(api, endpoint_id, "gated"), 30)
    job_id = await api.create_job(PROJECT, "gated", gated(marks, "across", lines=3))
    agent = await started(marks, "across")
    await api.dev_create_runner("newer", project_id=PROJECT)  # evicts the bridge's runner
    stops = "the bridge runner is no longer connected to Opik; that capability stops"
    await until(lambda: logged(proc, stops), 30)
    (marks / "across.gate").touch()
    job = await finished(api, job_id)
    assert (job.status, job.result) == ("completed", {"token": "across", "trace": agent.trace})
    later = await finished(api, await api.create_job(PROJECT, "gated", gated(marks, "later", gate=False)))
    assert later.status == "completed", later.error
    assert proc.poll() is None  # the jobs went on: the daemon still runs
    proc.send_signal(signal.SIGTERM)
    _, stderr = await finish(proc)
    assert proc.returncode == 69, stderr  # re-pair the bridge runner: a restart will not help


# --- 5. the checklist ---------------------------------------------------------------------------


async def test_the_checklist_reaches_opik_and_is_sent_again_when_the_agents_change(
    api: DevClient, serving: Running, endpoint_id: str, agents_root: Path
) -> None:
    async def checklist() -> dict[str, Any]:
        return (await api.get_runner(endpoint_id)).checklist or {}

    async def first_sent() -> bool:
        return bool(await checklist())

    await until(first_sent, 30)
    assert "later.py" not in (await checklist())["file_tree"].splitlines()
    (agents_root / "server.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    (agents_root / "src" / "id_rsa").write_text("secret\n")
    draft = agents_root / "later.draft"
    draft.write_text(DISCOVERED.replace('"shout"', '"later"'))
    draft.rename(agents_root / "later.py")  # whole when the scan sees it

    async def sent_again() -> bool:
        return "later.py" in (await checklist()).get("file_tree", "").splitlines()

    await until(sent_again, 30)
    sent = await checklist()
    assert sent["runner_type"] == "endpoint"
    assert sent["project_root"] == str(agents_root)
    tree = sent["file_tree"].splitlines()
    assert {"src/", "src/main.py", "gated_agent.py", "shouting.py"} <= set(tree)
    assert not {"server.pem", "src/id_rsa"} & set(tree)  # the deny-lists hold
    assert sent["instrumentation"] == {"tracing": True, "entrypoint": True, "prompts": False}
    assert any(match.startswith("later.py:") for match in sent["instrumentation_matches"])


# --- 6. a real Opik SDK in the agent ----------------------------------------------------------


@pytest.mark.skipif(not OPIK_VENV_PYTHON.exists(), reason="needs opik==2.2.* in /tmp/opikvenv")
async def test_a_discovered_agent_with_opiks_sdk_logs_its_trace_under_the_jobs_trace_id(
    devserver: DevServer, api: DevClient, endpoint_id: str, workspace: Path
) -> None:
    (workspace / "traced.py").write_text(TRACED)
    settings = jobs_settings(
        devserver.url, endpoint_id, workspace, declared_agents(workspace), python=str(OPIK_VENV_PYTHON)
    )
    async with running_daemon(settings) as running:
        await until(lambda: "traced" in running.daemon.jobs.agents, 20)
        job = await finished(api, await api.create_job(PROJECT, "traced", {"question": "why"}))
    assert job.status == "completed", job.error
    assert job.result == {"result": "answer to why"}
    assert job.trace_id is not None and uuid.UUID(job.trace_id).version == 7
    trace = await api.dev_trace(job.trace_id)
    assert trace is not None, "Opik's SDK logged no trace under the job's trace id"
    assert "traced" in json.dumps(trace)


# --- 7. one trace id on every report ----------------------------------------------------------


def journalled_report(journal: Path, job_id: str) -> dict[str, Any] | None:
    """The final report the daemon journalled for ``job_id`` before sending it (or None)."""
    try:
        data = journal.read_bytes()
    except FileNotFoundError:
        return None
    for line in data.split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # empty, or still being written
        if isinstance(record, dict) and record.get("op") == "result" and record.get("id") == job_id:
            body: dict[str, Any] = json.loads(record["body"])
            return body
    return None


async def test_the_running_and_the_final_report_carry_the_same_trace_id(
    api: DevClient, serving: Running, marks: Path
) -> None:
    job_id = await api.create_job(PROJECT, "gated", gated(marks, "t"))
    agent = await started(marks, "t")

    async def running_report_seen() -> bool:
        return (await api.get_job(job_id)).trace_id is not None

    await until(running_report_seen, 20)
    while_running = await api.get_job(job_id)
    assert (while_running.status, while_running.trace_id) == ("running", agent.trace)
    (marks / "t.gate").touch()
    job = await finished(api, job_id)
    assert (job.status, job.trace_id) == ("completed", agent.trace)


async def test_the_final_report_carries_the_trace_id_when_the_running_one_never_landed(
    api: DevClient, serving: Running, marks: Path, tmp_path: Path
) -> None:
    await api.dev_post("faults/profile", {"error_rate": 1.0, "routes": ["job_report"]})
    job_id = await api.create_job(PROJECT, "gated", gated(marks, "late"))
    agent = await started(marks, "late")
    (marks / "late.gate").touch()
    await until(lambda: process_gone(agent.pid), 20)

    journal = tmp_path / "xdg-state" / "runner-daemon" / "outbox.jsonl"  # conftest's state home
    await until(lambda: journalled_report(journal, job_id) is not None, 20)
    final = journalled_report(journal, job_id)
    assert final is not None and (final["status"], final["trace_id"]) == ("completed", agent.trace)
    assert (await api.get_job(job_id)).trace_id is None  # no running report got through
    await api.dev_post("faults/clear", {})
    job = await finished(api, job_id)
    assert (job.status, job.trace_id) == ("completed", agent.trace)
