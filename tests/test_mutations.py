"""WriteFile and EditFile: result shapes, error codes, atomicity, locking, read-only."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import anyio
import pytest

from runner_daemon.bridge.fileio import AnchoredDir
from runner_daemon.bridge.handlers.edit_file import fuzzy_view
from runner_daemon.bridge.results import Outcome
from runner_daemon.bridge.syntax import check_syntax
from runner_daemon.system.workspace import Workspace
from tests.support import executor_for

pytestmark = pytest.mark.anyio


async def run(root: Path, command_type: str, args: dict[str, Any], **settings: Any) -> Outcome:
    from runner_daemon.core.models import BridgeCommand

    command = BridgeCommand(command_id="c1", type=command_type, args=args)
    return await executor_for(root, **settings).execute(command)


def code_of(outcome: Outcome) -> str:
    assert outcome.status == "failed" and outcome.error is not None, outcome
    return outcome.error.code


# --- WriteFile ------------------------------------------------------------------------------


async def test_write_new_file_creates_parents(workspace: Path) -> None:
    outcome = await run(workspace, "WriteFile", {"path": "new/deep/notes.md", "content": "héllo\n"})
    assert outcome.status == "completed"
    assert outcome.result == {"bytes_written": 7, "created": True, "diff": None}
    assert (workspace / "new" / "deep" / "notes.md").read_text() == "héllo\n"


async def test_write_over_existing_reports_diff_and_keeps_mode(workspace: Path) -> None:
    target = workspace / "src" / "main.py"
    target.write_text("a = 1\nb = 2\n")
    target.chmod(0o751)
    outcome = await run(workspace, "WriteFile", {"path": "src/main.py", "content": "a = 1\nb = 3\n"})
    assert outcome.result == {
        "bytes_written": 12,
        "created": False,
        "diff": "--- a/src/main.py\n+++ b/src/main.py\n@@ -1,2 +1,2 @@\n a = 1\n-b = 2\n+b = 3\n",
        "syntax_check": "ok",
    }
    assert stat.S_IMODE(target.stat().st_mode) == 0o751
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".rd-tmp")]


async def test_write_reports_syntax_errors_but_still_writes(workspace: Path) -> None:
    outcome = await run(workspace, "WriteFile", {"path": "bad.py", "content": "def f(:\n"})
    assert outcome.status == "completed"
    assert outcome.result is not None
    assert outcome.result["syntax_check"].startswith("syntax_error: line 1, col 6: ")
    assert (workspace / "bad.py").read_text() == "def f(:\n"


async def test_write_over_binary_counts_as_created(workspace: Path) -> None:
    (workspace / "blob").write_bytes(b"\xff\xfe")
    outcome = await run(workspace, "WriteFile", {"path": "blob", "content": "text"})
    assert outcome.result == {"bytes_written": 4, "created": True, "diff": None}


async def test_write_through_a_symlink_inside_the_root(workspace: Path) -> None:
    (workspace / "alias.md").symlink_to(workspace / "README.md")
    outcome = await run(workspace, "WriteFile", {"path": "alias.md", "content": "new\n"})
    assert outcome.status == "completed"
    assert (workspace / "README.md").read_text() == "new\n"
    assert (workspace / "alias.md").is_symlink()


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("../x.txt", "path_traversal"),
        ("/tmp/x.txt", "path_traversal"),
        ("", "path_traversal"),
        ("src", "permission_denied"),
        (".", "permission_denied"),  # the root itself: not a file named after it inside
        (".git/config", "permission_denied"),
        (".env", "permission_denied"),
        ("config/.env.local", "permission_denied"),
        ("keys/server.pem", "permission_denied"),
        ("id_ed25519", "permission_denied"),
    ],
)
async def test_write_refusals(workspace: Path, path: str, code: str) -> None:
    assert code_of(await run(workspace, "WriteFile", {"path": path, "content": "x"})) == code


async def test_write_into_a_symlinked_folder_pointing_out_is_refused(workspace: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (workspace / "out").symlink_to(outside)
    assert (
        code_of(await run(workspace, "WriteFile", {"path": "out/x.txt", "content": "x"})) == "path_traversal"
    )
    assert list(outside.iterdir()) == []


async def test_deny_lists_are_configurable(workspace: Path) -> None:
    (workspace / ".env").write_text("TOKEN=1\n")
    assert code_of(await run(workspace, "ReadFile", {"path": ".env"})) == "permission_denied"
    outcome = await run(workspace, "ReadFile", {"path": ".env"}, deny_paths=["*.secret"])
    assert outcome.status == "completed"
    outcome = await run(workspace, "WriteFile", {"path": "a.secret", "content": "x"}, deny_paths=["*.secret"])
    assert code_of(outcome) == "permission_denied"
    assert (await run(workspace, "ReadFile", {"path": "src/main.py"}, deny_write_paths=["src/"])).status == (
        "completed"
    )
    outcome = await run(
        workspace, "WriteFile", {"path": "src/x.py", "content": ""}, deny_write_paths=["src/"]
    )
    assert code_of(outcome) == "permission_denied"


async def test_read_only_refuses_every_mutation(workspace: Path) -> None:
    cases: list[tuple[str, dict[str, Any]]] = [
        ("WriteFile", {"path": "a.txt", "content": "x"}),
        ("EditFile", {"path": "README.md", "edits": [{"old_string": "title", "new_string": "t"}]}),
        ("Exec", {"command": "touch pwned"}),
    ]
    for command_type, args in cases:
        outcome = await run(workspace, command_type, args, read_only=True)
        assert code_of(outcome) == "read_only"
        assert outcome.error is not None and command_type in outcome.error.message
    assert not (workspace / "a.txt").exists() and not (workspace / "pwned").exists()
    assert (await run(workspace, "ReadFile", {"path": "README.md"}, read_only=True)).status == "completed"


# --- EditFile -------------------------------------------------------------------------------


async def test_edit_exact_multiple_edits(workspace: Path) -> None:
    edits = [
        {"old_string": "line two", "new_string": "line 2"},
        {"old_string": "# title", "new_string": "# T"},
    ]
    outcome = await run(workspace, "EditFile", {"path": "README.md", "edits": edits})
    assert outcome.status == "completed"
    assert outcome.result == {
        "diff": (
            "--- a/README.md\n+++ b/README.md\n@@ -1,3 +1,3 @@\n"
            "-# title\n-line two\n+# T\n+line 2\n line three\n"
        ),
        "edits_applied": 2,
        "fuzzy_match_used": False,
    }
    assert (workspace / "README.md").read_text() == "# T\nline 2\nline three\n"


async def test_edit_keeps_crlf_and_bom(workspace: Path) -> None:
    target = workspace / "win.txt"
    target.write_bytes("\ufefffirst\r\nsecond\r\nthird\r\n".encode())
    edits = [{"old_string": "first\nsecond", "new_string": "one\ntwo"}]
    outcome = await run(workspace, "EditFile", {"path": "win.txt", "edits": edits})
    assert outcome.status == "completed"
    assert target.read_bytes() == "\ufeffone\r\ntwo\r\nthird\r\n".encode()


async def test_edit_fuzzy_match(workspace: Path) -> None:
    target = workspace / "q.py"
    target.write_text("msg = \u201chello\u201d  \nx = a \u2014 b\n")
    edits = [{"old_string": 'msg = "hello"\nx = a - b', "new_string": 'msg = "bye"\nx = a - b'}]
    outcome = await run(workspace, "EditFile", {"path": "q.py", "edits": edits})
    assert outcome.status == "completed"
    assert outcome.result is not None
    assert (outcome.result["fuzzy_match_used"], outcome.result["syntax_check"]) == (True, "ok")
    assert target.read_text() == 'msg = "bye"\nx = a - b\n'


@pytest.mark.parametrize(
    ("edits", "code"),
    [
        ([], "no_change"),
        ([{"old_string": "", "new_string": "x"}], "match_not_found"),
        ([{"old_string": "line", "new_string": "line"}], "no_change"),
        ([{"old_string": "line", "new_string": "x"}], "match_ambiguous"),
        ([{"old_string": "nowhere", "new_string": "x"}], "match_not_found"),
        (
            [{"old_string": "line two", "new_string": "x"}, {"old_string": "two\nline", "new_string": "y"}],
            "edits_overlap",
        ),
        ([{"old_string": 5}], "invalid_args"),
    ],
)
async def test_edit_error_codes(workspace: Path, edits: list[Any], code: str) -> None:
    before = (workspace / "README.md").read_bytes()
    assert code_of(await run(workspace, "EditFile", {"path": "README.md", "edits": edits})) == code
    assert (workspace / "README.md").read_bytes() == before


async def test_edit_ambiguity_message_counts_matches(workspace: Path) -> None:
    outcome = await run(
        workspace, "EditFile", {"path": "README.md", "edits": [{"old_string": "line", "new_string": "L"}]}
    )
    assert outcome.error is not None
    assert outcome.error.message == "Found 2 matches for the search string"


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("missing.txt", "file_not_found"),
        ("src", "file_not_found"),
        ("src/data.bin", "binary_file"),
        ("../x", "path_traversal"),
    ],
)
async def test_edit_file_checks(workspace: Path, path: str, code: str) -> None:
    edits = [{"old_string": "a", "new_string": "b"}]
    assert code_of(await run(workspace, "EditFile", {"path": path, "edits": edits})) == code


async def test_concurrent_edits_to_one_file_serialise(workspace: Path) -> None:
    """Forty appends racing on one file: every one lands, in some serial order."""
    target = workspace / "log.txt"
    target.write_text("END\n")
    executor = executor_for(workspace)
    from runner_daemon.core.models import BridgeCommand

    async def append(i: int) -> None:
        edits = [{"old_string": "END\n", "new_string": f"entry {i}\nEND\n"}]
        command = BridgeCommand(command_id=f"c{i}", type="EditFile", args={"path": "log.txt", "edits": edits})
        outcome = await executor.execute(command)
        assert outcome.status == "completed", outcome

    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(append, i)
    lines = target.read_text().splitlines()
    assert lines[-1] == "END"
    assert sorted(lines[:-1]) == sorted(f"entry {i}" for i in range(40))


async def test_a_symlink_swapped_in_during_the_edit_cannot_escape(workspace: Path, tmp_path: Path) -> None:
    """Resolve, then swap the file's folder for a symlink to outside: the write must not follow."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "mod.py").write_text("x = 1\n")
    ws = Workspace(workspace)
    real = ws.resolve("src/pkg/mod.py", write=True)
    os.rename(workspace / "src" / "pkg", workspace / "src" / "pkg-moved")
    (workspace / "src" / "pkg").symlink_to(outside)
    from runner_daemon.core.errors import CommandFailed

    with pytest.raises(CommandFailed) as info:
        AnchoredDir.open_parent(ws, real)
    assert info.value.code == "path_traversal"
    assert (outside / "mod.py").read_text() == "x = 1\n"


def test_fuzzy_view_maps_back_to_original_positions() -> None:
    text = "a\u00a0\u201cb\u201d  \nc"
    view, origins = fuzzy_view(text)
    assert view == 'a "b"\nc'
    assert [text[i] for i in origins] == ["a", "\u00a0", "\u201c", "b", "\u201d", "\n", "c"]


@pytest.mark.parametrize(
    ("path", "content", "expected"),
    [
        ("a.py", "x = 1\n", "ok"),
        ("a.PYW", "x = (\n", "syntax_error: line 1, col 4: '(' was never closed"),
        ("a.txt", "x = (", None),
        ("a.js", "const x = 1;\n", "ok"),
        ("a.ts", "let x: number = 1;\n", "ok"),
        ("a.tsx", "const a = <div>hi</div>;\n", "ok"),
    ],
)
def test_syntax_check(path: str, content: str, expected: str | None) -> None:
    assert check_syntax(path, content) == expected


def test_syntax_check_reports_js_errors() -> None:
    result = check_syntax("a.mjs", "function (\n")
    assert result is not None and result.startswith(("syntax_error: line 1", "missing_node: line 1"))
