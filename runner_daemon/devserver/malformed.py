"""Spoiled poll answers for the dev server: what a broken proxy or a hostile server would send.

``POST /dev/runners/{id}/malformed {"kind": ..., "count": n}`` spoils that runner's next poll
answers. The first two kinds answer at once and pick nothing up; the others spoil the first
command of an answer that really picked commands up, so the server has a record to check.
"""

from __future__ import annotations

import json
from typing import Any

MALFORMED_KINDS = ("not_json", "unknown_status", "wrong_types", "huge_args", "no_command_id")
ANSWER_KINDS = ("not_json", "unknown_status")
# A status the protocol does not define for a poll (it defines 200 and 404).
UNKNOWN_STATUS = 418
# More than Opik's 1 MiB of args: a server would never send this.
HUGE_ARGS_CHARS = 1_048_576 + 1024


def malformed_answer(kind: str, items: list[Any]) -> tuple[int, bytes, str]:
    """Status, body and content type of a spoiled poll answer (the items are lost for `not_json`
    and `unknown_status`, as when a proxy replaces an answer)."""
    if kind == "not_json":
        return 200, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html"
    if kind == "unknown_status":
        return UNKNOWN_STATUS, json.dumps({"commands": []}).encode(), "application/json"
    first = dict(items[0])
    if kind == "wrong_types":
        first.update(args=["not", "an", "object"], timeout_seconds="soon")
        items = [first, "not a command", *items[1:]]
    elif kind == "huge_args":
        first["args"] = {**first["args"], "padding": "x" * HUGE_ARGS_CHARS}
        items = [first, *items[1:]]
    elif kind == "no_command_id":
        first.pop("command_id")
        items = [first, *items[1:]]
    else:
        raise ValueError(f"unknown malformed kind {kind!r}; known: {', '.join(MALFORMED_KINDS)}")
    return 200, json.dumps({"commands": items}).encode(), "application/json"
