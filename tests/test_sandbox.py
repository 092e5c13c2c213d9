"""The Landlock sandbox as a building block: the policy derived, and what the kernel enforces."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from runner_daemon.errors import ConfigError
from runner_daemon.sandbox import SandboxPolicy, SandboxSupport, build_policy

SUPPORT = SandboxSupport.probe()
needs_landlock = pytest.mark.skipif(SUPPORT.abi < 1, reason=SUPPORT.describe())


@pytest.fixture
def place(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("ws", "home", "state", "other")}
    for path in paths.values():
        path.mkdir()
    (paths["home"] / ".ssh").mkdir()
    (paths["home"] / ".ssh" / "id_ed25519").write_text("FAKE PRIVATE KEY\n")
    (paths["state"] / "credentials.json").write_text('{"bridge_key": "secret"}')
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
        "the daemon's state": f"cat {place['state']}/credentials.json",
        "another project": f"cat {place['other']}/notes.txt",
        "a write outside": f"echo x > {place['other']}/planted.txt",
        "listing the temporary folder": f"ls {place['ws'].parent}",
        "python opening the state": f"python3 -c 'open(\"{place['state']}/credentials.json\").read()'",
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
