"""The bridge loop's phases: poll, dispatch, execute, report.

Each phase is a small named method with one job. :class:`Executor` and :class:`Reporter`
know nothing of polling and can be tested alone; :class:`BridgeLoop` owns the slots, the
in-flight set and the drain. Commands run in their own tasks inside a task group the loop
is given, so nothing outlives the daemon.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup
from pydantic import ValidationError

from runner_daemon.bridge.handlers import HandlerRegistry
from runner_daemon.bridge.handlers.base import HandlerContext, HandlerServices
from runner_daemon.bridge.outcome import (
    MalformedCommand,
    Outcome,
    clamp_timeout,
    encode_report,
    outcome_of,
    parse_command,
)
from runner_daemon.bridge.signing import HMAC_FIELD, verify_command
from runner_daemon.bridge.workspace import Workspace
from runner_daemon.core.api import RunnerApi
from runner_daemon.core.errors import (
    AlreadyReported,
    ApiError,
    CommandFailed,
    JournalUnavailable,
    RateLimited,
    RunnerGone,
    Unauthorized,
    describe_validation_error,
)
from runner_daemon.core.models import BridgeCommand
from runner_daemon.core.outbox import Outbox, OwedResult, Recovered, signature_digest
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


def _elapsed_ms(start: float) -> int:
    return int((time.monotonic() - start) * 1000)


# Upper bounds (seconds) of the command-duration histogram's buckets.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass
class LoopStats:
    """The daemon's counters: logs, STATUS=, /metrics and tests all read these."""

    completed: int = 0
    failed: int = 0
    already_reported: int = 0
    dropped: int = 0
    report_retries: int = 0
    poll_errors: int = 0
    last_error: str | None = None
    last_error_at: float = 0.0  # monotonic
    by_code: dict[str, int] = field(default_factory=dict)
    # (command type, status) -> count; durations per command type as histogram buckets.
    outcomes: dict[tuple[str, str], int] = field(default_factory=dict)
    duration_buckets: dict[str, list[int]] = field(default_factory=dict)
    duration_sums: dict[str, float] = field(default_factory=dict)

    def note_error(self, exc: ApiError) -> None:
        self.last_error = str(exc)
        self.last_error_at = time.monotonic()

    def record(self, command_type: str, outcome: Outcome) -> None:
        if outcome.status == "completed":
            self.completed += 1
        else:
            self.failed += 1
            code = outcome.error_code or "unknown"
            self.by_code[code] = self.by_code.get(code, 0) + 1
        key = (command_type, outcome.status)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        if outcome.duration_ms is not None:
            seconds = outcome.duration_ms / 1000
            buckets = self.duration_buckets.setdefault(command_type, [0] * (len(DURATION_BUCKETS) + 1))
            index = next(
                (i for i, bound in enumerate(DURATION_BUCKETS) if seconds <= bound), len(DURATION_BUCKETS)
            )
            buckets[index] += 1
            self.duration_sums[command_type] = self.duration_sums.get(command_type, 0.0) + seconds


class Executor:
    """Runs one command through its handler under its time limit; never raises."""

    def __init__(
        self,
        registry: HandlerRegistry,
        settings: Settings,
        services: HandlerServices,
        bridge_key: bytes | None = None,
        *,
        signatures: Outbox | None = None,
    ) -> None:
        """``signatures``: where accepted signatures are remembered (``reject_replayed_signatures``)."""
        if settings.reject_replayed_signatures and bridge_key is not None and signatures is None:
            raise ValueError("reject_replayed_signatures needs the outbox to remember signatures")
        self._registry = registry
        self._settings = settings
        self._services = services
        self._signatures = signatures
        self._bridge_key = bridge_key
        self._workspace = Workspace(settings.workspace_root, settings.deny_paths, settings.deny_write_paths)

    async def execute(self, command: BridgeCommand) -> Outcome:
        # Authenticity first: an unsigned or tampered command touches nothing.
        if self._bridge_key is not None and not verify_command(self._bridge_key, command.type, command.args):
            log.warning("rejected a command whose signature does not verify", command_id=command.command_id)
            return Outcome.failed("auth_failed", "Invalid command HMAC")
        if self._signatures is not None and self._bridge_key is not None:
            refused = await self._claim_signature(self._signatures, command)
            if refused is not None:
                return refused
        raw_args = {key: value for key, value in command.args.items() if key != HMAC_FIELD}
        handler = self._registry.get(command.type)
        if handler is None:
            # No duration, as Opik's runner: nothing ran.
            return Outcome.failed("unknown_type", f"Unknown command type: {command.type}")
        if handler.mutating and self._settings.read_only:
            return Outcome.failed(
                "read_only", f"{command.type} is disabled: the runner is read-only (read_only = true)"
            )
        try:
            args = handler.parse(raw_args)
        except ValidationError as exc:
            return Outcome.failed("invalid_args", describe_validation_error(exc))
        limit = clamp_timeout(command.timeout_seconds)
        ctx = HandlerContext(self._workspace, self._settings, self._services)
        start = time.monotonic()
        try:
            with anyio.move_on_after(limit) as deadline:
                result = await handler.run(args, ctx)
        except CommandFailed as exc:
            return Outcome.failed(exc.code, exc.message, _elapsed_ms(start))
        except Exception:
            log.exception("handler raised", command_id=command.command_id, type=command.type)
            return Outcome.failed("internal", "Internal error", _elapsed_ms(start))
        finally:
            ctx.stop.set()  # tells an abandoned worker thread to give up
        if deadline.cancelled_caught:
            return Outcome.failed("timeout", f"Command timed out after {limit:g}s", _elapsed_ms(start))
        return Outcome.completed(result, _elapsed_ms(start))

    @staticmethod
    async def _claim_signature(signatures: Outbox, command: BridgeCommand) -> Outcome | None:
        """Refuse a signature accepted before: a verbatim replay by whoever holds the API key."""
        digest = signature_digest(str(command.args.get(HMAC_FIELD)))
        try:
            fresh = await signatures.claim_signature(digest)
        except JournalUnavailable as exc:
            return Outcome.failed("internal", f"Not run: {exc}")
        if fresh:
            return None
        log.warning("refused a replayed command signature", command_id=command.command_id, type=command.type)
        return Outcome.failed(
            "auth_failed",
            "Replayed command: this runner already accepted a command with this signature "
            "(reject_replayed_signatures = true)",
        )


class Reporter:
    """Delivers one result: retries 5xx, network errors and 429 until accepted or too old."""

    def __init__(
        self,
        api: RunnerApi,
        settings: Settings,
        stats: LoopStats,
        on_fatal: Callable[[ApiError], None],
        outbox: Outbox,
        bridge_key: bytes | None = None,
        known_types: frozenset[str] = frozenset(),
    ) -> None:
        self._outbox = outbox
        self._api = api
        self._runner_id = str(settings.runner_id)
        self._settings = settings
        self._stats = stats
        self._on_fatal = on_fatal
        self._bridge_key = bridge_key
        self._known_types = known_types

    async def report(self, command_id: str, command_type: str, outcome: Outcome) -> bool:
        """Journal the result, then deliver it; True once the server holds it (409 counts)."""
        entry = OwedResult(
            self._runner_id, command_id, command_type, encode_report(outcome, self._bridge_key), time.time()
        )
        await self._outbox.result(entry)
        return await self.deliver(entry, outcome)

    async def deliver(
        self, entry: OwedResult, outcome: Outcome | None = None, *, recovered: bool = False
    ) -> bool:
        """Send until accepted or older than ``result_ttl_seconds``; True once the server holds it.

        The result leaves the outbox only on a 2xx, a 409, a 404 or its time to live: a
        ``recovered`` result (owed by a previous run) that meets a 404 is dropped with a
        warning (its command, or that old runner, is gone; the live runner may be fine); a
        live one ends the daemon (the runner was disconnected). A 401/403 ends the daemon
        too, but the result stays owed and is sent again on the next start. Anything else
        (5xx, network, 429, other 4xx, an unreadable answer) is retried with backoff.
        """
        outcome = outcome or outcome_of(entry.body)
        bound = log.bind(command_id=entry.command_id, type=entry.command_type, status=outcome.status)
        if outcome.duration_ms is not None:
            bound = bound.bind(duration_ms=outcome.duration_ms)
        if outcome.error is not None:
            bound = bound.bind(error_code=outcome.error.code)
        if recovered:
            bound = bound.bind(recovered=True)
        try:
            delivered = await self._send(entry, bound, recovered)
        except Unauthorized as exc:
            bound.error("result kept in the outbox: the server refused our credentials", error=str(exc))
            self._on_fatal(exc)
            return False
        if delivered:
            self._stats.record(self._metric_type(entry.command_type), outcome)
        else:
            self._stats.dropped += 1
        await self._outbox.done(entry.command_id)
        return delivered

    async def _send(self, entry: OwedResult, bound: Any, recovered: bool) -> bool:
        backoff = Backoff(self._settings.retry_initial_seconds, self._settings.retry_max_seconds)
        remaining = entry.created + self._settings.result_ttl_seconds - time.time()
        with anyio.move_on_after(max(remaining, 0.0)):
            while True:
                try:
                    await self._api.report(
                        entry.runner_id, entry.command_id, entry.body, conflict=AlreadyReported
                    )
                except AlreadyReported:
                    self._stats.already_reported += 1
                    bound.info("command already reported (or timed out by the server)")
                    return True
                except RunnerGone as exc:
                    if recovered:
                        bound.warning("dropping a result owed from before: the server no longer knows it")
                        return False
                    self._on_fatal(exc)
                    bound.warning("result not delivered: the runner was disconnected")
                    return False
                except Unauthorized:
                    raise
                except RateLimited as exc:
                    delay = exc.retry_after
                    self._note_retry(bound, exc, delay, backoff.attempts)
                except ApiError as exc:
                    delay = backoff.next_delay()
                    self._note_retry(bound, exc, delay, backoff.attempts)
                else:
                    bound.info("command finished")
                    return True
                await anyio.sleep(delay)
        bound.error("result dropped: still undelivered", after_seconds=self._settings.result_ttl_seconds)
        return False

    def _note_retry(self, bound: Any, exc: ApiError, delay: float, attempt: int) -> None:
        self._stats.report_retries += 1
        self._stats.note_error(exc)
        bound.warning("report failed; retrying", error=str(exc), retry_in=round(delay, 2), attempt=attempt)

    def _metric_type(self, command_type: str) -> str:
        # The server chooses the type: only known ones become metric labels (bounded cardinality).
        return command_type if command_type in self._known_types else "other"


class BridgeLoop:
    """Poll for as many commands as there are free slots, run each in its own task."""

    def __init__(
        self,
        settings: Settings,
        api: RunnerApi,
        registry: HandlerRegistry,
        stats: LoopStats,
        on_fatal: Callable[[ApiError], None],
        on_contact: Callable[[], None],
        outbox: Outbox,
        services: HandlerServices | None = None,
        bridge_key: bytes | None = None,
    ) -> None:
        self._settings = settings
        self.outbox = outbox
        self._bridge_key = bridge_key
        self._api = api
        self._runner_id = str(settings.runner_id)
        self._stats = stats
        self._on_fatal = on_fatal
        self._on_contact = on_contact
        self.services = services or HandlerServices(bridge_key=bridge_key)
        self.executor = Executor(
            registry,
            settings,
            self.services,
            bridge_key,
            signatures=outbox if settings.reject_replayed_signatures else None,
        )
        self.reporter = Reporter(api, settings, stats, on_fatal, outbox, bridge_key, frozenset(registry))
        self._limiter = anyio.CapacityLimiter(settings.max_concurrency)
        # Commands claimed from the server and not yet reported, with their cancel scopes.
        self._claimed: dict[str, anyio.CancelScope] = {}
        self._changed = anyio.Event()
        self._poll_scope: anyio.CancelScope | None = None
        self._backoff_scope: anyio.CancelScope | None = None
        self.stopping = False
        # Liveness, for the watchdog and /healthz: when the loop last moved, and whether it is
        # legitimately parked waiting for a free execution slot.
        self.last_tick = time.monotonic()
        self.waiting_for_slot = False

    @property
    def in_flight(self) -> int:
        return len(self._claimed)

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
        self._notify()

    def cancel_in_flight(self) -> None:
        for scope in self._claimed.values():
            scope.cancel()

    async def run(self, work: TaskGroup) -> None:
        """Poll and dispatch until :meth:`stop_polling`; commands run in ``work``."""
        backoff = Backoff(self._settings.retry_initial_seconds, self._settings.retry_max_seconds)
        while not self.stopping:
            self.last_tick = time.monotonic()
            await self._wait_for_free_slot()
            await self._wait_for_journal()
            await self._gather_slots()
            self.last_tick = time.monotonic()
            items: list[Any] = []
            failure: ApiError | None = None
            with anyio.CancelScope() as self._poll_scope:
                if self.stopping:
                    break
                asked = min(self._free_slots(), MAX_POLL_COMMANDS)
                try:
                    items = await self.poll(asked)
                except (RunnerGone, Unauthorized) as exc:
                    self._on_fatal(exc)
                    return
                except ApiError as exc:
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
        self._on_contact()
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
            if parsed.command_id in self._claimed:
                log.warning("poll returned a command already in flight", command_id=parsed.command_id)
                continue
            scope = anyio.CancelScope()
            self._claimed[parsed.command_id] = scope
            if self.outbox.known(parsed.command_id):
                work.start_soon(self._answer_again, parsed)
            elif asked is not None and index >= asked:
                excess.append(parsed)
            else:
                # Decided now: a command claimed before the stop still gets the grace period.
                work.start_soon(self._run_command, parsed, scope, LATE if self.stopping else None)
        if excess:
            log.warning("the server sent more commands than asked for", asked=asked, sent=len(items))
            work.start_soon(self._refuse_in_turn, excess)

    async def _refuse_in_turn(self, commands: list[BridgeCommand | MalformedCommand]) -> None:
        for command in commands:
            await self._run_command(command, self._claimed[command.command_id], EXCESS)

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
                "cancelled", "The runner shut down before the command finished", _elapsed_ms(start)
            )
        return outcome

    async def recover(self, recovered: Recovered, work: TaskGroup) -> None:
        """Deliver what a previous run still owed, in slots, before the first poll.

        Commands that were running when it stopped cannot be re-run blindly (they may have
        had side effects): each is reported ``interrupted``.
        """
        entries = list(recovered.owed)
        for lost in recovered.interrupted:
            outcome = Outcome.failed("interrupted", "The daemon restarted while the command ran")
            entry = OwedResult(
                lost.runner_id,
                lost.command_id,
                lost.command_type,
                encode_report(outcome, self._bridge_key),
                time.time(),
            )
            await self.outbox.result(entry)
            entries.append(entry)
        if entries:
            log.info("delivering results owed from before the restart", results=len(entries))
        for entry in entries:
            if entry.command_id in self._claimed:
                continue
            self._claimed[entry.command_id] = anyio.CancelScope()
            work.start_soon(self._redeliver, entry)

    async def _redeliver(self, entry: OwedResult) -> None:
        try:
            await self.reporter.deliver(entry, recovered=True)
        finally:
            self._release(entry.command_id)

    def _release(self, command_id: str) -> None:
        """The command's result is delivered (or given up): its slot is free again."""
        del self._claimed[command_id]
        self._notify()

    def _free_slots(self) -> int:
        return self._settings.max_concurrency - len(self._claimed)

    def _notify(self) -> None:
        """Wake every waiter; each waits on the event current when it started waiting."""
        self._changed.set()
        self._changed = anyio.Event()

    async def _wait_for_free_slot(self) -> None:
        self.waiting_for_slot = True
        try:
            while self._free_slots() <= 0 and not self.stopping:
                await self._changed.wait()
        finally:
            self.waiting_for_slot = False

    async def _gather_slots(self) -> None:
        """Under load, let a few more slots free up before polling, for a short while at most.

        Polling the moment one slot frees makes one request per command under a burst;
        waiting up to :data:`POLL_GATHER_SECONDS` for half the slots makes one for several
        (a profile of a burst: 2.3 commands a poll before, about 5 after). With nothing in
        flight it returns at once, so an idle runner answers a new command without delay.
        """
        wanted = max(1, self._settings.max_concurrency // 2)
        with anyio.move_on_after(POLL_GATHER_SECONDS):
            while self._claimed and self._free_slots() < wanted and not self.stopping:
                await self._changed.wait()

    async def _wait_for_journal(self) -> None:
        """Back-pressure: while the outbox cannot be written, take no command (deliveries go on)."""
        if self.outbox.failure is None:
            return
        log.info("polling paused until the outbox journal can be written")
        backoff = Backoff(self._settings.retry_initial_seconds, self._settings.retry_max_seconds)
        with anyio.CancelScope() as self._backoff_scope:  # a stop ends it at once
            while not self.stopping and not await self.outbox.retry():
                self.last_tick = time.monotonic()
                await anyio.sleep(backoff.next_delay())
        self._backoff_scope = None

    async def wait_idle(self) -> None:
        while self._claimed:
            await self._changed.wait()

    async def _poll_failed(self, exc: ApiError, backoff: Backoff) -> None:
        self._stats.poll_errors += 1
        self._stats.note_error(exc)
        # A 4xx other than the fatal ones will not fix itself soon: back off as for a 5xx.
        delay = exc.retry_after if isinstance(exc, RateLimited) else backoff.next_delay()
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
                asked = min(max(1, self._free_slots()), MAX_POLL_COMMANDS)
                items = await self._api.poll(self._runner_id, asked, wait=wait)
            except ApiError:
                return  # nothing came within the wait (or the server is gone): nothing pending
            self.dispatch(items, work)
            if not items:
                return

    async def drain(self, grace: float, work: TaskGroup) -> int:
        """Let in-flight commands finish, then cancel and report the rest; returns unreported."""
        if self._claimed:
            log.info("draining in-flight commands", in_flight=len(self._claimed), grace_seconds=grace)
        with anyio.move_on_after(grace):
            await self.wait_idle()
        if self._claimed:
            log.warning("grace period over; cancelling commands", in_flight=len(self._claimed))
            self.cancel_in_flight()
        with anyio.move_on_after(FINAL_REPORT_SECONDS):
            await self.wait_idle()
        unreported = len(self._claimed)
        if unreported:
            log.error("exiting with results not delivered", commands=sorted(self._claimed))
            work.cancel_scope.cancel()
        return unreported
