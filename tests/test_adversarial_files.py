"""Co-tenant attacks on the file handlers: folders swapped for symlinks, special files.

A process sharing the workspace can exchange two names atomically (``renameat2`` with
``RENAME_EXCHANGE``) as often as it likes. Whatever it does, no result may carry a name or a
byte from outside the root, and no command may hang on a FIFO, socket or device.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from runner_daemon.bridge.results import Outcome
from runner_daemon.core.models import BridgeCommand
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.server import DevServer
from tests.support import (
    DaemonProcesses,
    daemon_environment,
    executor_for,
    finish,
    git,
    runner_connected,
    until,
)

pytestmark = [pytest.mark.anyio, pytest.mark.adversarial]

GIT = shutil.which("git")
AT_FDCWD = -100
RENAME_EXCHANGE = 2
SECRET = "SECRET-OUTSIDE"
# Loops renameat2(RENAME_EXCHANGE) on two paths until killed: the co-tenant.
SWAPPER = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
first, second = sys.argv[1].encode(), sys.argv[2].encode()
libc.renameat2(-100, first, -100, second, 2)
print("swapping", flush=True)
while True:
    libc.renameat2(-100, first, -100, second, 2)
"""


def exchange(first: Path, second: Path) -> None:
    """Swap two names atomically; skips the test where the kernel or libc cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        pytest.skip("libc has no renameat2")
    if libc.renameat2(AT_FDCWD, bytes(first), AT_FDCWD, bytes(second), RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            pytest.skip(f"RENAME_EXCHANGE unsupported here: {os.strerror(code)}")
        raise OSError(code, os.strerror(code))


@contextmanager
def swapping(first: Path, second: Path) -> Iterator[None]:
    """Run the co-tenant on two paths for the duration of a ``with`` block."""
    exchange(first, second)
    exchange(first, second)
    # Leaving the Popen block closes the pipe and reaps the killed process.
    with subprocess.Popen(
        [sys.executable, "-c", SWAPPER, str(first), str(second)], stdout=subprocess.PIPE
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"swapping\n"  # EOF if it died
            yield
        finally:
            proc.kill()


async def run(root: Path, command_type: str, args: dict[str, Any], timeout: int = 30) -> Outcome:
    command = BridgeCommand(command_id="c1", type=command_type, args=args, timeout_seconds=timeout)
    return await executor_for(root).execute(command)


def leaked(outcome: Outcome) -> bool:
    text = json.dumps(outcome.result) + json.dumps(outcome.error.model_dump() if outcome.error else None)
    return SECRET in text or "secret-name" in text


@pytest.fixture(params=["plain", pytest.param("git", marks=pytest.mark.skipif(GIT is None, reason="no git"))])
def swapped_tree(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """``box`` (a real folder) and ``box-link`` (a symlink to outside) swapping places.

    Outside holds the same names as ``box`` with secret content, and secret names of its own.
    """
    outside = tmp_path / "outside"
    (outside / "deeper").mkdir(parents=True)
    for name in ("inner.txt", "untracked.txt", "secret-name.txt", "deeper/secret-name-2.txt"):
        (outside / name).write_text(f"{SECRET} needle\nline two {SECRET}\n")
    root = tmp_path / "ws"
    (root / "box" / "deeper").mkdir(parents=True)
    (root / "box" / "inner.txt").write_text("public needle\nline two\n")
    (root / "box" / "deeper" / "more.txt").write_text("public needle\n")
    (root / "box-link").symlink_to(outside, target_is_directory=True)
    if request.param == "git":
        git(root, "init", "-q")
        git(root, "add", "-A")
        git(root, "commit", "-q", "-m", "files")
    (root / "box" / "untracked.txt").write_text("public needle\n")
    with swapping(root / "box", root / "box-link"):
        yield root


COMMANDS: list[tuple[str, dict[str, Any]]] = [
    ("ReadFile", {"path": "box/inner.txt"}),
    ("ReadFile", {"path": "box/untracked.txt", "offset": 1}),
    ("ListFiles", {"path": "box", "depth": 3}),
    ("ListFiles", {"depth": 4}),
    ("SearchFiles", {"pattern": "needle|line two"}),
    ("SearchFiles", {"pattern": "needle", "path": "box"}),
    ("SearchFiles", {"pattern": "needle", "glob": "box/*"}),
    ("SearchFiles", {"pattern": "two"}),
]


async def test_a_folder_swapped_for_a_symlink_never_leaks_outside_content_or_names(
    swapped_tree: Path,
) -> None:
    leaks = []
    codes = set()
    for round_number in range(10):
        for command_type, args in COMMANDS:
            outcome = await run(swapped_tree, command_type, args)
            if leaked(outcome):
                leaks.append((round_number, command_type, args, outcome))
            codes.add(outcome.error.code if outcome.error else "completed")
    assert leaks == []
    # A swap is refused in the documented vocabulary, never as an internal error.
    assert codes <= {"completed", "path_traversal", "file_not_found"}


# --- special files -------------------------------------------------------------------------


@pytest.fixture
def special_files(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """A workspace holding a FIFO, a listening unix socket and (as root) a /dev/zero twin."""
    root = tmp_path / "ws"
    root.mkdir()
    (root / "plain.txt").write_text("needle\n")
    os.mkfifo(root / "pipe.txt")
    names = ["pipe.txt", "sock.txt"]
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(root / "sock.txt"))
        listener.listen()
        if os.geteuid() == 0:
            os.mknod(root / "zero.txt", stat.S_IFCHR | 0o666, os.makedev(1, 5))
            names.append("zero.txt")
        yield root, names


async def test_special_files_are_refused_at_once(special_files: tuple[Path, list[str]]) -> None:
    root, names = special_files
    for name in names:
        with anyio.fail_after(60):
            read = await run(root, "ReadFile", {"path": name})
            edit = await run(
                root, "EditFile", {"path": name, "edits": [{"old_string": "a", "new_string": "b"}]}
            )
            write = await run(root, "WriteFile", {"path": name, "content": "x"})
        assert read.error is not None and (read.error.code, read.error.message) == (
            "file_not_found",
            f"Not a regular file: {name}",
        )
        assert edit.error is not None and (edit.error.code, edit.error.message) == (
            "file_not_found",
            f"Not a regular file: {name}",
        )
        assert write.error is not None and write.error.code == "permission_denied", name
        assert not stat.S_ISREG((root / name).lstat().st_mode), "a special file was replaced"
    with anyio.fail_after(60):
        found = await run(root, "SearchFiles", {"pattern": "needle"})
        listed = await run(root, "ListFiles", {})
    assert found.result is not None and [m["file"] for m in found.result["matches"]] == ["plain.txt"]
    assert listed.result is not None and listed.result["files"] == sorted(["plain.txt", *names])


@pytest.fixture
def fifo_swap(tmp_path: Path) -> Iterator[Path]:
    """``data.txt`` and a FIFO swapping places, so a check may see a file and the open a FIFO.

    A reader that did block is released when the test ends, so a failure cannot hang pytest.
    """
    root = tmp_path / "ws"
    root.mkdir()
    (root / "data.txt").write_text("alpha\nneedle\n")
    fifo = root / "data.fifo"
    os.mkfifo(fifo)
    try:
        with swapping(root / "data.txt", fifo):
            yield root
    finally:
        release_fifo_readers(root)


def release_fifo_readers(root: Path) -> None:
    """Open every FIFO in ``root`` for writing without blocking, then close: readers wake."""
    for path in root.iterdir():
        if stat.S_ISFIFO(path.lstat().st_mode):
            with contextlib.suppress(OSError):  # ENXIO: no reader waiting
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


async def test_a_file_swapped_for_a_fifo_never_hangs_a_read(fifo_swap: Path) -> None:
    codes = set()
    for _ in range(40):
        for command_type, args in [
            ("ReadFile", {"path": "data.txt"}),
            ("SearchFiles", {"pattern": "needle"}),
        ]:
            outcome = await run(fifo_swap, command_type, args, timeout=10)
            codes.add(outcome.error.code if outcome.error else "completed")
    assert "timeout" not in codes
    assert codes <= {"completed", "file_not_found"}


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_daemon_still_stops_on_sigterm_after_commands_on_a_swapped_fifo(
    devserver: DevServer, api: DevClient, runner_id: str, tmp_path: Path, daemons: DaemonProcesses
) -> None:
    """A read or edit blocked on a FIFO for good would keep the stop waiting for ever."""
    root = tmp_path / "ws"
    root.mkdir()
    (root / "data.txt").write_text("alpha\nneedle\n")
    os.mkfifo(root / "data.fifo")
    proc = daemons.spawn(daemon_environment(devserver.url, runner_id, root))
    await until(lambda: runner_connected(api, runner_id), 20)
    absent = {"path": "data.txt", "edits": [{"old_string": "absent", "new_string": "x"}]}
    ids = []
    with swapping(root / "data.txt", root / "data.fifo"):
        # In rounds: 60 at once could meet the server's cap of 50 pending on a busy machine.
        for _ in range(3):
            batch = []
            for _ in range(10):
                batch.append(await api.submit_command(runner_id, "ReadFile", {"path": "data.txt"}, 5))
                batch.append(await api.submit_command(runner_id, "EditFile", absent, 5))
            with anyio.move_on_after(90):
                for command_id in batch:
                    await api.get_command(runner_id, command_id, wait=60)
            ids += batch
    proc.send_signal(signal.SIGTERM)
    await finish(proc, 60)
    assert proc.returncode == 0
    records = [await api.get_command(runner_id, command_id) for command_id in ids]
    assert all(record.terminal for record in records)
    codes = {record.error.code for record in records if record.error}
    assert codes <= {"file_not_found", "match_not_found"}
