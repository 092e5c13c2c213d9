"""What the demo and the tests do besides being the runner: act as Opik's UI, drive the dev server.

:class:`DevClient` is a :class:`~runner_daemon.core.api.RunnerApi` with the UI's calls
(activate a pairing, submit a command, read it back) and the dev server's own ``/dev/...``
control routes, so one object both plays the user and inspects the runner. The daemon never
makes these calls; their wire models stay in :mod:`runner_daemon.core.models` with the rest
of Opik's wire.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, TypeAdapter

from runner_daemon.core.api import (
    MAX_JOB_BYTES,
    POLL_BYTES_PER_COMMAND,
    RUNNERS_PATH,
    RunnerApi,
    parse_answer,
)
from runner_daemon.core.errors import RunnerGone, UnreadableAnswer
from runner_daemon.core.models import (
    CommandRecord,
    DevRunnerCreated,
    Job,
    LogEntry,
    SubmitRequest,
    SubmitResponse,
)

_LOGS = TypeAdapter(list[LogEntry])


class JobPage(BaseModel):
    """``GET {runnerId}/jobs``: one page, newest first."""

    page: int
    size: int
    total: int
    content: list[Job]


class DevClient(RunnerApi):
    """The runner's API plus the UI's side of Opik's and the dev server's control routes."""

    def __init__(self, base_url: str, **options: Any) -> None:
        super().__init__(base_url, keep_headers=("Location",), **options)

    async def submit_command(
        self,
        runner_id: str,
        command_type: str,
        args: Mapping[str, Any],
        timeout_seconds: int | None = None,
    ) -> str:
        body = SubmitRequest(type=command_type, args=dict(args), timeout_seconds=timeout_seconds)
        answer = await self._request(
            "POST",
            f"{RUNNERS_PATH}/{runner_id}/bridge/commands",
            content=body.model_dump_json(exclude_none=True).encode(),
        )
        return parse_answer(SubmitResponse, answer).command_id

    async def get_command(
        self, runner_id: str, command_id: str, *, wait: float | None = None
    ) -> CommandRecord:
        """Read a command; with ``wait``, the server holds until it is terminal or time passes."""
        params = {"wait": "true", "timeout": str(math.ceil(wait))} if wait else None
        answer = await self._request(
            "GET",
            f"{RUNNERS_PATH}/{runner_id}/bridge/commands/{command_id}",
            params=params,
            budget=(wait or 0) + self._request_timeout,
            limit=3 * POLL_BYTES_PER_COMMAND,  # args, result and error
        )
        return parse_answer(CommandRecord, answer)

    # --- jobs, as the Agent Playground and the SDK make them (../shared/JOBS.md) --------------

    async def create_job(self, project_id: str, agent_name: str, inputs: Any = None, **optional: Any) -> str:
        """Queue a job for the project's endpoint runner; its id, read from ``Location``.

        ``optional``: ``mask_id``, ``prompt_masks``, ``blueprint_name``, ``metadata``.
        """
        body = {"agent_name": agent_name, "project_id": project_id, **optional}
        if inputs is not None:
            body["inputs"] = inputs
        answer = await self._request("POST", f"{RUNNERS_PATH}/jobs", content=json.dumps(body).encode())
        location = answer.headers.get("Location", "")
        job_id = location.rstrip("/").rpartition("/")[2]
        if not job_id:
            raise UnreadableAnswer(f"no Location in the answer from {answer.path}", status=answer.status)
        return job_id

    async def get_job(self, job_id: str) -> Job:
        answer = await self._request("GET", f"{RUNNERS_PATH}/jobs/{job_id}", limit=MAX_JOB_BYTES)
        return parse_answer(Job, answer)

    async def cancel_job(self, job_id: str) -> None:
        await self._request("POST", f"{RUNNERS_PATH}/jobs/{job_id}/cancel")

    async def job_logs(self, job_id: str, offset: int = 0) -> list[LogEntry]:
        answer = await self._request(
            "GET", f"{RUNNERS_PATH}/jobs/{job_id}/logs", params={"offset": str(offset)}, limit=MAX_JOB_BYTES
        )
        return _LOGS.validate_json(answer.body)

    async def list_jobs(
        self, runner_id: str, project_id: str | None = None, *, page: int = 0, size: int = 25
    ) -> JobPage:
        params = {"page": str(page), "size": str(size)}
        if project_id is not None:
            params["project_id"] = project_id
        answer = await self._request(
            "GET", f"{RUNNERS_PATH}/{runner_id}/jobs", params=params, limit=MAX_JOB_BYTES
        )
        return parse_answer(JobPage, answer)

    # --- the dev server's own control routes (not Opik's API) ----------------------------

    async def dev_create_runner(
        self,
        name: str = "runner-daemon",
        bridge_key: bytes | None = None,
        *,
        type: str = "connect",
        project_id: str | None = None,
    ) -> str:
        """A runner (``type`` connect or endpoint); with ``bridge_key``, the dev server signs its
        commands; with ``project_id``, it evicts the older runner of its type for that project."""
        payload: dict[str, Any] = {"name": name, "type": type}
        if bridge_key is not None:
            payload["bridge_key"] = base64.b64encode(bridge_key).decode()
        if project_id is not None:
            payload["project_id"] = project_id
        body = json.dumps(payload).encode()
        answer = await self._request("POST", "dev/runners", content=body)
        return parse_answer(DevRunnerCreated, answer).runner_id

    async def dev_post(self, path: str, payload: Mapping[str, Any]) -> Any:
        """POST a control request to the dev server (faults, eviction) and return its JSON."""
        answer = await self._request("POST", f"dev/{path}", content=json.dumps(payload).encode())
        return json.loads(answer.body) if answer.body else None

    async def dev_get(self, path: str) -> Any:
        return json.loads((await self._request("GET", f"dev/{path}")).body)

    async def dev_trace(self, trace_id: str) -> dict[str, Any] | None:
        """The trace Opik's SDK sent with this id and its spans; None when none came."""
        try:
            answer = await self._request("GET", f"dev/traces/{trace_id}", limit=MAX_JOB_BYTES)
        except RunnerGone:  # the 404 of an unknown trace
            return None
        view: dict[str, Any] = json.loads(answer.body)
        return view
