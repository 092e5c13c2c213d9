"""A real daemon against the dev server's Opik answers: every 410 on a heartbeat is "runner gone"."""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from runner_daemon.core.models import PairingActivation, PairingSessionRequest
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.server import DevServer
from runner_daemon.service.pairing import activation_hmac
from tests.support import DaemonProcesses, daemon_environment, finish, until

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]


async def paired(api: DevClient, project_id: str) -> str:
    """A connect runner paired and approved as the browser does; its id."""
    key = secrets.token_bytes(32)
    session = await api.create_pairing_session(
        PairingSessionRequest(project_id=project_id, activation_key=base64.b64encode(key).decode())
    )
    hmac = activation_hmac(key, session.session_id, "laptop")
    await api.activate_pairing_session(session.session_id, PairingActivation(runner_name="laptop", hmac=hmac))
    return session.runner_id


async def has_beaten(api: DevClient, runner_id: str) -> bool:
    """Whether the runner's daemon is up: its first heartbeat reached the server."""
    return bool((await api.dev_get(f"runners/{runner_id}/stats"))["heartbeats"] > 0)


async def exits_69_saying_pair_again(proc: subprocess.Popen[str], *statuses: str) -> None:
    """The daemon stopped with exactly one error line: the runner is gone, pair again."""
    _, stderr = await finish(proc, 60)
    assert proc.returncode == 69, stderr
    errors: list[dict[str, Any]] = [
        json.loads(line) for line in stderr.splitlines() if '"level": "error"' in line
    ]
    assert len(errors) == 1, stderr
    assert "runner-daemon pair" in errors[0]["event"]
    assert errors[0]["error"].startswith(tuple(f"HTTP {status} " for status in statuses)), errors[0]


async def test_a_410_on_the_first_heartbeat_exits_69(
    devserver: DevServer, api: DevClient, workspace: Path, daemons: DaemonProcesses
) -> None:
    """An id that never existed, and a live runner of another workspace: Opik answers 410 to both."""
    unknown = daemons.spawn(daemon_environment(devserver.url, str(uuid.uuid4()), workspace))
    await exits_69_saying_pair_again(unknown, "410")
    runner_id = await api.dev_create_runner()
    env = daemon_environment(devserver.url, runner_id, workspace)
    env["RUNNER_DAEMON_WORKSPACE"] = "other-team"  # the Comet-Workspace the daemon sends
    theirs = daemons.spawn(env)
    await exits_69_saying_pair_again(theirs, "410")
    assert (await api.get_runner(runner_id)).status == "disconnected"  # never beat for it


async def test_a_newer_pairing_for_the_project_stops_the_running_daemon_with_69(
    devserver: DevServer, api: DevClient, workspace: Path, daemons: DaemonProcesses
) -> None:
    project = str(uuid.uuid4())
    older = await paired(api, project)
    proc = daemons.spawn(daemon_environment(devserver.url, older, workspace))
    await until(lambda: has_beaten(api, older), 20)
    newer = await paired(api, project)
    # Its next heartbeat answers 410 and its next poll 404: whichever comes first stops it.
    await exits_69_saying_pair_again(proc, "410", "404")
    assert (await api.get_runner(newer)).status == "connected"
