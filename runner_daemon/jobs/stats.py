"""The jobs' counters: logs, STATUS= and tests read these."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class JobStats:
    started: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0  # by the UI: stopped, and not reported (Opik ignores it anyway)
    reported: int = 0
    dropped: int = 0
    report_retries: int = 0
    poll_errors: int = 0
