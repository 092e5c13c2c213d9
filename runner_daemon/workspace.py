"""Confinement of every path argument to ``workspace_root``.

A path is resolved with all symlinks followed, and must land on the root or under it. The
checks mirror Opik's runner (empty path, ``..`` component, resolved path outside the root,
all ``path_traversal``); we add NUL bytes and over-long paths, which the OS would otherwise
reject with an error that is not Opik's vocabulary.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from runner_daemon.errors import CommandFailed

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


class Workspace:
    """The one folder the handlers may touch."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.realpath(root))
        self._prefix = str(self.root).rstrip(os.sep) + os.sep

    def contains(self, real_path: str) -> bool:
        return real_path == str(self.root) or real_path.startswith(self._prefix)

    def resolve(self, path: str) -> Path:
        """The real path that ``path`` names, or ``CommandFailed("path_traversal")``."""
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
        resolved = os.path.realpath(os.path.join(self.root, path))
        if not self.contains(resolved):
            raise CommandFailed("path_traversal", f"Path escapes workspace root: {path}")
        return Path(resolved)

    def relative(self, real_path: Path) -> str:
        return real_path.relative_to(self.root).as_posix()
