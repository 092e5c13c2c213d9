"""The dev server's jobs routes (JOBS.md) and what Opik's SDK needs inside an agent (traces).

Built by :func:`jobs_routes` from :func:`~runner_daemon.devserver.app.build_app`'s route
wrapper, so faults, error answers and ownership work as on the bridge's routes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from runner_daemon import __version__
from runner_daemon.devserver.records import ApiFailure
from runner_daemon.devserver.state import DevState
from runner_daemon.devserver.traces import PING_ANSWER

Endpoint = Callable[[Request], Awaitable[Response]]
RUNNERS = "/v1/private/local-runners"
RUNNER = RUNNERS + "/{runner_id}"
JOB = RUNNERS + "/jobs/{job_id}"


class RouteWrapper(Protocol):
    def __call__(
        self, fault_name: str | None, handler: Endpoint, *, profile_name: str | None = None
    ) -> Endpoint: ...


def _int_param(request: Request, name: str, default: int, minimum: int) -> int:
    raw = request.query_params.get(name)
    try:
        value = default if raw is None else int(raw)
    except ValueError:
        raise ApiFailure(400, f"{name} must be an integer") from None
    if value < minimum:
        raise ApiFailure(400, f"{name} must be greater than or equal to {minimum}")
    return value


def jobs_routes(
    state: DevState,
    route: RouteWrapper,
    json_body: Callable[[Request], Awaitable[Any]],
    owned: Callable[[Request], str],
    workspace: Callable[[Request], str],
) -> list[BaseRoute]:
    config = state.config
    jobs = state.jobs

    async def create_job(request: Request) -> Response:
        """201 with the job's ``Location`` and no body."""
        job = jobs.create(workspace(request), await json_body(request))
        location = request.url.replace(path=f"{request.url.path.rstrip('/')}/{job.id}", query="")
        return Response(status_code=201, headers={"Location": str(location)})

    async def get_job(request: Request) -> Response:
        return JSONResponse(jobs.job(request.path_params["job_id"], workspace(request)).as_wire())

    async def list_jobs(request: Request) -> Response:
        runner = state.runner(owned(request))
        project_id = request.query_params.get("project_id") or None
        page = _int_param(request, "page", 0, 0)
        size = _int_param(request, "size", 25, 1)
        return JSONResponse(jobs.page(runner, project_id, page, size))

    async def next_job(request: Request) -> Response:
        """Hold until a job is queued (then it is running) or the hold ends: ``null``."""
        runner = state.runner(owned(request))
        job = None
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                # A client that hung up must not have a job started on its behalf.
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch_disconnect)
            with anyio.move_on_after(config.jobs_poll_hold_seconds):
                while (
                    not runner.removed and not state.closed.is_set() and not (job := jobs.take_next(runner))
                ):
                    await runner.jobs_queued.wait()
            tg.cancel_scope.cancel()
        state.runner(runner.id)  # evicted while we held the request: 404 (its jobs failed)
        if job is not None:
            return JSONResponse(job.as_wire())
        if config.jobs_next_answers_204:
            return Response(status_code=204)
        return Response(b"null", media_type="application/json")

    async def report(request: Request) -> Response:
        jobs.report(request.path_params["job_id"], workspace(request), await json_body(request))
        return Response(status_code=204)

    async def post_logs(request: Request) -> Response:
        jobs.append_logs(request.path_params["job_id"], workspace(request), await json_body(request))
        return Response(status_code=204)

    async def get_logs(request: Request) -> Response:
        job = jobs.job(request.path_params["job_id"], workspace(request))
        return JSONResponse(job.logs[_int_param(request, "offset", 0, 0) :])

    async def cancel(request: Request) -> Response:
        jobs.cancel(request.path_params["job_id"], workspace(request))
        return Response(status_code=204)

    async def put_agents(request: Request) -> Response:
        runner = state.runner(owned(request))
        jobs.put_agents(runner, await json_body(request))
        return Response(status_code=204)

    async def patch_checklist(request: Request) -> Response:
        runner = state.runner(owned(request))
        jobs.patch_checklist(runner, await json_body(request))
        return Response(status_code=204)

    # --- what Opik's SDK calls from inside an agent ----------------------------------------

    async def ping(request: Request) -> Response:
        return JSONResponse(PING_ANSWER)

    async def version(request: Request) -> Response:
        return JSONResponse({"version": __version__})

    async def traces_batch(request: Request) -> Response:
        state.traces.add_traces(await json_body(request))
        return Response(status_code=204)

    async def spans_batch(request: Request) -> Response:
        state.traces.add_spans(await json_body(request))
        return Response(status_code=204)

    async def dev_trace(request: Request) -> Response:
        return JSONResponse(state.traces.view(request.path_params["trace_id"]))

    return [
        Route(f"{RUNNERS}/jobs", route("jobs", create_job), methods=["POST"]),
        Route(JOB, route(None, get_job, profile_name="job"), methods=["GET"]),
        Route(f"{JOB}/results", route("job_report", report), methods=["POST"]),
        Route(f"{JOB}/logs", route("job_logs", post_logs), methods=["POST"]),
        Route(f"{JOB}/logs", route(None, get_logs, profile_name="job"), methods=["GET"]),
        Route(f"{JOB}/cancel", route("job_cancel", cancel), methods=["POST"]),
        Route(f"{RUNNER}/jobs", route(None, list_jobs, profile_name="job"), methods=["GET"]),
        Route(f"{RUNNER}/jobs/next", route("jobs_next", next_job), methods=["POST"]),
        Route(f"{RUNNER}/agents", route("agents", put_agents), methods=["PUT"]),
        Route(f"{RUNNER}/checklist", route("checklist", patch_checklist), methods=["PATCH"]),
        Route("/is-alive/ping", route(None, ping), methods=["GET"]),
        Route("/is-alive/ver", route(None, version), methods=["GET"]),
        Route("/v1/private/traces/batch", route("traces", traces_batch), methods=["POST"]),
        Route("/v1/private/spans/batch", route("traces", spans_batch), methods=["POST"]),
        Route("/dev/traces/{trace_id}", route(None, dev_trace), methods=["GET"]),
    ]
