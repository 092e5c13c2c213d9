"""The Landlock sandbox as a building block: the policy derived, and what the kernel enforces."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from runner_daemon.core.errors import ConfigError
from runner_daemon.core.settings import load_settings
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.server import DevServer
from runner_daemon.system.protection import ProtectionProbe
from runner_daemon.system.sandbox import SandboxPolicy, SandboxSupport, build_policy
from tests.support import DaemonProcesses, daemon_environment, finish, runner_connected, until, wait_terminal

SUPPORT = SandboxSupport.probe()
needs_landlock = pytest.mark.skipif(SUPPORT.abi < 1, reason=SUPPORT.describe())


@pytest.fixture
def place(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("ws", "home", "state", "other")}
    for path in paths.values():
        path.mkdir()
    (paths["home"] / ".ssh").mkdir()
    (paths["home"] / ".ssh" / "id_ed25519").write_text("FAKE PRIVATE KEY\n")
    (paths["state"] / "private.json").write_text("state secret")
    (paths["other"] / "notes.txt").write_text("another project\n")
    return paths


def policy_for(place: dict[str, Path], **kwargs: object) -> SandboxPolicy:
    environ = {**os.environ, "HOME": str(place["home"])}
    policy, _ = build_policy(workspace=place["ws"], state_directory=place["state"], environ=environ, **kwargs)  # type: ignore[arg-type]
    return policy


def run(policy: SandboxPolicy, script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        policy.wrap(["bash", "-c", script]), cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_the_state_directory_is_never_in_a_policy(place: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="holds the state directory"):
        build_policy(
            workspace=place["ws"], state_directory=place["state"], read_paths=[str(place["state"].parent)]
        )
    with pytest.raises(ConfigError, match="inside workspace_root"):
        build_policy(workspace=place["state"].parent, state_directory=place["state"])
    # A derived path that holds it (a PATH entry's prefix) is left out, and said so.
    tool = place["state"] / "bin"
    tool.mkdir()
    policy, left_out = build_policy(
        workspace=place["ws"], state_directory=place["state"], environ={"PATH": f"{tool}:/usr/bin"}
    )
    assert str(place["state"]) in left_out
    assert not any(Path(p) in (place["state"], *place["state"].parents[:1]) for p in policy.read)


def test_the_home_folder_itself_is_never_derived(place: dict[str, Path]) -> None:
    home_bin = place["home"] / "bin"
    home_bin.mkdir()
    policy, left_out = build_policy(
        workspace=place["ws"],
        state_directory=place["state"],
        environ={"HOME": str(place["home"]), "PATH": f"{home_bin}:/usr/bin"},
    )
    assert str(home_bin) in policy.read
    assert str(place["home"]) not in policy.read and str(place["home"]) in left_out


@needs_landlock
def test_outside_the_workspace_a_command_reads_only_the_system_and_writes_nothing(
    place: dict[str, Path],
) -> None:
    policy = policy_for(place)
    denied = {
        "a key in the home folder": f"cat {place['home']}/.ssh/id_ed25519",
        "the daemon's state": f"cat {place['state']}/private.json",
        "another project": f"cat {place['other']}/notes.txt",
        "a write outside": f"echo x > {place['other']}/planted.txt",
        "listing the temporary folder": f"ls {place['ws'].parent}",
        "python opening the state": f"python3 -c 'open(\"{place['state']}/private.json\").read()'",
    }
    for what, script in denied.items():
        done = run(policy, script, place["ws"])
        assert done.returncode != 0, what
        assert "Permission denied" in done.stderr or "PermissionError" in done.stderr, (what, done.stderr)
    allowed = ["echo hi > made.txt && cat made.txt", "python3 -c 'print(6 * 7)'", "ls /usr/bin >/dev/null"]
    for script in allowed:
        done = run(policy, script, place["ws"])
        assert done.returncode == 0, (script, done.stderr)
    assert (place["ws"] / "made.txt").read_text() == "hi\n"
    assert not (place["other"] / "planted.txt").exists()


@needs_landlock
def test_a_symlink_planted_in_the_workspace_leads_nowhere(place: dict[str, Path]) -> None:
    (place["ws"] / "key").symlink_to(place["home"] / ".ssh" / "id_ed25519")
    done = run(policy_for(place), "cat key", place["ws"])
    assert done.returncode != 0 and "FAKE PRIVATE KEY" not in done.stdout


@pytest.mark.skipif(SUPPORT.abi < 6, reason="signal scoping needs Landlock ABI 6")
def test_signals_cannot_leave_the_sandbox(place: dict[str, Path]) -> None:
    done = run(policy_for(place), f"kill -0 {os.getpid()}", place["ws"])
    assert done.returncode != 0 and "not permitted" in done.stderr
    done = run(policy_for(place), "sleep 30 & kill $!; wait $!; echo $?", place["ws"])
    assert done.stdout.strip() == "143"  # within the sandbox, signals work


@pytest.mark.skipif(SUPPORT.abi < 4, reason="TCP rules need Landlock ABI 4")
@pytest.mark.parametrize("network", [True, False])
def test_tcp_bind_is_denied_and_connect_follows_the_setting(place: dict[str, Path], network: bool) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        connect = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5).close()"
        done = run(policy_for(place, network=network), f'python3 -c "{connect}"', place["ws"])
        assert (done.returncode == 0) == network, done.stderr
    bind = "import socket; socket.create_server(('127.0.0.1', 0))"
    done = run(policy_for(place, network=network), f'python3 -c "{bind}"', place["ws"])
    assert done.returncode != 0 and "PermissionError" in done.stderr


@needs_landlock
def test_a_read_only_policy_writes_nowhere(place: dict[str, Path]) -> None:
    done = run(policy_for(place).without_writes(), "cat /dev/null > x.txt", place["ws"])
    assert done.returncode != 0 and not (place["ws"] / "x.txt").exists()
    done = run(policy_for(place).without_writes(), "ls && echo ok >/dev/null", place["ws"])
    assert done.returncode == 0, done.stderr


@needs_landlock
def test_a_broken_policy_never_runs_the_command_unconfined(place: dict[str, Path]) -> None:
    launcher = policy_for(place).launcher
    done = subprocess.run(
        [*launcher, "x:/nowhere", "--", "touch", str(place["other"] / "ran")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 125 and "not running the command" in done.stderr
    assert not (place["other"] / "ran").exists()


@needs_landlock
def test_a_protected_folder_inside_the_workspace_is_read_only(place: dict[str, Path]) -> None:
    if not SandboxSupport.probe(check_protection=True).protects:
        pytest.skip("no mount namespaces here")
    git = place["ws"] / ".git"
    git.mkdir()
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    policy = policy_for(place).protecting(git)
    for script in ("echo x > .git/HEAD", "touch .git/new", "rm .git/HEAD", "umount .git"):
        assert run(policy, script, place["ws"]).returncode != 0, script
    assert run(policy, "cat .git/HEAD && echo y > beside.txt", place["ws"]).returncode == 0
    assert (git / "HEAD").read_text() == "ref: refs/heads/main\n" and not (git / "new").exists()
    assert (place["ws"] / "beside.txt").exists()


# --- a real daemon in the foreground, its Exec commands sandboxed ----------------------------

ATTACKS = {
    "read a key in the home folder": "cat $HOME/.ssh/id_ed25519",
    "write outside the workspace": "echo x > {other}/planted.txt && cat {other}/planted.txt",
    "signal the daemon": "kill -0 {daemon_pid} && echo signalled",
    "python opens the daemon's state": "python3 -c 'print(open(\"{state}/outbox.jsonl\").read())'",
    "follow a planted symlink": "ln -s $HOME/.ssh/id_ed25519 planted && cat planted",
    "read another project": "cat {other}/notes.txt",
}
WORKS = {
    "write in the workspace": "echo hi > made.txt && cat made.txt",
    "python": "python3 -c 'print(6 * 7)'",
    "git status": "git init -q . 2>/dev/null; git status --short >/dev/null && echo git-ok",
    "list the system": "ls /usr/bin >/dev/null && echo listed",
    "a private temporary folder": 'echo t > "$TMPDIR/t" && cat "$TMPDIR/t"',
}


@needs_landlock
@pytest.mark.anyio
@pytest.mark.adversarial
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("sandbox", ["landlock", "off"])
async def test_a_real_daemon_confines_what_exec_runs(
    place: dict[str, Path],
    devserver: DevServer,
    api: DevClient,
    runner_id: str,
    daemons: DaemonProcesses,
    sandbox: str,
) -> None:
    env = daemon_environment(
        devserver.url, runner_id, place["ws"], state_directory=place["state"], exec__sandbox=sandbox
    )
    env["HOME"] = str(place["home"])
    daemon = daemons.spawn(env)
    await until(lambda: runner_connected(api, runner_id), 20)
    names = {"other": place["other"], "state": place["state"], "daemon_pid": daemon.pid}

    async def run_exec(script: str, background: bool = False) -> Any:
        args: dict[str, Any] = {"command": script.format(**names), "background": background}
        command_id = await api.submit_command(runner_id, "Exec", args)
        record = await wait_terminal(api, runner_id, command_id, 30)
        assert record.status == "completed", record
        return record.result

    attacks = {what: await run_exec(script) for what, script in ATTACKS.items()}
    # A background process that tries the same later, after its command was answered.
    await run_exec(f"sleep 1; cat $HOME/.ssh/id_ed25519 > {place['ws']}/stolen.txt 2>&1", True)
    works = {what: await run_exec(script) for what, script in WORKS.items()}
    assert (place["ws"] / ".git").is_dir()
    (place["ws"] / "found.txt").write_text("needle\n")
    search_id = await api.submit_command(runner_id, "SearchFiles", {"pattern": "needle"})
    search = await wait_terminal(api, runner_id, search_id, 30)
    await until((place["ws"] / "stolen.txt").exists, 20)
    stolen = (place["ws"] / "stolen.txt").read_text()
    daemon.send_signal(signal.SIGTERM)
    await finish(daemon, 60)
    for what, result in works.items():
        assert result["exit_code"] == 0, (what, result)
    # SearchFiles' git (a work tree since "git status" above) runs in the read-only sandbox.
    assert search.status == "completed", search
    assert [match["file"] for match in search.result["matches"]] == ["found.txt"]
    if sandbox == "landlock":
        for what, result in attacks.items():
            assert result["exit_code"] != 0, (what, result)
            assert re.search(r"Permission denied|not permitted|PermissionError", result["stderr"]), what
        assert "FAKE PRIVATE KEY" not in stolen and "Permission denied" in stolen
        assert not (place["other"] / "planted.txt").exists()
    else:  # the same commands without the sandbox: the difference is the sandbox's, not the machine's
        assert all(result["exit_code"] == 0 for result in attacks.values()), attacks
        assert "FAKE PRIVATE KEY" in stolen
    assert daemon.returncode == 0  # and the daemon was not signalled


@needs_landlock
def test_the_sandbox_command_shows_what_a_command_can_do(place: dict[str, Path]) -> None:
    env = {**os.environ, "HOME": str(place["home"]), "RUNNER_DAEMON_STATE_DIRECTORY": str(place["state"])}
    cli = [sys.executable, "-m", "runner_daemon", "sandbox", "--workspace-root", str(place["ws"]), "--"]
    denied = subprocess.run(
        [*cli, "cat", str(place["home"] / ".ssh" / "id_ed25519")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    assert "Landlock ABI" in denied.stderr and "TCP bind: denied" in denied.stderr
    allowed = subprocess.run([*cli, "ls", "/usr/bin"], env=env, capture_output=True, text=True, check=False)
    assert allowed.returncode == 0 and "bash" in allowed.stdout


def test_without_landlock_the_default_refuses_to_start(
    place: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from runner_daemon.system import sandbox

    monkeypatch.setattr(sandbox, "landlock_abi", lambda: 0)
    settings = load_settings(None, {"workspace_root": place["ws"], "state_directory": place["state"]})
    with pytest.raises(ConfigError, match='set \\[exec\\] sandbox = "off"'):
        sandbox.sandbox_for(settings)
    off = load_settings(None, {"workspace_root": place["ws"], "exec": {"sandbox": "off"}})
    assert sandbox.sandbox_for(off)[0] is None


# --- the protection probe, begun before the imports -------------------------------------------


def _probe_folders() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("runner-daemon-probe-")}


def test_the_protection_probe_begins_only_for_run_and_leaves_nothing_behind() -> None:
    assert ProtectionProbe.for_command_line(["check-config"]) is None
    assert ProtectionProbe.for_command_line(["sandbox", "run"]) is None
    before = _probe_folders()
    probe = ProtectionProbe.for_command_line(["run", "--config", "x.toml"])
    assert probe is not None
    assert probe.result() is SandboxSupport.probe(check_protection=True).protects
    discarded = ProtectionProbe()
    discarded.discard()
    assert discarded.result() is False
    assert _probe_folders() <= before


def test_the_entry_point_begins_the_probe_before_the_heavy_imports() -> None:
    """The probe's launcher run overlaps the imports only if the entry imports nothing heavy."""
    heavy = "{'pydantic', 'anyio', 'structlog'}"
    script = f"import sys, runner_daemon.entry; print(sorted({heavy} & set(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"
