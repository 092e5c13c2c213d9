"""What a loop has claimed from Opik and not yet reported: its slots, and its drain.

Both loops (bridge commands, jobs) hold the same bookkeeping: each claimed id with the
cancel scope of its work, a wake-up whenever one is released, a wait for a free slot, and
the drain at a stop (finish within the grace period, then cancel, then a last short wait
for the reports).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator

import anyio
import structlog
from anyio.abc import TaskGroup

from runner_daemon.core.liveness import Liveness
from runner_daemon.core.outbox import OwedResult

log = structlog.get_logger(__name__)

Deliver = Callable[[OwedResult], Awaitable[object]]


class Claims:
    """Claimed ids and their cancel scopes, bounded by ``capacity`` slots."""

    def __init__(self, capacity: int, liveness: Liveness) -> None:
        self.capacity = capacity
        self._liveness = liveness
        self._scopes: dict[str, anyio.CancelScope] = {}
        self.changed = anyio.Event()  # replaced on every change: wait on the one current now

    def __len__(self) -> int:
        return len(self._scopes)

    def __contains__(self, claim_id: object) -> bool:
        return claim_id in self._scopes

    def __iter__(self) -> Iterator[str]:
        return iter(self._scopes)

    def get(self, claim_id: str) -> anyio.CancelScope | None:
        return self._scopes.get(claim_id)

    def claim(self, claim_id: str) -> anyio.CancelScope:
        scope = self._scopes[claim_id] = anyio.CancelScope()
        return scope

    def release(self, claim_id: str) -> None:
        """Its result is delivered (or given up): its slot is free again."""
        del self._scopes[claim_id]
        self.notify()

    @property
    def free(self) -> int:
        return self.capacity - len(self._scopes)

    def notify(self) -> None:
        """Wake every waiter; each waits on the event current when it started waiting."""
        self.changed.set()
        self.changed = anyio.Event()

    def cancel_all(self) -> None:
        for scope in self._scopes.values():
            scope.cancel()

    def deliver_owed(
        self,
        entries: Iterable[OwedResult],
        deliver: Callable[[OwedResult], Awaitable[object]],
        work: TaskGroup,
    ) -> None:
        """What a previous run still owed, each in a slot of its own, before the first poll."""
        for entry in entries:
            if entry.command_id in self:
                continue
            self.claim(entry.command_id)
            work.start_soon(self._deliver_owed, entry, deliver)

    async def _deliver_owed(
        self, entry: OwedResult, deliver: Callable[[OwedResult], Awaitable[object]]
    ) -> None:
        try:
            await deliver(entry)
        finally:
            self.release(entry.command_id)

    async def wait_for_free_slot(self, stopping: Callable[[], bool]) -> None:
        """Parked, which health counts as moving, until a slot frees or a stop begins."""
        self._liveness.parked = True
        try:
            while self.free <= 0 and not stopping():
                await self.changed.wait()
        finally:
            self._liveness.parked = False

    async def wait_idle(self) -> None:
        while self._scopes:
            await self.changed.wait()

    async def drain(self, grace: float, final_seconds: float, work: TaskGroup, what: str) -> int:
        """Let the work finish within ``grace``, then cancel it and give its reports
        ``final_seconds``; returns how many were left unreported (``work`` is then cancelled)."""
        if self._scopes:
            log.info(f"draining in-flight {what}", in_flight=len(self._scopes), grace_seconds=grace)
        with anyio.move_on_after(grace):
            await self.wait_idle()
        if self._scopes:
            log.warning(f"grace period over; cancelling {what}", in_flight=len(self._scopes))
            self.cancel_all()
        with anyio.move_on_after(final_seconds):
            await self.wait_idle()
        unreported = len(self._scopes)
        if unreported:
            log.error(f"exiting with {what} not reported", ids=sorted(self._scopes))
            work.cancel_scope.cancel()
        return unreported
