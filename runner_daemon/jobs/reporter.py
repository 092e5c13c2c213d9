"""Report a job: journal it, then deliver it until Opik holds it or it is too old.

Opik answers 204 to a report on a job that is already finished or cancelled (it ignores it),
so sending one again after a restart or a lost answer is always safe: at least once.
"""

from __future__ import annotations

import time

import anyio
import structlog

from runner_daemon.core.api import RunnerApi
from runner_daemon.core.errors import ApiError, JobGone
from runner_daemon.core.models import JobReport, JobReportStatus
from runner_daemon.core.outbox import Outbox, OwedResult
from runner_daemon.core.retry import Backoff, retrying
from runner_daemon.core.settings import Settings
from runner_daemon.jobs.stats import JobStats

log = structlog.get_logger(__name__)

RESTARTED = "the runner restarted while this job ran"


class JobReporter:
    """Delivers job reports; a 404 (:class:`JobGone`) drops one, and ends nothing else.

    Only :class:`~runner_daemon.core.errors.Unauthorized` is raised: refused credentials end
    the daemon, and the report stays owed for the next start.
    """

    def __init__(self, api: RunnerApi, settings: Settings, outbox: Outbox, stats: JobStats) -> None:
        self._api = api
        self._settings = settings
        self._outbox = outbox
        self._stats = stats
        self._runner_id = str(settings.jobs.runner_id)

    def entry(self, job_id: str, agent_name: str, body: bytes, runner_id: str | None = None) -> OwedResult:
        return OwedResult(runner_id or self._runner_id, job_id, agent_name, body, time.time(), "job")

    async def journal(self, job_id: str, agent_name: str, body: bytes) -> OwedResult:
        """Journal the final report, to :meth:`deliver` next: from here a crash costs no result."""
        entry = self.entry(job_id, agent_name, body)
        await self._outbox.result(entry)
        return entry

    async def send_running(self, job_id: str, body: bytes) -> None:
        """The ``running`` report (it carries the trace id, so the UI links it early): retried
        like any other, but only until the final report replaces it (the caller cancels)."""
        backoff = Backoff(self._settings.retry_initial_seconds, self._settings.retry_max_seconds)
        try:
            await retrying(
                lambda: self._api.report_job(job_id, body),
                backoff,
                self._retry_logger(job_id),
                final=(JobGone,),
            )
        except JobGone:
            log.warning("the running report was refused: Opik no longer knows this job", job_id=job_id)

    async def owed_from_before(self) -> list[OwedResult]:
        """What a previous run left for jobs: undelivered reports, and ``failed`` for each job
        that was running when it stopped (with the trace id it had reported)."""
        recovered = self._outbox.recovered
        entries = [entry for entry in recovered.results if entry.kind == "job"]
        for lost in (entry for entry in recovered.interrupted if entry.kind == "job"):
            body = encode_job_report("failed", error=RESTARTED, trace_id=lost.trace_id)
            entry = self.entry(lost.command_id, lost.command_type, body, lost.runner_id)
            await self._outbox.result(entry)
            entries.append(entry)
        return entries

    async def deliver(self, entry: OwedResult, *, recovered: bool = False) -> bool:
        bound = log.bind(job_id=entry.command_id, agent=entry.command_type)
        if recovered:
            bound = bound.bind(recovered=True)
        backoff = Backoff(self._settings.retry_initial_seconds, self._settings.retry_max_seconds)
        remaining = entry.created + self._settings.result_ttl_seconds - time.time()
        delivered = False
        with anyio.move_on_after(max(remaining, 0.0)):
            try:
                await retrying(
                    lambda: self._api.report_job(entry.command_id, entry.body),
                    backoff,
                    self._retry_logger(entry.command_id),
                    final=(JobGone,),
                )
            except JobGone:
                bound.warning("job report dropped: Opik no longer knows this job (expired or purged)")
            else:
                delivered = True
        if delivered:
            self._stats.reported += 1
        else:
            self._stats.dropped += 1
            if time.time() >= entry.created + self._settings.result_ttl_seconds:
                bound.error(
                    "job report dropped: still undelivered", after_seconds=self._settings.result_ttl_seconds
                )
        await self._outbox.done(entry.command_id)
        return delivered

    def _retry_logger(self, job_id: str) -> _RetryLog:
        return _RetryLog(job_id, self._stats)


class _RetryLog:
    def __init__(self, job_id: str, stats: JobStats) -> None:
        self._job_id = job_id
        self._stats = stats
        self._attempts = 0

    def __call__(self, exc: ApiError, delay: float) -> None:
        self._attempts += 1
        self._stats.report_retries += 1
        log.warning(
            "job report failed; retrying",
            job_id=self._job_id,
            error=str(exc),
            retry_in=round(delay, 2),
            attempt=self._attempts,
        )


def encode_job_report(
    status: JobReportStatus, *, result: object = None, error: str | None = None, trace_id: str | None = None
) -> bytes:
    """One report, serialised once: the same bytes are journalled and sent."""
    report = JobReport.model_validate(
        {"status": status, "result": result, "error": error, "trace_id": trace_id}
    )
    return report.model_dump_json(exclude_none=True).encode()
