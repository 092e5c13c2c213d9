"""ReadFile and ListFiles through the Executor (no network): shapes, codes and limits."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner_daemon.bridge.handlers import discover
from runner_daemon.bridge.handlers import read_file as read_file_module
from runner_daemon.bridge.handlers.base import HandlerContext, HandlerServices
from runner_daemon.bridge.results import Outcome
from runner_daemon.core.models import BridgeCommand
from runner_daemon.core.settings import load_settings
from runner_daemon.system.workspace import Workspace
from tests.support import executor_for


async def run(
    root: Path, command_type: str, args: dict[str, Any], timeout: int | None = None, **settings: Any
) -> Outcome:
    """Run one command through the Executor, as the loop would, without the network."""
    command = BridgeCommand(command_id="c1", type=command_type, args=args, timeout_seconds=timeout)
    return await executor_for(root, **settings).execute(command)


def error_of(outcome: Outcome) -> tuple[str, str]:
    assert outcome.status == "failed" and outcome.error is not None
    return outcome.error.code, outcome.error.message


def opik_read(text: str, offset: int, limit: int) -> dict[str, Any]:
    """Opik's ReadFile algorithm on a whole string, the reference for the streamed one."""
    lines = text.splitlines(keepends=True)
    total = len(lines)
    offset = min(offset, total)
    limit = min(limit, 2000)
    selected = lines[offset : offset + limit]
    content = "".join(selected)
    truncated = len(selected) < total - offset
    if len(content) > 512_000:
        truncated, content = True, content[:512_000]
    return {"content": content, "total_lines": total, "truncated": truncated, "encoding": "utf-8"}


def test_registry_discovers_the_handlers() -> None:
    assert {"ReadFile", "ListFiles"} <= set(discover())


pytestmark = pytest.mark.anyio


async def test_read_file_keeps_crlf_and_counts_lines(workspace: Path) -> None:
    outcome = await run(workspace, "ReadFile", {"path": "src/main.py"})
    assert outcome.status == "completed"
    assert outcome.result == {
        "content": "print('hi')\r\nprint('bye')\r\n",
        "total_lines": 2,
        "truncated": False,
        "encoding": "utf-8",
    }


@pytest.mark.parametrize(
    ("args", "content", "truncated"),
    [
        ({"offset": 0, "limit": 1}, "# title\n", True),
        ({"offset": 2}, "line three\n", False),
        ({"offset": 3}, "", False),
        ({"offset": 99}, "", False),
        ({"limit": 0}, "", True),
    ],
)
async def test_read_file_window(workspace: Path, args: dict[str, Any], content: str, truncated: bool) -> None:
    outcome = await run(workspace, "ReadFile", {"path": "README.md", **args})
    assert outcome.result is not None
    assert (outcome.result["content"], outcome.result["truncated"]) == (content, truncated)
    assert outcome.result["total_lines"] == 3


async def test_read_file_caps_lines_and_characters(workspace: Path) -> None:
    (workspace / "many.txt").write_text("".join(f"{i}\n" for i in range(5000)))
    outcome = await run(workspace, "ReadFile", {"path": "many.txt", "limit": 10_000})
    assert outcome.result is not None
    assert outcome.result["content"].count("\n") == 2000
    assert (outcome.result["total_lines"], outcome.result["truncated"]) == (5000, True)
    (workspace / "wide.txt").write_text(("y" * 999 + "\n") * 600)
    outcome = await run(workspace, "ReadFile", {"path": "wide.txt"})
    assert outcome.result is not None
    assert len(outcome.result["content"]) == 512_000
    assert (outcome.result["total_lines"], outcome.result["truncated"]) == (600, True)


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("missing.txt", "file_not_found"),
        ("src", "file_not_found"),
        ("src/data.bin", "binary_file"),
        ("latin1.txt", "binary_file"),
        ("", "path_traversal"),
        ("../outside.txt", "path_traversal"),
        ("src/../README.md", "path_traversal"),
        ("/etc/passwd", "path_traversal"),
        ("escape-link", "path_traversal"),
        ("a\x00b", "path_traversal"),
        ("x" * 5000, "path_traversal"),
        ("d/" + "n" * 300, "path_traversal"),
    ],
)
async def test_read_file_error_codes(workspace: Path, tmp_path: Path, path: str, code: str) -> None:
    (workspace / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (tmp_path / "outside.txt").write_text("secret")
    (workspace / "escape-link").symlink_to(tmp_path / "outside.txt")
    assert error_of(await run(workspace, "ReadFile", {"path": path}))[0] == code


async def test_read_file_accepts_an_absolute_path_inside_the_root(workspace: Path) -> None:
    outcome = await run(workspace, "ReadFile", {"path": str(workspace / "README.md")})
    assert outcome.status == "completed"


async def test_read_file_invalid_utf8_after_the_first_chunk_is_binary(workspace: Path) -> None:
    (workspace / "late.txt").write_bytes(b"ok\n" * 50_000 + b"\xff\n")
    assert error_of(await run(workspace, "ReadFile", {"path": "late.txt"})) == (
        "binary_file",
        "File is not valid UTF-8: late.txt",
    )


async def test_read_file_permission_denied(workspace: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    locked = workspace / "locked.txt"
    locked.write_text("x")
    locked.chmod(0)
    assert error_of(await run(workspace, "ReadFile", {"path": "locked.txt"}))[0] == "permission_denied"


LINE_PIECES = st.sampled_from(
    ["a", "bc", "é", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", " "]
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pieces=st.lists(LINE_PIECES, max_size=200),
    offset=st.integers(0, 60),
    limit=st.integers(0, 60),
    chunk=st.integers(1, 9),
)
def test_streamed_read_equals_opiks_whole_file_read(
    tmp_path: Path, pieces: list[str], offset: int, limit: int, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiny chunks put every line break, and every multi-byte character, across a boundary."""
    text = "".join(pieces)
    path = tmp_path / "f.txt"
    path.write_text(text, encoding="utf-8", newline="")
    monkeypatch.setattr(read_file_module, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(read_file_module, "BINARY_SNIFF_BYTES", chunk)
    ctx = HandlerContext(
        Workspace(tmp_path), load_settings(None, {"workspace_root": tmp_path}), HandlerServices()
    )
    with path.open("rb") as stream:
        assert read_file_module.read_window(stream, "f.txt", offset, limit, ctx) == opik_read(
            text, offset, limit
        )


async def test_list_files_shape_order_and_skips(workspace: Path) -> None:
    (workspace / "Zeta.txt").write_text("")
    (workspace / "alpha.txt").write_text("")
    outcome = await run(workspace, "ListFiles", {})
    assert outcome.result == {
        "files": ["src/", "alpha.txt", "README.md", "Zeta.txt"],
        "total": 4,
        "truncated": False,
    }


async def test_list_files_names_are_relative_to_the_listed_folder(workspace: Path) -> None:
    outcome = await run(workspace, "ListFiles", {"path": "src", "depth": 2})
    assert outcome.result is not None
    assert outcome.result["files"] == ["pkg/", "data.bin", "main.py", "pkg/mod.py"]


@pytest.mark.parametrize(
    ("pattern", "files"),
    [
        ("*.py", ["src/", "src/pkg/", "src/main.py", "src/pkg/mod.py"]),
        ("src/pkg/*", ["src/", "src/pkg/", "src/pkg/mod.py"]),
        ("README.md", ["src/", "src/pkg/", "README.md"]),
    ],
)
async def test_list_files_pattern_matches_name_or_path(
    workspace: Path, pattern: str, files: list[str]
) -> None:
    outcome = await run(workspace, "ListFiles", {"pattern": pattern, "depth": 5})
    assert outcome.result is not None and outcome.result["files"] == files


async def test_list_files_does_not_descend_symlinked_folders(workspace: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("s")
    (workspace / "link").symlink_to(outside)
    outcome = await run(workspace, "ListFiles", {"depth": 5})
    assert outcome.result is not None
    assert "link" in outcome.result["files"]
    assert not any("secret" in name for name in outcome.result["files"])
    assert error_of(await run(workspace, "ListFiles", {"path": "link"}))[0] == "path_traversal"


async def test_list_files_truncates_at_1000_entries(tmp_path: Path) -> None:
    for i in range(1205):
        (tmp_path / f"f{i:04}.txt").write_text("")
    outcome = await run(tmp_path, "ListFiles", {})
    assert outcome.result is not None
    assert (len(outcome.result["files"]), outcome.result["total"], outcome.result["truncated"]) == (
        1000,
        1205,
        True,
    )
    assert outcome.result["files"][:2] == ["f0000.txt", "f0001.txt"]
    assert outcome.result["files"][-1] == "f0999.txt"


async def test_list_files_truncates_at_512_kib_of_names(tmp_path: Path) -> None:
    # Long folder names make each file's relative name about 745 bytes: 800 of them are
    # well under the 1,000-entry cap but over 512 KiB.
    deep = tmp_path / ("a" * 250) / ("b" * 250)
    deep.mkdir(parents=True)
    for j in range(800):
        (deep / f"{j:03}{'n' * 240}").write_text("")
    outcome = await run(tmp_path, "ListFiles", {"depth": 3})
    assert outcome.result is not None
    assert outcome.result["total"] == 802
    assert outcome.result["truncated"] is True
    kept = outcome.result["files"]
    assert sum(len(name) + 1 for name in kept) <= 512 * 1024
    assert sum(len(name) + 1 for name in kept) + 746 > 512 * 1024
    assert kept[:2] == ["a" * 250 + "/", "a" * 250 + "/" + "b" * 250 + "/"]


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ({"path": "README.md"}, "file_not_found"),
        ({"path": "nope"}, "file_not_found"),
        ({"path": "../"}, "path_traversal"),
        ({"depth": 0}, "invalid_args"),
        ({"depth": 6}, "invalid_args"),
    ],
)
async def test_list_files_errors(workspace: Path, args: dict[str, Any], code: str) -> None:
    assert error_of(await run(workspace, "ListFiles", args))[0] == code


async def test_a_handler_over_its_time_is_cancelled(workspace: Path) -> None:
    from tests.support import registry_for_tests

    command = BridgeCommand(
        command_id="c2", type="Slow", args={"seconds": 60, "marker": "m"}, timeout_seconds=1
    )
    with anyio.fail_after(30):  # an executor that waited for the handler would take 60 s
        outcome = await executor_for(workspace, registry=registry_for_tests()).execute(command)
    assert error_of(outcome) == ("timeout", "Command timed out after 1s")
