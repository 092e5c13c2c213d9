"""Outbound: a command's final outcome and its wire encoding (pure functions, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runner_daemon.bridge.signing import sign_result
from runner_daemon.core.models import CommandError, ReportStatus, ResultReport

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
