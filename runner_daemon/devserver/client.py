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

from runner_daemon.core.api import POLL_BYTES_PER_COMMAND, RUNNERS_PATH, RunnerApi, parse_answer
from runner_daemon.core.models import (
    CommandRecord,
    DevRunnerCreated,
    SubmitRequest,
    SubmitResponse,
)


class DevClient(RunnerApi):
    """The runner's API plus the UI's side of Opik's and the dev server's control routes."""

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

    # --- the dev server's own control routes (not Opik's API) ----------------------------

    async def dev_create_runner(self, name: str = "runner-daemon", bridge_key: bytes | None = None) -> str:
        """A connected runner; with ``bridge_key``, the dev server signs its commands."""
        payload: dict[str, Any] = {"name": name}
        if bridge_key is not None:
            payload["bridge_key"] = base64.b64encode(bridge_key).decode()
        body = json.dumps(payload).encode()
        answer = await self._request("POST", "dev/runners", content=body)
        return parse_answer(DevRunnerCreated, answer).runner_id

    async def dev_post(self, path: str, payload: Mapping[str, Any]) -> Any:
        """POST a control request to the dev server (faults, eviction) and return its JSON."""
        answer = await self._request("POST", f"dev/{path}", content=json.dumps(payload).encode())
        return json.loads(answer.body) if answer.body else None

    async def dev_get(self, path: str) -> Any:
        return json.loads((await self._request("GET", f"dev/{path}")).body)
