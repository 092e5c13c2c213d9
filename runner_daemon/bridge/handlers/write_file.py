"""``WriteFile``: create or replace a UTF-8 text file, atomically, under its file lock."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from runner_daemon.bridge.fileio import AnchoredDir, NotRegularFile
from runner_daemon.bridge.handlers.base import Args, Handler, HandlerContext
from runner_daemon.bridge.syntax import check_syntax
from runner_daemon.core.errors import CommandFailed
from runner_daemon.system.workspace import Workspace

DIFF_CONTEXT_LINES = 4


class WriteFileArgs(Args):
    path: str
    content: str = ""


def unified_diff(old: str, new: str, relative: str) -> str:
    """The diff Opik's runner reports: ``a/``/``b/`` headers and 4 lines of context."""
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True),
            new.splitlines(keepends=True),
            fromfile=f"a/{relative}",
            tofile=f"b/{relative}",
            n=DIFF_CONTEXT_LINES,
        )
    )


def describe_change(old: str | None, new: str, relative: str, path_arg: str) -> dict[str, Any]:
    """``diff`` (None for a new file) and, for checked languages, ``syntax_check``.

    Diffing and parsing can take a while on big files, so they run off the event loop and
    after the file lock is released.
    """
    described: dict[str, Any] = {"diff": None if old is None else unified_diff(old, new, relative)}
    syntax = check_syntax(path_arg, new)
    if syntax is not None:
        described["syntax_check"] = syntax
    return described


def write_text(workspace: Workspace, real: Path, path_arg: str, content: str) -> str | None:
    """Replace the file; returns its previous text, or None when there was no readable text."""
    try:
        with AnchoredDir.open_parent(workspace, real, create=True) as folder:
            old = folder.read_bytes(real.name)
            folder.replace(real.name, content.encode("utf-8"))
    except NotRegularFile:  # the workspace root itself
        raise CommandFailed("permission_denied", f"Not a regular file: {path_arg}") from None
    except PermissionError:
        raise CommandFailed("permission_denied", f"File is not writable: {path_arg}") from None
    if old is None:
        return None
    try:
        return old.decode("utf-8")
    except UnicodeDecodeError:
        return None


class WriteFileHandler(Handler[WriteFileArgs]):
    command_type = "WriteFile"
    args_model = WriteFileArgs
    mutating = True

    async def run(self, args: WriteFileArgs, ctx: HandlerContext) -> dict[str, Any]:
        real = await ctx.resolve(args.path, write=True)
        async with ctx.services.locks.hold(real):
            old = await ctx.in_thread_to_completion(write_text, ctx.workspace, real, args.path, args.content)
        result: dict[str, Any] = {"bytes_written": len(args.content.encode("utf-8")), "created": old is None}
        result.update(
            await ctx.in_thread(describe_change, old, args.content, ctx.workspace.relative(real), args.path)
        )
        return result


HANDLER = WriteFileHandler()
