"""``ReadFile``: a window of lines of a UTF-8 text file.

Results match Opik's runner (lines as ``str.splitlines(keepends=True)`` cuts them, the
window and the 512,000-character cut), but the file is streamed in chunks, so reading the
first lines of a multi-gigabyte log costs a chunk of memory, not the whole file. Only a
regular file is read, opened through descriptors anchored at the root (runner_daemon.bridge.fileio).
"""

from __future__ import annotations

import codecs
from typing import Any, BinaryIO

from pydantic import Field

from runner_daemon.bridge.fileio import AnchoredDir, NotRegularFile, open_regular
from runner_daemon.bridge.handlers.base import Args, Handler, HandlerContext
from runner_daemon.core.errors import CommandFailed

MAX_LINES = 2000
MAX_CHARS = 512_000
BINARY_SNIFF_BYTES = 8192
CHUNK_BYTES = 1 << 16
# Every character str.splitlines() treats as a line boundary.
LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


class ReadFileArgs(Args):
    path: str
    offset: int = Field(0, ge=0)
    limit: int = Field(MAX_LINES, ge=0)


def open_text_file(ctx: HandlerContext, path_arg: str) -> BinaryIO:
    """Open the regular file ``path_arg`` names inside the workspace, through descriptors
    anchored at the root (a folder swapped for a symlink meanwhile is ``path_traversal``)."""
    real = ctx.workspace.resolve(path_arg)
    try:
        with AnchoredDir.open_parent(ctx.workspace, real) as folder:
            return open_regular(folder.fd, real.name)
    except FileNotFoundError:
        raise CommandFailed("file_not_found", f"File not found: {path_arg}") from None
    except CommandFailed as exc:
        if exc.code == "file_not_found":  # a folder on the way is missing
            raise CommandFailed("file_not_found", f"File not found: {path_arg}") from None
        raise
    except NotRegularFile:
        raise CommandFailed("file_not_found", f"Not a regular file: {path_arg}") from None
    except PermissionError:
        raise CommandFailed("permission_denied", f"Permission denied: {path_arg}") from None


def _ends_with_break(line: str) -> bool:
    return bool(line) and line[-1] in LINE_BREAKS


def read_window(
    stream: BinaryIO, path_arg: str, offset: int, limit: int, ctx: HandlerContext
) -> dict[str, Any]:
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    total = 0
    pieces: list[str] = []
    chars = 0
    cut = False
    carry = ""
    head = stream.read(BINARY_SNIFF_BYTES)
    if b"\x00" in head:
        raise CommandFailed("binary_file", f"Binary file: {path_arg}")
    chunk = head
    while True:
        ctx.check_stop()
        final = not chunk
        try:
            text = carry + decoder.decode(chunk, final=final)
        except UnicodeDecodeError:
            raise CommandFailed("binary_file", f"File is not valid UTF-8: {path_arg}") from None
        lines = text.splitlines(keepends=True)
        carry = ""
        # The last piece may continue in the next chunk, and a lone "\r" may be
        # the first half of "\r\n": keep it back until more text arrives.
        if not final and lines and (not _ends_with_break(lines[-1]) or lines[-1][-1] == "\r"):
            carry = lines.pop()
        for line in lines:
            if offset <= total < offset + limit and not cut:
                piece = line[: MAX_CHARS - chars]
                cut = len(piece) < len(line)
                pieces.append(piece)
                chars += len(piece)
            total += 1
        if final:
            break
        chunk = stream.read(CHUNK_BYTES)
    return {
        "content": "".join(pieces),
        "total_lines": total,
        "truncated": cut or total > offset + limit,
        "encoding": "utf-8",
    }


def read_file(args: ReadFileArgs, ctx: HandlerContext) -> dict[str, Any]:
    """Resolve and read in one worker thread: one hop off the event loop, not two."""
    with open_text_file(ctx, args.path) as stream:
        return read_window(stream, args.path, args.offset, min(args.limit, MAX_LINES), ctx)


class ReadFileHandler(Handler[ReadFileArgs]):
    command_type = "ReadFile"
    args_model = ReadFileArgs

    async def run(self, args: ReadFileArgs, ctx: HandlerContext) -> dict[str, Any]:
        return await ctx.in_thread(read_file, args, ctx)


HANDLER = ReadFileHandler()
