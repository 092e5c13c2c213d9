"""The daemon's life: start up, run, drain, shut down.

Signals are not handled here: the CLI turns them into :meth:`Daemon.request_stop` (drain)
and :meth:`Daemon.force_stop` (exit now), and the daemon reacts to that state.
"""

from __future__ import annotations

import enum
import gc
import math
import time
from typing import Literal

import anyio
import structlog
from anyio.abc import TaskGroup

from runner_daemon.bridge.handlers import HandlerRegistry
from runner_daemon.bridge.handlers.base import HandlerServices
from runner_daemon.bridge.loop import BridgeLoop, LoopStats
from runner_daemon.core.api import RunnerApi
from runner_daemon.core.errors import ApiError, RateLimited, RunnerGone, Unauthorized
from runner_daemon.core.models import BRIDGE_CAPABILITY
from runner_daemon.core.outbox import Outbox, Recovered
from runner_daemon.core.retry import Backoff
from runner_daemon.core.settings import Settings
from runner_daemon.service.notify import Notifier

log = structlog.get_logger(__name__)

# While Opik cannot be reached, a reminder this often (the first failure is logged at once).
OUTAGE_SUMMARY_SECONDS = 300.0
# A poll loop that has not moved for its poll timeout plus this long is stuck.
LOOP_STALL_SLACK_SECONDS = 15.0

CAPABILITIES = [BRIDGE_CAPABILITY]
# Declared from a stop on: a non-empty list without "bridge" replaces the stored one, so the
# server refuses new submissions (409) and a held poll may then be closed without losing one.
DRAINING_CAPABILITIES = ["draining"]
# After that heartbeat was answered, how long the open poll may still bring a command it took
# just before (its answer left Opik before the heartbeat's did: this covers the jitter).
RACE_WAIT_SECONDS = 0.5
# How long the closing sweep's poll waits: one that finds commands pending answers at once.
SWEEP_WAIT_SECONDS = 0.5
State = Literal["starting", "running", "draining", "stopped"]


class ExitStatus(enum.IntEnum):
    """The process exit statuses; the README and the systemd unit rely on these values."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    DISCONNECTED = 69  # EX_UNAVAILABLE: the server dropped this runner; re-pair, don't restart
    PAIRING_EXPIRED = 75  # EX_TEMPFAIL: pairing expired, or Opik unreachable; try again
    UNAUTHORIZED = 77  # EX_NOPERM: the API key or workspace was refused
    CONFIG = 78  # EX_CONFIG
    # A second signal exits at once with 128 + the signal number (130 for Ctrl-C).


class Daemon:
    def __init__(
        self,
        settings: Settings,
        api: RunnerApi,
        registry: HandlerRegistry,
        outbox: Outbox,
        bridge_key: bytes | None = None,
        notifier: Notifier | None = None,
        recovered: Recovered | None = None,
        services: HandlerServices | None = None,
    ) -> None:
        if settings.runner_id is None:
            raise ValueError("the daemon needs a runner_id")
        self._settings = settings
        self._api = api
        self._runner_id = str(settings.runner_id)
        self.stats = LoopStats()
        self.loop = BridgeLoop(
            settings,
            api,
            registry,
            self.stats,
            on_fatal=self._fatal,
            on_contact=self._contact,
            outbox=outbox,
            services=services,
            bridge_key=bridge_key,
        )
        self._recovered = recovered or Recovered([], [])
        self.state: State = "starting"
        self.running = anyio.Event()  # set once the first heartbeat was answered
        self.last_contact: float | None = None
        self.fatal_error: ApiError | None = None
        self._stop_requested = False
        self._stop_reason: str | None = None  # shown in STATUS= from the stop on
        self._services: TaskGroup | None = None  # the daemon's own tasks, while it runs
        self._withdrawal = anyio.Event()  # the stop's "no more bridge commands" heartbeat ended
        self._withdrawn = False  # ... and Opik took it
        self._drain_deadline: float | None = None  # on anyio's clock, once a stop was requested
        self._forced_by: int | None = None
        self._root: anyio.CancelScope | None = None
        self._startup_scope: anyio.CancelScope | None = None
        self.notifier = notifier or Notifier(None)
        self.health_port: int | None = None  # bound port of the health listener, once serving

    # --- control, called from the CLI's signal handling ---------------------------------

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def request_stop(self, reason: str) -> None:
        """Begin a graceful stop: no new polls, in-flight commands get the grace period."""
        if self._stop_requested:
            return
        self._stop_requested = True
        grace = self._settings.shutdown_grace_seconds
        self._drain_deadline = anyio.current_time() + grace
        log.info(
            "stopping: finishing in-flight commands and the open poll",
            reason=reason,
            in_flight=self.loop.in_flight,
            grace_seconds=grace,
        )
        self._stop_reason = reason
        self.notifier.stopping(self._status_line())
        # The open poll is kept through the grace period (Opik cannot tell a client hung up on
        # a held poll, and would hand it commands no one reports), unless Opik confirms it
        # takes no more bridge commands: then it is closed after a short wait.
        self.loop.stop_polling(poll_grace=grace)
        if self._services is not None:
            self._services.start_soon(self._withdraw_bridge)
        if self._startup_scope is not None:
            self._startup_scope.cancel()

    def _capabilities(self) -> list[str]:
        return DRAINING_CAPABILITIES if self._stop_requested else CAPABILITIES

    async def _withdraw_bridge(self) -> None:
        """Tell Opik this runner takes no more commands, then close the open poll soon after."""
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

    def force_stop(self, signum: int) -> None:
        """Exit now; commands still running are abandoned (the server times them out)."""
        self._forced_by = signum
        log.warning("forced exit: abandoning in-flight commands", in_flight=self.loop.in_flight)
        if self._root is not None:
            self._root.cancel()

    # --- the life cycle -----------------------------------------------------------------

    async def run(self) -> ExitStatus | int:
        try:
            with anyio.CancelScope() as self._root:
                async with anyio.create_task_group() as outer:
                    # The health listener answers from the start: "starting" is worth probing.
                    if self._settings.health.listen and not await self._start_health(outer):
                        return ExitStatus.FAILURE
                    if await self._startup():
                        await self._main()
                        await self._shutdown()
                    outer.cancel_scope.cancel()
        finally:
            # Background processes die with the daemon, even on a forced exit; what the
            # outbox buffered is written, however the daemon ends.
            with anyio.CancelScope(shield=True):
                await self.loop.services.aclose()
                await self.loop.outbox.close()
        self.state = "stopped"
        status = self._exit_status()
        stats = self.stats
        log.info(
            "runner-daemon stopped",
            exit_status=int(status),
            reason=self._stop_reason,
            commands_run=stats.completed + stats.failed,
            results_owed=self.loop.outbox.owed,
        )
        return status

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
            self.state = "stopped"
            return False
        return True

    async def _startup(self) -> bool:
        """Send the first heartbeat (it declares the bridge capability) before any poll."""
        backoff = Backoff(self._settings.retry_initial_seconds, self._settings.retry_max_seconds)
        first_failure: float | None = None
        last_summary = 0.0
        with anyio.CancelScope() as self._startup_scope:
            while not self._stop_requested:
                try:
                    await self._api.heartbeat(self._runner_id, CAPABILITIES)
                except (RunnerGone, Unauthorized) as exc:
                    self._fatal(exc)
                    return False
                except ApiError as exc:
                    delay = exc.retry_after if isinstance(exc, RateLimited) else backoff.next_delay()
                    now = time.monotonic()
                    # One line when it starts, one every few minutes while it lasts: not one a retry.
                    if first_failure is None:
                        first_failure = last_summary = now
                        log.warning("cannot reach Opik yet; retrying", error=str(exc), url=self._settings.url)
                    elif now - last_summary >= OUTAGE_SUMMARY_SECONDS:
                        last_summary = now
                        log.warning(
                            "still cannot reach Opik; retrying",
                            error=str(exc),
                            attempts=backoff.attempts,
                            for_seconds=round(now - first_failure),
                        )
                    await anyio.sleep(delay)
                else:
                    if first_failure is not None:
                        log.info(
                            "Opik answered",
                            after_attempts=backoff.attempts,
                            after_seconds=round(time.monotonic() - first_failure, 1),
                        )
                    self._contact()
                    # What start-up built lives as long as the daemon: out of the collector's
                    # sight, a full collection takes microseconds instead of 10-20 ms (the
                    # latency tail of whichever command it lands on).
                    gc.freeze()
                    self.notifier.ready(self._status_line())
                    return True
        return False

    async def _main(self) -> None:
        async with anyio.create_task_group() as services:
            self._services = services
            services.start_soon(self._heartbeat_loop)
            services.start_soon(self._supervise)
            async with anyio.create_task_group() as work:
                self.state = "running"
                self.running.set()
                log.info(
                    "runner connected; waiting for bridge commands",
                    runner_id=self._runner_id,
                    url=self._settings.url,
                    workspace_root=str(self._settings.workspace_root),
                    max_concurrency=self._settings.max_concurrency,
                )
                await self.loop.recover(self._recovered, work)
                await self.loop.run(work)
                self.state = "draining"
                if self._stop_requested and self.fatal_error is None:
                    # What was submitted before Opik took the withdrawal in is still pending:
                    # answer it now (cancelled, not run) rather than leave it to time out.
                    with anyio.move_on_after(self._settings.request_timeout_seconds):
                        await self._withdrawal.wait()
                    if self._withdrawn:
                        await self.loop.sweep(SWEEP_WAIT_SECONDS, work)
                # Heartbeats go on while draining: the server must still see us alive.
                # One grace period from the stop request, the open poll's wait included.
                grace = self._settings.shutdown_grace_seconds
                if self._drain_deadline is not None:
                    grace = max(0.0, self._drain_deadline - anyio.current_time())
                await self.loop.drain(grace, work)
            services.cancel_scope.cancel()
        self._services = None

    async def _shutdown(self) -> None:
        if not self._settings.disconnect_on_exit or self.fatal_error is not None:
            return
        try:
            await self._api.disconnect(self._runner_id)
        except ApiError as exc:
            log.warning("could not disconnect the runner on exit", error=str(exc))
        else:
            log.info("runner disconnected from Opik (disconnect_on_exit = true)")

    async def _heartbeat_loop(self) -> None:
        failures = 0
        while True:
            await anyio.sleep(self._settings.heartbeat_interval_seconds)
            try:
                await self._api.heartbeat(self._runner_id, self._capabilities())
            except (RunnerGone, Unauthorized) as exc:
                self._fatal(exc)
                return
            except ApiError as exc:
                failures += 1
                self.stats.note_error(exc)
                level = log.warning if failures == 1 else log.debug
                level("heartbeat failed", error=str(exc), failures=failures)
            else:
                if failures:
                    log.info("heartbeat restored", after_failures=failures)
                failures = 0
                self._contact()

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

    # --- health ---------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self.loop.in_flight

    def contact_fresh(self) -> bool:
        """The server answered recently: within three heartbeats and one request's time."""
        return self.seconds_since_contact() <= (
            3 * self._settings.heartbeat_interval_seconds + self._settings.request_timeout_seconds
        )

    def seconds_since_contact(self) -> float:
        """Since the server last answered a heartbeat or a poll (infinite before it ever did)."""
        return math.inf if self.last_contact is None else time.monotonic() - self.last_contact

    def healthy(self) -> bool:
        """Alive and its loop moving (or parked for a free slot, which is healthy too)."""
        if self.state == "starting":
            return True
        if self.state == "stopped":
            return False
        stuck_after = self._settings.poll_timeout_seconds + LOOP_STALL_SLACK_SECONDS
        return self.loop.waiting_for_slot or time.monotonic() - self.loop.last_tick <= stuck_after

    def ready(self) -> bool:
        """Connected to the server, polling, not draining."""
        return self.state == "running" and not self._stop_requested and self.contact_fresh()

    def _status_line(self) -> str:
        """What is true now: the stop once asked for, and an error only until Opik answers again."""
        stats = self.stats
        state = f"stopping ({self._stop_reason})" if self._stop_reason else self.state
        line = f"{state}: {stats.completed + stats.failed} commands run, {self.loop.in_flight} in flight"
        if not self.contact_fresh():
            line += "; server not answering"
        if stats.last_error and stats.last_error_at > (self.last_contact or 0.0):
            line += f"; last error: {stats.last_error[:120]}"
        return line

    # --- reactions ------------------------------------------------------------------------

    def _contact(self) -> None:
        self.last_contact = time.monotonic()

    def _fatal(self, exc: ApiError) -> None:
        """The server will not serve this runner again: stop, and say what to do."""
        if self.fatal_error is not None:
            return
        self.fatal_error = exc
        if isinstance(exc, RunnerGone):
            log.error(
                f"runner {self._runner_id} is no longer connected to Opik; pair again with "
                "`runner-daemon pair --project-id <id>` (against the dev server: POST /dev/runners) "
                "and restart runner-daemon with the new runner id",
                error=str(exc),
                exit_status=int(ExitStatus.DISCONNECTED),
            )
        else:
            log.error(
                "Opik refused our credentials; check OPIK_API_KEY and OPIK_WORKSPACE",
                error=str(exc),
                exit_status=int(ExitStatus.UNAUTHORIZED),
            )
        self._stop_requested = True
        self._stop_reason = "Opik refused this runner" if isinstance(exc, Unauthorized) else "runner gone"
        self.notifier.stopping(self._status_line())
        self.loop.stop_polling()
        self.loop.cancel_in_flight()  # their results could not be delivered anyway
        if self._startup_scope is not None:
            self._startup_scope.cancel()

    def _exit_status(self) -> ExitStatus | int:
        if self._forced_by is not None:
            return 128 + self._forced_by
        if isinstance(self.fatal_error, RunnerGone):
            return ExitStatus.DISCONNECTED
        if isinstance(self.fatal_error, Unauthorized):
            return ExitStatus.UNAUTHORIZED
        return ExitStatus.OK
