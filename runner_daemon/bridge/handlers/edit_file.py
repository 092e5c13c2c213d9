"""``EditFile``: replace unique snippets of a text file, all edits at once, atomically.

Matching runs on LF text with the BOM removed; the file's BOM and dominant line ending are
put back afterwards. When an edit does not match exactly, every edit is matched again on a
"fuzzy" view of the text (NFKC, straight quotes, plain dashes and spaces, no trailing
blanks), which absorbs what a language model typically changes when it quotes code; each
position of that view remembers where it came from, so the replacement lands on the
original characters.
"""

from __future__ import annotations

import itertools
import unicodedata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from runner_daemon.bridge.fileio import AnchoredDir, NotRegularFile
from runner_daemon.bridge.handlers.base import Args, Handler, HandlerContext
from runner_daemon.bridge.handlers.read_file import BINARY_SNIFF_BYTES
from runner_daemon.bridge.handlers.write_file import describe_change
from runner_daemon.core.errors import CommandFailed
from runner_daemon.system.workspace import Workspace

BOM = "\ufeff"
FUZZY_CHARACTERS = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2013": "-",
        "\u2014": "-",
        "\u2212": "-",
        "\u00a0": " ",
        "\u2009": " ",
        "\u200a": " ",
    }
)

Span = tuple[int, int]  # start, end in the LF text


class Edit(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    old_string: str
    new_string: str


class EditFileArgs(Args):
    path: str
    edits: list[Edit]


def check_edits(edits: list[Edit]) -> None:
    """The argument rules Opik applies before touching the file."""
    if not edits:
        raise CommandFailed("no_change", "No edits provided")
    for edit in edits:
        if not edit.old_string:
            raise CommandFailed("match_not_found", "Empty old_string")
        if edit.old_string == edit.new_string:
            raise CommandFailed("no_change", "old_string equals new_string")


def fuzzy_view(text: str) -> tuple[str, list[int]]:
    """The fuzzy form of ``text`` and, for each of its characters, the original index."""
    chars: list[str] = []
    origins: list[int] = []
    for index, char in enumerate(text):
        for normal in unicodedata.normalize("NFKC", char).translate(FUZZY_CHARACTERS):
            chars.append(normal)
            origins.append(index)
    kept_chars: list[str] = []
    kept_origins: list[int] = []
    run_start = None  # start of a pending run of spaces/tabs
    for char, origin in zip(chars, origins, strict=True):
        if char in " \t":
            run_start = len(kept_chars) if run_start is None else run_start
        elif char == "\n" and run_start is not None:
            del kept_chars[run_start:], kept_origins[run_start:]  # blanks before a newline
        if char not in " \t":
            run_start = None
        kept_chars.append(char)
        kept_origins.append(origin)
    return "".join(kept_chars), kept_origins


def fuzzy_form(text: str) -> str:
    return fuzzy_view(text)[0]


def find_unique(haystack: str, needle: str, kind: str) -> int | None:
    first = haystack.find(needle)
    if first == -1:
        return None
    if haystack.find(needle, first + 1) != -1:
        raise CommandFailed("match_ambiguous", f"Found {haystack.count(needle)} {kind}for the search string")
    return first


def locate(content: str, edits: list[Edit]) -> tuple[list[Span], bool]:
    """Where each edit applies in ``content`` (LF text), and whether fuzzy matching was needed."""
    spans: list[Span] = []
    for edit in edits:
        old = edit.old_string.replace("\r\n", "\n")
        start = find_unique(content, old, "matches ")
        if start is None:
            break
        spans.append((start, start + len(old)))
    else:
        return spans, False
    view, origins = fuzzy_view(content)
    spans = []
    for edit in edits:
        old = fuzzy_form(edit.old_string.replace("\r\n", "\n"))
        start = find_unique(view, old, "fuzzy matches ")
        if start is None:
            raise CommandFailed("match_not_found", "old_string not found in file")
        end = start + len(old)
        original_end = origins[end] if end < len(origins) else len(content)
        spans.append((origins[start], max(original_end, origins[start] + 1)))
    return spans, True


def apply_edits(content: str, spans: list[Span], edits: list[Edit]) -> str:
    ordered = sorted(zip(spans, edits, strict=True), key=lambda pair: pair[0])
    for (span, _), (next_span, _) in itertools.pairwise(ordered):
        if span[1] > next_span[0]:
            raise CommandFailed("edits_overlap", "Two edits overlap in the file")
    pieces: list[str] = []
    position = 0
    for (start, end), edit in ordered:
        pieces += [content[position:start], edit.new_string.replace("\r\n", "\n")]
        position = end
    pieces.append(content[position:])
    return "".join(pieces)


def edit_text(workspace: Workspace, real: Path, path_arg: str, edits: list[Edit]) -> tuple[str, str, bool]:
    """Apply the edits under the caller's lock; returns (old text, new text, fuzzy used)."""
    try:
        with AnchoredDir.open_parent(workspace, real) as folder:
            raw = folder.read_bytes(real.name)
            if raw is None:
                if folder.stat(real.name) is None:
                    raise CommandFailed("file_not_found", f"File not found: {path_arg}")
                raise CommandFailed("file_not_found", f"Not a regular file: {path_arg}")
            if b"\x00" in raw[:BINARY_SNIFF_BYTES]:
                raise CommandFailed("binary_file", f"Binary file: {path_arg}")
            try:
                old = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CommandFailed("binary_file", f"File is not valid UTF-8: {path_arg}") from None
            bom = BOM if old.startswith(BOM) else ""
            body = old[len(bom) :]
            first_break = body.find("\n")
            crlf = first_break > 0 and body[first_break - 1] == "\r"
            content = body.replace("\r\n", "\n")
            spans, fuzzy = locate(content, edits)
            new = apply_edits(content, spans, edits)
            new = bom + (new.replace("\n", "\r\n") if crlf else new)
            folder.replace(real.name, new.encode("utf-8"))
    except NotRegularFile:  # the workspace root itself
        raise CommandFailed("file_not_found", f"Not a regular file: {path_arg}") from None
    except PermissionError:
        raise CommandFailed("permission_denied", f"File is not writable: {path_arg}") from None
    return old, new, fuzzy


class EditFileHandler(Handler[EditFileArgs]):
    command_type = "EditFile"
    args_model = EditFileArgs
    mutating = True

    async def run(self, args: EditFileArgs, ctx: HandlerContext) -> dict[str, Any]:
        real = await ctx.resolve(args.path, write=True)
        check_edits(args.edits)
        async with ctx.services.locks.hold(real):
            old, new, fuzzy = await ctx.in_thread_to_completion(
                edit_text, ctx.workspace, real, args.path, args.edits
            )
        result: dict[str, Any] = {"edits_applied": len(args.edits), "fuzzy_match_used": fuzzy}
        described = await ctx.in_thread(describe_change, old, new, ctx.workspace.relative(real), args.path)
        return {"diff": described.pop("diff"), **result, **described}


HANDLER = EditFileHandler()
