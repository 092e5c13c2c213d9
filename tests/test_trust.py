"""Pairing, signed commands and results, and secrets that never leak."""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest

from runner_daemon import cli
from runner_daemon.bridge.signing import HMAC_FIELD, derive_bridge_key, sign, sign_result, verify_command
from runner_daemon.core.errors import ConfigError
from runner_daemon.core.settings import load_settings
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.server import DevServer
from runner_daemon.service import pairing
from runner_daemon.service.credentials import CREDENTIALS_FILE, Credentials, load, resolve, store
from runner_daemon.service.pairing import activation_hmac, pairing_link, parse_link_fragment
from tests.support import (
    FAST,
    DaemonProcesses,
    daemon_environment,
    environ_without_settings,
    finish,
    make_settings,
    running_daemon,
    until,
    wait_terminal,
)

REPO = Path(__file__).resolve().parent.parent


async def bridge_ready(api: DevClient, runner_id: str) -> bool:
    """The daemon's heartbeat declared the bridge capability (pairing alone does not)."""
    return (await api.get_runner(runner_id)).capabilities == ["bridge"]


KEY = bytes(range(32))


def test_hkdf_matches_rfc_5869_test_case_1() -> None:
    from runner_daemon.bridge.signing import hkdf_sha256

    okm = hkdf_sha256(bytes([0x0B] * 22), bytes(range(13)), bytes(range(0xF0, 0xFA)), 32)
    assert okm.hex() == "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"


def test_command_signature_round_trip_and_tampering() -> None:
    args = {"path": "a.txt", "content": "é"}
    signed = {**args, HMAC_FIELD: sign(KEY, "WriteFile", args)}
    assert verify_command(KEY, "WriteFile", signed)
    assert not verify_command(KEY, "EditFile", signed)  # the type is signed too
    assert not verify_command(KEY, "WriteFile", {**signed, "content": "x"})
    assert not verify_command(bytes(32), "WriteFile", signed)
    assert not verify_command(KEY, "WriteFile", args)
    assert not verify_command(KEY, "WriteFile", {**args, HMAC_FIELD: 7})


def test_result_signature_covers_status_and_empty_results() -> None:
    signed = sign_result(KEY, "failed", None)
    assert signed == {HMAC_FIELD: sign(KEY, "failed", {})}
    result = sign_result(KEY, "completed", {"a": 1})
    assert result[HMAC_FIELD] == sign(KEY, "completed", {"a": 1})


def test_pairing_link_round_trip() -> None:
    session, project = str(uuid.uuid4()), str(uuid.uuid4())
    link = pairing_link(
        "https://www.comet.com/opik/api/",
        session_id=session,
        activation_key=KEY,
        project_id=project,
        project_name="my project",
        runner_name="laptop-é",
        workspace="team a",
    )
    assert link.startswith(
        "https://www.comet.com/opik/pair/v1?url=https%3A%2F%2Fwww.comet.com%2Fopik%2F"
        "&project=my%20project&workspace=team%20a#"
    )
    assert "=" not in link.split("#")[1]
    assert parse_link_fragment(link) == (session, KEY, project, "laptop-é")


def test_credentials_are_stored_private_and_atomic(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "runner-daemon"
    path = store(directory, Credentials("4c7e7f0a-2b7e-4f57-9d0c-0a0e8b7f1c11", KEY, "http://x/api/"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert [p.name for p in directory.iterdir()] == [CREDENTIALS_FILE]
    loaded = load(directory)
    assert loaded is not None and loaded.bridge_key == KEY
    assert base64.b64encode(KEY).decode() not in repr(loaded)


def test_run_loads_stored_credentials_and_flags_override(tmp_path: Path) -> None:
    runner = "4c7e7f0a-2b7e-4f57-9d0c-0a0e8b7f1c11"
    store(tmp_path, Credentials(runner, KEY))
    settings, key = resolve(load_settings(None, {"state_directory": tmp_path}))
    assert (str(settings.runner_id), key) == (runner, KEY)
    other = "5d8f8a1b-3c8f-4a68-8e1d-1b1f9c8a2d22"
    with pytest.raises(ConfigError, match="bridge key: none for runner"):
        resolve(load_settings(None, {"state_directory": tmp_path, "runner_id": other}))
    key_file = tmp_path / "key"
    key_file.write_text(base64.b64encode(bytes(32)).decode() + "\n")
    settings, key = resolve(
        load_settings(None, {"state_directory": tmp_path, "runner_id": other, "bridge_key_file": key_file})
    )
    assert (str(settings.runner_id), key) == (other, bytes(32))
    key_file.write_text("not base64!")
    with pytest.raises(ConfigError, match="bridge_key_file"):
        resolve(load_settings(None, {"state_directory": tmp_path, "bridge_key_file": key_file}))


@pytest.mark.anyio
async def test_signed_commands_run_and_forgeries_are_refused(
    devserver: DevServer, api: DevClient, workspace: Path
) -> None:
    key_a, key_b = secrets.token_bytes(32), secrets.token_bytes(32)
    runner_a = await api.dev_create_runner("a", bridge_key=key_a)
    runner_b = await api.dev_create_runner("b", bridge_key=key_b)
    unsigned_runner = await api.dev_create_runner("unsigned")
    args = {"path": "marker.txt", "content": "written"}

    def write(name: str) -> dict[str, str]:
        return {"path": name, "content": "written"}

    async with running_daemon(make_settings(devserver.url, runner_a, workspace), bridge_key=key_a):
        good = await api.submit_command(runner_a, "WriteFile", write("good.txt"))
        forged_sig = sign(key_a, "WriteFile", args)
        tampered = await api.submit_command(
            runner_a, "WriteFile", {**write("tampered.txt"), HMAC_FIELD: forged_sig}
        )
        wrong_key = await api.submit_command(
            runner_a,
            "WriteFile",
            {**write("wrong.txt"), HMAC_FIELD: sign(key_b, "WriteFile", write("wrong.txt"))},
        )
        good_record = await wait_terminal(api, runner_a, good)
        tampered_record = await wait_terminal(api, runner_a, tampered)
        wrong_record = await wait_terminal(api, runner_a, wrong_key)
    assert good_record.status == "completed" and (workspace / "good.txt").read_text() == "written"
    assert good_record.result is not None
    unsigned_result = {k: v for k, v in good_record.result.items() if k != HMAC_FIELD}
    assert good_record.result[HMAC_FIELD] == sign(key_a, "completed", unsigned_result)
    for record, name in [(tampered_record, "tampered.txt"), (wrong_record, "wrong.txt")]:
        assert record.status == "failed"
        assert record.error is not None
        assert (record.error.code, record.error.message) == ("auth_failed", "Invalid command HMAC")
        assert record.duration_ms is None
        assert record.result == {HMAC_FIELD: sign(key_a, "failed", {})}
        assert not (workspace / name).exists()

    # Missing signature: the server knows no key for this runner, the daemon has one.
    async with running_daemon(make_settings(devserver.url, unsigned_runner, workspace), bridge_key=key_a):
        missing = await wait_terminal(
            api, unsigned_runner, await api.submit_command(unsigned_runner, "WriteFile", write("missing.txt"))
        )
    assert missing.error is not None and missing.error.code == "auth_failed"
    assert not (workspace / "missing.txt").exists()

    # Replay: a command signed for runner A, sent to runner B.
    record_a = await api.get_command(runner_a, good)
    assert record_a.args is not None
    async with running_daemon(make_settings(devserver.url, runner_b, workspace), bridge_key=key_b):
        replayed = await wait_terminal(
            api,
            runner_b,
            await api.submit_command(
                runner_b, "WriteFile", {**record_a.args, "path": "good.txt", "content": "replayed"}
            ),
        )
    assert replayed.error is not None and replayed.error.code == "auth_failed"
    assert (workspace / "good.txt").read_text() == "written"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_pairing_end_to_end_then_run(
    devserver: DevServer, api: DevClient, workspace: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    env = environ_without_settings()
    env.update(
        RUNNER_DAEMON_URL=devserver.url,
        RUNNER_DAEMON_STATE_DIRECTORY=str(state),
        RUNNER_DAEMON_LOG_FORMAT="json",
    )
    pair = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runner_daemon",
            "pair",
            "--project-id",
            str(uuid.uuid4()),
            "--name",
            "ci-box",
            "--ttl",
            "60",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        link = ""
        with anyio.fail_after(20):
            while "/opik/pair/v1" not in link:
                link = (await anyio.to_thread.run_sync(pair.stdout.readline)).strip()  # type: ignore[union-attr]
        await api.dev_post("pairing/approve", {"link": link})
        out, err = await anyio.to_thread.run_sync(lambda: pair.communicate(timeout=30))
    finally:
        if pair.poll() is None:
            pair.kill()
    assert pair.returncode == 0, err
    session_id, activation_key, _, name = parse_link_fragment(link)
    assert name == "ci-box"
    credentials_file = state / CREDENTIALS_FILE
    assert stat.S_IMODE(credentials_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    stored = json.loads(credentials_file.read_text())
    assert base64.b64decode(stored["bridge_key"]) == derive_bridge_key(activation_key, session_id)
    assert f"paired runner {stored['runner_id']}" in out

    env.update({f"RUNNER_DAEMON_{k.upper()}": str(v) for k, v in FAST.items()})
    env["RUNNER_DAEMON_WORKSPACE_ROOT"] = str(workspace)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "runner_daemon", "run"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await until(lambda: bridge_ready(api, stored["runner_id"]), 20)
        command_id = await api.submit_command(stored["runner_id"], "ReadFile", {"path": "README.md"})
        record = await wait_terminal(api, stored["runner_id"], command_id)
        daemon.send_signal(signal.SIGTERM)
        _, daemon_err = await anyio.to_thread.run_sync(lambda: daemon.communicate(timeout=20))
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert record.status == "completed", daemon_err
    assert daemon.returncode == 0
    assert stored["bridge_key"] not in daemon_err


@pytest.mark.anyio
async def test_pairing_that_nobody_approves_expires(
    devserver: DevServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(None, {"url": devserver.url, "state_directory": tmp_path / "state"})
    args = argparse.Namespace(project_id=uuid.uuid4(), project_name=None, name="late", ttl=60, type="connect")
    real_wait = pairing.wait_until_connected

    async def impatient(api: DevClient, pending: pairing.PendingPairing, ttl: float, tick: Any) -> bytes:
        return await real_wait(api, pending, 1, tick, poll_interval=0.2)  # the session's TTL, shortened

    monkeypatch.setattr(pairing, "wait_until_connected", impatient)
    status = await cli._pair(settings, args)
    assert status == 75
    assert "pairing expired after 1s" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()


@pytest.mark.anyio
async def test_activation_needs_the_key_from_the_link(devserver: DevServer, api: DevClient) -> None:
    from runner_daemon.core.errors import Unauthorized
    from runner_daemon.core.models import PairingActivation, PairingSessionRequest

    session = await api.create_pairing_session(
        PairingSessionRequest(project_id=str(uuid.uuid4()), activation_key=base64.b64encode(KEY).decode())
    )
    forged = activation_hmac(bytes(32), session.session_id, "x")
    with pytest.raises(Unauthorized):
        await api.activate_pairing_session(
            session.session_id, PairingActivation(runner_name="x", hmac=forged)
        )
    from runner_daemon.core.errors import RunnerGone

    with pytest.raises(RunnerGone):
        await api.get_runner(session.runner_id)  # not visible until activated


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_secrets_never_reach_the_output(
    devserver: DevServer, api: DevClient, workspace: Path, tmp_path: Path, daemons: DaemonProcesses
) -> None:
    """Errors, retries, debug logging, a crashing handler: neither secret is ever printed."""
    api_key = "opik-api-key-" + secrets.token_hex(8)
    bridge_key = secrets.token_bytes(32)
    key_text = base64.b64encode(bridge_key).decode()
    key_file = tmp_path / "bridge.key"
    key_file.write_text(key_text)
    runner_id = await api.dev_create_runner("secretive", bridge_key=bridge_key)
    env = daemon_environment(
        devserver.url,
        runner_id,
        workspace,
        bridge_key_file=key_file,
        log_level="debug",
        allow_unsigned_commands=False,
    )
    env["OPIK_API_KEY"] = api_key
    for route, status, count in [("heartbeat", 503, 2), ("poll", 500, 2), ("poll", 401, 1)]:
        await api.dev_post("faults", {"route": route, "status": status, "count": count})
    _, err = await finish(daemons.spawn(env))
    assert daemons.last.returncode == 77  # the injected 401 on poll: credentials refused
    # Again, with commands that fail in every way and reports that must be retried.
    await api.dev_post("faults", {"route": "report", "status": 502, "count": 2})
    proc = daemons.spawn(env)
    await until(lambda: bridge_ready(api, runner_id), 20)
    ids = [
        await api.submit_command(runner_id, "Boom", {"note": api_key}),
        await api.submit_command(runner_id, "ReadFile", {"path": key_text}),
        await api.submit_command(runner_id, "Exec", {"command": "env; echo $OPIK_API_KEY"}),
        await api.submit_command(runner_id, "ReadFile", {"path": "x", HMAC_FIELD: "bad"}),
    ]
    for command_id in ids:
        await wait_terminal(api, runner_id, command_id)
    exec_record = await api.get_command(runner_id, ids[2])
    proc.send_signal(signal.SIGTERM)
    out2, err2 = await finish(proc)
    everything = err + out2 + err2
    assert "handler raised" in err2 and "Traceback" not in everything
    assert exec_record.result is not None and exec_record.result["stdout"].strip()
    assert api_key not in json.dumps(exec_record.result)
    for secret in (api_key, key_text, bridge_key.hex()):
        assert secret not in everything
    assert os.environ.get("OPIK_API_KEY") != api_key


def test_check_config_and_repr_mask_secrets(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPIK_API_KEY", "masked-key-123")
    assert cli.main(["check-config"]) == 0
    assert "masked-key-123" not in capsys.readouterr().out
    settings = load_settings()
    assert "masked-key-123" not in repr(settings) and "masked-key-123" not in str(settings)
