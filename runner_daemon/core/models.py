"""Wire models of Opik's local-runner API, field names exactly as on the wire.

Requests are built from these and serialised once; responses are validated through them, so a
malformed answer surfaces as a ``ValidationError`` at the edge instead of a ``KeyError`` deep
inside the loop.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CommandStatus = Literal["pending", "picked_up", "completed", "failed", "timed_out"]
ReportStatus = Literal["completed", "failed"]
RunnerStatus = Literal["pairing", "connected", "disconnected"]

BRIDGE_CAPABILITY = "bridge"
JOBS_CAPABILITY = "jobs"
JobStatus = Literal["pending", "running", "completed", "failed", "cancelled"]
JobReportStatus = Literal["running", "completed", "failed"]
ParamType = Literal["string", "integer", "float", "boolean", "prompt", "prompt_commit", "number"]


class _Wire(BaseModel):
    # Opik may add fields; ignoring them keeps an older daemon working against a newer server.
    model_config = ConfigDict(extra="ignore", frozen=True, defer_build=True)


class HeartbeatRequest(_Wire):
    capabilities: list[str]


class HeartbeatResponse(_Wire):
    """A heartbeat's answer.

    ``cancelled_job_ids`` is validated (a malformed answer is a protocol error) but nothing
    reads it yet: Opik fills it only for an endpoint runner's jobs, and a connect runner
    always gets ``[]``. It stays for the jobs loop, which will cancel the jobs it names.
    """

    cancelled_job_ids: list[str] = Field(default_factory=list)


class PollRequest(_Wire):
    max_commands: int


class BridgeCommand(_Wire):
    """One item of a poll answer."""

    # The id goes into a URL path: anything but a plain token is refused, not escaped.
    command_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")
    type: str
    args: dict[str, Any] = Field(default_factory=dict)
    timeout_seconds: int | None = None
    submitted_at: datetime | None = None


class PollResponse(_Wire):
    # Items stay raw here: one malformed item must not cost the others their report.
    commands: list[Any] = Field(default_factory=list)


class CommandError(_Wire):
    code: str
    message: str


class ResultReport(_Wire):
    """Body of ``POST .../bridge/commands/{commandId}/results``."""

    status: ReportStatus
    result: dict[str, Any] | None = None
    error: CommandError | None = None
    duration_ms: int | None = None


class SubmitRequest(_Wire):
    type: str
    args: dict[str, Any] = Field(default_factory=dict)
    timeout_seconds: int | None = None


class SubmitResponse(_Wire):
    command_id: str


class CommandRecord(_Wire):
    """The full command, as ``GET .../bridge/commands/{commandId}`` returns it."""

    command_id: str
    runner_id: str
    type: str
    status: CommandStatus
    args: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: CommandError | None = None
    timeout_seconds: int | None = None
    submitted_at: datetime | None = None
    picked_up_at: datetime | None = None
    completed_at: datetime | None = None
    duration_ms: int | None = None

    @property
    def terminal(self) -> bool:
        return self.status in ("completed", "failed", "timed_out")


class Runner(_Wire):
    id: str
    name: str | None = None
    project_id: str | None = None
    status: RunnerStatus
    connected_at: datetime | None = None
    type: str | None = None
    capabilities: list[str] = Field(default_factory=list)
    agents: list[Agent] = Field(default_factory=list)  # each named; listed only while connected
    checklist: dict[str, Any] | None = None


class DevRunnerCreated(_Wire):
    """Answer of the dev server's ``POST /dev/runners`` (not part of Opik's API)."""

    runner_id: str


class PairingSessionRequest(_Wire):
    project_id: str
    activation_key: str  # base64 of 32 random bytes
    type: Literal["connect", "endpoint"] = "connect"
    ttl_seconds: int = 300


class PairingSession(_Wire):
    session_id: str
    runner_id: str


class PairingActivation(_Wire):
    runner_name: str
    hmac: str


# --- jobs (the endpoint runner; ../shared/JOBS.md) -------------------------------------------


class AgentParam(_Wire):
    name: str
    type: str
    presence: Literal["required", "optional"] | None = None


class Agent(_Wire):
    """One entry of ``PUT {runnerId}/agents`` (the map's key is the agent's name).

    ``name`` is left out when registering (the key names it) and set on read-back.
    """

    name: str | None = None
    description: str | None = None
    language: str | None = None
    executable: str | None = None
    source_file: str | None = None
    params: list[AgentParam] = Field(default_factory=list)
    timeout: int | None = None


class Job(_Wire):
    """A job as ``jobs/next`` and ``GET jobs/{jobId}`` return it."""

    id: str
    runner_id: str | None = None
    agent_name: str
    status: JobStatus
    inputs: Any = None
    result: Any = None
    error: str | None = None
    project_id: str | None = None
    trace_id: str | None = None
    prompt_masks: dict[str, str] | None = None
    blueprint_name: str | None = None
    metadata: dict[str, Any] | None = None
    timeout: int = 1800
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None

    @property
    def terminal(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")


class JobReport(_Wire):
    """Body of ``POST jobs/{jobId}/results``."""

    status: JobReportStatus
    result: Any = None
    error: str | None = None
    trace_id: str | None = None


class LogEntry(_Wire):
    """One line of a job's log; Opik refuses a batch holding a blank stream or text (422)."""

    stream: Literal["stdout", "stderr"] | str
    text: str
