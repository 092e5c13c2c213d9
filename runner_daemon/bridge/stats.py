"""The bridge's counters: logs, STATUS=, /metrics and tests all read these."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from runner_daemon.bridge.results import Outcome
from runner_daemon.core.errors import ApiError

# Upper bounds (seconds) of the command-duration histogram's buckets.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass
class LoopStats:
    """Counts of what happened to commands, results and requests since start."""

    completed: int = 0
    failed: int = 0
    already_reported: int = 0
    dropped: int = 0
    report_retries: int = 0
    poll_errors: int = 0
    last_error: str | None = None
    last_error_at: float = 0.0  # monotonic
    by_code: dict[str, int] = field(default_factory=dict)
    # (command type, status) -> count; durations per command type as histogram buckets.
    outcomes: dict[tuple[str, str], int] = field(default_factory=dict)
    duration_buckets: dict[str, list[int]] = field(default_factory=dict)
    duration_sums: dict[str, float] = field(default_factory=dict)

    def note_error(self, exc: ApiError) -> None:
        self.last_error = str(exc)
        self.last_error_at = time.monotonic()

    def record(self, command_type: str, outcome: Outcome) -> None:
        if outcome.status == "completed":
            self.completed += 1
        else:
            self.failed += 1
            code = outcome.error_code or "unknown"
            self.by_code[code] = self.by_code.get(code, 0) + 1
        key = (command_type, outcome.status)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        if outcome.duration_ms is not None:
            seconds = outcome.duration_ms / 1000
            buckets = self.duration_buckets.setdefault(command_type, [0] * (len(DURATION_BUCKETS) + 1))
            index = next(
                (i for i, bound in enumerate(DURATION_BUCKETS) if seconds <= bound), len(DURATION_BUCKETS)
            )
            buckets[index] += 1
            self.duration_sums[command_type] = self.duration_sums.get(command_type, 0.0) + seconds
