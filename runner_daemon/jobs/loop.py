"""The jobs loop: publish the agents, poll for a job while a slot is free, run, report.

One job's path, forward only: :meth:`JobsLoop.poll` (``jobs/next``: the job is ``running`` on
the server from that moment) → :meth:`JobsLoop.dispatch` → the journal's ``started`` line
(with the job's trace id) → the ``running`` report → :func:`~runner_daemon.jobs.execute.run_job`
(its own process group; its logs shipped as they come) → the final report journalled → the
job's last log lines, if Opik was down (they wait as long as the report may, and go first) →
the report delivered through the outbox.
A cancel from the UI arrives in the endpoint runner's heartbeat and cancels the job's scope:
its process group is killed, and no report follows (Opik ignores one on a cancelled job).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping

import anyio
import anyio.to_thread
import structlog
from anyio.abc import TaskGroup

from runner_daemon.core.api import RunnerApi
from runner_daemon.core.claims import Claims
from runner_daemon.core.errors import ApiError, Fatal, JournalUnavailable
from runner_daemon.core.ids import uuid7
from runner_daemon.core.liveness import Liveness
from runner_daemon.core.models import JOBS_CAPABILITY, Job
from runner_daemon.core.outbox import Outbox, OwedResult
from runner_daemon.core.retry import Backoff, retrying
from runner_daemon.core.settings import Settings
from runner_daemon.jobs.agents import AgentsFound, AgentSpec
from runner_daemon.jobs.checklist import build_checklist
from runner_daemon.jobs.execute import JobOutcome, run_job
from runner_daemon.jobs.logs import LogShipper
from runner_daemon.jobs.reporter import JobReporter, encode_job_report
from runner_daemon.jobs.stats import JobStats
from runner_daemon.jobs.watch import watch_agents
from runner_daemon.system.sandbox import SandboxPolicy

log = structlog.get_logger(__name__)

CAPABILITIES = [JOBS_CAPABILITY]
LATE = "The runner is shutting down; the job was not started"
SHUT_DOWN = "The runner shut down before the job finished"
# A cancel that arrives before its job was polled is remembered this long, this many (Opik's).
CANCEL_MEMORY_SECONDS = 300.0
MAX_CANCEL_MEMORY = 10_000
# How often the workspace is scanned for a changed set of agents (published within 10 s).
AGENT_SCAN_SECONDS = 3.0
# After the grace period, cancelled jobs get this long to be killed and reported.
FINAL_REPORT_SECONDS = 30.0


class JobsLoop:
    """Owns the job slots, the in-flight jobs and their cancel scopes, and the drain."""

    def __init__(
        self,
        settings: Settings,
        api: RunnerApi,
        outbox: Outbox,
        *,
        stats: JobStats | None = None,
        liveness: Liveness | None = None,
        sandbox: SandboxPolicy | None = None,
        bridge_key: bytes | None = None,
    ) -> None:
        """``bridge_key``: kept out of every agent's environment, in any encoding."""
        if settings.jobs.runner_id is None:
            raise ValueError("the jobs loop needs [jobs] runner_id")
        self._settings = settings
        self._api = api
        self._outbox = outbox
        self._runner_id = str(settings.jobs.runner_id)
        self.stats = stats or JobStats()
        self.liveness = liveness or Liveness()
        self._sandbox = sandbox
        self._bridge_key = bridge_key
        self.reporter = JobReporter(api, settings, outbox, self.stats)
        self.agents: dict[str, AgentSpec] = {}
        self.agents_ready = anyio.Event()  # set once the first set of agents is known
        self._claims = Claims(settings.jobs.max_jobs, self.liveness)
        self._cancelled_by_ui: set[str] = set()
        self._cancel_memory: OrderedDict[str, float] = OrderedDict()
        self._poll_scope: anyio.CancelScope | None = None
        self._backoff_scope: anyio.CancelScope | None = None
        self.stopping = False

    @property
    def runner_id(self) -> str:
        return self._runner_id

    @property
    def in_flight(self) -> int:
        return len(self._claims)

    # --- agents ---------------------------------------------------------------------------

    async def publish(self, agents: Mapping[str, AgentSpec]) -> None:
        """Register ``agents`` with Opik (replacing the set), then serve them."""
        backoff = Backoff(self._settings.retry_initial_seconds, self._settings.retry_max_seconds)

        def note(exc: ApiError, delay: float) -> None:
            log.warning("could not register the agents; retrying", error=str(exc), retry_in=round(delay, 2))

        registrations = {name: spec.registration() for name, spec in agents.items()}
        await retrying(lambda: self._api.put_agents(self._runner_id, registrations), backoff, note)
        self.agents = dict(agents)
        self.agents_ready.set()
        log.info("agents registered", agents=sorted(agents))

    async def keep_agents_published(self) -> None:
        """Register the agents at start, and again whenever the set changes (a file edited,
        added or removed): within :data:`AGENT_SCAN_SECONDS` of the change, no restart."""
        async with contextlib.aclosing(watch_agents(self._settings, interval=AGENT_SCAN_SECONDS)) as sets:
            async for found in sets:
                for warning in found.warnings:
                    log.warning("agent discovery", problem=warning)
                await self.publish(found.by_name())
                await self._send_checklist(found)

    async def _send_checklist(self, found: AgentsFound) -> None:
        """What Opik's runner page shows about this runner; a failure is not worth retrying."""
        checklist = await anyio.to_thread.run_sync(
            build_checklist, self._settings, found, abandon_on_cancel=True
        )
        try:
            await self._api.patch_checklist(self._runner_id, checklist)
        except Fatal:
            raise
        except ApiError as exc:
            log.info("could not send the checklist", error=str(exc))

    # --- cancel, from the endpoint runner's heartbeats --------------------------------------

    async def heartbeats(self) -> None:
        """Beat for the endpoint runner; each answer's ``cancelled_job_ids`` (delivered once,
        so this is the one place that reads them) cancels those jobs. A Fatal answer is raised."""
        failures = 0
        while True:
            await anyio.sleep(self._settings.heartbeat_interval_seconds)
            try:
                answer = await self._api.heartbeat(self._runner_id, CAPABILITIES)
            except Fatal:
                raise
            except ApiError as exc:
                failures += 1
                (log.warning if failures == 1 else log.debug)("jobs heartbeat failed", error=str(exc))
                continue
            if failures:
                log.info("jobs heartbeat restored", after_failures=failures)
            failures = 0
            self.liveness.contact()
            self.cancel(answer.cancelled_job_ids)

    def cancel(self, job_ids: Iterable[str]) -> None:
        """Stop these jobs: a running one's process group is killed; a later one never starts."""
        now = time.monotonic()
        for job_id in job_ids:
            scope = self._claims.get(job_id)
            if scope is not None:
                log.info("job cancelled from Opik; stopping it", job_id=job_id)
                self._cancelled_by_ui.add(job_id)
                scope.cancel()
            else:
                self._cancel_memory[job_id] = now
                self._cancel_memory.move_to_end(job_id)
        while self._cancel_memory and (
            len(self._cancel_memory) > MAX_CANCEL_MEMORY
            or next(iter(self._cancel_memory.values())) < now - CANCEL_MEMORY_SECONDS
        ):
            self._cancel_memory.popitem(last=False)

    # --- poll and dispatch -------------------------------------------------------------------

    def stop_polling(self, poll_grace: float | None = None) -> None:
        """No new poll. An open one may still answer for ``poll_grace`` seconds: the job it
        brings is already ``running`` on the server, so it is answered, never abandoned."""
        self.stopping = True
        if self._backoff_scope is not None:
            self._backoff_scope.cancel()
        if self._poll_scope is not None:
            if poll_grace is None:
                self._poll_scope.cancel()
            else:
                self._poll_scope.deadline = min(self._poll_scope.deadline, anyio.current_time() + poll_grace)
        self._claims.notify()

    async def run(self, work: TaskGroup) -> None:
        """Poll and dispatch until :meth:`stop_polling`; jobs run in ``work``."""
        backoff = Backoff(self._settings.retry_initial_seconds, self._settings.retry_max_seconds)
        with anyio.CancelScope() as self._backoff_scope:
            await self.agents_ready.wait()  # a job polled before would meet "Unknown agent"
        self._backoff_scope = None
        while not self.stopping:
            self.liveness.tick()
            await self._claims.wait_for_free_slot(lambda: self.stopping)
            await self._wait_for_journal()
            job: Job | None = None
            failure: ApiError | None = None
            with anyio.CancelScope() as self._poll_scope:
                if self.stopping:
                    break
                try:
                    job = await self.poll()
                except ApiError as exc:
                    if isinstance(exc, Fatal):
                        raise
                    failure = exc
                else:
                    backoff.reset()
            self._poll_scope = None
            if job is not None:  # dispatched even when stopping: it is running on the server
                self.dispatch(job, work)
            if failure is not None:
                self.stats.poll_errors += 1
                delay = backoff.delay_after(failure)
                level = log.warning if backoff.attempts <= 1 else log.debug
                level("job poll failed; retrying", error=str(failure), retry_in=round(delay, 2))
                with anyio.CancelScope() as self._backoff_scope:
                    await anyio.sleep(delay)
                self._backoff_scope = None

    async def poll(self) -> Job | None:
        job = await self._api.next_job(self._runner_id)
        self.liveness.contact()
        return job

    def dispatch(self, job: Job, work: TaskGroup) -> None:
        if job.id in self._claims:
            log.warning("poll returned a job already in flight", job_id=job.id)
            return
        scope = self._claims.claim(job.id)
        if self._outbox.known(job.id):
            log.warning("Opik delivered a job this runner already ran; not running it again", job_id=job.id)
            work.start_soon(self._answer_again, job)
            return
        work.start_soon(self._run, job, scope, LATE if self.stopping else None)

    async def _answer_again(self, job: Job) -> None:
        try:
            body = self._outbox.delivered_body(job.id) or encode_job_report(
                "failed", error="This runner already ran this job; it is not run a second time"
            )
            await self.reporter.deliver(self.reporter.entry(job.id, job.agent_name, body))
        finally:
            self._release(job.id)

    # --- execute and report --------------------------------------------------------------

    async def _run(self, job: Job, scope: anyio.CancelScope, refusal: str | None) -> None:
        trace_id = uuid7()
        try:
            async with LogShipper(
                functools.partial(self._api.post_job_logs, job.id),
                max_lines=self._settings.jobs.max_log_lines,
                backoff=Backoff(self._settings.retry_initial_seconds, self._settings.retry_max_seconds),
            ) as logs:
                try:
                    await self._outbox.started(
                        self._runner_id, job.id, job.agent_name, kind="job", trace_id=trace_id
                    )
                except JournalUnavailable as exc:
                    body: bytes | None = encode_job_report("failed", error=f"Not run: {exc}")
                else:
                    body = await self._execute(job, scope, trace_id, refusal, logs)
                if body is None:  # cancelled from Opik: a report would be ignored
                    self.stats.cancelled += 1
                    await self._outbox.done(job.id)
                    return
                entry = await self.reporter.journal(job.id, job.agent_name, body)
                await self._last_lines(logs, entry)
            await self.reporter.deliver(entry)
        finally:
            self._release(job.id)

    async def _last_lines(self, logs: LogShipper, entry: OwedResult) -> None:
        """Lines :func:`run_job` could not send within its bound (Opik is down): they wait as
        long as the report may, and still go first. The report is journalled by now, so a
        crash while they wait costs the lines, never the result."""
        if logs.unsent:
            log.info("job log lines still unsent; the report waits for them", job_id=entry.command_id)
            await logs.flush(entry.created + self._settings.result_ttl_seconds - time.time())

    async def _execute(
        self, job: Job, scope: anyio.CancelScope, trace_id: str, refusal: str | None, logs: LogShipper
    ) -> bytes | None:
        """The final report's body; None when Opik cancelled the job (nothing to report)."""
        bound = log.bind(job_id=job.id, agent=job.agent_name)
        if job.id in self._cancel_memory:
            bound.info("job cancelled before it started; not starting it")
            return None
        if refusal is not None:
            return encode_job_report("failed", error=refusal)
        spec = self.agents.get(job.agent_name)
        if spec is None:  # as Opik's runner: no trace id, nothing ran
            bound.warning("job for an agent this runner does not serve")
            return encode_job_report("failed", error=f"Unknown agent: {job.agent_name}")
        self.stats.started += 1
        start = time.monotonic()
        outcome = None
        async with anyio.create_task_group() as running:
            running.start_soon(
                self.reporter.send_running, job.id, encode_job_report("running", trace_id=trace_id)
            )
            with scope:
                bound.info("job started", trace_id=trace_id)
                outcome = await self._run_agent(spec, job, trace_id, logs)
            running.cancel_scope.cancel()  # the final report carries the trace id too
        duration_ms = int((time.monotonic() - start) * 1000)
        if outcome is None:
            if job.id in self._cancelled_by_ui:
                bound.info("job stopped: cancelled from Opik", duration_ms=duration_ms)
                return None
            self.stats.failed += 1
            bound.warning("job stopped: the runner is shutting down", duration_ms=duration_ms)
            return encode_job_report("failed", error=SHUT_DOWN, trace_id=trace_id)
        if outcome.status == "completed":
            self.stats.completed += 1
        else:
            self.stats.failed += 1
        bound.info("job finished", status=outcome.status, error=outcome.error, duration_ms=duration_ms)
        return encode_job_report(
            outcome.status, result=outcome.result, error=outcome.error, trace_id=trace_id
        )

    async def _run_agent(self, spec: AgentSpec, job: Job, trace_id: str, logs: LogShipper) -> JobOutcome:
        """The agent's process, its logs shipped as they come."""
        return await run_job(
            spec,
            job,
            trace_id,
            settings=self._settings,
            logs=logs,
            sandbox=self._sandbox,
            bridge_key=self._bridge_key,
        )

    # --- recovery, slots and the drain -----------------------------------------------------

    async def recover(self, work: TaskGroup) -> None:
        """Deliver what a previous run still owed for jobs, before the first poll."""
        entries = await self.reporter.owed_from_before()
        if entries:
            log.info("delivering job reports owed from before the restart", reports=len(entries))
        self._claims.deliver_owed(entries, functools.partial(self.reporter.deliver, recovered=True), work)

    def _release(self, job_id: str) -> None:
        self._cancelled_by_ui.discard(job_id)
        self._claims.release(job_id)

    async def _wait_for_journal(self) -> None:
        if self._outbox.failure is None:
            return
        backoff = Backoff(self._settings.retry_initial_seconds, self._settings.retry_max_seconds)
        with anyio.CancelScope() as self._backoff_scope:
            while not self.stopping and not await self._outbox.retry():
                self.liveness.tick()
                await anyio.sleep(backoff.next_delay())
        self._backoff_scope = None

    async def drain(self, grace: float, work: TaskGroup) -> int:
        """Let running jobs finish, then stop and report the rest; returns the unreported."""
        return await self._claims.drain(grace, FINAL_REPORT_SECONDS, work, "jobs")
