"""Inbound: what a poll item means, before anything runs (pure functions, no I/O).

A command enters here (:func:`parse_command`, :func:`clamp_timeout`) and leaves through
:mod:`runner_daemon.bridge.results`; nothing here knows how results are encoded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from runner_daemon.bridge.results import MAX_PAYLOAD_CHARS
from runner_daemon.core.errors import describe_validation_error
from runner_daemon.core.models import BridgeCommand

DEFAULT_TIMEOUT_SECONDS = 30
MIN_TIMEOUT_SECONDS = 1
MAX_TIMEOUT_SECONDS = 300


@dataclass(frozen=True, slots=True)
class MalformedCommand:
    """A poll item we cannot run but can still answer, because its id is usable."""

    command_id: str
    type: str
    problem: str


def clamp_timeout(timeout_seconds: int | None) -> float:
    """The command's time limit: missing or non-positive means the default; clamped to [1, 300]."""
    if timeout_seconds is None or timeout_seconds <= 0:
        return float(DEFAULT_TIMEOUT_SECONDS)
    return float(min(max(timeout_seconds, MIN_TIMEOUT_SECONDS), MAX_TIMEOUT_SECONDS))


def parse_command(raw: Any) -> BridgeCommand | MalformedCommand | str:
    """Validate one poll item; a string return says why it cannot even be answered."""
    try:
        command = BridgeCommand.model_validate(raw)
    except ValidationError as exc:
        problem = describe_validation_error(exc)
    else:
        # Opik refuses such args at submission, so only a broken or hostile server sends them.
        size = len(json.dumps(command.args, ensure_ascii=False, separators=(",", ":")))
        if size <= MAX_PAYLOAD_CHARS:
            return command
        return MalformedCommand(
            command.command_id, command.type, f"args: {size} characters, over the {MAX_PAYLOAD_CHARS} limit"
        )
    command_id = raw.get("command_id") if isinstance(raw, dict) else None
    try:
        BridgeCommand.model_validate({"command_id": command_id, "type": ""})
    except ValidationError:
        return f"command without a usable command_id ({problem})"
    raw_type = raw.get("type") if isinstance(raw, dict) else None
    return MalformedCommand(str(command_id), raw_type if isinstance(raw_type, str) else "", problem)
