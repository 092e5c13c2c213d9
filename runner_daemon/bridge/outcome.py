"""A command's final outcome and its wire encoding: pure functions, no I/O."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from runner_daemon.bridge.signing import sign_result
from runner_daemon.core.errors import describe_validation_error
from runner_daemon.core.models import BridgeCommand, CommandError, ReportStatus, ResultReport

DEFAULT_TIMEOUT_SECONDS = 30
MIN_TIMEOUT_SECONDS = 1
MAX_TIMEOUT_SECONDS = 300
# Opik refuses an args/result/error over this many characters of JSON with a 400.
MAX_PAYLOAD_CHARS = 1_048_576


@dataclass(frozen=True, slots=True)
class Outcome:
    status: ReportStatus
    result: dict[str, Any] | None = None
    error: CommandError | None = None
    duration_ms: int | None = None

    @classmethod
    def completed(cls, result: dict[str, Any], duration_ms: int) -> Outcome:
        return cls("completed", result=result, duration_ms=duration_ms)

    @classmethod
    def failed(cls, code: str, message: str, duration_ms: int | None = None) -> Outcome:
        return cls("failed", error=CommandError(code=code, message=message), duration_ms=duration_ms)

    @property
    def error_code(self) -> str | None:
        return self.error.code if self.error else None


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


def encode_report(outcome: Outcome, bridge_key: bytes | None = None) -> bytes:
    """Serialise the report once, signed when there is a bridge key.

    A result over Opik's payload cap becomes a failure instead, since Opik would refuse it.
    """
    result = outcome.result if bridge_key is None else sign_result(bridge_key, outcome.status, outcome.result)
    report = ResultReport(
        status=outcome.status,
        result=result,
        error=outcome.error,
        duration_ms=outcome.duration_ms,
    )
    body = report.model_dump_json(exclude_none=True).encode()
    # Bytes of UTF-8 are never fewer than characters, so this check is conservative.
    if len(body) > MAX_PAYLOAD_CHARS:
        return encode_report(
            Outcome.failed(
                "result_too_large",
                f"The result is larger than the server accepts ({MAX_PAYLOAD_CHARS} characters)",
                outcome.duration_ms,
            ),
            bridge_key,
        )
    return body


def outcome_of(body: bytes) -> Outcome:
    """The outcome an encoded report carries (for logs and counters of a journalled result)."""
    report = ResultReport.model_validate_json(body)
    return Outcome(report.status, report.result, report.error, report.duration_ms)
