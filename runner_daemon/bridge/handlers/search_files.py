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
that way and dropped unless it is the same bytes
(:class:`~runner_daemon.bridge.search.git_grep.GitGrepOutput`): a folder swapped
for a symlink mid-search yields nothing from outside the root. ``context_before`` and
``context_after`` are the (up to) three file lines on each side of the match, whether or
not they match too. ``matches`` is always a prefix of all matches in path order;
``truncated`` says some were left out.

The engines live in :mod:`runner_daemon.bridge.search`; this module holds the handler, its
arguments and the result.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import anyio
from pydantic import field_validator

from runner_daemon.bridge.handlers.base import Args, Handler, HandlerContext, existing_folder
from runner_daemon.bridge.search.git_grep import find_git_work_tree, git_environment, git_search
from runner_daemon.bridge.search.hits import Hit, Hits, line_text, open_inside, read_line
from runner_daemon.bridge.search.walk import python_search
from runner_daemon.core.errors import CommandFailed
from runner_daemon.system.workspace import Workspace

MAX_BYTES = 512 * 1024
MAX_PATTERN_CHARS = 500
CONTEXT_LINES = 3
# Without an enclosing deadline (a direct call), a search still ends.
DEFAULT_SEARCH_SECONDS = 300.0
# Our own limit ends this long before the command's, so the failure is ours to word.
DEADLINE_MARGIN_SECONDS = 0.5


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


def folder_path(ctx: HandlerContext, path_arg: str) -> Path:
    """The real path of the folder ``path_arg`` names, checked by opening it (anchored)."""
    with existing_folder(ctx, path_arg) as folder:
        return folder.path


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
