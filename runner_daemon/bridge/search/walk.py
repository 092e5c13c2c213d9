"""The pure-Python search, outside a git work tree: an anchored walk in git's order and ``re``.

Folders are entered and files opened through descriptors anchored at the root, never
following a symlink; the skip list, ``.git``, denied folders and binary or non-UTF-8 files
are skipped.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from runner_daemon.bridge.fileio import AnchoredDir, open_subfolder
from runner_daemon.bridge.handlers.base import HandlerContext
from runner_daemon.bridge.search.hits import Hit, Hits, line_text, open_quietly, reportable
from runner_daemon.system.workspace import SKIP_DIRS, Workspace

BINARY_SNIFF_BYTES = 8192


def glob_matches(relative: str, glob: str) -> bool:
    """Python-mode ``glob``: the root-relative path or the file name matches it, or (as a git
    pathspec does) it names a folder the file is under."""
    name = relative.rsplit("/", 1)[-1]
    folder = glob.rstrip("/")
    return (
        fnmatch.fnmatch(relative, glob)
        or fnmatch.fnmatch(name, glob)
        or (bool(folder) and relative.startswith(folder + "/"))
    )


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    is_dir: bool
    is_file: bool


def sorted_entries(folder_fd: int) -> Iterator[Entry]:
    """An open folder's entries, in git's order (a folder sorts as its name plus "/", so a
    full walk yields paths in byte order). A symlink is neither a folder nor a file."""
    try:
        with os.scandir(folder_fd) as listing:
            entries = [
                Entry(entry.name, entry.is_dir(follow_symlinks=False), entry.is_file(follow_symlinks=False))
                for entry in listing
            ]
    except OSError:
        return iter(())  # unreadable folders are skipped, as ListFiles does
    entries.sort(key=lambda entry: entry.name + ("/" if entry.is_dir else ""))
    return iter(entries)


def walk_files(
    base: AnchoredDir, workspace: Workspace, ctx: HandlerContext
) -> Iterator[tuple[int, str, str]]:
    """The regular files under ``base`` in the order git grep reports them: each as its
    folder's descriptor (open until the next item), its name, and its root-relative path.

    Skips the skip list, ``.git``, denied folders, and every symlink; folders are entered by
    descriptor with ``O_NOFOLLOW``, so a folder swapped for a symlink is not entered.
    Iterative, so depth is not bounded by the recursion limit.
    """
    prefix = workspace.relative(base.path)
    stack = [(base.fd, sorted_entries(base.fd), prefix + "/" if prefix else "")]
    try:
        while stack:
            ctx.check_stop()
            folder_fd, entries, folder = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                if folder_fd != base.fd:
                    os.close(folder_fd)
                continue
            relative = folder + entry.name
            if entry.is_dir:
                if (
                    entry.name not in SKIP_DIRS
                    and entry.name != ".git"
                    and not workspace.denied(workspace.root / relative)
                    and (child := open_subfolder(folder_fd, entry.name)) is not None
                ):
                    stack.append((child, sorted_entries(child), relative + "/"))
            elif entry.is_file:
                yield folder_fd, entry.name, relative
    finally:
        for folder_fd, _, _ in stack:
            if folder_fd != base.fd:
                os.close(folder_fd)


def scan_file(
    stream: BinaryIO, regex: re.Pattern[str], room: int, ctx: HandlerContext
) -> tuple[list[tuple[int, str]], int] | None:
    """The first ``room`` matching lines of a text file and the count of all, or ``None``
    when the file is not a readable text file (Opik's rule: NUL in the first 8 KiB, or not
    UTF-8). Lines are matched as git does: without the newline, with a CR if there is one."""
    found: list[tuple[int, str]] = []
    count = 0
    try:
        if b"\x00" in stream.read(BINARY_SNIFF_BYTES):
            return None
        stream.seek(0)
        for number, raw in enumerate(stream, 1):
            ctx.check_stop()
            line = raw.removesuffix(b"\n")
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                return None  # split at b"\n" only, so per-line decoding is exact
            if regex.search(text):
                count += 1
                if len(found) < room:
                    found.append((number, line_text(line)))
    except OSError:
        return None
    return found, count


def python_search(
    workspace: Workspace, start: Path, regex: re.Pattern[str], glob: str, ctx: HandlerContext
) -> Hits:
    hits = Hits()
    with AnchoredDir.open_folder(workspace, start, workspace.relative(start)) as base:
        for folder_fd, name, relative in walk_files(base, workspace, ctx):
            if not reportable(workspace, relative) or (glob and not glob_matches(relative, glob)):
                continue
            stream = open_quietly(folder_fd, name)
            if stream is None:
                continue
            with stream:
                scanned = scan_file(stream, regex, hits.room, ctx)
            if scanned is None:
                continue
            found, count = scanned
            hits.total += count
            hits.kept.extend(Hit(relative, number, content) for number, content in found)
    return hits
