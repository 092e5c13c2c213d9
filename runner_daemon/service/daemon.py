"""The daemon's life: open what it needs, start up, run, drain, shut down, close.

Signals are not handled here: the CLI turns them into :meth:`Daemon.request_stop` (drain)
and :meth:`Daemon.force_stop` (exit now). Errors that end the daemon are raised out of the
loops as :class:`~runner_daemon.core.errors.Fatal` and caught once, in :meth:`Daemon.run`.
Each resource (the API client, the outbox, the handlers' services) is opened and closed by
:meth:`Daemon.run` alone, in one ``AsyncExitStack``.

Over 400 lines on purpose: the phases of one life read top to bottom in one class.
"""

from __future__ import annotations

import functools
import gc
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import anyio
import structlog
from anyio.abc import TaskGroup

from runner_daemon.bridge.handlers import HandlerRegistry
from runner_daemon.bridge.handlers.base import HandlerServices
from runner_daemon.bridge.loop import BridgeLoop
from runner_daemon.bridge.stats import LoopStats
from runner_daemon.core import eventloop
from runner_daemon.core.api import RunnerApi
from runner_daemon.core.errors import ApiError, ConfigError, Fatal, RunnerGone
from runner_daemon.core.liveness import Liveness
from runner_daemon.core.models import BRIDGE_CAPABILITY, JOBS_CAPABILITY
from runner_daemon.core.outbox import Outbox
from runner_daemon.core.retry import Backoff, retrying
from runner_daemon.core.settings import Settings
from runner_daemon.jobs.stats import JobStats
from runner_daemon.service.lifecycle import ExitStatus, Lifecycle, Phase
from runner_daemon.service.notify import Notifier
from runner_daemon.system.sandbox import SandboxPolicy

if TYPE_CHECKING:
    from runner_daemon.jobs.loop import JobsLoop

log = structlog.get_logger(__name__)

# While Opik cannot be reached, a reminder this often (the first failure is logged at once).
OUTAGE_SUMMARY_SECONDS = 300.0
# A poll loop that has not moved for its poll timeout plus this long is stuck.
LOOP_STALL_SLACK_SECONDS = 15.0

CAPABILITIES = [BRIDGE_CAPABILITY]
JOBS_CAPABILITIES = [JOBS_CAPABILITY]
# Declared from a stop on: a non-empty list without "bridge" replaces the stored one, so the
# server refuses new submissions (409) and a held poll may then be closed without losing one.
DRAINING_CAPABILITIES = ["draining"]
# After that heartbeat was answered, how long the open poll may still bring a command it took
# just before (its answer left Opik before the heartbeat's did: this covers the jitter).
RACE_WAIT_SECONDS = 0.5
# How long the closing sweep's poll waits: one that finds commands pending answers at once.
SWEEP_WAIT_SECONDS = 0.5
# The most closing a resource may take once the daemon ends (shielded from cancellation).
CLOSE_SECONDS = 10.0

__all__ = ["Daemon", "ExitStatus"]


class _Outage:
    """Start-up's log of an outage: one line when it starts, one every few minutes after."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.first: float | None = None
        self._last_summary = 0.0
        self.attempts = 0

    def note(self, exc: ApiError, _delay: float) -> None:
        self.attempts += 1
        now = time.monotonic()
        if self.first is None:
            self.first = self._last_summary = now
            log.warning("cannot reach Opik yet; retrying", error=str(exc), url=self._url)
        elif now - self._last_summary >= OUTAGE_SUMMARY_SECONDS:
            self._last_summary = now
            log.warning(
                "still cannot reach Opik; retrying",
                error=str(exc),
                attempts=self.attempts,
                for_seconds=round(now - self.first),
            )

    def ended(self) -> None:
        if self.first is not None:
            log.info(
                "Opik answered",
                after_attempts=self.attempts,
                after_seconds=round(time.monotonic() - self.first, 1),
            )


def _first_fatal(group: BaseExceptionGroup[Fatal]) -> Fatal:
    """The first error of a (nested) group from ``except* Fatal``: only Fatal leaves are in it."""
    first = group.exceptions[0]
    return _first_fatal(first) if isinstance(first, BaseExceptionGroup) else first


async def _close_shielded(close: Callable[[], Awaitable[None]]) -> None:
    """Closing runs however the daemon ends (a forced exit cancels everything else)."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_SECONDS):
        await close()


class Daemon:
    """One runner's life; ``settings`` is the one config, the rest is what start-up derived."""

    def __init__(
        self,
        settings: Settings,
        registry: HandlerRegistry,
        *,
        bridge_key: bytes | None = None,
        sandbox: SandboxPolicy | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        if not (settings.bridge.enabled or settings.jobs.enabled):
            raise ConfigError("bridge.enabled, jobs.enabled: at least one capability must be on")
        if settings.bridge.enabled and settings.runner_id is None:
            raise ConfigError("runner_id: the bridge needs a paired runner (runner-daemon pair)")
        if settings.jobs.enabled and settings.jobs.runner_id is None:
            raise ConfigError(
                "jobs.runner_id: jobs need a paired endpoint runner (runner-daemon pair --type endpoint)"
            )
        self._settings = settings
        self._registry = registry
        self._bridge_key = bridge_key
        self._sandbox = sandbox
        self._runner_id = str(settings.runner_id)
        self.notifier = notifier or Notifier(None)
        self.stats = LoopStats()
        self.liveness = Liveness(last_contact=None)
        self.lifecycle = Lifecycle()
        self.health_port: int | None = None  # bound port of the health listener, once serving
        self._api: RunnerApi | None = None
        self._outbox: Outbox | None = None
        self._loop: BridgeLoop | None = None
        self._jobs: JobsLoop | None = None
        self.job_stats = JobStats()
        self.jobs_liveness = Liveness(last_contact=None)
        self._services: TaskGroup | None = None  # the daemon's own tasks, while it runs
        self._withdrawal = anyio.Event()  # the stop's "no more bridge commands" heartbeat ended
        self._withdrawn = False  # ... and Opik took it
        self._root: anyio.CancelScope | None = None
        self._startup_scope: anyio.CancelScope | None = None

    # --- what tests, health and metrics read ------------------------------------------------

    @property
    def loop(self) -> BridgeLoop:
        if self._loop is None:
            raise RuntimeError("the daemon has not opened its loop yet")
        return self._loop

    @property
    def state(self) -> Phase:
        return self.lifecycle.phase

    @property
    def running(self) -> anyio.Event:
        return self.lifecycle.running

    @property
    def fatal_error(self) -> Fatal | None:
        return self.lifecycle.error

    @property
    def stop_requested(self) -> bool:
        return self.lifecycle.stopping

    @property
    def jobs(self) -> JobsLoop:
        if self._jobs is None:
            raise RuntimeError("the daemon serves no jobs (or has not opened its loop yet)")
        return self._jobs

    @property
    def in_flight(self) -> int:
        loops: list[BridgeLoop | JobsLoop | None] = [self._loop, self._jobs]
        return sum(loop.in_flight for loop in loops if loop is not None)

    # --- control, called from the CLI's signal handling ---------------------------------

    def request_stop(self, reason: str) -> None:
        """Begin a graceful stop: no new polls, in-flight commands get the grace period."""
        grace = self._settings.shutdown_grace_seconds
        if not self.lifecycle.ask_stop(reason, grace):
            return
        log.info(
            "stopping: finishing in-flight commands and the open poll",
            reason=reason,
            in_flight=self.in_flight,
            grace_seconds=grace,
        )
        self.notifier.stopping(self._status_line())
        # The open poll is kept through the grace period (Opik cannot tell a client hung up on
        # a held poll, and would hand it commands no one reports), unless Opik confirms it
        # takes no more bridge commands: then it is closed after a short wait.
        if self._loop is not None:
            self._loop.stop_polling(poll_grace=grace)
        if self._jobs is not None:
            self._jobs.stop_polling(poll_grace=grace)
        if self._services is not None:
            self._services.start_soon(self._withdraw_bridge)
        if self._startup_scope is not None:
            self._startup_scope.cancel()

    def force_stop(self, signum: int) -> None:
        """Exit now; commands still running are abandoned (the server times them out)."""
        self.lifecycle.force(signum)
        log.warning("forced exit: abandoning in-flight commands", in_flight=self.in_flight)
        if self._root is not None:
            self._root.cancel()

    # --- the life cycle -----------------------------------------------------------------

    async def run(self) -> ExitStatus | int:
        """Open, start up, run, drain, shut down, close; returns the exit status.

        Raises :class:`~runner_daemon.core.errors.ConfigError` when the state directory
        cannot hold the outbox (or another daemon holds it).
        """
        with anyio.CancelScope() as self._root:
            async with AsyncExitStack() as resources:
                api = self._open(resources)
                try:
                    async with anyio.create_task_group() as outer:
                        # The health listener answers from the start: "starting" is worth probing.
                        if self._settings.health.listen and not await self._start_health(outer):
                            self.lifecycle.advance(Phase.STOPPED)
                            return ExitStatus.FAILURE
                        if await self._startup(api):
                            await self._main(api)
                            await self._shutdown(api)
                        outer.cancel_scope.cancel()
                except* Fatal as group:
                    self._failed(_first_fatal(group))
        self.lifecycle.advance(Phase.STOPPED)
        status = self.lifecycle.exit_status()
        stats = self.stats
        log.info(
            "runner-daemon stopped",
            exit_status=int(status),
            reason=self.lifecycle.stop_reason,
            commands_run=stats.completed + stats.failed,
            results_owed=0 if self._outbox is None else self._outbox.undelivered,
        )
        return status

    def _open(self, resources: AsyncExitStack) -> RunnerApi:
        """The resources of this run, closed in reverse order when it ends, however it ends."""
        self._outbox = outbox = Outbox.open(self._settings.state_directory)
        # Whatever the outbox buffered is written, however the daemon ends.
        resources.push_async_callback(_close_shielded, outbox.close)
        self._api = api = RunnerApi.from_settings(self._settings)
        resources.push_async_callback(api.aclose)
        services = HandlerServices(bridge_key=self._bridge_key, sandbox=self._sandbox)
        # Background processes die with the daemon, even on a forced exit.
        resources.push_async_callback(_close_shielded, services.aclose)
        if self._settings.bridge.enabled:
            self._loop = BridgeLoop(
                self._settings,
                api,
                self._registry,
                self.stats,
                outbox,
                services=services,
                liveness=self.liveness,
                bridge_key=self._bridge_key,
            )
        if self._settings.jobs.enabled:
            # Imported only here: a daemon without [jobs] never loads the jobs package (about
            # 0.9 MB of resident memory, the agents' discovery and execution among it).
            from runner_daemon.jobs.loop import JobsLoop

            self._jobs = JobsLoop(
                self._settings,
                api,
                outbox,
                stats=self.job_stats,
                liveness=self.jobs_liveness,
                sandbox=self._sandbox,
                bridge_key=self._bridge_key,
            )
        return api

    async def _start_health(self, group: TaskGroup) -> bool:
        # Imported here: prometheus-client costs 1.3 MB of RSS, spent only with a listener.
        from runner_daemon.service.health import HealthServer
        from runner_daemon.service.metrics import metrics_registry

        listen = self._settings.health.listen
        assert listen is not None
        try:
            self.health_port = await group.start(HealthServer(self, metrics_registry(self)).serve, listen)
        except OSError as exc:
            log.error("cannot serve the health listener", listen=listen, error=exc.strerror or str(exc))
            return False
        return True

    async def _startup(self, api: RunnerApi) -> bool:
        """The first heartbeat of each runner (it declares the capability) before any poll.

        A runner that is gone already drops its capability (:meth:`_lost`); the daemon goes on
        with the other one, if there is one.
        """
        if self.lifecycle.stopping:
            return False
        outage = _Outage(self._settings.url)
        backoff = Backoff(self._settings.retry_initial_seconds, self._settings.retry_max_seconds)
        with anyio.CancelScope() as self._startup_scope:
            for runner_id, capabilities, liveness in self._runners():
                try:
                    await retrying(
                        functools.partial(api.heartbeat, runner_id, capabilities), backoff, outage.note
                    )
                except RunnerGone as exc:
                    self._lost(capabilities[0], exc)
                else:
                    liveness.contact()
            outage.ended()
            # What start-up built lives as long as the daemon: out of the collector's sight, a
            # full collection takes microseconds instead of 10-20 ms (the latency tail of
            # whichever command it lands on).
            gc.freeze()
            self.notifier.ready(self._status_line())
            return True
        return False

    def _runners(self) -> list[tuple[str, list[str], Liveness]]:
        runners = []
        if self._loop is not None:
            runners.append((self._runner_id, CAPABILITIES, self.liveness))
        if self._jobs is not None:
            runners.append((self._jobs.runner_id, JOBS_CAPABILITIES, self.jobs_liveness))
        return runners

    def _lost(self, capability: str, error: Fatal) -> None:
        """One runner is gone: its capability stops; the daemon ends only when none is left."""
        if capability == BRIDGE_CAPABILITY:
            self._loop = None
        else:
            self._jobs = None
        if self._loop is None and self._jobs is None:
            raise error
        self.lifecycle.lose(error)
        log.error(
            f"the {capability} runner is no longer connected to Opik; that capability stops, the "
            "other goes on. Pair it again (`runner-daemon pair"
            + (" --type endpoint" if capability != BRIDGE_CAPABILITY else "")
            + "`) and restart runner-daemon",
            error=str(error),
        )

    async def _main(self, api: RunnerApi) -> None:
        async with anyio.create_task_group() as services:
            self._services = services
            services.start_soon(self._supervise)
            self.lifecycle.advance(Phase.RUNNING)
            async with anyio.create_task_group() as capabilities:
                if self._loop is not None:
                    capabilities.start_soon(self._serve_bridge, api, self._loop)
                if self._jobs is not None:
                    capabilities.start_soon(self._serve_jobs, self._jobs)
            services.cancel_scope.cancel()
        self._services = None

    async def _serve_bridge(self, api: RunnerApi, loop: BridgeLoop) -> None:
        try:
            async with anyio.create_task_group() as beats:
                beats.start_soon(self._heartbeat_loop, api)
                async with anyio.create_task_group() as work:
                    log.info(
                        "runner connected; waiting for bridge commands",
                        runner_id=self._runner_id,
                        url=self._settings.url,
                        workspace_root=str(self._settings.workspace_root),
                        max_concurrency=self._settings.max_concurrency,
                        event_loop=eventloop.running(),
                    )
                    await loop.recover(work)
                    await loop.run(work)
                    self.lifecycle.advance(Phase.DRAINING)
                    # What was submitted before Opik took the withdrawal in is still pending:
                    # answer it now (cancelled, not run) rather than leave it to time out.
                    with anyio.move_on_after(self._settings.request_timeout_seconds):
                        await self._withdrawal.wait()
                    if self._withdrawn:
                        await loop.sweep(SWEEP_WAIT_SECONDS, work)
                    # Heartbeats go on while draining: the server must still see us alive.
                    # One grace period from the stop request, the open poll's wait included.
                    grace = self.lifecycle.drain_time_left(self._settings.shutdown_grace_seconds)
                    await loop.drain(grace, work)
                beats.cancel_scope.cancel()
        except* RunnerGone as group:
            self._lost(BRIDGE_CAPABILITY, _first_fatal(group))

    async def _serve_jobs(self, jobs: JobsLoop) -> None:
        try:
            async with anyio.create_task_group() as beats:
                beats.start_soon(jobs.heartbeats)
                beats.start_soon(jobs.keep_agents_published)
                async with anyio.create_task_group() as work:
                    log.info(
                        "endpoint runner connected; waiting for jobs",
                        runner_id=jobs.runner_id,
                        max_jobs=self._settings.jobs.max_jobs,
                        event_loop=eventloop.running(),
                    )
                    await jobs.recover(work)
                    await jobs.run(work)
                    self.lifecycle.advance(Phase.DRAINING)
                    grace = self.lifecycle.drain_time_left(self._settings.shutdown_grace_seconds)
                    await jobs.drain(grace, work)
                beats.cancel_scope.cancel()
        except* RunnerGone as group:
            self._lost(JOBS_CAPABILITY, _first_fatal(group))

    async def _withdraw_bridge(self) -> None:
        """Tell Opik this runner takes no more commands, then close the open poll soon after."""
        assert self._api is not None
        try:
            await self._api.heartbeat(self._runner_id, DRAINING_CAPABILITIES)
        except ApiError as exc:
            log.info("could not withdraw the bridge capability; keeping the open poll", error=str(exc))
            return
        finally:
            self._withdrawal.set()
        self._withdrawn = True
        await anyio.sleep(RACE_WAIT_SECONDS)
        self.loop.stop_polling()

    async def _shutdown(self, api: RunnerApi) -> None:
        if not self._settings.disconnect_on_exit:
            return
        try:
            await api.disconnect(self._runner_id)
        except ApiError as exc:
            log.warning("could not disconnect the runner on exit", error=str(exc))
        else:
            log.info("runner disconnected from Opik (disconnect_on_exit = true)")

    async def _heartbeat_loop(self, api: RunnerApi) -> None:
        """Every interval, whatever happened to the last one; a Fatal answer is raised."""
        failures = 0
        while True:
            await anyio.sleep(self._settings.heartbeat_interval_seconds)
            capabilities = DRAINING_CAPABILITIES if self.lifecycle.stopping else CAPABILITIES
            try:
                await api.heartbeat(self._runner_id, capabilities)
            except Fatal:
                raise
            except ApiError as exc:
                failures += 1
                self.stats.note_error(exc)
                level = log.warning if failures == 1 else log.debug
                level("heartbeat failed", error=str(exc), failures=failures)
            else:
                if failures:
                    log.info("heartbeat restored", after_failures=failures)
                failures = 0
                self.liveness.contact()

    async def _supervise(self) -> None:
        """Keep STATUS= current and ping the watchdog while the daemon itself is fine.

        The pings come from the daemon's own event loop, and only while the poll loop moves
        (or waits, by design, for a free slot or its back-off): a blocked event loop, or a loop
        that stopped polling, lets systemd's watchdog act. An outage does not: a restart cannot
        bring Opik back, so it shows in STATUS= ("server not answering") and in /metrics.
        """
        interval = min(2.0, self.notifier.watchdog_interval or 2.0)
        last_status = ""
        while True:
            status = self._status_line()
            if status != last_status:
                self.notifier.status(status)
                last_status = status
            if self.notifier.watchdog_interval and self.healthy():
                self.notifier.watchdog()
            await anyio.sleep(interval)

    def _failed(self, error: Fatal) -> None:
        """The server will not serve this runner again: say what to do."""
        if not self.lifecycle.fail(error):
            return
        if isinstance(error, RunnerGone):
            log.error(
                f"runner {self._runner_id} is no longer connected to Opik; pair again with "
                "`runner-daemon pair --project-id <id>` (against the dev server: POST /dev/runners) "
                "and restart runner-daemon with the new runner id",
                error=str(error),
                exit_status=int(ExitStatus.DISCONNECTED),
            )
        else:
            log.error(
                "Opik refused our credentials; check OPIK_API_KEY and OPIK_WORKSPACE",
                error=str(error),
                exit_status=int(ExitStatus.UNAUTHORIZED),
            )
        self.notifier.stopping(self._status_line())

    # --- health ---------------------------------------------------------------------------

    def contact_fresh(self) -> bool:
        """The server answered recently: within three heartbeats and one request's time."""
        return self.seconds_since_contact() <= (
            3 * self._settings.heartbeat_interval_seconds + self._settings.request_timeout_seconds
        )

    def seconds_since_contact(self) -> float:
        """Since the server last answered a heartbeat or a poll (infinite before it ever did)."""
        return min(self.liveness.seconds_since_contact(), self.jobs_liveness.seconds_since_contact())

    def healthy(self) -> bool:
        """Alive and its loop moving (or parked for a free slot, which is healthy too)."""
        if self.state is Phase.STARTING:
            return True
        if self.state is Phase.STOPPED:
            return False
        stuck_after = self._settings.poll_timeout_seconds + LOOP_STALL_SLACK_SECONDS
        moving = [self.liveness.moving(stuck_after)] if self._loop is not None else []
        moving += [self.jobs_liveness.moving(stuck_after)] if self._jobs is not None else []
        return all(moving)

    def ready(self) -> bool:
        """Connected to the server, polling, not draining."""
        return self.state is Phase.RUNNING and not self.lifecycle.stopping and self.contact_fresh()

    def _status_line(self) -> str:
        """What is true now: the stop once asked for, and an error only until Opik answers again."""
        stats = self.stats
        reason = self.lifecycle.stop_reason
        state = f"stopping ({reason})" if reason else str(self.state)
        line = f"{state}: {stats.completed + stats.failed} commands run, {self.in_flight} in flight"
        if not self.contact_fresh():
            line += "; server not answering"
        if self._jobs is not None:
            jobs = self.job_stats
            line += f"; {jobs.completed + jobs.failed} jobs run, {self._jobs.in_flight} running"
        if stats.last_error and stats.last_error_at > (self.liveness.last_contact or 0.0):
            line += f"; last error: {stats.last_error[:120]}"
        return line
