"""The dev server's records: its config, runners, commands, pairing sessions and queued faults.

Plain data; :class:`~runner_daemon.devserver.state.DevState` changes them and
:mod:`runner_daemon.devserver.persistence` saves them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio

DEFAULT_WORKSPACE = "default"  # a request without Comet-Workspace acts in it, as on a local Opik
WRITE_TYPES = frozenset({"WriteFile", "EditFile", "Exec"})
TERMINAL = frozenset({"completed", "failed", "timed_out"})


@dataclass(frozen=True)
class DevServerConfig:
    """Opik's server defaults, shortened by the tests where waiting would only slow them."""

    poll_hold_seconds: float = 30.0
    heartbeat_ttl_seconds: float = 15.0
    default_timeout_seconds: int = 30
    max_timeout_seconds: int = 120
    stale_grace_seconds: float = 10.0
    reaper_interval_seconds: float = 5.0
    finished_ttl_seconds: float = 3600.0
    max_pending: int = 50
    submissions_per_minute: int = 600
    writes_per_minute: int = 120
    payload_cap_chars: int = 1_048_576
    default_max_commands: int = 10
    max_max_commands: int = 20
    wait_default_seconds: int = 30
    # Jobs (JOBS.md "Opik server defaults").
    jobs_poll_hold_seconds: float = 10.0
    jobs_next_answers_204: bool = False  # an older Opik: 204 and no body when no job came
    job_default_timeout_seconds: int = 1800
    job_reaper_interval_seconds: float = 60.0
    finished_job_ttl_seconds: float = 7 * 86_400.0
    max_pending_jobs: int = 100
    max_agents: int = 50
    max_log_entries: int = 1000
    checklist_cap_chars: int = 1_048_576
    checklist_merge_depth: int = 10
    # The SDK's traces and spans, kept for ``GET /dev/traces/{id}`` (the oldest go first).
    max_traces: int = 1000
    max_spans_per_trace: int = 1000

    @property
    def max_body_bytes(self) -> int:
        """The largest request body, raw or inflated: a report with result and error at the cap.

        (A UTF-8 body is never longer than the JSON measured against the cap.)
        """
        return 2 * self.payload_cap_chars + 65_536


class ApiFailure(Exception):
    """An error answer: status and Opik's ``{"errors": [...]}`` body."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class Signal:
    """Wakes every current waiter; later waiters wait for the next notify."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = anyio.Event()

    async def wait(self) -> None:
        await self._event.wait()


@dataclass
class RunnerCounters:
    heartbeats: int = 0
    polls: int = 0
    polls_open: int = 0  # being handled now: a test sees when a poll it abandoned has ended
    max_commands_asked: list[int] = field(default_factory=list)
    reports_accepted: int = 0
    reports_conflict: int = 0
    reports_not_found: int = 0
    reports_rejected: int = 0
    reports_gzipped: int = 0  # of those that arrived, how many with Content-Encoding: gzip
    # The last requests in the order they arrived: ["poll", null], ["answered", [ids]] when a
    # poll answers, ["report", id]; a test sees whether a poll went ahead of a report.
    arrivals: list[tuple[str, Any]] = field(default_factory=list)

    def arrived(self, kind: str, detail: Any = None) -> None:
        self.arrivals.append((kind, detail))
        del self.arrivals[:-1000]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, arrivals=[list(arrival) for arrival in self.arrivals])


@dataclass
class Runner:
    id: str
    name: str
    project_id: str
    created_at: str
    capabilities: list[str] | None = None
    connected_at: str | None = None
    last_heartbeat: float | None = None
    removed: bool = False  # disconnected (DELETE), purged or evicted: endpoints answer 404
    visible: bool = True  # False while its pairing session waits for the browser
    bridge_key: bytes | None = None  # known when the dev server played the browser's part
    workspace: str = DEFAULT_WORKSPACE  # the owner: every other workspace gets 404 (410 on heartbeat)
    type: str = "connect"  # "endpoint" runners get jobs, "connect" runners bridge commands
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)  # as PUT, key -> agent
    checklist: dict[str, Any] | None = None
    cancelled_jobs: list[str] = field(default_factory=list)  # for the next heartbeat, then cleared
    expired_jobs: int = 0  # counted by a list without project_id, as Opik's total does
    jobs_queued: Signal = field(default_factory=Signal)
    submitted: Signal = field(default_factory=Signal)
    submit_times: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    write_times: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    counters: RunnerCounters = field(default_factory=RunnerCounters)
    malformed: deque[str] = field(default_factory=lambda: deque(maxlen=1000))  # spoiled poll answers
    # Ids of commands handed out once already, to hand out again (a hostile or buggy server).
    redeliver: deque[str] = field(default_factory=lambda: deque(maxlen=1000))


@dataclass
class Command:
    id: str
    runner_id: str
    type: str
    args: dict[str, Any]
    timeout_seconds: int
    submitted_at: str
    submitted_mono: float
    status: str = "pending"
    picked_up_at: str | None = None
    picked_up_mono: float | None = None
    completed_at: str | None = None
    finished_mono: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    duration_ms: int | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    report_attempts: int = 0  # report requests that reached the server, faults included
    accepted_reports: int = 0  # reports that stored a result: 0 or 1, unless something is wrong

    def as_item(self) -> dict[str, Any]:
        return {
            "command_id": self.id,
            "type": self.type,
            "args": self.args,
            "timeout_seconds": self.timeout_seconds,
            "submitted_at": self.submitted_at,
        }

    def as_record(self) -> dict[str, Any]:
        return {
            "command_id": self.id,
            "runner_id": self.runner_id,
            "type": self.type,
            "status": self.status,
            "args": self.args,
            "result": self.result,
            "error": self.error,
            "timeout_seconds": self.timeout_seconds,
            "submitted_at": self.submitted_at,
            "picked_up_at": self.picked_up_at,
            "completed_at": self.completed_at,
            "duration_ms": self.duration_ms,
        }

    def as_dev_record(self) -> dict[str, Any]:
        return {
            **self.as_record(),
            "report_attempts": self.report_attempts,
            "accepted_reports": self.accepted_reports,
        }


@dataclass
class PairingSession:
    id: str
    runner_id: str
    project_id: str
    activation_key: bytes
    expires: float
    activated: bool = False
    type: str = "connect"


@dataclass
class Fault:
    """An answer forced onto the next ``count`` requests of one route."""

    route: str
    status: int
    count: int = 1
    retry_after: float | None = None
