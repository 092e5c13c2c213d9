"""The jobs loop end to end: a real daemon serving an endpoint runner of the dev server."""

from __future__ import annotations

import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from runner_daemon.core.models import Job
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.records import DevServerConfig
from runner_daemon.devserver.server import DevServer
from tests.support import (
    DaemonProcesses,
    Running,
    daemon_environment,
    finish,
    jobs_settings,
    process_gone,
    running_daemon,
    until,
)

pytestmark = pytest.mark.anyio

PROJECT = "0193a5c2-0000-7000-8000-00000000a11c"

# A declared agent: inputs on stdin, a few log lines, its pid and a result in the result file.
ECHO_AGENT = """
import json, os, sys, time
inputs = json.load(sys.stdin)
print("starting", inputs.get("text"))
print("to stderr", file=sys.stderr)
for n in range(int(inputs.get("lines", 0))):
    print("line", n)
if inputs.get("pidfile"):
    open(inputs["pidfile"], "w").write(str(os.getpid()))
if inputs.get("sleep"):
    time.sleep(float(inputs["sleep"]))
with open(os.environ["OPIK_RESULT_FILE"], "w") as out:
    json.dump({"result": {"echo": inputs.get("text"), "trace": os.environ["OPIK_TRACE_ID"]}}, out)
"""

# A discovered agent: found by reading the source; opik here is the workspace's own stand-in.
DISCOVERED = '''
import opik


@opik.track(entrypoint=True, name="shout")
def shout(text: str, times: int = 1) -> str:
    """Shout the text."""
    print("shouting", text)
    return (text.upper() + "!") * times
'''
FAKE_OPIK = "def track(*args, **kwargs):\n    return lambda function: function\n"


@pytest.fixture
def devserver_config() -> DevServerConfig:
    return DevServerConfig(
        poll_hold_seconds=1.0,
        reaper_interval_seconds=0.2,
        stale_grace_seconds=1.0,
        jobs_poll_hold_seconds=1.0,
        job_reaper_interval_seconds=0.5,
    )


@pytest.fixture
async def endpoint_id(api: DevClient) -> str:
    return await api.dev_create_runner("jobs", type="endpoint", project_id=PROJECT)


@pytest.fixture
def agents_root(workspace: Path) -> Path:
    (workspace / "echo_agent.py").write_text(ECHO_AGENT)
    (workspace / "opik").mkdir()
    (workspace / "opik" / "__init__.py").write_text(FAKE_OPIK)
    (workspace / "shouting.py").write_text(DISCOVERED)
    return workspace


def declared_agents(root: Path) -> dict[str, Any]:
    return {
        "echo": {
            "command": [sys.executable, str(root / "echo_agent.py")],
            "description": "echoes",
            "params": [
                {"name": "text", "type": "string"},
                {"name": "lines", "type": "integer", "presence": "optional"},
                {"name": "sleep", "type": "float", "presence": "optional"},
                {"name": "pidfile", "type": "string", "presence": "optional"},
            ],
        },
        "napper": {
            "command": [sys.executable, str(root / "echo_agent.py")],
            "params": [{"name": "sleep", "type": "float"}, {"name": "pidfile", "type": "string"}],
            "timeout": 1,
        },
    }


@pytest.fixture
async def serving(devserver: DevServer, endpoint_id: str, agents_root: Path) -> AsyncIterator[Running]:
    async with running_daemon(
        jobs_settings(devserver.url, endpoint_id, agents_root, declared_agents(agents_root))
    ) as running:
        await until(lambda: bool(running.daemon.jobs.agents), 20)
        yield running


async def agent_registered(api: DevClient, runner_id: str, name: str) -> bool:
    return name in {agent.name for agent in (await api.get_runner(runner_id)).agents}


async def finished(api: DevClient, job_id: str, timeout: float = 30) -> Job:
    async def terminal() -> bool:
        return (await api.get_job(job_id)).terminal

    await until(terminal, timeout)
    return await api.get_job(job_id)


async def test_a_declared_agent_runs_with_its_inputs_and_reports_result_trace_and_logs(
    api: DevClient, serving: Running
) -> None:
    job_id = await api.create_job(PROJECT, "echo", {"text": "hi", "lines": 250})
    job = await finished(api, job_id)
    assert job.status == "completed", job.error
    assert job.trace_id is not None and uuid.UUID(job.trace_id).version == 7
    assert job.result == {"echo": "hi", "trace": job.trace_id}  # the agent saw the reported id
    logs = await api.job_logs(job_id)  # all there once the result is: flushed before the report
    stdout = [entry.text for entry in logs if entry.stream == "stdout"]
    assert stdout == ["starting hi", *(f"line {n}" for n in range(250))]
    assert [entry.text for entry in logs if entry.stream == "stderr"] == ["to stderr"]


async def test_a_discovered_python_agent_is_registered_and_called_with_keyword_arguments(
    api: DevClient, serving: Running, endpoint_id: str
) -> None:
    runner = await api.get_runner(endpoint_id)
    registered = {agent.name: agent for agent in runner.agents}
    assert {"echo", "napper", "shout"} <= set(registered)
    shout = registered["shout"]
    assert shout.description == "Shout the text." and shout.language == "python"
    assert [(p.name, p.type, p.presence) for p in shout.params] == [
        ("text", "string", "required"),
        ("times", "integer", "optional"),
    ]
    job = await finished(api, await api.create_job(PROJECT, "shout", {"text": "hey", "times": 2}))
    assert job.status == "completed", job.error
    assert job.result == {"result": "HEY!HEY!"}  # not a dict: wrapped, as Opik's runner does
    assert [entry.text for entry in await api.job_logs(job.id)] == ["shouting hey"]


async def test_inputs_are_checked_against_the_agents_params_before_anything_starts(
    api: DevClient, serving: Running, workspace: Path
) -> None:
    missing = await finished(api, await api.create_job(PROJECT, "echo", {"lines": 1}))
    assert missing.status == "failed" and missing.error is not None and "'text'" in missing.error
    wrong = await finished(api, await api.create_job(PROJECT, "echo", {"text": "x", "lines": "many"}))
    assert wrong.status == "failed" and wrong.error is not None and "'lines'" in wrong.error
    assert await api.job_logs(missing.id) == [] and await api.job_logs(wrong.id) == []


async def test_a_cancel_from_the_ui_stops_the_running_job_and_its_process(
    api: DevClient, serving: Running, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    job_id = await api.create_job(PROJECT, "echo", {"text": "long", "sleep": 600, "pidfile": str(pidfile)})
    await until(pidfile.exists, 20)
    pid = int(pidfile.read_text())
    await api.cancel_job(job_id)
    await until(lambda: process_gone(pid), 20)
    assert (await api.get_job(job_id)).status == "cancelled"
    await until(lambda: serving.daemon.jobs.in_flight == 0, 20)


async def test_a_job_cancelled_before_it_was_polled_never_starts(
    devserver: DevServer, api: DevClient, endpoint_id: str, agents_root: Path, tmp_path: Path
) -> None:
    settings = jobs_settings(
        devserver.url, endpoint_id, agents_root, declared_agents(agents_root), max_jobs=1
    )
    async with running_daemon(settings) as running:
        await until(lambda: bool(running.daemon.jobs.agents), 20)
        busy = tmp_path / "busy"
        first = await api.create_job(PROJECT, "echo", {"text": "a", "sleep": 600, "pidfile": str(busy)})
        await until(busy.exists, 20)  # the only slot is taken: no poll until it frees
        never = tmp_path / "never"
        second = await api.create_job(PROJECT, "echo", {"text": "b", "pidfile": str(never)})
        await api.cancel_job(second)
        await api.cancel_job(first)
        await until(lambda: running.daemon.jobs.in_flight == 0, 20)
        assert (await api.get_job(second)).status == "cancelled"
        assert not never.exists()


async def test_a_timeout_kills_the_job_and_fails_it_with_opiks_message(
    api: DevClient, serving: Running, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    job_id = await api.create_job(PROJECT, "napper", {"sleep": 600, "pidfile": str(pidfile)})
    job = await finished(api, job_id)
    assert (job.status, job.error) == ("failed", "Job timed out after 1s")
    assert process_gone(int(pidfile.read_text()))


async def test_agents_are_published_again_when_a_file_changes(
    api: DevClient, serving: Running, endpoint_id: str, agents_root: Path
) -> None:
    (agents_root / "later.py").write_text(
        DISCOVERED.replace('"shout"', '"later"').replace("def shout", "def later")
    )
    await until(lambda: "later" in serving.daemon.jobs.agents, 20)
    assert "later" in {agent.name for agent in (await api.get_runner(endpoint_id)).agents}
    (agents_root / "later.py").unlink()
    await until(lambda: "later" not in serving.daemon.jobs.agents, 20)
    assert "later" not in {agent.name for agent in (await api.get_runner(endpoint_id)).agents}


async def test_a_gone_endpoint_runner_stops_the_jobs_while_the_bridge_goes_on(
    devserver: DevServer, api: DevClient, runner_id: str, endpoint_id: str, agents_root: Path
) -> None:
    settings = jobs_settings(devserver.url, endpoint_id, agents_root, declared_agents(agents_root))
    settings = settings.model_copy(
        update={
            "runner_id": uuid.UUID(runner_id),
            "bridge": settings.bridge.model_copy(update={"enabled": True}),
        }
    )
    async with running_daemon(settings) as running:
        await until(lambda: bool(running.daemon.jobs.agents), 20)
        await api.dev_create_runner("newer", type="endpoint", project_id=PROJECT)  # evicts ours
        await until(lambda: running.daemon.lifecycle.lost != [], 20)
        command_id = await api.submit_command(runner_id, "ReadFile", {"path": "echo_agent.py"})
        record = await api.get_command(runner_id, command_id, wait=20)
        assert record.status == "completed"
    assert running.exit_status == 69  # re-pair the endpoint runner: a restart will not help


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_job_running_when_the_daemon_was_killed_is_failed_by_the_next_start(
    devserver: DevServer,
    api: DevClient,
    endpoint_id: str,
    agents_root: Path,
    tmp_path: Path,
    daemons: DaemonProcesses,
) -> None:
    settings = jobs_settings(devserver.url, endpoint_id, agents_root, declared_agents(agents_root))
    env = daemon_environment(
        devserver.url,
        str(uuid.uuid4()),
        agents_root,
        state_directory=tmp_path / "state",
        bridge__enabled="false",
        jobs=json.dumps(settings.jobs.model_dump(mode="json")),
    )
    first = daemons.spawn(env)
    pidfile = tmp_path / "pid"
    await until(lambda: agent_registered(api, endpoint_id, "echo"), 30)
    job_id = await api.create_job(PROJECT, "echo", {"text": "x", "sleep": 600, "pidfile": str(pidfile)})
    await until(pidfile.exists, 30)
    agent = int(pidfile.read_text())
    os.kill(first.pid, signal.SIGKILL)
    await finish(first, 10)
    await until(lambda: process_gone(agent), 20)  # the group watcher took the job down
    second = daemons.spawn(env)
    job = await finished(api, job_id)
    assert (job.status, job.error) == ("failed", "the runner restarted while this job ran")
    second.send_signal(signal.SIGTERM)
    await finish(second, 30)
    assert second.returncode == 0
