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
searched under its own name anyway), its name is valid UTF-8 (the result must serialise), and the
deny-list allows reading it. ``context_before``/``context_after`` are the (up to) three
file lines on each side of the match, whether or not they match too. ``matches`` is always
a prefix of all matches in path order; ``truncated`` says some were left out.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import anyio.abc
from pydantic import field_validator

from runner_daemon.errors import CommandFailed
from runner_daemon.handlers.base import Args, Handler, HandlerContext, existing_folder
from runner_daemon.handlers.exec import child_environment
from runner_daemon.workspace import SKIP_DIRS, Workspace

MAX_MATCHES = 100
MAX_BYTES = 512 * 1024
MAX_LINE_CHARS = 500
MAX_PATTERN_CHARS = 500
CONTEXT_LINES = 3
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


def open_regular(path: str) -> BinaryIO | None:
    """Open a regular file, or ``None``: a final symlink is not followed, a FIFO never blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return os.fdopen(fd, "rb")
    except OSError:
        os.close(fd)
        return None


def reportable(workspace: Workspace, real_path: str) -> str | None:
    """The root-relative name of a file under the root that may be reported, else ``None``."""
    if real_path == str(workspace.root) or not workspace.contains(real_path):
        return None
    path = Path(real_path)
    relative = workspace.relative(path)
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        return None  # an undecodable name (surrogate escapes) cannot go into JSON
    return None if workspace.denied(path) else relative


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


def sorted_entries(folder: str) -> Iterator[tuple[os.DirEntry[str], bool]]:
    """A folder's entries with whether each is a real folder, in git's order (a folder
    sorts as its name plus "/", so a full walk yields paths in byte order)."""
    try:
        with os.scandir(folder) as listing:
            entries = [(entry, entry.is_dir(follow_symlinks=False)) for entry in listing]
    except OSError:
        return iter(())  # unreadable folders are skipped, as ListFiles does
    entries.sort(key=lambda item: item[0].name + ("/" if item[1] else ""))
    return iter(entries)


def walk_files(base: str, workspace: Workspace, ctx: HandlerContext) -> Iterator[str]:
    """Paths of the regular files under ``base``, in the order git grep reports them.

    Skips the skip list, ``.git``, denied folders, and every symlink. Iterative, so depth is
    not bounded by the recursion limit.
    """
    stack = [sorted_entries(base)]
    while stack:
        ctx.check_stop()
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        # With follow_symlinks=False a symlink is neither a folder nor a file: skipped.
        entry, is_dir = item
        if is_dir:
            if (
                entry.name not in SKIP_DIRS
                and entry.name != ".git"
                and not workspace.denied(Path(entry.path))
            ):
                stack.append(sorted_entries(entry.path))
        elif entry.is_file(follow_symlinks=False):
            yield entry.path


def scan_file(
    path: str, regex: re.Pattern[str], room: int, ctx: HandlerContext
) -> tuple[list[tuple[int, str]], int] | None:
    """The first ``room`` matching lines of a text file and the count of all, or ``None``
    when the file is not a readable text file (Opik's rule: NUL in the first 8 KiB, or not
    UTF-8). Lines are matched as git does: without the newline, with a CR if there is one."""
    stream = open_regular(path)
    if stream is None:
        return None
    found: list[tuple[int, str]] = []
    count = 0
    with stream:
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
    workspace: Workspace, base: Path, regex: re.Pattern[str], glob: str, ctx: HandlerContext
) -> Hits:
    hits = Hits()
    for path in walk_files(str(base), workspace, ctx):
        relative = reportable(workspace, path)
        if relative is None or (glob and not glob_matches(relative, glob)):
            continue
        scanned = scan_file(path, regex, hits.room, ctx)
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
    no memory. Files that may not be reported are dropped here, before they are counted.
    """

    def __init__(self, workspace: Workspace, hits: Hits) -> None:
        self._workspace = workspace
        self._hits = hits
        self._field = bytearray()
        self._part = 0  # 0: file name, 1: line number, 2: content
        self._name = b""
        self._line = 0
        self._names: dict[bytes, str | None] = {}
        # Set instead of raising: an exception inside the reading task group would reach
        # the caller wrapped in an ExceptionGroup.
        self.malformed = False

    def feed(self, data: bytes, ctx: HandlerContext) -> None:
        ctx.check_stop()
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
                self._emit()

    def close(self) -> None:
        """End of output: a last record without its newline still counts."""
        if self._part == 2:
            self._emit()

    def _emit(self) -> None:
        relative = self._relative(self._name)
        if relative is not None:
            self._hits.total += 1
            if self._hits.room > 0:
                self._hits.kept.append(Hit(relative, self._line, line_text(bytes(self._field))))
        self._field.clear()
        self._part = 0

    def _relative(self, name: bytes) -> str | None:
        if name not in self._names:
            # git names files relative to its cwd, the root; a pathspec may reach "../".
            lexical = os.path.normpath(os.path.join(self._workspace.root, os.fsdecode(name)))
            # Any symlink on the way (the file itself included) makes the two differ.
            same = os.path.realpath(lexical) == lexical
            self._names[name] = reportable(self._workspace, lexical) if same else None
        return self._names[name]


@dataclass
class GitRun:
    status: int
    stderr: str


async def run_git(
    argv: list[str],
    cwd: Path,
    env: dict[str, str],
    on_stdout: Callable[[bytes], Awaitable[None]],
) -> GitRun:
    """Run git to completion, streaming stdout into ``on_stdout``.

    If this is cancelled (our time limit, the command's deadline, the daemon stopping) or
    fails, the child is killed and reaped before the exception propagates.
    """
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
    env = child_environment(ctx.settings)
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
                [git, "rev-parse", "--is-inside-work-tree"], ctx.workspace.root, env, collect
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
        done = await run_git(argv, ctx.workspace.root, env, parse)
    except OSError as exc:
        raise CommandFailed("search_failed", f"Could not run git grep: {exc.strerror}") from None
    if done.status == 1:
        return Hits()  # no match
    if done.status != 0:
        message = done.stderr or f"git grep exited with status {done.status}"
        if any(marker in message for marker in GIT_PATTERN_ERRORS):
            raise CommandFailed("match_not_found", f"Invalid pattern: {message}")
        raise CommandFailed("search_failed", f"git grep failed: {message}")
    parser.close()
    if parser.malformed:
        raise CommandFailed("search_failed", "Unexpected output from git grep")
    return hits


# --- result ------------------------------------------------------------------------------


def with_context(workspace: Workspace, hits: Hits, ctx: HandlerContext) -> dict[str, Any]:
    """The result: each kept hit with the file lines around it, within the byte budget.

    If a file changed since it was searched (its line no longer reads as the match), the
    hit keeps its content and gets no context rather than someone else's lines.
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
        stream = open_regular(os.path.join(workspace.root, name))
        if stream is None:
            continue
        with stream:
            try:
                for number, raw in enumerate(stream, 1):
                    ctx.check_stop()
                    if number in wanted:
                        lines[name, number] = line_text(raw.removesuffix(b"\n"))
                    if number >= last:
                        break
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
        base = await ctx.in_thread(existing_folder, ctx, args.path)
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
