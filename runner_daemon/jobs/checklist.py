"""The checklist Opik's Runners page shows: what this runner is, where, and what it found.

Sent with ``PATCH {runnerId}/checklist`` in the shape Opik's own runner sends
(``opik/runner/snapshot.py``, ``../shared/JOBS.md``). Differences, on purpose: the file tree
and the scan honour the deny-lists and never follow a symlink; the instrumentation flags are
computed over every file scanned, not only over the first 50 matching lines (Opik's shows no
``prompts`` when 50 tracing lines come first); the tree is bounded in bytes too, so the
checklist stays under the server's 1 MiB cap whatever the path lengths. ``command`` is null:
there is no one program, each job starts its agent's own.
"""

from __future__ import annotations

import platform
import re
import shutil
from typing import Any

from runner_daemon.core.settings import Settings
from runner_daemon.jobs.agents import AgentsFound
from runner_daemon.jobs.discovery import MAX_FILE_BYTES, MAX_FILES, Walk, read_small_file
from runner_daemon.system.workspace import Workspace

MAX_TREE_ENTRIES = 1000
MAX_TREE_CHARS = 256 * 1024
MAX_MATCHES = 50
MAX_MATCH_CHARS = 300  # a minified line is cut, not sent whole
CODE_SUFFIXES = (".py", ".js", ".ts", ".tsx", ".mjs")

# Opik's patterns, line by line (opik/runner/snapshot.py).
TRACING = re.compile(
    r"import opik|from opik|@opik\.track|opik\.track\(|opik\.flush_tracker|from [\"']opik[\"']"
    r"|require\(['\"]opik['\"]\)|from [\"']opik-openai[\"']|from [\"']opik-vercel[\"']"
)
ENTRYPOINT = re.compile(r"entrypoint\s*=\s*True|entrypoint:\s*true")
PROMPTS = re.compile(
    r"\.(?:get_prompt|create_prompt|get_chat_prompt|create_chat_prompt)\(|\.(?:get|create)(?:Chat)?Prompt\("
)
PATTERNS = {"tracing": TRACING, "entrypoint": ENTRYPOINT, "prompts": PROMPTS}


def file_tree(
    workspace: Workspace, *, max_entries: int = MAX_TREE_ENTRIES, max_chars: int = MAX_TREE_CHARS
) -> str:
    """Newline-separated root-relative paths, folders with a trailing ``/`` before their
    contents; past ``max_entries`` (or ``max_chars``) a last line ``[truncated: N total files]``,
    N counting folders and files as Opik's does (``N+`` when the walk's own bound was hit)."""
    walk = Walk(workspace)
    lines: list[str] = []
    size = 0
    total = 0
    full = False
    for entry in walk:
        total += 1
        line = entry.relative + ("/" if entry.is_dir else "")
        size += len(line) + 1
        if full or len(lines) == max_entries or size > max_chars:
            full = True
            continue
        lines.append(line)
    if full or walk.cut:
        lines.append(f"[truncated: {total}{'+' if walk.cut else ''} total files]")
    return "\n".join(lines)


def instrumentation(workspace: Workspace, *, max_files: int = MAX_FILES) -> tuple[dict[str, bool], list[str]]:
    """Which of Opik's markers the code files hold, and the first matching lines as
    ``path:line:text`` (at most :data:`MAX_MATCHES`); files over 1 MiB or not UTF-8 are skipped."""
    flags = dict.fromkeys(PATTERNS, False)
    matches: list[str] = []
    code = (entry for entry in Walk(workspace) if not entry.is_dir and entry.name.endswith(CODE_SUFFIXES))
    for count, entry in enumerate(code):
        if count == max_files:
            break
        data = read_small_file(entry, MAX_FILE_BYTES)
        if data is None or not (b"opik" in data or b"entrypoint" in data or b"rompt" in data):
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            hits = [key for key, pattern in PATTERNS.items() if pattern.search(line)]
            for key in hits:
                flags[key] = True
            if hits and len(matches) < MAX_MATCHES:
                matches.append(f"{entry.relative}:{number}:{line.strip()[:MAX_MATCH_CHARS]}")
    return flags, matches


def build_checklist(settings: Settings, found: AgentsFound) -> dict[str, Any]:
    """The body of ``PATCH {runnerId}/checklist``. Blocking (it walks and reads the
    workspace): call it in a worker thread.

    ``entrypoint`` is also true when any agent is registered, declared ones included: the
    runner does serve agents then, whatever the markers say.
    """
    workspace = Workspace(settings.workspace_root, settings.deny_paths)
    flags, matches = instrumentation(workspace)
    flags["entrypoint"] = flags["entrypoint"] or bool(found.specs)
    return {
        "runner_type": "endpoint",
        "command": None,
        "platform": platform.system().lower(),
        "project_root": str(workspace.root),
        "python_executable": shutil.which(found.python) or found.python,
        "file_tree": file_tree(workspace),
        "instrumentation": flags,
        "instrumentation_matches": matches,
    }
