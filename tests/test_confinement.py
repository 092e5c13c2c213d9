"""No path argument escapes workspace_root: a corpus of known tricks and a property test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner_daemon.core.errors import CommandFailed
from runner_daemon.core.settings import DEFAULT_DENY_PATHS, DEFAULT_DENY_WRITE_PATHS
from runner_daemon.system.workspace import DenyList, Workspace, matches_deny_pattern


@pytest.fixture
def jail(tmp_path: Path) -> Workspace:
    root = tmp_path / "root"
    (root / "inner").mkdir(parents=True)
    (root / "inner" / "file.txt").write_text("in")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("out")
    (root / "link_out").symlink_to(outside)
    (root / "file_out").symlink_to(outside / "secret.txt")
    (root / "link_in").symlink_to(root / "inner")
    (root / "chain").symlink_to(root / "link_out")
    (root / "dotdot_link").symlink_to("..")
    (root / "loop").symlink_to(root / "loop")
    return Workspace(root)


def outcome(jail: Workspace, path: str) -> str:
    try:
        resolved = jail.resolve(path)
    except CommandFailed as exc:
        return exc.code
    assert jail.contains(str(resolved)), f"{path!r} escaped to {resolved}"
    return "inside"


@pytest.mark.parametrize(
    "path",
    [
        "..",
        "../",
        "../outside/secret.txt",
        "inner/../../outside",
        "./../outside",
        "inner/./../..",
        "/etc/passwd",
        "//etc/passwd",
        "link_out",
        "link_out/secret.txt",
        "file_out",
        "chain/secret.txt",
        "dotdot_link",
        "dotdot_link/outside/secret.txt",
        "inner/\x00/file.txt",
        "a" * 4097,
        "n" * 256,
        "",
    ],
)
def test_known_escapes_are_path_traversal(jail: Workspace, path: str) -> None:
    assert outcome(jail, path) == "path_traversal"


@pytest.mark.parametrize(
    "path",
    [
        "inner/file.txt",
        "link_in/file.txt",
        "./inner",
        "inner/",
        "\u2024\u2024/x",  # one-dot leaders look like ".." but are an ordinary name
        "\uff0e\uff0e/x",  # fullwidth full stops: also an ordinary name
        "%2e%2e/x",
        "..\\x",
        "~",
        "...",
        "loop",
    ],
)
def test_lookalikes_stay_inside(jail: Workspace, path: str) -> None:
    assert outcome(jail, path) == "inside"


def test_absolute_path_inside_is_accepted(jail: Workspace) -> None:
    assert jail.resolve(str(jail.root / "inner" / "file.txt")) == jail.root / "inner" / "file.txt"


SEGMENTS = st.sampled_from(
    [
        "..",
        ".",
        "",
        "inner",
        "file.txt",
        "link_out",
        "link_in",
        "file_out",
        "chain",
        "dotdot_link",
        "loop",
        "secret.txt",
        "outside",
        "\x00",
        "\u2024\u2024",
        "~",
        "x" * 300,
    ]
)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segments=st.lists(SEGMENTS, max_size=8), absolute=st.booleans())
def test_random_paths_never_resolve_outside(jail: Workspace, segments: list[str], absolute: bool) -> None:
    path = "/".join(segments)
    if absolute:
        path = os.path.join(str(jail.root), path)
    assert outcome(jail, path) in {"inside", "path_traversal"}


@given(st.text(max_size=40))
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_arbitrary_text_never_resolves_outside(jail: Workspace, path: str) -> None:
    assert outcome(jail, path) in {"inside", "path_traversal"}


@pytest.mark.parametrize(
    ("relative", "pattern", "expected"),
    [
        (".git/config", ".git/", True),
        ("sub/.git/HEAD", ".git/", True),
        (".github/workflows/ci.yml", ".git/", False),
        (".env", ".env", True),
        ("app/.env.production", ".env.*", True),
        ("environment.py", ".env*", False),
        ("keys/server.pem", "*.pem", True),
        ("src/config/secrets.json", "src/config/*", True),
        ("other/config/secrets.json", "src/config/*", False),
        ("id_ed25519.pub", "id_ed25519*", True),
        ("ID.txt", "id*", False),
    ],
)
def test_deny_pattern_rules(relative: str, pattern: str, expected: bool) -> None:
    assert matches_deny_pattern(relative, pattern) is expected
    assert DenyList([pattern]).matches(relative) is expected


_NAME_CHARS = st.sampled_from(list("ab.-_*?[]!/\\e"))
_PATTERNS = st.text(_NAME_CHARS, min_size=1, max_size=8)
_PARTS = st.text(st.sampled_from(list("ab.-_*?[]!e\\")), min_size=1, max_size=6)
_RELATIVE = st.lists(_PARTS, max_size=4).map("/".join)


@settings(max_examples=400, deadline=None)
@given(relative=_RELATIVE, patterns=st.lists(_PATTERNS, max_size=6))
def test_a_compiled_deny_list_matches_what_its_patterns_match_one_by_one(
    relative: str, patterns: list[str]
) -> None:
    expected = any(matches_deny_pattern(relative, pattern) for pattern in patterns)
    assert DenyList(patterns).matches(relative) is expected


def test_the_default_deny_lists_compiled_agree_with_each_pattern() -> None:
    paths = [".env", "a/.env.local", "k/server.pem", ".git/config", "src/.git", "x/id_rsa.pub", "README.md"]
    for patterns in (DEFAULT_DENY_PATHS, DEFAULT_DENY_PATHS + DEFAULT_DENY_WRITE_PATHS):
        for relative in paths:
            expected = any(matches_deny_pattern(relative, pattern) for pattern in patterns)
            assert DenyList(patterns).matches(relative) is expected
