"""Report: journal a command's result and deliver it until Opik holds it or it is too old.

Also the one path for what a previous run left owed (:meth:`Reporter.owed_from_before`):
those results go through the same :meth:`Reporter.deliver` as a fresh one.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import anyio
import structlog

from runner_daemon.bridge.results import Outcome, encode_report, outcome_of
from runner_daemon.bridge.stats import LoopStats
from runner_daemon.core.api import RunnerApi
from runner_daemon.core.errors import AlreadyReported, ApiError, JournalUnavailable, RunnerGone, Unauthorized
from runner_daemon.core.outbox import Outbox, OwedResult
from runner_daemon.core.retry import Backoff, retrying
from runner_daemon.core.settings import Settings

log = structlog.get_logger(__name__)

# A fresh result whose first send is still unanswered after this long is fsynced meanwhile.
SYNC_GRACE_SECONDS = 0.05


class Reporter:
    """Delivers results: retries 5xx, network errors and 429 until accepted or too old.

    A 401/403 or (for a live result) a 404 is raised as :class:`~runner_daemon.core.errors.Fatal`
    out of :meth:`deliver`: the daemon ends, and the task group cancels the rest.
    """

    def __init__(
        self,
        api: RunnerApi,
        settings: Settings,
        stats: LoopStats,
        outbox: Outbox,
        bridge_key: bytes | None = None,
        known_types: frozenset[str] = frozenset(),
    ) -> None:
        self._outbox = outbox
        self._api = api
        self._runner_id = str(settings.runner_id)
        self._settings = settings
        self._stats = stats
        self._bridge_key = bridge_key
        self._known_types = known_types

    def entry(
        self, command_id: str, command_type: str, outcome: Outcome, runner_id: str | None = None
    ) -> OwedResult:
        return OwedResult(
            runner_id or self._runner_id,
            command_id,
            command_type,
            encode_report(outcome, self._bridge_key),
            time.time(),
        )

    async def report(self, command_id: str, command_type: str, outcome: Outcome) -> bool:
        """Journal the result and deliver it; True once the server holds it (409 counts).

        The line is in the journal file (the page cache outlives a crashed daemon) before the
        first send, which does not wait for an fsync: see :class:`_Durability` for when it is
        fsynced. That is settled before this returns and the command's slot frees.
        """
        entry = self.entry(command_id, command_type, outcome)
        durability = _Durability(self._outbox, self._outbox.write_result(entry))
        error: Exception | None = None
        async with anyio.create_task_group() as group:
            group.start_soon(durability.run)
            try:
                delivered = await self.deliver(entry, outcome, fresh=durability)
            except Exception as exc:  # raised as itself once the fsync ended, not in a group
                error = exc
        if error is not None:
            raise error
        return delivered

    async def owed_from_before(self) -> list[OwedResult]:
        """What the previous run left: its undelivered results, and ``interrupted`` for each
        command it started and never finished (it may have had side effects: never re-run)."""
        recovered = self._outbox.recovered
        entries = [entry for entry in recovered.results if entry.kind == "command"]
        for lost in (entry for entry in recovered.interrupted if entry.kind == "command"):
            outcome = Outcome.failed("interrupted", "The daemon restarted while the command ran")
            entry = self.entry(lost.command_id, lost.command_type, outcome, lost.runner_id)
            await self._outbox.result(entry)
            entries.append(entry)
        return entries

    async def deliver(
        self,
        entry: OwedResult,
        outcome: Outcome | None = None,
        *,
        recovered: bool = False,
        fresh: _Durability | None = None,
    ) -> bool:
        """Send until accepted or older than ``result_ttl_seconds``; True once the server holds it.

        The result leaves the outbox only on a 2xx, a 409, a 404 or its time to live: a
        ``recovered`` result (owed by a previous run) that meets a 404 is dropped with a
        warning (its command, or that old runner, is gone; the live runner may be fine); a
        live one raises :class:`RunnerGone` (the runner was disconnected). A 401/403 raises
        :class:`Unauthorized`, and the result stays owed, to be sent again on the next start.
        Anything else (5xx, network, 429, other 4xx, an unreadable answer) is retried; a
        ``fresh`` result only once its journal line is on disk.
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
            delivered = await self._send(entry, bound, recovered, fresh)
        except Unauthorized as exc:
            bound.error("result kept in the outbox: the server refused our credentials", error=str(exc))
            raise
        except RunnerGone:
            # Nobody can take this result any more: it leaves the outbox before the daemon ends.
            bound.warning("result not delivered: the runner was disconnected")
            self._stats.dropped += 1
            await self._outbox.done(entry.command_id)
            raise
        if delivered:
            self._stats.record(self._metric_type(entry.command_type), outcome)
        else:
            self._stats.dropped += 1
        await self._outbox.done(entry.command_id)
        return delivered

    async def _send(
        self,
        entry: OwedResult,
        bound: Any,
        recovered: bool,
        fresh: _Durability | None,
    ) -> bool:
        backoff = Backoff(self._settings.retry_initial_seconds, self._settings.retry_max_seconds)

        async def send() -> None:
            if fresh is not None:
                await fresh.before_send()
            delivered = False
            try:
                await self._api.report(entry.runner_id, entry.command_id, entry.body)
                delivered = True
            except AlreadyReported:
                delivered = True
                raise
            finally:
                if fresh is not None:
                    fresh.sent(delivered)

        def note_retry(exc: ApiError, delay: float) -> None:
            self._stats.report_retries += 1
            self._stats.note_error(exc)
            bound.warning(
                "report failed; retrying", error=str(exc), retry_in=round(delay, 2), attempt=backoff.attempts
            )

        remaining = entry.created + self._settings.result_ttl_seconds - time.time()
        with anyio.move_on_after(max(remaining, 0.0)):
            try:
                await retrying(
                    send,
                    backoff,
                    note_retry,
                    final=(AlreadyReported,),
                )
            except AlreadyReported:
                self._stats.already_reported += 1
                bound.info("command already reported (or timed out by the server)")
                return True
            except RunnerGone:
                if not recovered:
                    raise
                bound.warning("dropping a result owed from before: the server no longer knows it")
                return False
            bound.info("command finished")
            return True
        bound.error("result dropped: still undelivered", after_seconds=self._settings.result_ttl_seconds)
        return False

    def _metric_type(self, command_type: str) -> str:
        # The server chooses the type: only known ones become metric labels (bounded cardinality).
        return command_type if command_type in self._known_types else "other"


class _Durability:
    """When a fresh result's journal line is fsynced: only when its first send did not land.

    A result Opik accepted (or answered 409 for) on its first send needs no copy on disk, so
    the common case costs no fsync and no thread hop. The line is fsynced as soon as the first
    send fails, or once it has gone :data:`SYNC_GRACE_SECONDS` unanswered, and in either case
    before any second send. A crashed daemon loses nothing (the page cache outlives it); a
    power cut loses a result only within that grace of its completion, and only if its first
    send had not reached Opik either: Opik then times the command out.
    """

    def __init__(self, outbox: Outbox, mark: int) -> None:
        self._outbox = outbox
        self._mark = mark  # the result's line, as Outbox.write_result numbered it
        self._answered = anyio.Event()
        self._delivered = False
        self._settled = anyio.Event()

    async def run(self) -> None:
        """Fsync unless the first send delivers the result within the grace (in the reporter's group)."""
        try:
            with anyio.move_on_after(SYNC_GRACE_SECONDS):
                await self._answered.wait()
            if not self._delivered:
                with contextlib.suppress(JournalUnavailable):  # kept in memory; sent all the same
                    await self._outbox.sync(self._mark)
        finally:
            self._settled.set()

    async def before_send(self) -> None:
        """The first send goes at once; any later one (the first was answered) only once the
        line is on disk."""
        if self._answered.is_set():
            await self._settled.wait()

    def sent(self, delivered: bool) -> None:
        if not self._answered.is_set():
            self._delivered = delivered
            self._answered.set()
