"""The dev server's HTTP routes (Starlette), under both ``/v1/...`` and ``/api/v1/...``.

Over 400 lines on purpose: every route is a closure over one :class:`DevState` and one fault
wrapper, and together they read as the API's one table.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from runner_daemon.core.errors import describe_validation_error
from runner_daemon.devserver.faults import Action, FaultMiddleware, FaultProfile, mark_reset
from runner_daemon.devserver.jobs_routes import jobs_routes
from runner_daemon.devserver.malformed import ANSWER_KINDS, MALFORMED_KINDS, malformed_answer
from runner_daemon.devserver.records import DEFAULT_WORKSPACE, ApiFailure, DevServerConfig, Fault
from runner_daemon.devserver.state import DevState
from runner_daemon.service.pairing import approve

Endpoint = Callable[[Request], Awaitable[Response]]
RUNNER = "/v1/private/local-runners/{runner_id}"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"errors": [message]}, status_code=status, headers=headers)


def _too_large() -> ApiFailure:
    return ApiFailure(413, "Request body exceeds the maximum payload size")


async def _body(request: Request, limit: int) -> bytes:
    """The request body, read and (for ``Content-Encoding: gzip``) inflated up to ``limit`` bytes.

    Opik's own client gzips bodies of 256 bytes or more; a few KiB of gzip can inflate to
    gigabytes, so neither the wire nor the inflater may go past the limit.
    """
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise _too_large()
    return _gunzip(bytes(raw), limit) if _gzipped(request) else bytes(raw)


def _gzipped(request: Request) -> bool:
    return request.headers.get("content-encoding", "identity").strip().lower() in ("gzip", "x-gzip")


def _gunzip(data: bytes, limit: int) -> bytes:
    """Inflate gzip members one after another, as Opik's server does, refusing more than ``limit``."""
    out = bytearray()
    while data:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out += inflater.decompress(data, limit + 1 - len(out))  # never 0: that means unbounded
        except zlib.error:
            raise ApiFailure(400, "Unable to process gzip request body") from None
        if len(out) > limit:
            raise _too_large()
        if not inflater.eof:
            raise ApiFailure(400, "Unable to process gzip request body")  # truncated
        data = inflater.unused_data
    return bytes(out)


def _workspace(request: Request) -> str:
    """The caller's workspace: ``Comet-Workspace``, or ``default`` as a local Opik assumes."""
    return request.headers.get("comet-workspace", "").strip() or DEFAULT_WORKSPACE


def build_app(state: DevState) -> Starlette:
    config = state.config

    async def _json_body(request: Request) -> Any:
        raw = await _body(request, config.max_body_bytes)
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiFailure(400, "Unable to process JSON") from None

    def owned(request: Request) -> str:
        """The path's runner id, once the caller's workspace is known to own it (else 404)."""
        runner_id: str = request.path_params["runner_id"]
        state.check_owner(runner_id, _workspace(request))
        return runner_id

    def route(fault_name: str | None, handler: Endpoint, *, profile_name: str | None = None) -> Endpoint:
        """Wrap a handler: injected faults first, ``ApiFailure`` becomes an error answer.

        ``fault_name`` is the route's name in the fault queue (``POST /dev/faults``) and, unless
        ``profile_name`` is given, in the fault profile; None for the dev routes (never faulted).
        """
        profiled = profile_name or fault_name

        async def endpoint(request: Request) -> Response:
            if fault_name == "report":
                params = request.path_params
                state.count_report_attempt(params["runner_id"], params["command_id"])
            fault = state.take_fault(fault_name) if fault_name else None
            if fault is not None:  # a one-off fault wins over the profile
                state.injector.counters.queued += 1
                headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
                return _error(fault.status, "injected fault", headers)
            decision = state.injector.decide(profiled) if profiled else None
            if decision is not None and decision.latency:
                await anyio.sleep(decision.latency)  # before handling (for a poll: before the hold)
            if decision is not None:
                if decision.action is Action.RESET_BEFORE and mark_reset(request.scope, partial=False):
                    return Response(status_code=500)  # never sent: the connection is reset
                if decision.action is Action.ERROR and decision.status is not None:
                    return _error(decision.status, "injected fault")
                if decision.action is Action.RATE_LIMIT:
                    return _error(429, "injected rate limit", {"Retry-After": f"{decision.retry_after:g}"})
            try:
                response = await handler(request)
            except ApiFailure as exc:
                response = _error(exc.status, exc.message, exc.headers)
            if decision is not None and decision.action is Action.RESET_AFTER:
                mark_reset(request.scope, partial=True)  # processed, but the client never sees the answer
            return response

        return endpoint

    async def get_runner(request: Request) -> Response:
        return JSONResponse(state.runner_view(state.runner(owned(request))))

    async def delete_runner(request: Request) -> Response:
        with contextlib.suppress(ApiFailure):  # 204 always: another workspace's runner stays as it is
            state.remove_runner(owned(request))
        return Response(status_code=204)

    async def heartbeat(request: Request) -> Response:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise ApiFailure(400, "Body must be a JSON object")
        capabilities = body.get("capabilities")
        if capabilities is not None and (
            not isinstance(capabilities, list)
            or not all(
                isinstance(c, str) and c and c.isascii() and all(ch.islower() or ch == "_" for ch in c)
                for c in capabilities
            )
        ):
            raise ApiFailure(400, "capabilities must be names matching [a-z_]+")
        cancelled = state.heartbeat(request.path_params["runner_id"], _workspace(request), capabilities)
        return JSONResponse({"cancelled_job_ids": cancelled})

    async def submit(request: Request) -> Response:
        runner_id = owned(request)
        body = await _json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("type"), str):
            raise ApiFailure(400, "type is required")
        args = body.get("args") or {}
        timeout = body.get("timeout_seconds")
        if not isinstance(args, dict) or (timeout is not None and not isinstance(timeout, int)):
            raise ApiFailure(400, "args must be an object and timeout_seconds an integer")
        command = state.submit(runner_id, body["type"], args, timeout)
        location = f"{request.url.path}/{command.id}"
        return JSONResponse({"command_id": command.id}, status_code=201, headers={"Location": location})

    async def next_commands(request: Request) -> Response:
        runner_id = owned(request)
        runner = state.runner(runner_id)
        body = await _json_body(request)
        asked = body.get("max_commands") if isinstance(body, dict) else None
        if not isinstance(asked, int) or asked <= 0:
            asked = config.default_max_commands
        asked = min(asked, config.max_max_commands)
        runner.counters.polls += 1
        runner.counters.arrived("poll")
        runner.counters.max_commands_asked.append(asked)
        del runner.counters.max_commands_asked[:-1000]
        if runner.malformed and runner.malformed[0] in ANSWER_KINDS:
            return _malformed(runner.malformed.popleft(), [])
        taken = []
        runner.counters.polls_open += 1
        try:
            async with anyio.create_task_group() as tg:

                async def watch_disconnect() -> None:
                    # A client that hung up must not have commands picked up on its behalf.
                    while (await request.receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_disconnect)
                with anyio.move_on_after(config.poll_hold_seconds):
                    while (
                        not runner.removed
                        and not state.closed.is_set()
                        and not (taken := state.take_pending(runner_id, asked))
                    ):
                        await runner.submitted.wait()
                tg.cancel_scope.cancel()
        finally:
            runner.counters.polls_open -= 1
        state.runner(runner_id)  # disconnected while we held the request: 404
        items = [c.as_item() for c in taken]
        runner.counters.arrived("answered", [c.id for c in taken])
        if items and runner.malformed:  # spoiled as it is sent, so a poll held meanwhile counts too
            return _malformed(runner.malformed.popleft(), items)
        return JSONResponse({"commands": items})

    async def report(request: Request) -> Response:
        body = await _json_body(request)
        runner_id = owned(request)
        counters = state.runner(runner_id).counters
        counters.arrived("report", request.path_params["command_id"])
        if _gzipped(request):
            counters.reports_gzipped += 1
        state.report(runner_id, request.path_params["command_id"], body)
        return Response(status_code=204)

    async def get_command(request: Request) -> Response:
        command = state.command(owned(request), request.path_params["command_id"])
        if request.query_params.get("wait") == "true":
            try:
                timeout = int(request.query_params.get("timeout", config.wait_default_seconds))
            except ValueError:
                raise ApiFailure(400, "timeout must be an integer") from None
            with anyio.move_on_after(min(max(timeout, 1), config.max_timeout_seconds)):
                await _first_of(command.done, state.closed)
        return JSONResponse(command.as_record())

    async def create_pairing(request: Request) -> Response:
        session = state.create_pairing(await _json_body(request), _workspace(request))
        return JSONResponse({"session_id": session.id, "runner_id": session.runner_id}, status_code=201)

    async def activate_pairing(request: Request) -> Response:
        """201 with the runner's ``Location``, as Opik answers the browser."""
        body = await _json_body(request)
        runner = state.activate_pairing(request.path_params["session_id"], body, _workspace(request))
        path = request.url.path
        prefix = path[: path.index("/v1/private/pairing/")]
        location = request.url.replace(path=f"{prefix}/v1/private/local-runners/{runner.id}", query="")
        return Response(status_code=201, headers={"Location": str(location)})

    # --- dev-only routes ------------------------------------------------------------------

    async def dev_approve_pairing(request: Request) -> Response:
        """Do what the user's browser does with a pairing link."""
        body = await _json_body(request)
        try:
            session_id, activation = approve(str(body.get("link", "")) if isinstance(body, dict) else "")
        except (ValueError, IndexError):
            raise ApiFailure(400, "link is not a pairing link") from None
        state.activate_pairing(session_id, activation.model_dump())
        return Response(status_code=204)

    async def dev_create_runner(request: Request) -> Response:
        body = await _json_body(request)
        body = body if isinstance(body, dict) else {}
        name = body.get("name")
        try:
            key = base64.b64decode(body["bridge_key"], validate=True) if body.get("bridge_key") else None
        except (ValueError, TypeError):
            raise ApiFailure(400, "bridge_key must be base64") from None
        name = name if isinstance(name, str) and name else "dev-runner"
        runner_type, project_id = body.get("type", "connect"), body.get("project_id")
        if runner_type not in ("connect", "endpoint"):
            raise ApiFailure(400, "type must be connect or endpoint")
        try:
            project_id = str(uuid.UUID(project_id)) if project_id is not None else None
        except (ValueError, TypeError, AttributeError):
            raise ApiFailure(400, "project_id must be a UUID") from None
        runner = state.create_runner(
            name, bridge_key=key, project_id=project_id, workspace=_workspace(request), type=runner_type
        )
        return JSONResponse({"runner_id": runner.id}, status_code=201)

    async def dev_stats(request: Request) -> Response:
        runner = state.runners.get(request.path_params["runner_id"])
        if runner is None:
            raise ApiFailure(404, "Runner not found")
        return JSONResponse(runner.counters.as_dict())

    async def dev_evict(request: Request) -> Response:
        state.remove_runner(request.path_params["runner_id"])
        return Response(status_code=204)

    async def dev_faults(request: Request) -> Response:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise ApiFailure(400, "fault must be an object")
        try:
            fault = Fault(
                route=str(body["route"]),
                status=int(body["status"]),
                count=int(body.get("count", 1)),
                retry_after=float(body["retry_after"]) if body.get("retry_after") is not None else None,
            )
        except (KeyError, TypeError, ValueError):
            raise ApiFailure(400, "fault needs route, status, and optionally count, retry_after") from None
        state.add_fault(fault)
        return Response(status_code=204)

    async def dev_clear_faults(request: Request) -> Response:
        body = await _json_body(request)
        state.faults.clear()
        state.injector.clear(counters=isinstance(body, dict) and body.get("counters") is True)
        return Response(status_code=204)

    async def dev_malformed(request: Request) -> Response:
        runner = state.runner(request.path_params["runner_id"])
        body = await _json_body(request)
        kind = body.get("kind") if isinstance(body, dict) else None
        count = body.get("count", 1) if isinstance(body, dict) else None
        if kind not in MALFORMED_KINDS or not isinstance(count, int) or not 1 <= count <= 100:
            raise ApiFailure(400, f"need kind (one of {', '.join(MALFORMED_KINDS)}) and count in [1, 100]")
        runner.malformed.extend([kind] * count)
        return Response(status_code=204)

    async def dev_redeliver(request: Request) -> Response:
        runner = state.runner(request.path_params["runner_id"])
        body = await _json_body(request)
        command_id = body.get("command_id") if isinstance(body, dict) else None
        if not isinstance(command_id, str):
            raise ApiFailure(400, "need command_id")
        state.command(runner.id, command_id)  # 404 when unknown
        runner.redeliver.append(command_id)
        runner.submitted.notify()
        return Response(status_code=204)

    def faults_view() -> dict[str, Any]:
        queued = [dict(fault.__dict__) for fault in state.faults]
        return {**state.injector.view(), "queued": queued}

    async def dev_get_faults(request: Request) -> Response:
        return JSONResponse(faults_view())

    async def dev_set_fault_profile(request: Request) -> Response:
        body = await _json_body(request)
        try:
            profile = FaultProfile.model_validate(body)
        except ValidationError as exc:
            raise ApiFailure(400, describe_validation_error(exc)) from None
        state.injector.set_profile(profile)
        return JSONResponse(faults_view())

    async def dev_runner_commands(request: Request) -> Response:
        commands = state.runner_commands(request.path_params["runner_id"])
        return JSONResponse([command.as_dev_record() for command in commands])

    routes: list[BaseRoute] = [
        *jobs_routes(state, route, _json_body, owned, _workspace),
        Route(RUNNER, route(None, get_runner, profile_name="runner"), methods=["GET"]),
        Route(RUNNER, route(None, delete_runner, profile_name="runner"), methods=["DELETE"]),
        Route(f"{RUNNER}/heartbeats", route("heartbeat", heartbeat), methods=["POST"]),
        Route(f"{RUNNER}/bridge/commands", route("submit", submit), methods=["POST"]),
        Route(f"{RUNNER}/bridge/commands/next", route("poll", next_commands), methods=["POST"]),
        Route(f"{RUNNER}/bridge/commands/{{command_id}}/results", route("report", report), methods=["POST"]),
        Route(
            f"{RUNNER}/bridge/commands/{{command_id}}",
            route(None, get_command, profile_name="command"),
            methods=["GET"],
        ),
        Route("/v1/private/pairing/sessions", route("pairing", create_pairing), methods=["POST"]),
        Route(
            "/v1/private/pairing/sessions/{session_id}/activate",
            route("pairing", activate_pairing),
            methods=["POST"],
        ),
        Route("/dev/pairing/approve", route(None, dev_approve_pairing), methods=["POST"]),
        Route("/dev/runners", route(None, dev_create_runner), methods=["POST"]),
        Route("/dev/runners/{runner_id}/stats", route(None, dev_stats), methods=["GET"]),
        Route("/dev/runners/{runner_id}/evict", route(None, dev_evict), methods=["POST"]),
        Route("/dev/runners/{runner_id}/commands", route(None, dev_runner_commands), methods=["GET"]),
        Route("/dev/runners/{runner_id}/malformed", route(None, dev_malformed), methods=["POST"]),
        Route("/dev/runners/{runner_id}/redeliver", route(None, dev_redeliver), methods=["POST"]),
        Route("/dev/faults", route(None, dev_faults), methods=["POST"]),
        Route("/dev/faults", route(None, dev_get_faults), methods=["GET"]),
        Route("/dev/faults/profile", route(None, dev_set_fault_profile), methods=["POST"]),
        Route("/dev/faults/clear", route(None, dev_clear_faults), methods=["POST"]),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:

            async def reaper(interval: float, reap: Callable[[], None]) -> None:
                while True:
                    await anyio.sleep(interval)
                    reap()

            tg.start_soon(reaper, config.reaper_interval_seconds, state.reap)
            tg.start_soon(reaper, config.job_reaper_interval_seconds, state.jobs.reap)
            yield
            tg.cancel_scope.cancel()

    return Starlette(routes=[*routes, Mount("/api", routes=routes)], lifespan=lifespan)


def _malformed(kind: str, items: list[Any]) -> Response:
    status, body, media_type = malformed_answer(kind, items)
    return Response(body, status_code=status, media_type=media_type)


async def _first_of(*events: anyio.Event) -> None:
    """Return as soon as any of the events is set."""
    async with anyio.create_task_group() as tg:

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait, event)


def make_app(
    config: DevServerConfig | None = None, clock: Callable[[], float] = time.monotonic
) -> tuple[FaultMiddleware, DevState]:
    """The app with fault injection around it (the outermost layer, to reach the connection)."""
    state = DevState(config or DevServerConfig(), clock)
    return FaultMiddleware(build_app(state), state.injector), state
