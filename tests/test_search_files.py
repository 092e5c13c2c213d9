"""SearchFiles through the Executor: git grep inside a work tree, pure Python outside one.

Most tests run in both modes on the same files and expect the same result, which pins the
two engines to one shape and one meaning of context, order and limits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from runner_daemon.bridge.handlers import discover
from runner_daemon.bridge.handlers import search_files as search_module
from runner_daemon.bridge.handlers.base import HandlerContext, HandlerServices
from runner_daemon.bridge.results import Outcome
from runner_daemon.bridge.search.git_grep import GitGrepOutput
from runner_daemon.bridge.search.hits import Hit, Hits
from runner_daemon.core.models import BridgeCommand
from runner_daemon.core.settings import load_settings
from runner_daemon.system.workspace import Workspace
from tests.support import executor_for, git

pytestmark = pytest.mark.anyio

GIT = shutil.which("git")
MODES = [
    pytest.param("git", marks=pytest.mark.skipif(GIT is None, reason="git is not installed")),
    "plain",
]

APP_PY = "import os\n\ndef main():\n    needle = 1\n    return needle\n\n# end\n"
# Common files: the same result is expected from git grep and from the Python search.
FILES: dict[str, str | bytes] = {
    "src/app.py": APP_PY,
    "docs/notes.md": "intro\nthe needle here\n",
    "we:ird-na-me.txt": "1-2:3\nneedle:4-5\n7:8-9\n",
    ".env": "TOKEN=needle\n",  # deny-listed by default: never searched
    "logo.bin": b"needle\x00\x01\x02",  # binary: never searched
}
EXPECTED_NEEDLE = {
    "matches": [
        {
            "file": "docs/notes.md",
            "line": 2,
            "content": "the needle here",
            "context_before": ["intro"],
            "context_after": [],
        },
        {
            "file": "src/app.py",
            "line": 4,
            "content": "    needle = 1",
            "context_before": ["import os", "", "def main():"],
            "context_after": ["    return needle", "", "# end"],
        },
        {
            "file": "src/app.py",
            "line": 5,
            "content": "    return needle",
            "context_before": ["", "def main():", "    needle = 1"],
            "context_after": ["", "# end"],
        },
        {
            "file": "untracked.txt",
            "line": 1,
            "content": "needle untracked",
            "context_before": [],
            "context_after": [],
        },
        {
            "file": "we:ird-na-me.txt",
            "line": 2,
            "content": "needle:4-5",
            "context_before": ["1-2:3"],
            "context_after": ["7:8-9"],
        },
    ],
    "total_matches": 5,
    "truncated": False,
}


async def run(root: Path, args: dict[str, Any], timeout: int | None = None, **settings: Any) -> Outcome:
    command = BridgeCommand(command_id="c1", type="SearchFiles", args=args, timeout_seconds=timeout)
    return await executor_for(root, **settings).execute(command)


async def search(root: Path, **args: Any) -> dict[str, Any]:
    outcome = await run(root, args)
    assert outcome.status == "completed", outcome.error
    assert outcome.result is not None
    return outcome.result


def error_of(outcome: Outcome) -> tuple[str, str]:
    assert outcome.status == "failed" and outcome.error is not None
    return outcome.error.code, outcome.error.message


def write(root: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def make_tree(
    root: Path,
    mode: str,
    files: dict[str, str | bytes],
    untracked: dict[str, str | bytes] | None = None,
    ignored: dict[str, str | bytes] | None = None,
) -> Path:
    """``files`` committed, ``untracked`` left out of git; ``ignored`` only in a git repo."""
    root.mkdir(parents=True)
    if mode == "git":
        git(root, "init", "-q")
        write(root, files)
        if ignored:
            write(root, {".gitignore": "".join(f"{name}\n" for name in ignored), **ignored})
        git(root, "add", "-A")
        git(root, "commit", "-q", "-m", "files")
    else:
        write(root, files)
        if GIT is not None:  # the Python search is only used outside a work tree
            probe = subprocess.run(
                ["git", "rev-parse", "--is-inside-work-tree"],
                cwd=root,
                capture_output=True,
                text=True,
                check=False,
            )
            assert probe.stdout.strip() != "true", "tmp_path is inside a git work tree"
    write(root, untracked or {})
    return root


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def tree(tmp_path: Path, mode: str) -> Path:
    return make_tree(
        tmp_path / "ws",
        mode,
        FILES,
        untracked={"untracked.txt": "needle untracked\n"},
        ignored={"ignored.log": "needle ignored\n"},
    )


@pytest.fixture
def no_git(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if git were not installed."""
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "git" else real_which(name))


def fake_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, grep_script: str) -> None:
    """A ``git`` whose rev-parse says "true" and whose grep runs ``grep_script``."""
    script = tmp_path / "fake-git"
    script.write_text(f'#!/bin/sh\ncase "$*" in\n  *rev-parse*) echo true ;;\n  *) {grep_script} ;;\nesac\n')
    script.chmod(0o755)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: str(script))


def test_handler_is_registered_and_read_only() -> None:
    handler = discover()["SearchFiles"]
    assert handler is search_module.HANDLER
    assert handler.command_type == "SearchFiles"
    assert handler.mutating is False


async def test_exact_shape(tree: Path) -> None:
    # Untracked files are found; ignored, deny-listed and binary files are not.
    assert await search(tree, pattern="needle") == EXPECTED_NEEDLE


async def test_runs_when_the_runner_is_read_only(tree: Path) -> None:
    outcome = await run(tree, {"pattern": "needle"}, read_only=True)
    assert outcome.status == "completed"


async def test_no_match_is_an_empty_result(tree: Path) -> None:
    assert await search(tree, pattern="no such text anywhere") == {
        "matches": [],
        "total_matches": 0,
        "truncated": False,
    }


@pytest.mark.skipif(GIT is None, reason="git is not installed")
async def test_without_git_the_python_search_takes_over(tmp_path: Path, no_git: None) -> None:
    """A git repository searched without git: same matches, but .gitignore means nothing."""
    root = make_tree(
        tmp_path / "ws",
        "git",
        FILES,
        untracked={"untracked.txt": "needle untracked\n"},
        ignored={"ignored.log": "needle ignored\n"},
    )
    result = await search(root, pattern="needle")
    assert [(m["file"], m["line"]) for m in result["matches"]] == [
        ("docs/notes.md", 2),
        ("ignored.log", 1),
        ("src/app.py", 4),
        ("src/app.py", 5),
        ("untracked.txt", 1),
        ("we:ird-na-me.txt", 2),
    ]


async def test_pcre_and_python_patterns(tree: Path) -> None:
    result = await search(tree, pattern=r"^\s+(?:needle|return)\b")
    assert [(m["file"], m["line"]) for m in result["matches"]] == [("src/app.py", 4), ("src/app.py", 5)]


async def test_pattern_starting_with_a_dash(tmp_path: Path, mode: str) -> None:
    root = make_tree(tmp_path / "ws", mode, {"a.txt": "x\na --needle b\n"})
    result = await search(root, pattern="--needle")
    assert [(m["file"], m["line"], m["content"]) for m in result["matches"]] == [("a.txt", 2, "a --needle b")]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"glob": "*.py"}, [("src/app.py", 4), ("src/app.py", 5)]),
        ({"glob": "*.md"}, [("docs/notes.md", 2)]),
        ({"glob": "docs"}, [("docs/notes.md", 2)]),
        ({"glob": "*.rs"}, []),
        ({"path": "src"}, [("src/app.py", 4), ("src/app.py", 5)]),
        ({"path": "./docs/"}, [("docs/notes.md", 2)]),
        # The glob wins when both are given, as in Opik.
        ({"path": "src", "glob": "*.md"}, [("docs/notes.md", 2)]),
    ],
)
async def test_glob_and_path_filters(
    tree: Path, args: dict[str, str], expected: list[tuple[str, int]]
) -> None:
    result = await search(tree, pattern="needle", **args)
    assert [(m["file"], m["line"]) for m in result["matches"]] == expected
    assert result["total_matches"] == len(expected)


async def test_absolute_path_inside_the_root(tree: Path) -> None:
    result = await search(tree, pattern="needle", path=str(tree / "src"))
    assert {m["file"] for m in result["matches"]} == {"src/app.py"}


async def test_context_lines(tmp_path: Path, mode: str) -> None:
    lines = [f"line {n}" for n in range(1, 11)]
    lines[0] = lines[5] = lines[6] = lines[9] = "hit"
    root = make_tree(
        tmp_path / "ws", mode, {"c.txt": "\n".join(lines) + "\n", "crlf.txt": b"a\r\nhit\r\nb\r\n"}
    )
    result = await search(root, pattern="hit")
    got = [
        (m["file"], m["line"], m["content"], m["context_before"], m["context_after"])
        for m in result["matches"]
    ]
    assert got == [
        ("c.txt", 1, "hit", [], ["line 2", "line 3", "line 4"]),
        # Neighbouring matches appear in each other's context: these are the file's lines.
        ("c.txt", 6, "hit", ["line 3", "line 4", "line 5"], ["hit", "line 8", "line 9"]),
        ("c.txt", 7, "hit", ["line 4", "line 5", "hit"], ["line 8", "line 9", "hit"]),
        ("c.txt", 10, "hit", ["hit", "line 8", "line 9"], []),
        ("crlf.txt", 2, "hit", ["a"], ["b"]),
    ]


async def test_match_cap_counts_everything(tmp_path: Path, mode: str) -> None:
    many = "".join(f"hit {n}\n" for n in range(1, 151))
    root = make_tree(tmp_path / "ws", mode, {"many.txt": many, "z.txt": "hit last\n"})
    result = await search(root, pattern="^hit")
    assert result["total_matches"] == 151
    assert result["truncated"] is True
    assert [m["line"] for m in result["matches"]] == list(range(1, 101))
    assert result["matches"][-1]["context_after"] == ["hit 101", "hit 102", "hit 103"]


async def test_byte_cap(tmp_path: Path, mode: str) -> None:
    wide = "".join("X" + "€" * 600 + "\n" for _ in range(100))  # each kept line: ~1.5 KB
    root = make_tree(tmp_path / "ws", mode, {"wide.txt": wide})
    result = await search(root, pattern="^X")
    kept = result["matches"]
    assert 0 < len(kept) < 100
    assert result["total_matches"] == 100
    assert result["truncated"] is True
    assert sum(len(json.dumps(m, ensure_ascii=False).encode()) for m in kept) <= 512 * 1024
    assert all(len(m["content"]) == 500 for m in kept)


async def test_long_lines_are_cut_at_500_characters(tmp_path: Path, mode: str) -> None:
    match = "needle" + "x" * 1000
    before = "é" * 900
    root = make_tree(tmp_path / "ws", mode, {"long.txt": f"{before}\n{match}\nshort\n"})
    result = await search(root, pattern="needle")
    [entry] = result["matches"]
    assert entry["content"] == match[:500]
    assert entry["context_before"] == [before[:500]]
    assert entry["context_after"] == ["short"]


@pytest.mark.parametrize("pattern", ["(", "a{2,1}", "[z-a]"])
async def test_invalid_pattern(tree: Path, mode: str, pattern: str) -> None:
    code, message = error_of(await run(tree, {"pattern": pattern}))
    assert code == "match_not_found"
    assert message.startswith("Invalid pattern: ")
    if mode == "git" and pattern == "(":
        assert "missing closing parenthesis" in message  # git's own words


@pytest.mark.parametrize(("pattern", "reason"), [("", "Empty"), ("a" * 501, "too long"), ("a\x00b", "NUL")])
async def test_empty_too_long_or_nul_pattern(tree: Path, pattern: str, reason: str) -> None:
    code, message = error_of(await run(tree, {"pattern": pattern}))
    assert code == "match_not_found"
    assert reason in message


async def test_pattern_of_500_characters_is_accepted(tree: Path) -> None:
    assert (await search(tree, pattern="n" + "e?" * 249 + "x"))["total_matches"] == 0


@pytest.mark.parametrize("path", ["src/app.py", "missing", "missing/deeper"])
async def test_path_must_be_a_folder(tree: Path, path: str) -> None:
    code, _ = error_of(await run(tree, {"pattern": "needle", "path": path}))
    assert code == "file_not_found"


async def test_path_traversal(tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "s.txt").write_text("needle\n")
    (tree / "out").symlink_to(outside, target_is_directory=True)
    for path in ["..", "../outside", "src/../..", str(outside), "out", "a\x00b"]:
        code, _ = error_of(await run(tree, {"pattern": "needle", "path": path}))
        assert code == "path_traversal", path


async def test_nul_in_glob_is_refused(tree: Path) -> None:
    code, _ = error_of(await run(tree, {"pattern": "needle", "glob": "*\x00"}))
    assert code == "invalid_args"


async def test_denied_files_never_appear(tree: Path) -> None:
    # Only .env holds TOKEN, and the deny-list forbids reading it: searching is reading.
    assert (await search(tree, pattern="TOKEN"))["total_matches"] == 0
    assert (await search(tree, pattern="TOKEN", glob=".env"))["total_matches"] == 0
    code, _ = error_of(await run(tree, {"pattern": "needle", "path": "docs"}, deny_paths=["docs/"]))
    assert code == "permission_denied"
    outcome = await run(tree, {"pattern": "needle"}, deny_paths=[".env", "*.md", "src/"])
    assert outcome.result is not None
    assert [m["file"] for m in outcome.result["matches"]] == ["untracked.txt", "we:ird-na-me.txt"]
    assert outcome.result["total_matches"] == 2


async def test_symlinked_files_never_appear(tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "needle-outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("needle outside\n")
    # Targets whose paths hold "needle", should a symlink's text ever be searched.
    (tree / "link.txt").symlink_to(outside / "secret.txt")
    (tree / "alias.py").symlink_to(tree / "src" / "app.py")
    (tree / "linked-dir").symlink_to(outside, target_is_directory=True)
    assert await search(tree, pattern="needle") == EXPECTED_NEEDLE


async def test_file_names_with_separators(tmp_path: Path, mode: str) -> None:
    files: dict[str, str | bytes] = {
        "a:1:b-2-c.txt": "x-1-y\nneedle-3:z\n",
        "dir-9-/f:1:.txt": "needle\n",
        "new\nline.txt": "w\nneedle\n",
        "10": "needle 10\n",
    }
    root = make_tree(tmp_path / "ws", mode, files)
    result = await search(root, pattern="needle")
    got = [(m["file"], m["line"], m["content"], m["context_before"]) for m in result["matches"]]
    assert got == [
        ("10", 1, "needle 10", []),
        ("a:1:b-2-c.txt", 2, "needle-3:z", ["x-1-y"]),
        ("dir-9-/f:1:.txt", 1, "needle", []),
        ("new\nline.txt", 2, "needle", ["w"]),
    ]


@pytest.mark.skipif(GIT is None, reason="git is not installed")
async def test_git_searches_from_a_subfolder_root_only(tmp_path: Path) -> None:
    repo = make_tree(tmp_path / "repo", "git", {"top.txt": "needle top\n", "sub/inner.txt": "needle inner\n"})
    root = repo / "sub"
    assert (await search(root, pattern="needle"))["matches"][0]["file"] == "inner.txt"
    # A pathspec reaching above the root finds files there, which are never reported.
    for glob in ["../*", ":/", ":(top)*"]:
        result = await search(root, pattern="needle", glob=glob)
        assert {m["file"] for m in result["matches"]} <= {"inner.txt"}, glob
        assert result["total_matches"] == len(result["matches"]), glob


async def test_python_search_skips_folders_and_non_text(tmp_path: Path, no_git: None) -> None:
    root = make_tree(
        tmp_path / "ws",
        "plain",
        {
            "keep/a.txt": "needle\n",
            "node_modules/dep.js": "needle\n",
            ".venv/lib.py": "needle\n",
            "build/out.txt": "needle\n",
            ".git/config": "needle\n",
            "latin1.txt": "caf\xe9 needle\n".encode("latin-1"),
            "late-nul.txt": b"needle\n" + b"x" * 9000 + b"\x00",
            "early-nul.txt": b"needle\x00\n",
        },
    )
    (root / "keep-link").symlink_to(root / "keep", target_is_directory=True)
    os.mkfifo(root / "pipe.txt")  # must neither be read nor block the search
    result = await search(root, pattern="needle")
    # NUL after the first 8 KiB: still text, as Opik's rule says.
    assert [m["file"] for m in result["matches"]] == ["keep/a.txt", "late-nul.txt"]


@pytest.mark.skipif(GIT is None, reason="git is not installed")
async def test_other_git_failure_is_search_failed(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ws", "git", FILES)
    code, message = error_of(await run(root, {"pattern": "needle", "glob": ":(nonsense)x"}))
    assert code == "search_failed"
    assert "pathspec magic" in message


async def test_malformed_git_output_is_search_failed(
    tmp_path: Path, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_git(tmp_path, monkeypatch, r"printf 'README.md\000two\000text\n'")
    code, message = error_of(await run(workspace, {"pattern": "x"}))
    assert (code, message) == ("search_failed", "Unexpected output from git grep")


async def test_slow_search_times_out_and_the_child_is_killed(
    tmp_path: Path, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid_file = tmp_path / "grep.pid"
    fake_git(tmp_path, monkeypatch, f'echo $$ > "{pid_file}"; exec sleep 30')
    outcome = await run(workspace, {"pattern": "x"}, timeout=1)
    code, message = error_of(outcome)
    assert code == "timeout"
    assert message.startswith("Search timed out")
    assert outcome.duration_ms is not None and outcome.duration_ms < 30000  # not the 30 s sleep
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped, not left running


def handler_context(root: Path, deny: tuple[str, ...] = ()) -> HandlerContext:
    settings = load_settings(None, {"workspace_root": root})
    return HandlerContext(Workspace(root, deny), settings, HandlerServices())


@pytest.mark.parametrize("chunk", [1, 2, 7, 1 << 16])
def test_git_output_parser_filters_and_splits_anywhere(tmp_path: Path, chunk: int) -> None:
    root = tmp_path / "ws"
    (root / "real").mkdir(parents=True)
    # Every record is also true of the files: only the name decides what is dropped.
    (root / "ok.txt").write_bytes(b"one\ntwo\nhello\r\n" + b"x" * 5000 + b"\n")
    (tmp_path / "outside.txt").write_text("outside the root\n")
    (root / "real" / "a.txt").write_text("under a symlinked folder\n")
    (root / "link.txt").symlink_to(root / "ok.txt")
    (root / "dirlink").symlink_to(root / "real", target_is_directory=True)
    (root / ".env").write_text("denied\n")
    (root / "a\nb:1-2").write_bytes(b"\n" * 11 + b"c\x00d:-\n")
    (root / "last").write_text("no final newline")
    output = (
        b"ok.txt\x003\x00hello\r\n"
        b"../outside.txt\x001\x00outside the root\n"
        b"link.txt\x001\x00hello\r\n"
        b"dirlink/a.txt\x001\x00under a symlinked folder\n"
        b".env\x001\x00denied\n"
        b"a\nb:1-2\x0012\x00c\x00d:-\n"  # a newline in the name, a NUL in the content
        b"ok.txt\x004\x00" + b"x" * 5000 + b"\n"
        b"ok.txt\x001\x00not what the file holds\n"  # e.g. read by git through a swapped folder
        b"last\x001\x00no final newline"
    )
    hits = Hits()
    parser = GitGrepOutput(handler_context(root, (".env",)).workspace, hits)
    ctx = handler_context(root)
    for start in range(0, len(output), chunk):
        parser.feed(output[start : start + chunk], ctx)
    parser.close(ctx)
    assert not parser.malformed
    assert hits.kept == [
        Hit("ok.txt", 3, "hello"),
        Hit("a\nb:1-2", 12, "c\x00d:-"),
        Hit("ok.txt", 4, "x" * 500),
        Hit("last", 1, "no final newline"),
    ]
    assert hits.total == 4


async def test_a_file_changed_since_the_search_gets_no_context(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    (root / "f.txt").write_text("a\nnow different\nb\nneedle\nc\n")
    hits = Hits([Hit("f.txt", 2, "needle"), Hit("f.txt", 4, "needle")], total=2)
    result = search_module.with_context(handler_context(root).workspace, hits, handler_context(root))
    assert result["matches"] == [
        {"file": "f.txt", "line": 2, "content": "needle", "context_before": [], "context_after": []},
        {
            "file": "f.txt",
            "line": 4,
            "content": "needle",
            "context_before": ["a", "now different", "b"],
            "context_after": ["c"],
        },
    ]


async def test_files_come_in_path_byte_order(tmp_path: Path, mode: str) -> None:
    names = ["a/b.txt", "a.txt", "a-c.txt", "B.txt", "a/a/z.txt"]
    root = make_tree(tmp_path / "ws", mode, dict.fromkeys(names, "needle\n"))
    result = await search(root, pattern="needle")
    assert [m["file"] for m in result["matches"]] == ["B.txt", "a-c.txt", "a.txt", "a/a/z.txt", "a/b.txt"]
