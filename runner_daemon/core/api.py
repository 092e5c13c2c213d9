"""The runner's side of Opik's local-runner API: the calls the daemon makes, and what answers mean.

The wire is :mod:`runner_daemon.core.transport`'s (the only module that imports httpx); here
every status code is turned into :mod:`runner_daemon.core.errors`, the generic ones in
:func:`raise_for_status` and an endpoint's own (a 409 on a result) in that endpoint's method,
so callers never see a status code. The UI's calls and the dev server's control routes are
:class:`runner_daemon.devserver.client.DevClient`'s.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import pydantic_core
from pydantic import BaseModel, ValidationError

from runner_daemon import __version__
from runner_daemon.core.errors import (
    AlreadyReported,
    Conflict,
    JobGone,
    RateLimited,
    RequestRejected,
    RunnerEvicted,
    RunnerGone,
    ServerError,
    Unauthorized,
    UnreadableAnswer,
)
from runner_daemon.core.models import (
    Agent,
    HeartbeatRequest,
    HeartbeatResponse,
    Job,
    LogEntry,
    PairingActivation,
    PairingSession,
    PairingSessionRequest,
    PollRequest,
    PollResponse,
    Runner,
)
from runner_daemon.core.settings import Settings, header_value
from runner_daemon.core.transport import Answer, Transport

RUNNERS_PATH = "v1/private/local-runners"
PAIRING_PATH = "v1/private/pairing/sessions"
DEFAULT_RETRY_AFTER_SECONDS = 1.0
MAX_RETRY_AFTER_SECONDS = 300.0
# Where a 429 says how long to wait, in the order they are read.
RETRY_AFTER_HEADERS = ("Retry-After", "RateLimit-Reset")
# Opik's cap on a command's args (and on a result, an error), as serialized JSON characters.
PAYLOAD_CAP_CHARS = 1_048_576
# The most a 2xx answer may hold, decoded: twice the payload cap (a heartbeat, a runner)...
MAX_ANSWER_BYTES = 2 * PAYLOAD_CAP_CHARS
# ...and for each command a poll asks for, one payload at 3 bytes per character (UTF-8 for
# what Opik counts as one character) plus the item's other fields.
POLL_BYTES_PER_COMMAND = 3 * PAYLOAD_CAP_CHARS + 64 * 1024
# Opik sets no cap on a job's inputs; ours bounds what one poll answer may hold.
MAX_JOB_BYTES = 8 * 1024 * 1024
M = TypeVar("M", bound=BaseModel)


def raise_for_status(answer: Answer) -> None:
    """Map a non-2xx answer to the error tree; the one place that knows the generic codes."""
    status = answer.status
    if status < 300:
        return
    message = error_message(answer)
    if status == 404:
        raise RunnerGone(message, status=status)
    if status == 410:
        raise RunnerEvicted(message, status=status)
    if status == 409:
        raise Conflict(message, status=status)
    if status == 429:
        raise RateLimited(message, status=status, retry_after=retry_after_seconds(answer))
    if status in (401, 403):
        raise Unauthorized(message, status=status)
    if status >= 500 or status == 408:
        raise ServerError(message, status=status)
    raise RequestRejected(message, status=status)


def error_message(answer: Answer) -> str:
    """``HTTP 404 from GET http://host/path: <what the body says>``."""
    return f"HTTP {answer.status} from {answer.method} {answer.url}: {_error_text(answer)}"


def retry_after_seconds(answer: Answer, now: float | None = None) -> float:
    """Seconds to wait from ``Retry-After`` (delta or HTTP date) or ``RateLimit-Reset``."""
    for header in RETRY_AFTER_HEADERS:
        raw = answer.headers.get(header)
        if raw is None:
            continue
        raw = raw.strip()
        try:
            seconds = float(raw)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                continue
            seconds = when.timestamp() - (time.time() if now is None else now)
        if math.isfinite(seconds):
            return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)
    return DEFAULT_RETRY_AFTER_SECONDS


def _error_text(answer: Answer) -> str:
    """A short description from Opik's ``{"errors": [...]}`` or ``{"message": ...}`` bodies."""
    try:
        # pydantic's parser, not json.loads: CPython 3.11's C decoder, on "[[[[..." nested past
        # the stack, raises a RecursionError that leaves the interpreter's depth count wrong.
        body = pydantic_core.from_json(answer.body)
    except ValueError:
        return answer.body.decode("utf-8", "replace")[:200] or answer.reason
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list) and errors:
            return "; ".join(str(item) for item in errors)[:200]
        if body.get("message"):
            return str(body["message"])[:200]
    return str(body)[:200]


def parse_answer(model: type[M], answer: Answer) -> M:
    """A 2xx body as ``model``; anything else is an :class:`UnreadableAnswer`."""
    try:
        return model.model_validate_json(answer.body)
    except ValidationError as exc:
        raise UnreadableAnswer(
            f"unexpected answer from {answer.path}: "
            f"{exc.error_count()} problem(s), first: {exc.errors()[0]['msg']}",
            status=answer.status,
        ) from None


class RunnerApi:
    """One shared connection pool to Opik for the daemon's whole life."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        workspace: str | None = None,
        request_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        poll_timeout: float = 45.0,
        max_connections: int = 16,
        keep_headers: Sequence[str] = (),
    ) -> None:
        """``keep_headers``: answer headers to keep besides the rate limit's (the UI's ``Location``)."""
        headers = {"User-Agent": f"runner-daemon/{__version__}", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = header_value(api_key, spaces=False)
        if workspace:
            headers["Comet-Workspace"] = header_value(workspace, spaces=True)
        self._request_timeout = request_timeout
        self._poll_timeout = poll_timeout
        self._transport = Transport(
            base_url,
            headers=headers,
            secrets=[api_key] if api_key else [],
            keep_headers=(*RETRY_AFTER_HEADERS, *keep_headers),
            request_timeout=request_timeout,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(
            settings.url,
            api_key=settings.api_key.get_secret_value() if settings.api_key else None,
            workspace=settings.workspace,
            request_timeout=settings.request_timeout_seconds,
            connect_timeout=settings.connect_timeout_seconds,
            poll_timeout=settings.poll_timeout_seconds,
            # Every execution slot may report at once, plus the poll and the heartbeat.
            max_connections=settings.max_concurrency + 2,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        params: Mapping[str, str] | None = None,
        budget: float | None = None,
        limit: int = MAX_ANSWER_BYTES,
    ) -> Answer:
        """A 2xx answer, or its status's error (see :meth:`Transport.send` for the rest)."""
        answer = await self._transport.send(
            method, path, content=content, params=params, budget=budget, limit=limit
        )
        raise_for_status(answer)
        return answer

    async def heartbeat(self, runner_id: str, capabilities: list[str]) -> HeartbeatResponse:
        body = HeartbeatRequest(capabilities=capabilities).model_dump_json().encode()
        answer = await self._request("POST", f"{RUNNERS_PATH}/{runner_id}/heartbeats", content=body)
        return parse_answer(HeartbeatResponse, answer)

    async def poll(self, runner_id: str, max_commands: int, wait: float | None = None) -> list[Any]:
        """Long-poll for commands (at most ``wait`` seconds when given); raw items."""
        body = PollRequest(max_commands=max_commands).model_dump_json().encode()
        answer = await self._request(
            "POST",
            f"{RUNNERS_PATH}/{runner_id}/bridge/commands/next",
            content=body,
            budget=self._poll_timeout if wait is None else wait,
            limit=max(1, max_commands) * POLL_BYTES_PER_COMMAND,
        )
        return parse_answer(PollResponse, answer).commands

    async def report(self, runner_id: str, command_id: str, body: bytes) -> None:
        """Post an encoded :class:`~runner_daemon.core.models.ResultReport`.

        A 409 here is :class:`AlreadyReported`: the command is terminal already.
        """
        path = f"{RUNNERS_PATH}/{runner_id}/bridge/commands/{command_id}/results"
        answer = await self._transport.send("POST", path, content=body, limit=MAX_ANSWER_BYTES)
        if answer.status == 409:
            raise AlreadyReported(error_message(answer), status=answer.status)
        raise_for_status(answer)

    # --- jobs: the endpoint runner (../shared/JOBS.md) ----------------------------------------

    async def next_job(self, runner_id: str) -> Job | None:
        """Long-poll for one job; ``None`` when the hold ends without one (``null`` or 204)."""
        answer = await self._request(
            "POST", f"{RUNNERS_PATH}/{runner_id}/jobs/next", budget=self._poll_timeout, limit=MAX_JOB_BYTES
        )
        if answer.status == 204 or answer.body.strip() in (b"", b"null"):
            return None
        return parse_answer(Job, answer)

    async def report_job(self, job_id: str, body: bytes) -> None:
        """Post an encoded :class:`~runner_daemon.core.models.JobReport` (Opik answers 204,
        and ignores a report on a finished job with 204 too: at-least-once is safe). A 404
        is :class:`JobGone`: that job expired, the runner may be fine."""
        await self._job_request(f"{RUNNERS_PATH}/jobs/{job_id}/results", body)

    async def post_job_logs(self, job_id: str, entries: Sequence[LogEntry]) -> None:
        """A batch of a job's log lines; a 404 is :class:`JobGone`, as for its report."""
        body = b"[" + b",".join(entry.model_dump_json().encode() for entry in entries) + b"]"
        await self._job_request(f"{RUNNERS_PATH}/jobs/{job_id}/logs", body)

    async def _job_request(self, path: str, body: bytes) -> None:
        answer = await self._transport.send("POST", path, content=body, limit=MAX_ANSWER_BYTES)
        if answer.status == 404:
            raise JobGone(error_message(answer), status=answer.status)
        raise_for_status(answer)

    async def put_agents(self, runner_id: str, agents: Mapping[str, Agent]) -> None:
        """Replace the runner's whole set of agents (``{}`` clears it)."""
        body = (
            b"{"
            + b",".join(
                json.dumps(name).encode() + b":" + agent.model_dump_json(exclude_none=True).encode()
                for name, agent in agents.items()
            )
            + b"}"
        )
        await self._request("PUT", f"{RUNNERS_PATH}/{runner_id}/agents", content=body)

    async def patch_checklist(self, runner_id: str, checklist: Mapping[str, Any]) -> None:
        """Deep-merged by the server into the runner's stored checklist."""
        await self._request(
            "PATCH", f"{RUNNERS_PATH}/{runner_id}/checklist", content=json.dumps(dict(checklist)).encode()
        )

    async def disconnect(self, runner_id: str) -> None:
        await self._request("DELETE", f"{RUNNERS_PATH}/{runner_id}")

    async def get_runner(self, runner_id: str) -> Runner:
        return parse_answer(Runner, await self._request("GET", f"{RUNNERS_PATH}/{runner_id}"))

    async def create_pairing_session(self, request: PairingSessionRequest) -> PairingSession:
        answer = await self._request("POST", PAIRING_PATH, content=request.model_dump_json().encode())
        return parse_answer(PairingSession, answer)

    async def activate_pairing_session(self, session_id: str, activation: PairingActivation) -> None:
        """What the browser does with a pairing link; an endpoint runner paired headless
        (``pair --type endpoint``) makes this call itself."""
        await self._request(
            "POST", f"{PAIRING_PATH}/{session_id}/activate", content=activation.model_dump_json().encode()
        )
