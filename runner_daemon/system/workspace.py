"""Confinement of every path argument to ``workspace_root``.

A path is resolved with all symlinks followed, and must land on the root or under it. This
is a check only: handlers then open the real path through descriptors anchored at the root
(runner_daemon.bridge.fileio), so a folder swapped for a symlink after the check cannot lead out. The
checks mirror Opik's runner (empty path, ``..`` component, resolved path outside the root,
all ``path_traversal``); we add NUL bytes and over-long paths, which the OS would otherwise
reject with an error that is not Opik's vocabulary.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from runner_daemon.core.errors import CommandFailed

# Folders never walked (Opik's list): dependency and cache trees drown real results.
SKIP_DIRS = frozenset(
    {
        "node_modules",
        "__pycache__",
        ".venv",
        "venv",
        ".tox",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        "dist",
        "build",
    }
)
MAX_PATH_CHARS = 4096
MAX_NAME_BYTES = 255


def matches_deny_pattern(relative: str, pattern: str) -> bool:
    """Whether a root-relative POSIX path falls under one deny-list pattern.

    ``name/`` matches a folder of that name anywhere, and everything in it; a pattern with
    another ``/`` matches the whole relative path; any other pattern matches the file name.
    Patterns are shell globs, matched case-sensitively.
    """
    parts = PurePosixPath(relative).parts
    if pattern.endswith("/"):
        return any(fnmatch.fnmatchcase(part, pattern[:-1]) for part in parts)
    if "/" in pattern:
        return fnmatch.fnmatchcase(relative, pattern)
    return bool(parts) and fnmatch.fnmatchcase(parts[-1], pattern)


class DenyList:
    """Patterns as :func:`matches_deny_pattern` reads them, compiled into one expression per
    kind (folder, whole path, file name): a path is matched once, not once per pattern.

    Every read checks its path, and a search every file it walks: matched a pattern at a
    time, the default list cost about a tenth of a small ReadFile's time.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        patterns = tuple(patterns)
        self._folders = _joined(p[:-1] for p in patterns if p.endswith("/"))
        self._paths = _joined(p for p in patterns if "/" in p and not p.endswith("/"))
        self._names = _joined(p for p in patterns if "/" not in p)

    def matches(self, relative: str) -> bool:
        """Whether a root-relative POSIX path (as :meth:`Workspace.relative` gives it) falls
        under any of the patterns."""
        parts = [part for part in relative.split("/") if part and part != "."]  # as pathlib parts it
        if self._names is not None and parts and self._names.match(parts[-1]):
            return True
        if self._paths is not None and self._paths.match(relative):
            return True
        folders = self._folders
        return folders is not None and any(folders.match(part) for part in parts)


def _joined(patterns: Iterable[str]) -> re.Pattern[str] | None:
    """One expression that matches what any of the shell globs matches (each one whole)."""
    alternatives = [f"(?:{fnmatch.translate(pattern)})" for pattern in patterns]
    return re.compile("|".join(alternatives)) if alternatives else None


class Workspace:
    """The one folder the handlers may touch, and the paths in it they may not."""

    def __init__(self, root: Path, deny: Iterable[str] = (), deny_write: Iterable[str] = ()) -> None:
        self.root = Path(os.path.realpath(root))
        self._prefix = str(self.root).rstrip(os.sep) + os.sep
        deny = tuple(deny)
        self._deny = DenyList(deny)
        self._deny_write = DenyList((*deny, *deny_write))

    def denied(self, real_path: Path, *, write: bool = False) -> bool:
        """Whether the deny-lists forbid this (already confined) real path."""
        return (self._deny_write if write else self._deny).matches(self.relative(real_path))

    def check_allowed(self, real_path: Path, path_arg: str, *, write: bool = False) -> None:
        if self.denied(real_path, write=write):
            action = "written" if write else "read"
            raise CommandFailed("permission_denied", f"Path may not be {action} by policy: {path_arg}")

    def contains(self, real_path: str) -> bool:
        return real_path == str(self.root) or real_path.startswith(self._prefix)

    def resolve(self, path: str, *, write: bool = False) -> Path:
        """The real path that ``path`` names, confined and allowed, or ``CommandFailed``.

        ``path_traversal`` when it leads outside the root, ``permission_denied`` when the
        deny-lists forbid it (for reading, or for writing when ``write``).
        """
        if not path:
            raise CommandFailed("path_traversal", "Empty path")
        if "\x00" in path:
            raise CommandFailed("path_traversal", "Path contains a NUL byte")
        if len(path) > MAX_PATH_CHARS or any(
            len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for part in PurePosixPath(path).parts
        ):
            raise CommandFailed("path_traversal", "Path is too long")
        if ".." in PurePosixPath(path).parts:
            raise CommandFailed("path_traversal", f"Path contains '..': {path}")
        try:
            resolved = os.path.realpath(os.path.join(self.root, path))
        except OSError:
            # A symlink swapped for a folder between realpath's lstat and readlink: EINVAL.
            raise CommandFailed("path_traversal", f"Path changed while it was resolved: {path}") from None
        if not self.contains(resolved):
            raise CommandFailed("path_traversal", f"Path escapes workspace root: {path}")
        real = Path(resolved)
        self.check_allowed(real, path, write=write)
        return real

    def relative(self, real_path: Path) -> str:
        """The root-relative POSIX path; ``""`` for the root itself."""
        text = str(real_path)
        if text.startswith(self._prefix) and os.sep == "/":  # the common case, without pathlib
            return text[len(self._prefix) :]
        relative = real_path.relative_to(self.root).as_posix()
        return "" if relative == "." else relative
