"""The search inside a git work tree: ``git grep --untracked -P``, its output parsed as it
streams, each reported line read again through anchored descriptors and kept only when it is
the same bytes (:class:`GitGrepOutput`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import anyio
import anyio.abc

from runner_daemon.bridge.handlers.base import HandlerContext
from runner_daemon.bridge.search.hits import (
    KEEP_LINE_BYTES,
    Hit,
    Hits,
    line_text,
    open_inside,
    read_line,
    reportable,
)
from runner_daemon.core.errors import CommandFailed
from runner_daemon.system.environment import child_environment
from runner_daemon.system.sandbox import SandboxPolicy
from runner_daemon.system.workspace import Workspace

# rev-parse answers in milliseconds; longer means git hangs (a network mount, a lock).
GIT_PROBE_SECONDS = 5.0
MAX_STDERR_BYTES = 64 * 1024
# Variables that would point git at another repository than the workspace's (a hook's
# environment sets GIT_DIR, for one).
GIT_LOCATION_ENV = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_COMMON_DIR",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_NAMESPACE",
    "GIT_PREFIX",
    "GIT_CONFIG_PARAMETERS",
    "GIT_CONFIG_COUNT",
)
# How git words a pattern it cannot compile: "fatal: -e option, '<pattern>': <reason>".
GIT_PATTERN_ERRORS = ("-e option, '", "PCRE2 pattern")


class GitGrepOutput:
    """Parses ``git grep -z -n`` output as it streams: ``<file>\\0<line>\\0<content>\\n``.

    A file name holds any byte but NUL and a content any byte but a newline, so the fields
    split unambiguously. Contents are kept to :data:`KEEP_LINE_BYTES`, so one huge line costs
    no memory.

    git opens files by name, so a co-tenant swapping a folder for a symlink can make it read
    outside the root. So a record counts only when the same line, read now through
    descriptors anchored at the root (no symlink followed), is the same bytes: then both the
    name and the content are the workspace's. git reports a file's lines in order, so each
    file is read once, forwards; it is open only during one :meth:`feed` call. Files that may
    not be reported are dropped too, before they are counted.
    """

    def __init__(self, workspace: Workspace, hits: Hits) -> None:
        self._workspace = workspace
        self._hits = hits
        self._field = bytearray()
        self._part = 0  # 0: file name, 1: line number, 2: content
        self._name = b""
        self._line = 0
        # Set instead of raising: an exception inside the reading task group would reach
        # the caller wrapped in an ExceptionGroup.
        self.malformed = False
        # The file whose lines are being checked: git's name, ours (None: not reportable),
        # its stream while a feed() runs, and where its next line starts.
        self._file = b""
        self._relative: str | None = None
        self._stream: BinaryIO | None = None
        self._offset = 0
        self._lines_read = 0

    def feed(self, data: bytes, ctx: HandlerContext) -> None:
        ctx.check_stop()
        try:
            self._parse(data, ctx)
        finally:
            self._park()

    def close(self, ctx: HandlerContext) -> None:
        """End of output: a last record without its newline still counts."""
        try:
            if self._part == 2:
                self._emit(ctx)
        finally:
            self._park()

    def _parse(self, data: bytes, ctx: HandlerContext) -> None:
        position, end_of_data = 0, len(data)
        while position < end_of_data:
            if self._part < 2:
                end = data.find(b"\x00", position)
                if end < 0:
                    self._field += data[position:]
                    return
                self._field += data[position:end]
                position = end + 1
                if self._part == 0:
                    self._name = bytes(self._field)
                elif self._field.isdigit():
                    self._line = int(self._field)
                else:
                    self.malformed = True
                    self._line = 0
                self._field.clear()
                self._part += 1
            else:
                end = data.find(b"\n", position)
                stop = end_of_data if end < 0 else end
                room = KEEP_LINE_BYTES - len(self._field)
                if room > 0:
                    self._field += data[position : min(stop, position + room)]
                if end < 0:
                    return
                position = end + 1
                self._emit(ctx)

    def _emit(self, ctx: HandlerContext) -> None:
        content = bytes(self._field)
        if self._line_now(self._name, self._line, ctx) == content and self._relative is not None:
            self._hits.total += 1
            if self._hits.room > 0:
                self._hits.kept.append(Hit(self._relative, self._line, line_text(content)))
        self._field.clear()
        self._part = 0

    def _line_now(self, name: bytes, number: int, ctx: HandlerContext) -> bytes | None:
        """Line ``number`` of the file git named, read through anchored descriptors and cut
        as git's content is; ``None`` when it may not be reported, is not a regular file
        reached without a symlink, or is shorter now."""
        if name != self._file:
            self._park()
            self._file, self._relative = name, self._reportable_name(name)
            self._offset = self._lines_read = 0
        if self._relative is None:
            return None
        if number <= self._lines_read:  # not git's order: read the file again
            self._park()
            self._offset = self._lines_read = 0
        if self._stream is None:
            self._stream = open_inside(self._workspace, self._relative)
            if self._stream is None:
                self._relative = None
                return None
            self._stream.seek(self._offset)
        line = None
        while self._lines_read < number:
            ctx.check_stop()
            line = read_line(self._stream)
            if line is None:
                return None
            self._lines_read += 1
        return line

    def _reportable_name(self, name: bytes) -> str | None:
        # git names files relative to its cwd, the root; a pathspec may reach "../".
        relative = os.fsdecode(name)
        if any(part in ("", ".", "..") for part in relative.split("/")):
            return None
        return relative if reportable(self._workspace, relative) else None

    def _park(self) -> None:
        """Close the file between feeds, remembering where its next line starts."""
        if self._stream is not None:
            self._offset = self._stream.tell()
            self._stream.close()
            self._stream = None


@dataclass
class GitRun:
    status: int
    stderr: str


async def run_git(
    argv: list[str],
    cwd: Path,
    env: dict[str, str],
    on_stdout: Callable[[bytes], Awaitable[None]],
    sandbox: SandboxPolicy | None,
) -> GitRun:
    """Run git to completion, streaming stdout into ``on_stdout``; in the sandbox, read-only.

    If this is cancelled (our time limit, the command's deadline, the daemon stopping) or
    fails, the child is killed and reaped before the exception propagates.
    """
    if sandbox is not None:
        argv = sandbox.without_writes().wrap(argv)
    with anyio.CancelScope(shield=True):  # never lose the handle of a child just spawned
        process = await anyio.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
        )
    stderr = bytearray()

    async def drain_stderr(stream: anyio.abc.ByteReceiveStream) -> None:
        async for chunk in stream:
            stderr.extend(chunk[: MAX_STDERR_BYTES - len(stderr)])

    async def drain_stdout(stream: anyio.abc.ByteReceiveStream) -> None:
        async for chunk in stream:
            await on_stdout(chunk)

    status: int | None = None
    try:
        assert process.stdout is not None and process.stderr is not None
        async with anyio.create_task_group() as readers:
            readers.start_soon(drain_stderr, process.stderr)
            readers.start_soon(drain_stdout, process.stdout)
        status = await process.wait()
    finally:
        with anyio.CancelScope(shield=True):
            if status is None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                    process.kill()
            await process.aclose()  # waits for the (killed) child and closes the pipes
    return GitRun(status, stderr.decode("utf-8", "replace").strip())


def git_environment(ctx: HandlerContext) -> dict[str, str]:
    """The Exec child environment (no daemon secrets), aimed at the workspace's repository,
    with untranslated messages so errors can be told apart."""
    env = child_environment(ctx.settings, bridge_key=ctx.services.bridge_key)
    for name in (*GIT_LOCATION_ENV, "LANGUAGE"):
        env.pop(name, None)
    env["LC_ALL"] = "C.UTF-8"  # PCRE in UTF-8 mode, as Python's str patterns; falls back to C
    return env


async def find_git_work_tree(ctx: HandlerContext, env: dict[str, str]) -> str | None:
    """The git executable when the root is inside a git work tree, else ``None``."""
    git = await ctx.in_thread(shutil.which, "git")
    if git is None:
        return None
    output = bytearray()

    async def collect(chunk: bytes) -> None:
        output.extend(chunk[:64])

    with anyio.move_on_after(GIT_PROBE_SECONDS):
        try:
            probe = await run_git(
                [git, "rev-parse", "--is-inside-work-tree"],
                ctx.workspace.root,
                env,
                collect,
                ctx.services.sandbox,
            )
        except OSError:
            return None  # not executable after all
        if probe.status == 0 and output.strip() == b"true":
            return git
    return None


async def git_search(git: str, pattern: str, pathspec: str, env: dict[str, str], ctx: HandlerContext) -> Hits:
    argv = [
        git,
        "-c",
        "core.fsmonitor=false",  # a repository's config must not make us run its programs
        "grep",
        "--untracked",
        "-I",  # binary files: skipped, as the Python search skips them
        "-n",
        "-z",
        "--no-color",
        "--no-full-name",  # paths relative to the root even under grep.fullName
        "--no-column",
        "--no-recurse-submodules",  # submodule.recurse would make --untracked an error
        "-P",
        "-e",  # a pattern starting with "-" is a pattern, not an option
        pattern,
    ]
    if pathspec:
        argv += ["--", pathspec]
    hits = Hits()
    parser = GitGrepOutput(ctx.workspace, hits)

    async def parse(chunk: bytes) -> None:
        # Name checks touch the file system: off the event loop, one hop per chunk.
        await ctx.in_thread(parser.feed, chunk, ctx)

    try:
        done = await run_git(argv, ctx.workspace.root, env, parse, ctx.services.sandbox)
    except OSError as exc:
        raise CommandFailed("search_failed", f"Could not run git grep: {exc.strerror}") from None
    if done.status == 1:
        return Hits()  # no match
    if done.status != 0:
        message = done.stderr or f"git grep exited with status {done.status}"
        if any(marker in message for marker in GIT_PATTERN_ERRORS):
            raise CommandFailed("match_not_found", f"Invalid pattern: {message}")
        raise CommandFailed("search_failed", f"git grep failed: {message}")
    await ctx.in_thread(parser.close, ctx)
    if parser.malformed:
        raise CommandFailed("search_failed", "Unexpected output from git grep")
    return hits
