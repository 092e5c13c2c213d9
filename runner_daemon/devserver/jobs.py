"""The dev server's jobs: the endpoint runner's queue, reports, logs, cancels, agents, checklist.

Semantics are Opik's as ../shared/JOBS.md states them (messages and status codes included).
Like :class:`~runner_daemon.devserver.state.DevState`, every method is synchronous and runs
on the server's event loop, so each is atomic; only the routes await, between calls.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runner_daemon.core.ids import uuid7
from runner_daemon.devserver.records import ApiFailure, DevServerConfig, Runner, now_iso

JOB_TERMINAL = frozenset({"completed", "failed", "cancelled"})
REPORT_STATUSES = ("running", "completed", "failed")
NO_RUNNER = "No runner configured. Pair one from the Runners page."
NOT_CONNECTED = "Your runner is not connected. Start it with: opik connect"
DISCONNECTED = "Runner disconnected"
_AGENT_TEXT_FIELDS = ("description", "language", "executable", "source_file")


@dataclass
class JobRecord:
    id: str
    runner_id: str
    workspace: str
    agent_name: str
    project_id: str
    timeout: int
    created_at: str
    created_mono: float
    inputs: Any = None
    mask_id: str | None = None
    prompt_masks: dict[str, str] | None = None
    blueprint_name: str | None = None
    metadata: dict[str, Any] | None = None
    status: str = "pending"
    result: Any = None
    error: str | None = None
    trace_id: str | None = None
    started_at: str | None = None
    started_mono: float | None = None
    completed_at: str | None = None
    finished_mono: float | None = None
    logs: list[dict[str, str]] = field(default_factory=list)

    def as_wire(self) -> dict[str, Any]:
        """The job as Opik answers it: null fields left out, ``timeout`` always there."""
        wire = {
            "id": self.id,
            "runner_id": self.runner_id,
            "agent_name": self.agent_name,
            "status": self.status,
            "inputs": self.inputs,
            "result": self.result,
            "error": self.error,
            "project_id": self.project_id,
            "trace_id": self.trace_id,
            "mask_id": self.mask_id,
            "prompt_masks": self.prompt_masks,
            "blueprint_name": self.blueprint_name,
            "metadata": self.metadata,
            "timeout": self.timeout,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
        }
        return {key: value for key, value in wire.items() if value is not None}


def _uuid(value: Any, what: str, status: int = 422) -> str:
    if isinstance(value, str):
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    raise ApiFailure(status, f"{what} must be a UUID")


def _blank(value: Any) -> bool:
    return not isinstance(value, str) or not value.strip()


def parse_create(body: Any) -> dict[str, Any]:
    """``POST jobs``'s body, checked as Opik's bean validation does (422 when invalid)."""
    if not isinstance(body, dict):
        raise ApiFailure(422, "Body must be a JSON object")
    if _blank(body.get("agent_name")):
        raise ApiFailure(422, "agent_name must not be blank")
    fields: dict[str, Any] = {
        "agent_name": body["agent_name"],
        "project_id": _uuid(body.get("project_id"), "project_id"),
        "inputs": body.get("inputs"),
    }
    if body.get("mask_id") is not None:
        fields["mask_id"] = _uuid(body["mask_id"], "mask_id")
    masks = body.get("prompt_masks")
    if masks is not None:
        if not isinstance(masks, dict):
            raise ApiFailure(422, "prompt_masks must map prompt ids to mask ids")
        fields["prompt_masks"] = {_uuid(k, "prompt id"): _uuid(v, "mask id") for k, v in masks.items()}
    if body.get("blueprint_name") is not None:
        if _blank(body["blueprint_name"]):
            raise ApiFailure(422, "blueprint_name must not be blank")
        fields["blueprint_name"] = body["blueprint_name"]
    if body.get("metadata") is not None:
        if not isinstance(body["metadata"], dict):
            raise ApiFailure(422, "metadata must be an object")
        fields["metadata"] = body["metadata"]
    return fields


def parse_agents(body: Any, max_agents: int) -> dict[str, dict[str, Any]]:
    """``PUT agents``'s body: name -> agent, each as it reads back (``timeout`` 0 when unset)."""
    if not isinstance(body, dict) or not all(isinstance(agent, dict) for agent in body.values()):
        raise ApiFailure(400, "Unable to process JSON")
    if len(body) > max_agents:
        raise ApiFailure(400, f"Too many agents. Maximum is {max_agents}")
    agents: dict[str, dict[str, Any]] = {}
    for name, agent in body.items():
        clean: dict[str, Any] = {"name": name}
        for key in _AGENT_TEXT_FIELDS:
            if agent.get(key) is not None:
                if not isinstance(agent[key], str):
                    raise ApiFailure(400, "Unable to process JSON")
                clean[key] = agent[key]
        timeout = agent.get("timeout")
        if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool)):
            raise ApiFailure(400, "Unable to process JSON")
        clean["timeout"] = timeout or 0
        params = agent.get("params")
        if params is not None:
            if not isinstance(params, list) or not all(isinstance(p, dict) for p in params):
                raise ApiFailure(400, "Unable to process JSON")
            clean["params"] = [_param(p) for p in params]
        agents[name] = clean
    return agents


def _param(param: dict[str, Any]) -> dict[str, Any]:
    if _blank(param.get("name")) or _blank(param.get("type")):
        raise ApiFailure(422, "a param needs a name and a type")
    clean = {"name": param["name"], "type": param["type"]}
    presence = param.get("presence")
    if presence is not None:
        if presence not in ("required", "optional"):
            raise ApiFailure(400, "Unable to process JSON")
        clean["presence"] = presence
    return clean


def merge_checklist(stored: dict[str, Any], patch: dict[str, Any], depth: int) -> dict[str, Any]:
    """Objects merge key by key down to ``depth``; arrays, scalars and null replace."""
    merged = dict(stored)
    for key, value in patch.items():
        old = merged.get(key)
        if depth > 1 and isinstance(old, dict) and isinstance(value, dict):
            merged[key] = merge_checklist(old, value, depth - 1)
        else:
            merged[key] = value
    return merged


def parse_logs(body: Any, max_entries: int) -> list[dict[str, str]]:
    if not isinstance(body, list):
        raise ApiFailure(400, "Unable to process JSON")
    entries = []
    for entry in body:
        if not isinstance(entry, dict) or _blank(entry.get("stream")) or _blank(entry.get("text")):
            raise ApiFailure(422, "stream and text must not be blank")
        entries.append({"stream": entry["stream"], "text": entry["text"]})
    if len(entries) > max_entries:
        raise ApiFailure(400, f"Too many log entries. Maximum per batch is {max_entries}")
    return entries


class JobBook:
    """Every job the server keeps, and the job side of each runner."""

    def __init__(
        self,
        config: DevServerConfig,
        runners: dict[str, Runner],
        alive: Callable[[Runner], bool],
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.jobs: dict[str, JobRecord] = {}  # insertion order = creation order
        self._runners = runners
        self._alive = alive
        self._clock = clock

    def endpoint_runner(self, workspace: str, project_id: str) -> Runner | None:
        """The (workspace, project)'s current endpoint runner: the newest one still there."""
        found = None
        for runner in self._runners.values():
            if (runner.type, runner.workspace, runner.project_id) == ("endpoint", workspace, project_id) and (
                runner.visible and not runner.removed
            ):
                found = runner
        return found

    def create(self, workspace: str, body: Any) -> JobRecord:
        fields = parse_create(body)
        runner = self.endpoint_runner(workspace, fields["project_id"])
        if runner is None:
            raise ApiFailure(404, NO_RUNNER)
        if not self._alive(runner):
            raise ApiFailure(409, NOT_CONNECTED)
        agent = runner.agents.get(fields["agent_name"])
        if agent is None:
            raise ApiFailure(400, f"Agent '{fields['agent_name']}' is not registered on this runner")
        pending = sum(1 for j in self.jobs.values() if j.runner_id == runner.id and j.status == "pending")
        if pending >= self.config.max_pending_jobs:
            raise ApiFailure(429, "Too many pending jobs for this runner")
        timeout = agent.get("timeout") or 0
        job = JobRecord(
            id=uuid7(),
            runner_id=runner.id,
            workspace=workspace,
            timeout=timeout if timeout > 0 else self.config.job_default_timeout_seconds,
            created_at=now_iso(),
            created_mono=self._clock(),
            **fields,
        )
        self.jobs[job.id] = job
        runner.jobs_queued.notify()
        return job

    def job(self, job_id: str, workspace: str) -> JobRecord:
        job = self.jobs.get(job_id)
        if job is None or job.workspace != workspace:
            raise ApiFailure(404, "Job not found")
        return job

    def take_next(self, runner: Runner) -> JobRecord | None:
        """Move the runner's oldest pending job to running; a connect runner never gets one."""
        if runner.type != "endpoint" or runner.removed:
            return None
        for job in self.jobs.values():
            if job.runner_id == runner.id and job.status == "pending":
                job.status, job.started_at, job.started_mono = "running", now_iso(), self._clock()
                return job
        return None

    def report(self, job_id: str, workspace: str, body: Any) -> None:
        job = self.job(job_id, workspace)
        if not isinstance(body, dict):
            raise ApiFailure(400, "Unable to process JSON")
        status = body.get("status")
        if status in ("pending", "cancelled"):
            raise ApiFailure(400, f"Invalid result status. Must be one of: [{', '.join(REPORT_STATUSES)}]")
        if status not in REPORT_STATUSES:
            raise ApiFailure(400 if status is not None else 422, "Unable to process JSON")
        error, trace_id = body.get("error"), body.get("trace_id")
        if error is not None and not isinstance(error, str):
            raise ApiFailure(400, "Unable to process JSON")
        if trace_id is not None:
            trace_id = _uuid(trace_id, "trace_id", status=400)
        if job.status in JOB_TERMINAL:
            return  # ignored with 204: the runner learns nothing
        if body.get("result") is not None:
            job.result = body["result"]
        if error is not None:
            job.error = error
        if trace_id is not None:
            job.trace_id = trace_id
        if status != "running":
            self._finish(job, status)

    def append_logs(self, job_id: str, workspace: str, body: Any) -> None:
        job = self.job(job_id, workspace)
        job.logs.extend(parse_logs(body, self.config.max_log_entries))

    def cancel(self, job_id: str, workspace: str) -> None:
        job = self.job(job_id, workspace)
        if job.status in JOB_TERMINAL:
            return
        was_running = job.status == "running"
        self._finish(job, "cancelled")
        runner = self._runners.get(job.runner_id)
        if was_running and runner is not None:
            runner.cancelled_jobs.append(job.id)

    def page(self, runner: Runner, project_id: str | None, page: int, size: int) -> dict[str, Any]:
        """Newest first; without ``project_id`` the total counts expired jobs too, as Opik's does."""
        jobs = [
            j
            for j in reversed(self.jobs.values())
            if j.runner_id == runner.id and (project_id is None or j.project_id == project_id)
        ]
        total = len(jobs) + (runner.expired_jobs if project_id is None else 0)
        content = [j.as_wire() for j in jobs[page * size : (page + 1) * size]]
        return {"page": page, "size": size, "total": total, "content": content}

    @staticmethod
    def take_cancelled(runner: Runner) -> list[str]:
        """What an endpoint runner's heartbeat answers, each id once; a connect runner: []."""
        if runner.type != "endpoint":
            return []
        taken, runner.cancelled_jobs = runner.cancelled_jobs, []
        return taken

    def put_agents(self, runner: Runner, body: Any) -> None:
        runner.agents = parse_agents(body, self.config.max_agents)

    def patch_checklist(self, runner: Runner, body: Any) -> None:
        if not isinstance(body, dict):
            raise ApiFailure(400, "Checklist must be a JSON object")
        merged = merge_checklist(runner.checklist or {}, body, self.config.checklist_merge_depth)
        size = len(json.dumps(merged, separators=(",", ":"), ensure_ascii=False))
        if size > self.config.checklist_cap_chars:
            raise ApiFailure(
                400, f"Checklist too large: {size} bytes (max {self.config.checklist_cap_chars})"
            )
        runner.checklist = merged

    def runner_gone(self, runner_id: str) -> None:
        """Eviction, DELETE or purge: every pending and running job fails."""
        for job in self.jobs.values():
            if job.runner_id == runner_id and job.status in ("pending", "running"):
                job.error = DISCONNECTED
                self._finish(job, "failed")

    def reap(self) -> None:
        """Fail running jobs past their timeout; forget finished jobs past their TTL."""
        now = self._clock()
        for job in list(self.jobs.values()):
            if (
                job.status == "running"
                and job.started_mono is not None
                and now - job.started_mono > job.timeout
            ):
                job.error = f"Job timed out after {job.timeout}s"
                self._finish(job, "failed")
            elif (
                job.finished_mono is not None
                and now - job.finished_mono > self.config.finished_job_ttl_seconds
            ):
                del self.jobs[job.id]
                runner = self._runners.get(job.runner_id)
                if runner is not None:
                    runner.expired_jobs += 1

    def _finish(self, job: JobRecord, status: str) -> None:
        job.status, job.completed_at, job.finished_mono = status, now_iso(), self._clock()
