"""``ListFiles``: the names under a folder, like ``ls -R`` to a depth.

Names are relative to the listed folder, as Opik's runner returns them. Only the first
1,000 names in sort order are kept while walking (a bounded heap), so a huge tree costs a
count, not a list. Folders are listed through descriptors opened from the root with
``O_NOFOLLOW``, so a folder swapped for a symlink mid-walk lists nothing from outside.
"""

from __future__ import annotations

import fnmatch
import heapq
import os
from collections.abc import Iterator
from typing import Any

from pydantic import Field

from runner_daemon.bridge.fileio import AnchoredDir, open_subfolder
from runner_daemon.bridge.handlers.base import Args, Handler, HandlerContext, existing_folder
from runner_daemon.system.workspace import SKIP_DIRS

MAX_ENTRIES = 1000
MAX_BYTES = 512 * 1024
MAX_DEPTH = 5


class ListFilesArgs(Args):
    path: str = ""
    pattern: str | None = None
    depth: int = Field(1, ge=1, le=MAX_DEPTH)


def _walk(folder_fd: int, prefix: str, pattern: str | None, depth: int, ctx: HandlerContext) -> Iterator[str]:
    """Names under the open folder, each prefixed with ``prefix`` (its path from the base)."""
    ctx.check_stop()
    try:
        with os.scandir(folder_fd) as entries:
            listed = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
    except OSError:
        return  # unreadable folders are skipped, as Opik does
    for name, is_dir in listed:
        # Symlinked folders count as files: never descended, so never a way out.
        if is_dir and name in SKIP_DIRS:
            continue
        rel = prefix + name
        if is_dir:
            yield rel + "/"
            # Opened by name with O_NOFOLLOW: a folder swapped for a symlink since the
            # listing is not entered.
            child = open_subfolder(folder_fd, name) if depth > 1 else None
            if child is not None:
                try:
                    yield from _walk(child, rel + "/", pattern, depth - 1, ctx)
                finally:
                    os.close(child)
        elif not pattern or fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(rel, pattern):
            yield rel


def _sort_key(name: str) -> tuple[bool, str]:
    return (not name.endswith("/"), name.lower())


def list_names(base: AnchoredDir, pattern: str | None, depth: int, ctx: HandlerContext) -> dict[str, Any]:
    total = 0

    def counted() -> Iterator[str]:
        nonlocal total
        for name in _walk(base.fd, "", pattern, depth, ctx):
            total += 1
            yield name

    first = heapq.nsmallest(MAX_ENTRIES + 1, counted(), key=_sort_key)
    files: list[str] = []
    size = 0
    for name in first:
        size += len(name.encode("utf-8")) + 1
        if len(files) >= MAX_ENTRIES or size > MAX_BYTES:
            break
        files.append(name)
    return {"files": files, "total": total, "truncated": len(files) < total}


def list_folder(args: ListFilesArgs, ctx: HandlerContext) -> dict[str, Any]:
    """Resolve and list in one worker thread: one hop off the event loop, not two."""
    with existing_folder(ctx, args.path) as base:
        return list_names(base, args.pattern or None, args.depth, ctx)


class ListFilesHandler(Handler[ListFilesArgs]):
    command_type = "ListFiles"
    args_model = ListFilesArgs

    async def run(self, args: ListFilesArgs, ctx: HandlerContext) -> dict[str, Any]:
        return await ctx.in_thread(list_folder, args, ctx)


HANDLER = ListFilesHandler()
