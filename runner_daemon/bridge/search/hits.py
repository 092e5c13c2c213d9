"""The lines a search reports, shared by both engines and the result: limits, the
:class:`Hit` record, cutting a line, and opening a file anchored at the root.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import BinaryIO

from runner_daemon.bridge.fileio import AnchoredDir, NotRegularFile, open_regular
from runner_daemon.core.errors import CommandFailed
from runner_daemon.system.workspace import Workspace

MAX_MATCHES = 100
MAX_LINE_CHARS = 500
CHUNK_BYTES = 1 << 16
# Bytes of a line kept before decoding: enough for MAX_LINE_CHARS characters of 4 bytes.
KEEP_LINE_BYTES = MAX_LINE_CHARS * 4 + 4


@dataclass(frozen=True, slots=True)
class Hit:
    """One matching line: root-relative POSIX path, 1-based line number, cut content."""

    file: str
    line: int
    content: str


@dataclass
class Hits:
    """The first :data:`MAX_MATCHES` hits in order, and the count of all of them."""

    kept: list[Hit] = field(default_factory=list)
    total: int = 0

    @property
    def room(self) -> int:
        return MAX_MATCHES - len(self.kept)


def line_text(raw: bytes) -> str:
    """A line (without its newline) as reported: UTF-8 with replacement, no CR, cut."""
    return raw[:KEEP_LINE_BYTES].decode("utf-8", "replace").removesuffix("\r")[:MAX_LINE_CHARS]


def read_line(stream: BinaryIO) -> bytes | None:
    """The next line without its newline, cut to :data:`KEEP_LINE_BYTES` (the rest of a huge
    line is skipped, not held); ``None`` at the end of the file."""
    head = stream.readline(KEEP_LINE_BYTES)
    if head.endswith(b"\n"):
        return head[:-1]
    if len(head) == KEEP_LINE_BYTES:
        while (rest := stream.readline(CHUNK_BYTES)) and not rest.endswith(b"\n"):
            pass
    return head or None


def open_quietly(dir_fd: int, name: str) -> BinaryIO | None:
    """:func:`open_regular`, or ``None`` for anything a search skips: a missing file, a
    folder, FIFO, socket or device, a symlink, an unreadable file."""
    try:
        return open_regular(dir_fd, name)
    except (OSError, NotRegularFile, CommandFailed):
        return None


def open_inside(workspace: Workspace, relative: str) -> BinaryIO | None:
    """The regular file at a root-relative path, reached from the root without following
    any symlink, or ``None``: whatever was swapped in, nothing outside the root is read."""
    try:
        with AnchoredDir.open_parent(workspace, workspace.root / relative) as folder:
            return open_quietly(folder.fd, PurePosixPath(relative).name)
    except (OSError, NotRegularFile, CommandFailed):
        return None


def reportable(workspace: Workspace, relative: str) -> bool:
    """Whether a file at this root-relative path may be reported."""
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        return False  # an undecodable name (surrogate escapes) cannot go into JSON
    return not workspace.denied(workspace.root / relative)
