"""The bridge loop: poll, dispatch, and the slots, the in-flight set and the drain.

One command's path, forward only: :meth:`BridgeLoop.poll` (via :mod:`runner_daemon.core.api`)
→ :meth:`BridgeLoop.dispatch` (:mod:`~runner_daemon.bridge.commands` parses it) → the
:class:`~runner_daemon.bridge.executor.Executor` (its handler) → the
:class:`~runner_daemon.bridge.reporter.Reporter` (:mod:`~runner_daemon.bridge.results`
encodes it, :mod:`runner_daemon.core.outbox` journals it, the API delivers it). Commands run
in tasks of a task group the loop is given, so nothing outlives the daemon; an error that
ends the daemon (:class:`~runner_daemon.core.errors.Fatal`) is raised out of :meth:`run`.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup

from runner_daemon.bridge.commands import MalformedCommand, parse_command
from runner_daemon.bridge.executor import Executor, elapsed_ms
from runner_daemon.bridge.handlers import HandlerRegistry
from runner_daemon.bridge.handlers.base import HandlerServices
from runner_daemon.bridge.reporter import Reporter
from runner_daemon.bridge.results import Outcome
from runner_daemon.bridge.stats import LoopStats
from runner_daemon.core.api import RunnerApi
from runner_daemon.core.claims import Claims
from runner_daemon.core.errors import ApiError, Fatal, JournalUnavailable, RateLimited
from runner_daemon.core.liveness import Liveness
from runner_daemon.core.models import BridgeCommand
from runner_daemon.core.outbox import Outbox, OwedResult
from runner_daemon.core.retry import Backoff
from runner_daemon.core.settings import Settings

# Opik answers at most 20 commands per poll, whatever we ask for.
MAX_POLL_COMMANDS = 20
# How long a poll may wait for more execution slots to free up while commands run.
POLL_GATHER_SECONDS = 0.03
# Why a command is answered without running.
LATE = "The runner is shutting down; the command was not started"
EXCESS = "The server sent more commands than this runner asked for; the command was not started"
# After the grace period, cancelled commands get this long to report before we give up.
FINAL_REPORT_SECONDS = 10.0

log = structlog.get_logger(__name__)


class BridgeLoop:
    """Poll for as many commands as there are free slots, run each in its own task."""

    def __init__(
        self,
        settings: Settings,
        api: RunnerApi,
        registry: HandlerRegistry,
        stats: LoopStats,
        outbox: Outbox,
        *,
        services: HandlerServices,
        liveness: Liveness | None = None,
        bridge_key: bytes | None = None,
    ) -> None:
        """Everything here is borrowed: the daemon opens and closes the API, outbox and services."""
        self._settings = settings
        self.outbox = outbox
        self._api = api
        self._runner_id = str(settings.runner_id)
        self._stats = stats
        self.liveness = liveness or Liveness()
        self.executor = Executor(
            registry,
            settings,
            services,
            bridge_key,
            signatures=outbox if settings.reject_replayed_signatures else None,
        )
        self.reporter = Reporter(api, settings, stats, outbox, bridge_key, frozenset(registry))
        self._limiter = anyio.CapacityLimiter(settings.max_concurrency)
        # Commands claimed from the server and not yet reported, with their cancel scopes.
        self._claims = Claims(settings.max_concurrency, self.liveness)
        self._poll_scope: anyio.CancelScope | None = None
        self._backoff_scope: anyio.CancelScope | None = None
        # The commands the last poll started, which the next poll lets report first.
        self._last_batch: list[str] = []
        self.stopping = False

    @property
    def in_flight(self) -> int:
        return len(self._claims)

    def stop_polling(self, poll_grace: float | None = None) -> None:
        """No new poll; an open poll may still answer for ``poll_grace`` seconds (None: none).

        A server may already have picked commands up for a poll it holds (Opik's cannot tell
        that a client hung up until it writes the answer): were the poll abandoned, those
        commands would get no report at all. What it returns is reported ``cancelled``.
        """
        self.stopping = True
        if self._backoff_scope is not None:
            self._backoff_scope.cancel()
        if self._poll_scope is not None:
            if poll_grace is None:
                self._poll_scope.cancel()
            else:
                deadline = anyio.current_time() + poll_grace
                self._poll_scope.deadline = min(self._poll_scope.deadline, deadline)
        self._claims.notify()

    async def run(self, work: TaskGroup) -> None:
        """Poll and dispatch until :meth:`stop_polling`; commands run in ``work``.

        A :class:`~runner_daemon.core.errors.Fatal` error (this runner is gone, or our
        credentials were refused) is raised: ``work``'s cancellation stops the commands.
        """
        backoff = Backoff(self._settings.retry_initial_seconds, self._settings.retry_max_seconds)
        while not self.stopping:
            self.liveness.tick()
            await self._claims.wait_for_free_slot(lambda: self.stopping)
            await self._wait_for_journal()
            await self._gather_slots()
            self.liveness.tick()
            items: list[Any] = []
            failure: ApiError | None = None
            with anyio.CancelScope() as self._poll_scope:
                if self.stopping:
                    break
                asked = min(self._claims.free, MAX_POLL_COMMANDS)
                try:
                    items = await self.poll(asked)
                except ApiError as exc:
                    if isinstance(exc, Fatal):
                        raise
                    failure = exc
                else:
                    backoff.reset()
            self._poll_scope = None
            # Outside the scope: whatever a poll returned is dispatched, stopping or not.
            self.dispatch(items, work, asked)
            if failure is not None:
                with anyio.CancelScope() as self._backoff_scope:  # a stop ends it at once
                    await self._poll_failed(failure, backoff)
                self._backoff_scope = None

    async def poll(self, max_commands: int) -> list[Any]:
        """Phase 1: one long poll."""
        items = await self._api.poll(self._runner_id, max_commands)
        self.liveness.contact()
        log.debug("poll answered", commands=len(items), asked=max_commands)
        return items

    def dispatch(self, items: list[Any], work: TaskGroup, asked: int | None = None) -> None:
        """Phase 2: claim each item and start its task; malformed items are answered failed.

        Items beyond the ``asked`` number (a broken or hostile server) are claimed too, since
        the server holds them as picked up, but answered ``cancelled`` without running, one
        after the other in a single task: they cost one report each, never a slot or a task.
        """
        excess: list[BridgeCommand | MalformedCommand] = []
        for index, raw in enumerate(items):
            parsed = parse_command(raw)
            if isinstance(parsed, str):
                self._stats.dropped += 1
                log.error("ignoring a poll item that cannot be answered", problem=parsed)
                continue
            if parsed.command_id in self._claims:
                log.warning("poll returned a command already in flight", command_id=parsed.command_id)
                continue
            scope = self._claims.claim(parsed.command_id)
            if self.outbox.known(parsed.command_id):
                work.start_soon(self._answer_again, parsed)
            elif asked is not None and index >= asked:
                excess.append(parsed)
            else:
                # Decided now: a command claimed before the stop still gets the grace period.
                work.start_soon(self._run_command, parsed, scope, LATE if self.stopping else None)
                self._last_batch.append(parsed.command_id)
        if excess:
            log.warning("the server sent more commands than asked for", asked=asked, sent=len(items))
            work.start_soon(self._refuse_in_turn, excess)

    async def _refuse_in_turn(self, commands: list[BridgeCommand | MalformedCommand]) -> None:
        for command in commands:
            scope = self._claims.get(command.command_id)
            assert scope is not None  # claimed in dispatch, released only by this task
            await self._run_command(command, scope, EXCESS)

    async def _run_command(
        self, command: BridgeCommand | MalformedCommand, scope: anyio.CancelScope, refusal: str | None
    ) -> None:
        start = time.monotonic()
        try:
            try:
                # Recorded before the handler runs: after a crash, "interrupted", never re-run.
                await self.outbox.started(self._runner_id, command.command_id, command.type)
            except JournalUnavailable as exc:
                outcome = Outcome.failed("internal", f"Not run: {exc}")
            else:
                outcome = await self._execute_in_slot(command, scope, start, refusal)
            await self.reporter.report(command.command_id, command.type, outcome)
        finally:
            self._release(command.command_id)

    async def _answer_again(self, command: BridgeCommand | MalformedCommand) -> None:
        """A command this runner claimed before, delivered again: answered, never re-run.

        At-least-once delivery, a proxy retrying a lost poll answer, or a hostile server: the
        result already delivered is sent again while it is kept, else ``interrupted``.
        """
        log.warning(
            "the server delivered a command this runner already ran; not running it again",
            command_id=command.command_id,
            type=command.type,
        )
        try:
            body = self.outbox.delivered_body(command.command_id)
            if body is not None:
                await self.reporter.deliver(
                    OwedResult(self._runner_id, command.command_id, command.type, body, time.time())
                )
            else:
                outcome = Outcome.failed(
                    "interrupted", "This runner already ran this command; it is not run a second time"
                )
                await self.reporter.report(command.command_id, command.type, outcome)
        finally:
            self._release(command.command_id)

    async def _execute_in_slot(
        self,
        command: BridgeCommand | MalformedCommand,
        scope: anyio.CancelScope,
        start: float,
        refusal: str | None,
    ) -> Outcome:
        """Phase 3: run the handler in an execution slot; a shutdown cancel becomes a result.

        With a ``refusal`` (the command arrived after the stop began, or beyond what was
        asked for) it is reported cancelled without running.
        """
        if isinstance(command, MalformedCommand):
            return Outcome.failed("invalid_args", f"Malformed command from server: {command.problem}")
        if refusal is not None:
            return Outcome.failed("cancelled", refusal)
        outcome: Outcome | None = None
        with scope:
            async with self._limiter:
                log.debug("command started", command_id=command.command_id, type=command.type)
                outcome = await self.executor.execute(command)
        if outcome is None:
            return Outcome.failed(
                "cancelled", "The runner shut down before the command finished", elapsed_ms(start)
            )
        return outcome

    async def recover(self, work: TaskGroup) -> None:
        """Deliver what a previous run still owed, in slots, before the first poll."""
        entries = await self.reporter.owed_from_before()
        if entries:
            log.info("delivering results owed from before the restart", results=len(entries))
        self._claims.deliver_owed(entries, functools.partial(self.reporter.deliver, recovered=True), work)

    def _release(self, command_id: str) -> None:
        self._claims.release(command_id)

    async def _gather_slots(self) -> None:
        """Before the next poll, let the last poll's commands report, for a short while at most.

        A poll sent while the commands it just returned still run goes ahead of their reports,
        in this loop and in the server: at a steady rate that was the largest part of a
        command's latency left to us. So the next poll waits until half of what the last one
        returned has been reported, and under load until half the slots are free (polling the
        moment one slot frees makes one request per command under a burst; a profile of a
        burst: 2.3 commands a poll before, about 5 after). Never longer than
        :data:`POLL_GATHER_SECONDS`, and with nothing in flight not at all, so an idle runner
        answers a new command without delay.
        """
        wanted = max(1, self._settings.max_concurrency // 2)
        batch, self._last_batch = self._last_batch, []
        awaited = (len(batch) + 1) // 2

        def waiting() -> bool:
            if self.stopping or not len(self._claims):
                return False
            reported = sum(1 for command_id in batch if command_id not in self._claims)
            return reported < awaited or self._claims.free < wanted

        with anyio.move_on_after(POLL_GATHER_SECONDS):
            while waiting():
                await self._claims.changed.wait()

    async def _wait_for_journal(self) -> None:
        """Back-pressure: while the outbox cannot be written, take no command (deliveries go on)."""
        if self.outbox.failure is None:
            return
        log.info("polling paused until the outbox journal can be written")
        backoff = Backoff(self._settings.retry_initial_seconds, self._settings.retry_max_seconds)
        with anyio.CancelScope() as self._backoff_scope:  # a stop ends it at once
            while not self.stopping and not await self.outbox.retry():
                self.liveness.tick()
                await anyio.sleep(backoff.next_delay())
        self._backoff_scope = None

    async def wait_idle(self) -> None:
        await self._claims.wait_idle()

    async def _poll_failed(self, exc: ApiError, backoff: Backoff) -> None:
        self._stats.poll_errors += 1
        self._stats.note_error(exc)
        # A 4xx other than the fatal ones will not fix itself soon: back off as for a 5xx.
        delay = backoff.delay_after(exc)
        # The first failure of an outage is a warning; the rest of it would only be noise.
        level = log.warning if backoff.attempts <= 1 or isinstance(exc, RateLimited) else log.debug
        level("poll failed; retrying", error=str(exc), retry_in=round(delay, 2))
        await anyio.sleep(delay)

    async def sweep(self, wait: float, work: TaskGroup) -> None:
        """Collect commands still pending once the server takes no more: answered, not run.

        Only after Opik confirmed it refuses new submissions: a poll then answers at once with
        what is pending, and holding it longer cannot bring more, so a short wait is safe.
        """
        while True:
            try:
                asked = min(max(1, self._claims.free), MAX_POLL_COMMANDS)
                items = await self._api.poll(self._runner_id, asked, wait=wait)
            except ApiError:
                return  # nothing came within the wait (or the server is gone): nothing pending
            self.dispatch(items, work)
            if not items:
                return

    async def drain(self, grace: float, work: TaskGroup) -> int:
        """Let in-flight commands finish, then cancel and report the rest; returns unreported."""
        return await self._claims.drain(grace, FINAL_REPORT_SECONDS, work, "commands")
