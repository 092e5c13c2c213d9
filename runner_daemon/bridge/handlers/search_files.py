"""``SearchFiles``: the lines of the workspace's text files that match a regular expression.

Two engines give one result shape (HANDLERS.md, "SearchFiles"):

* Inside a git work tree, ``git grep --untracked -P`` as Opik's runner runs it, so tracked
  and untracked-but-not-ignored files are searched with PCRE. We ask git for the matches
  only (``-z``, no ``-C3``) and read the three lines of context from the files ourselves:
  with ``-z`` git writes the same NUL after the line number of a match and of a context
  line, and without ``-z`` a file name holding ``:`` or ``-`` cannot be told apart from
  the line number. NUL and newline delimit ``-z`` records unambiguously. As in Opik, the
  skip list does not apply (``.gitignore`` does), and a non-UTF-8 text file is searched,
  its lines decoded with replacement characters.
* Outside a git work tree, and also when git is not installed or does not answer
  ``rev-parse`` within a few seconds (we add: the command works in any folder rather than
  failing ``not_a_git_repository``/``git_not_available``), a pure-Python walk with ``re``,
  which is close to, but not exactly, PCRE. ``.gitignore`` means nothing there; the skip
  list, ``.git`` folders, symlinked folders and binary or non-UTF-8 files are skipped.

In both modes a file is reported only when it is a regular file reached from the root
without any symlink (a symlink may lead out of the root, and a target inside it is
searched under its own name anyway), its name is valid UTF-8 (the result must serialise),
and the deny-list allows reading it. We read files only through descriptors anchored at
the root (runner_daemon.bridge.fileio); git reads by name, so each line it reports is read again
that way and dropped unless it is the same bytes (:class:`GitGrepOutput`): a folder swapped
for a symlink mid-search yields nothing from outside the root. ``context_before`` and
``context_after`` are the (up to) three file lines on each side of the match, whether or
not they match too. ``matches`` is always a prefix of all matches in path order;
``truncated`` says some were left out.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
import re
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import anyio
import anyio.abc
from pydantic import field_validator

from runner_daemon.bridge.fileio import AnchoredDir, NotRegularFile, open_regular, open_subfolder
from runner_daemon.bridge.handlers.base import Args, Handler, HandlerContext, existing_folder
from runner_daemon.bridge.handlers.exec import child_environment
from runner_daemon.bridge.workspace import SKIP_DIRS, Workspace
from runner_daemon.core.errors import CommandFailed
from runner_daemon.system.sandbox import SandboxPolicy

MAX_MATCHES = 100
MAX_BYTES = 512 * 1024
MAX_LINE_CHARS = 500
MAX_PATTERN_CHARS = 500
CONTEXT_LINES = 3
CHUNK_BYTES = 1 << 16
BINARY_SNIFF_BYTES = 8192
# Bytes of a line kept before decoding: enough for MAX_LINE_CHARS characters of 4 bytes.
KEEP_LINE_BYTES = MAX_LINE_CHARS * 4 + 4
# rev-parse answers in milliseconds; longer means git hangs (a network mount, a lock).
GIT_PROBE_SECONDS = 5.0
# Without an enclosing deadline (a direct call), a search still ends.
DEFAULT_SEARCH_SECONDS = 300.0
# Our own limit ends this long before the command's, so the failure is ours to word.
DEADLINE_MARGIN_SECONDS = 0.5
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


class SearchFilesArgs(Args):
    pattern: str
    glob: str = ""
    path: str = ""

    @field_validator("glob")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        # A NUL cannot reach git's argv, and no file name holds one.
        if "\x00" in value:
            raise ValueError("must not contain a NUL byte")
        return value


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


# --- pure-Python search ------------------------------------------------------------------


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


# --- git search --------------------------------------------------------------------------


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


def folder_path(ctx: HandlerContext, path_arg: str) -> Path:
    """The real path of the folder ``path_arg`` names, checked by opening it (anchored)."""
    with existing_folder(ctx, path_arg) as folder:
        return folder.path


# --- result ------------------------------------------------------------------------------


def with_context(workspace: Workspace, hits: Hits, ctx: HandlerContext) -> dict[str, Any]:
    """The result: each kept hit with the file lines around it, within the byte budget.

    If a file changed since it was searched (its line no longer reads as the match), the
    hit keeps its content and gets no context rather than someone else's lines. Files are
    read through descriptors anchored at the root, as everywhere.
    """
    by_file: dict[str, list[Hit]] = {}
    for hit in hits.kept:
        by_file.setdefault(hit.file, []).append(hit)
    lines: dict[tuple[str, int], str] = {}
    for name, file_hits in by_file.items():
        wanted = {
            number
            for hit in file_hits
            for number in range(hit.line - CONTEXT_LINES, hit.line + CONTEXT_LINES + 1)
        }
        last = max(wanted)
        stream = open_inside(workspace, name)
        if stream is None:
            continue
        with stream:
            try:
                for number in range(1, last + 1):
                    ctx.check_stop()
                    raw = read_line(stream)
                    if raw is None:
                        break
                    if number in wanted:
                        lines[name, number] = line_text(raw)
            except OSError:
                pass
    matches: list[dict[str, Any]] = []
    size = 0
    for hit in hits.kept:
        before: list[str] = []
        after: list[str] = []
        if lines.get((hit.file, hit.line)) == hit.content:
            first = max(1, hit.line - CONTEXT_LINES)
            before = [lines[hit.file, number] for number in range(first, hit.line)]
            for number in range(hit.line + 1, hit.line + CONTEXT_LINES + 1):
                if (hit.file, number) not in lines:
                    break  # end of file
                after.append(lines[hit.file, number])
        entry = {
            "file": hit.file,
            "line": hit.line,
            "content": hit.content,
            "context_before": before,
            "context_after": after,
        }
        size += len(json.dumps(entry, ensure_ascii=False).encode("utf-8"))
        if size > MAX_BYTES:
            break
        matches.append(entry)
    return {"matches": matches, "total_matches": hits.total, "truncated": len(matches) < hits.total}


def search_seconds() -> float:
    """The time the search may take: the command's remaining time, less a margin."""
    remaining = anyio.current_effective_deadline() - anyio.current_time()
    if math.isinf(remaining):
        return DEFAULT_SEARCH_SECONDS
    return max(remaining - min(DEADLINE_MARGIN_SECONDS, remaining / 2), 0.0)


class SearchFilesHandler(Handler[SearchFilesArgs]):
    command_type = "SearchFiles"
    args_model = SearchFilesArgs

    async def run(self, args: SearchFilesArgs, ctx: HandlerContext) -> dict[str, Any]:
        if not args.pattern:
            raise CommandFailed("match_not_found", "Empty search pattern")
        if len(args.pattern) > MAX_PATTERN_CHARS:
            raise CommandFailed("match_not_found", f"Pattern too long (max {MAX_PATTERN_CHARS} chars)")
        if "\x00" in args.pattern:
            raise CommandFailed("match_not_found", "Invalid pattern: contains a NUL byte")
        base = await ctx.in_thread(folder_path, ctx, args.path)
        seconds = search_seconds()
        try:
            with anyio.fail_after(seconds):
                hits = await self._search(args, base, ctx)
                return await ctx.in_thread(with_context, ctx.workspace, hits, ctx)
        except TimeoutError:
            raise CommandFailed("timeout", f"Search timed out after {seconds:.1f}s") from None

    async def _search(self, args: SearchFilesArgs, base: Path, ctx: HandlerContext) -> Hits:
        env = git_environment(ctx)
        git = await find_git_work_tree(ctx, env)
        if git is not None:
            # The glob wins over the path, as in Opik; a path is literal, not a pattern.
            relative = ctx.workspace.relative(base)
            pathspec = args.glob or (f":(literal){relative}" if relative else "")
            return await git_search(git, args.pattern, pathspec, env, ctx)
        try:
            regex = re.compile(args.pattern)
        except re.error as exc:
            raise CommandFailed("match_not_found", f"Invalid pattern: {exc}") from None
        start = ctx.workspace.root if args.glob else base
        return await ctx.in_thread(python_search, ctx.workspace, start, regex, args.glob, ctx)


HANDLER = SearchFilesHandler()
