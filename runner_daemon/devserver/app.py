"""The dev server's HTTP routes (Starlette), under both ``/v1/...`` and ``/api/v1/...``."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from runner_daemon.devserver.state import ApiFailure, DevServerConfig, DevState, Fault
from runner_daemon.pairing import approve

Endpoint = Callable[[Request], Awaitable[Response]]
RUNNER = "/v1/private/local-runners/{runner_id}"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"errors": [message]}, status_code=status, headers=headers)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        raise ApiFailure(400, "Unable to process JSON") from None


def build_app(state: DevState) -> Starlette:
    config = state.config

    def route(fault_name: str | None, handler: Endpoint) -> Endpoint:
        """Wrap a handler: injected faults first, ``ApiFailure`` becomes an error answer."""

        async def endpoint(request: Request) -> Response:
            fault = state.take_fault(fault_name) if fault_name else None
            if fault is not None:
                headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
                return _error(fault.status, "injected fault", headers)
            try:
                return await handler(request)
            except ApiFailure as exc:
                return _error(exc.status, exc.message, exc.headers)

        return endpoint

    async def get_runner(request: Request) -> Response:
        return JSONResponse(state.runner_view(state.runner(request.path_params["runner_id"])))

    async def delete_runner(request: Request) -> Response:
        state.remove_runner(request.path_params["runner_id"])
        return Response(status_code=204)

    async def heartbeat(request: Request) -> Response:
        body = await _json_body(request)
        capabilities = body.get("capabilities", []) if isinstance(body, dict) else None
        if not isinstance(capabilities, list) or not all(
            isinstance(c, str) and c and c.isascii() and all(ch.islower() or ch == "_" for ch in c)
            for c in capabilities
        ):
            raise ApiFailure(400, "capabilities must be names matching [a-z_]+")
        state.heartbeat(request.path_params["runner_id"], capabilities)
        return JSONResponse({"cancelled_job_ids": []})

    async def submit(request: Request) -> Response:
        runner_id = request.path_params["runner_id"]
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
        runner_id = request.path_params["runner_id"]
        runner = state.runner(runner_id)
        body = await _json_body(request)
        asked = body.get("max_commands") if isinstance(body, dict) else None
        if not isinstance(asked, int) or asked <= 0:
            asked = config.default_max_commands
        asked = min(asked, config.max_max_commands)
        runner.counters.polls += 1
        runner.counters.max_commands_asked.append(asked)
        del runner.counters.max_commands_asked[:-1000]
        taken = []
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                # A client that hung up must not have commands picked up on its behalf.
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch_disconnect)
            with anyio.move_on_after(config.poll_hold_seconds):
                while not runner.removed and not (taken := state.take_pending(runner_id, asked)):
                    await runner.submitted.wait()
            tg.cancel_scope.cancel()
        state.runner(runner_id)  # disconnected while we held the request: 404
        return JSONResponse({"commands": [c.as_item() for c in taken]})

    async def report(request: Request) -> Response:
        body = await _json_body(request)
        state.report(request.path_params["runner_id"], request.path_params["command_id"], body)
        return Response(status_code=204)

    async def get_command(request: Request) -> Response:
        command = state.command(request.path_params["runner_id"], request.path_params["command_id"])
        if request.query_params.get("wait") == "true":
            try:
                timeout = int(request.query_params.get("timeout", config.wait_default_seconds))
            except ValueError:
                raise ApiFailure(400, "timeout must be an integer") from None
            with anyio.move_on_after(min(max(timeout, 1), config.max_timeout_seconds)):
                await command.done.wait()
        return JSONResponse(command.as_record())

    async def create_pairing(request: Request) -> Response:
        session = state.create_pairing(await _json_body(request))
        return JSONResponse({"session_id": session.id, "runner_id": session.runner_id}, status_code=201)

    async def activate_pairing(request: Request) -> Response:
        state.activate_pairing(request.path_params["session_id"], await _json_body(request))
        return Response(status_code=204)

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
        runner = state.create_runner(name if isinstance(name, str) and name else "dev-runner", bridge_key=key)
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
        state.faults.clear()
        return Response(status_code=204)

    routes: list[BaseRoute] = [
        Route(RUNNER, route(None, get_runner), methods=["GET"]),
        Route(RUNNER, route(None, delete_runner), methods=["DELETE"]),
        Route(f"{RUNNER}/heartbeats", route("heartbeat", heartbeat), methods=["POST"]),
        Route(f"{RUNNER}/bridge/commands", route("submit", submit), methods=["POST"]),
        Route(f"{RUNNER}/bridge/commands/next", route("poll", next_commands), methods=["POST"]),
        Route(f"{RUNNER}/bridge/commands/{{command_id}}/results", route("report", report), methods=["POST"]),
        Route(f"{RUNNER}/bridge/commands/{{command_id}}", route(None, get_command), methods=["GET"]),
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
        Route("/dev/faults", route(None, dev_faults), methods=["POST"]),
        Route("/dev/faults/clear", route(None, dev_clear_faults), methods=["POST"]),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:

            async def reaper() -> None:
                while True:
                    await anyio.sleep(config.reaper_interval_seconds)
                    state.reap()

            tg.start_soon(reaper)
            yield
            tg.cancel_scope.cancel()

    return Starlette(routes=[*routes, Mount("/api", routes=routes)], lifespan=lifespan)


def make_app(config: DevServerConfig | None = None) -> tuple[Starlette, DevState]:
    state = DevState(config or DevServerConfig())
    return build_app(state), state
