"""Exec under attack: processes that try to outlive their command or the daemon, and children
that try to read the daemon's secrets (its environment, /proc, its memory)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from runner_daemon.bridge.results import Outcome
from runner_daemon.bridge.signing import encode_bridge_key
from runner_daemon.core.models import BridgeCommand
from runner_daemon.core.settings import load_settings
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.server import DevServer
from runner_daemon.system.environment import child_environment
from runner_daemon.system.processes import GroupWatcher, group_alive
from tests.support import (
    REPO,
    DaemonProcesses,
    command_status_is,
    daemon_environment,
    executor_for,
    finish,
    process_gone,
    runner_connected,
    until,
    wait_terminal,
)

pytestmark = [pytest.mark.anyio, pytest.mark.adversarial]

# Test secrets: a bridge key without NUL bytes (it goes into an environment variable raw).
BRIDGE_KEY = bytes(byte % 255 + 1 for byte in hashlib.sha256(b"bridge key under test").digest())
KEY_TEXT = encode_bridge_key(BRIDGE_KEY)
API_KEY = "opik-api-key-" + hashlib.sha256(b"api key under test").hexdigest()[:24]
UNPRIVILEGED_USER = "rd-exec-test"


def b64(data: bytes | str, urlsafe: bool = False) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(raw).decode()


# Every way an operator might have put one of the keys into the daemon's environment.
LEAKY_VALUES = {
    "bridge_key_text": KEY_TEXT,
    "bridge_key_text_wrapped": f"  {KEY_TEXT[:20]}\n{KEY_TEXT[20:]}\n",
    "bridge_key_hex": BRIDGE_KEY.hex(),
    "bridge_key_HEX": BRIDGE_KEY.hex().upper(),
    "bridge_key_urlsafe_unpadded": b64(BRIDGE_KEY, urlsafe=True).rstrip("="),
    "bridge_key_raw_bytes": BRIDGE_KEY.decode("utf-8", "surrogateescape"),
    "bridge_key_as_latin1": BRIDGE_KEY.decode("latin-1"),
    "bridge_key_text_in_base64": b64(KEY_TEXT),
    "bridge_key_text_percent_encoded": urllib.parse.quote(KEY_TEXT, safe=""),
    "bridge_key_in_json": json.dumps({"key": KEY_TEXT}).replace("/", "\\/"),
    "bridge_key_in_url": f"https://deploy:{urllib.parse.quote(KEY_TEXT, safe='')}@example.com/hook",
    "api_key_base64": b64(API_KEY),
    "api_key_in_basic_auth": "Basic " + b64(f"user:{API_KEY}"),
    "api_key_in_bearer": f"Bearer {API_KEY}",
    "api_key_hex": API_KEY.encode().hex(),
    "api_key_urlsafe_in_text": "x" + b64("ab" + API_KEY + "cd", urlsafe=True),
}


@pytest.mark.parametrize("value", LEAKY_VALUES.values(), ids=LEAKY_VALUES.keys())
def test_child_environment_drops_both_keys_in_any_encoding(tmp_path: Path, value: str) -> None:
    settings = load_settings(None, {"workspace_root": tmp_path, "api_key": API_KEY})
    environ = {"PATH": "/bin", "DEPLOY_BRIDGE_KEY": value}
    assert child_environment(settings, environ, BRIDGE_KEY) == {"PATH": "/bin"}


def test_child_environment_keeps_innocent_values(tmp_path: Path) -> None:
    settings = load_settings(None, {"workspace_root": tmp_path, "api_key": "short"})
    innocent = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/home/runner",
        "OTHER_KEY": b64(hashlib.sha256(b"another key").digest()),
        "PART_OF_KEY": KEY_TEXT[:6],
        "SHORT_KEY_INSIDE": "not-short-at-all",  # a short secret is only matched whole
        "EMPTY": "",
    }
    assert child_environment(settings, innocent, BRIDGE_KEY) == innocent
    assert child_environment(settings, {**innocent, "COPY": " short\n"}, BRIDGE_KEY) == innocent


# --- nothing outlives a foreground command ------------------------------------------------


def pid_in(path: Path) -> int | None:
    text = path.read_text().strip() if path.exists() else ""
    return int(text) if text else None


async def read_pid(path: Path) -> int:
    await until(lambda: pid_in(path))
    pid = pid_in(path)
    assert pid is not None
    return pid


def result_of(outcome: Outcome) -> dict[str, Any]:
    assert outcome.status == "completed", outcome.error
    assert outcome.result is not None
    return outcome.result


@contextlib.contextmanager
def killed_at_exit(pids: list[int]) -> Iterator[None]:
    """A failing test must not leave its sleepers (or their groups) behind."""
    try:
        yield
    finally:
        for pid in pids:
            if not process_gone(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            if group_alive(pid):
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    "command",
    [
        "sleep 100 >/dev/null 2>&1 & echo $! > left.pid",
        "(trap '' TERM; exec sleep 100) >/dev/null 2>&1 & echo $! > left.pid",
        "nested() { sleep 100; }; nested </dev/null >/dev/null 2>&1 & echo $! > left.pid; exit 3",
    ],
    ids=["detached", "ignores_sigterm", "non_zero_exit"],
)
async def test_a_foreground_command_leaves_no_process_behind(workspace: Path, command: str) -> None:
    outcome = await executor_for(workspace).execute(
        BridgeCommand(command_id="c", type="Exec", args={"command": command})
    )
    left = await read_pid(workspace / "left.pid")
    with killed_at_exit([left]):
        assert result_of(outcome)["exit_code"] in (0, 3)
        await until(lambda: process_gone(left), timeout=20)


# --- background processes end with the daemon, however it stops --------------------------

SLEEPERS = "sleep 300 >/dev/null 2>&1 & echo $! > {name}.pid; sleep 300"


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def start_background(api: DevClient, runner_id: str, workspace: Path, name: str) -> list[int]:
    """A background Exec whose leader and detached child both sleep; their pids."""
    command_id = await api.submit_command(
        runner_id, "Exec", {"command": SLEEPERS.format(name=name), "background": True}
    )
    record = await wait_terminal(api, runner_id, command_id, 20)
    assert record.status == "completed" and record.result is not None, record
    assert record.result["status"] == "running"
    return [record.result["pid"], await read_pid(workspace / f"{name}.pid")]


async def all_gone(pids: list[int]) -> None:
    # pids[0] leads the group: it must be gone as a whole, detached members included.
    await until(lambda: all(process_gone(pid) for pid in pids) and not group_alive(pids[0]), timeout=30)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGHUP", "disconnected"])
async def test_background_processes_end_when_the_daemon_stops(
    devserver: DevServer,
    api: DevClient,
    runner_id: str,
    workspace: Path,
    daemons: DaemonProcesses,
    how: str,
) -> None:
    proc = daemons.spawn(daemon_environment(devserver.url, runner_id, workspace))
    await until(lambda: runner_connected(api, runner_id), 20)
    pids = await start_background(api, runner_id, workspace, "bg")
    with killed_at_exit(pids):
        if how == "disconnected":
            await api.disconnect(runner_id)  # the next poll or heartbeat answers 404
        else:
            proc.send_signal(signal.Signals[how])
        _, stderr = await finish(proc, 60)
        lines = json_lines(stderr)
        if how == "disconnected":
            assert proc.returncode == 69, stderr
        else:
            assert proc.returncode == 0, stderr
            assert any(line.get("reason") == how for line in lines), stderr
        await all_gone(pids)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_background_processes_end_on_a_forced_exit(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path, daemons: DaemonProcesses
) -> None:
    """A second signal abandons in-flight commands, but still ends the background ones."""
    proc = daemons.spawn(daemon_environment(devserver.url, runner_id, workspace, shutdown_grace_seconds=60))
    await until(lambda: runner_connected(api, runner_id), 20)
    pids = await start_background(api, runner_id, workspace, "bg")
    with killed_at_exit(pids):
        slow = await api.submit_command(runner_id, "Slow", {"seconds": 60})
        await until(lambda: command_status_is(api, runner_id, slow, "picked_up"), 20)
        proc.send_signal(signal.SIGTERM)
        await until(lambda: any(line.get("reason") == "SIGTERM" for line in json_lines(proc.output()[1])), 20)
        proc.send_signal(signal.SIGHUP)
        await finish(proc, 60)
        assert proc.returncode == 128 + signal.SIGHUP
        await all_gone(pids)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_processes_end_even_when_the_daemon_is_killed(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path, daemons: DaemonProcesses
) -> None:
    """SIGKILL leaves the daemon no chance to clean up: its group watcher does it."""
    proc = daemons.spawn(daemon_environment(devserver.url, runner_id, workspace))
    await until(lambda: runner_connected(api, runner_id), 20)
    background = await start_background(api, runner_id, workspace, "bg")
    command = "echo $$ > fg_leader.pid; " + SLEEPERS.format(name="fg")
    await api.submit_command(runner_id, "Exec", {"command": command, "timeout": 120})
    foreground = [await read_pid(workspace / "fg_leader.pid"), await read_pid(workspace / "fg.pid")]
    with killed_at_exit(background + foreground):
        # The daemon tells its watcher of a group just after starting it: let a whole other
        # command run first, so that moment is surely past.
        await wait_terminal(api, runner_id, await api.submit_command(runner_id, "Exec", {"command": "true"}))
        proc.kill()
        await finish(proc, 60)
        await all_gone(background)
        await all_gone(foreground)


def spawn_group(command: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["bash", "-c", command], start_new_session=True)


async def test_the_group_watcher_ends_what_it_watches_and_nothing_else() -> None:
    watcher = GroupWatcher(grace=0.5)
    stubborn = spawn_group("trap '' TERM; sleep 300 & wait")
    forgotten = spawn_group("sleep 300")
    groups = [stubborn.pid, forgotten.pid]
    with killed_at_exit(groups):
        watcher.watch(stubborn.pid)
        watcher.watch(forgotten.pid)
        watcher.forget(forgotten.pid)
        watcher.close()  # what the daemon's death does: the watcher's input ends
        await until(lambda: stubborn.poll() is not None and not group_alive(stubborn.pid), timeout=30)
        assert forgotten.poll() is None
    for child in (stubborn, forgotten):
        child.wait(10)


# --- an Exec child cannot read the daemon's secrets ----------------------------------------

# Run by an Exec child: scan the daemon's writable memory for the secrets listed in
# needles.json (which the daemon never reads) and say which it found.
PEEK = """
import json, sys
pid = sys.argv[1]
needles = {name: bytes.fromhex(value) for name, value in json.load(open("needles.json")).items()}
try:
    maps = open(f"/proc/{pid}/maps").read().splitlines()
    mem = open(f"/proc/{pid}/mem", "rb")
except OSError as exc:
    sys.exit(f"cannot read the daemon's memory: {exc.strerror}")
scanned = 0
for line in maps:
    addresses, perms = line.split()[:2]
    start, end = (int(x, 16) for x in addresses.split("-"))
    if not perms.startswith("rw") or end - start > 1 << 28:
        continue
    try:
        mem.seek(start)
        data = mem.read(end - start)
    except (OSError, ValueError, OverflowError):
        continue
    scanned += len(data)
    for name, needle in needles.items():
        if needle in data:
            print("FOUND", name)
print("scanned", scanned, "bytes")
"""


@pytest.fixture(scope="module")
def unprivileged_user() -> Iterator[pwd.struct_passwd]:
    """A system user to run a daemon as (created for the tests, removed after)."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root on Linux with useradd, to run a daemon as an unprivileged user")
    try:
        yield pwd.getpwnam(UNPRIVILEGED_USER)  # left by an interrupted run: reuse it
        return
    except KeyError:
        pass
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", UNPRIVILEGED_USER],
        check=True,
        timeout=60,
    )
    try:
        yield pwd.getpwnam(UNPRIVILEGED_USER)
    finally:
        subprocess.run(["userdel", UNPRIVILEGED_USER], check=False, timeout=60)


def spawn_as(user: pwd.struct_passwd, env: dict[str, str], logs: IO[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.slow_daemon"],
        cwd=REPO,
        env=env,
        stdout=logs,
        stderr=logs,
        text=True,
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
    )


def chown_tree(root: Path, user: pwd.struct_passwd) -> None:
    for path in [root, *root.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)


# Env variables holding the keys under other names, and the forms the output must not hold.
DISGUISED = {"DEPLOY_BRIDGE_KEY": KEY_TEXT, "OTHER": b64(API_KEY)} | {
    f"LEAK_{index}": value for index, value in enumerate(LEAKY_VALUES.values())
}
FORBIDDEN = [
    API_KEY,
    KEY_TEXT,
    BRIDGE_KEY.hex(),
    BRIDGE_KEY.hex().upper(),
    b64(API_KEY),
    b64(BRIDGE_KEY, urlsafe=True).rstrip("="),
    BRIDGE_KEY.decode("latin-1"),
    *LEAKY_VALUES.values(),
]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_exec_children_cannot_read_the_daemons_secrets(
    devserver: DevServer, api: DevClient, unprivileged_user: pwd.struct_passwd
) -> None:
    home = Path(tempfile.mkdtemp(prefix="rd-exec-test-"))  # tmp_path is private to root
    logs = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed below
    proc: subprocess.Popen[str] | None = None
    try:
        workspace, state = home / "ws", home / "state"
        workspace.mkdir()
        state.mkdir()
        (home / "bridge.key").write_text(KEY_TEXT)
        (workspace / "peek.py").write_text(PEEK)
        needles = {
            "api_key": API_KEY.encode(),
            "bridge_key": BRIDGE_KEY,
            "bridge_key_text": KEY_TEXT.encode(),
        }
        (workspace / "needles.json").write_text(json.dumps({k: v.hex() for k, v in needles.items()}))
        chown_tree(home, unprivileged_user)
        runner_id = await api.dev_create_runner("unprivileged", bridge_key=BRIDGE_KEY)  # signs commands
        env = daemon_environment(
            devserver.url,
            runner_id,
            workspace,
            bridge_key_file=home / "bridge.key",
            allow_unsigned_commands="false",
            state_directory=state,
        )
        env |= {"OPIK_API_KEY": API_KEY, "HOME": str(home), "VISIBLE": "visible-value", **DISGUISED}
        proc = spawn_as(unprivileged_user, env, logs)
        await until(lambda: runner_connected(api, runner_id), 20)
        attacks = [
            "env",
            "cat /proc/$PPID/environ | tr '\\0' '\\n'",
            f"cat /proc/{proc.pid}/environ /proc/{proc.pid}/task/*/environ | tr '\\0' '\\n'",
            f"python3 peek.py {proc.pid}",
            f"cat /proc/{proc.pid}/cmdline; ls -l /proc/{proc.pid}/fd/",
        ]
        texts = []
        for attack in attacks:
            command_id = await api.submit_command(runner_id, "Exec", {"command": attack})
            record = await wait_terminal(api, runner_id, command_id, 30)
            assert record.status == "completed" and record.result is not None, record
            texts.append(record.result["stdout"] + record.result["stderr"])
        assert "VISIBLE=visible-value" in texts[0]  # the commands ran, and saw the environment
        everything = "\n".join(texts)
        assert "FOUND" not in everything
        for form in FORBIDDEN:
            assert form not in everything
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(30)
        logs.close()
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_hang_up_of_a_closed_terminal_still_drains_and_exits_0(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path
) -> None:
    """The terminal is gone before SIGHUP arrives: every log line now fails with EIO."""
    main, terminal = os.openpty()
    env = daemon_environment(devserver.url, runner_id, workspace, log_format="console")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.slow_daemon"],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
        text=True,
    )
    try:
        os.close(terminal)
        await until(lambda: runner_connected(api, runner_id), 20)
        os.close(main)  # the terminal window closes
        command_id = await api.submit_command(runner_id, "ReadFile", {"path": "README.md"})
        record = await wait_terminal(api, runner_id, command_id, 20)
        assert record.status == "completed"  # logging into the void did not stop the work
        proc.send_signal(signal.SIGHUP)
        await finish(proc, 60)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_background_log_folder_goes_with_the_daemon(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path, daemons: DaemonProcesses
) -> None:
    proc = daemons.spawn(daemon_environment(devserver.url, runner_id, workspace))
    await until(lambda: runner_connected(api, runner_id), 20)
    command_id = await api.submit_command(
        runner_id, "Exec", {"command": "echo hi; sleep 60", "background": True}
    )
    record = await wait_terminal(api, runner_id, command_id, 20)
    assert record.result is not None
    log_folder = Path(record.result["log_file"]).parent
    assert log_folder.is_dir() and log_folder.name.startswith(f"runner-daemon-{proc.pid}-exec-")
    proc.send_signal(signal.SIGTERM)
    await finish(proc, 60)
    assert proc.returncode == 0 and not log_folder.exists()
