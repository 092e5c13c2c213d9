"""A job's output as Opik's UI shows it: one entry per line, in order, in small batches.

:meth:`LogShipper.pump` reads a child's pipe line by line: bytes decoded as UTF-8 (bad
bytes replaced), the newline (and a ``\\r`` before it) stripped, a line longer than
:data:`LINE_CHARS` characters split into several entries, blank lines dropped (Opik
refuses a batch holding one). A sender task posts what was read in batches of at most
``max_batch`` entries (and about :data:`BATCH_CHARS` characters), within ``batch_seconds``
of the oldest line being read, one batch at a time, so the UI sees lines in the order they
were read. A failed post is retried with a backoff (``Retry-After`` on a 429); one the
server refuses as it stands (400, 409, 422) is dropped with a warning; a
:class:`~runner_daemon.core.errors.Fatal` error ends the shipper and propagates.

What waits to be sent is bounded (``max_lines`` lines, :data:`MAX_UNSENT_CHARS`
characters): past it the oldest waiting lines are dropped, and an entry in their place
says how many (``[runner-daemon] N log lines dropped``). :meth:`LogShipper.flush` sends
everything left, so a job's last line reaches Opik before its result.
"""

from __future__ import annotations

import codecs
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType

import anyio
import anyio.abc
import structlog

from runner_daemon.core.errors import ApiError, Conflict, RequestRejected
from runner_daemon.core.models import LogEntry
from runner_daemon.core.retry import Backoff, retrying

# A longer line becomes several entries (a minified JSON dump, a progress bar without \n).
LINE_CHARS = 16 * 1024
# A batch holds at most about this many characters of text (and at least one entry).
BATCH_CHARS = 1024 * 1024
# What waits to be sent is bounded in characters too: max_lines long lines are a lot.
MAX_UNSENT_CHARS = 16 * 1024 * 1024
DROPPED_TEXT = "[runner-daemon] {count} log lines dropped"
DROPPED_STREAM = "stderr"

Send = Callable[[list[LogEntry]], Awaitable[None]]

log = structlog.get_logger(__name__)


class LogShipper:
    """One job's log: lines in, batches out. Use as ``async with LogShipper(...) as logs``.

    The sender runs inside the ``async with`` block; leaving it stops the sender, and what
    was not sent by then is dropped (with a warning): call :meth:`flush` first.
    """

    def __init__(
        self,
        send: Send,
        *,
        max_lines: int,
        batch_seconds: float = 0.5,
        max_batch: int = 1000,
        backoff: Backoff | None = None,
    ) -> None:
        if max_lines < 1 or max_batch < 1 or batch_seconds < 0:
            raise ValueError("a log shipper needs max_lines >= 1, max_batch >= 1, batch_seconds >= 0")
        self._send = send
        self._max_lines = max_lines
        self._batch_seconds = batch_seconds
        self._max_batch = max_batch
        self._backoff = backoff or Backoff(0.5, 30.0)
        self._queue: deque[LogEntry] = deque()
        self._queued_chars = 0
        self._oldest: float | None = None  # when the oldest waiting line was read
        self._dropped = 0  # lines dropped just before the queue's head, not announced yet
        self._in_flight = 0
        self._flushing = False
        self._wake = anyio.Event()  # lines arrived, or a flush began
        self._progress = anyio.Event()  # a batch was sent (or given up)
        self._task_group: anyio.abc.TaskGroup | None = None

    @property
    def unsent(self) -> int:
        """Entries read but not yet sent (those being sent included)."""
        return len(self._queue) + self._in_flight + (1 if self._dropped else 0)

    async def __aenter__(self) -> LogShipper:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._run)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        assert self._task_group is not None
        if self.unsent:
            log.warning("job log lines were not sent", lines=self.unsent)
        self._task_group.cancel_scope.cancel()
        return await self._task_group.__aexit__(exc_type, exc, traceback)

    def add(self, stream: str, text: str) -> None:
        """Queue one line (already split and decoded); a blank one is dropped."""
        if not text.strip():
            return
        self._queue.append(LogEntry(stream=stream, text=text))
        self._queued_chars += len(text)
        if self._oldest is None:
            self._oldest = anyio.current_time()
        while len(self._queue) > self._max_lines or self._queued_chars > MAX_UNSENT_CHARS:
            self._queued_chars -= len(self._queue.popleft().text)
            self._dropped += 1
        self._wake.set()

    async def pump(self, stream: str, source: anyio.abc.ByteReceiveStream) -> None:
        """Read ``source`` to its end, each line an entry of ``stream``."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        async for chunk in source:
            pending = self._add_text(stream, pending + decoder.decode(chunk))
        self._add_line(stream, pending + decoder.decode(b"", final=True))

    async def flush(self, timeout: float) -> bool:
        """Send everything read so far without waiting for a batch to fill; True when all
        went out within ``timeout`` seconds (the rest stays queued, and is still being sent)."""
        self._flushing = True
        self._wake.set()
        with anyio.move_on_after(timeout):
            while self.unsent:
                await self._progress.wait()
        return not self.unsent  # what is left, the caller may wait for again; at exit it is logged

    def _add_text(self, stream: str, text: str) -> str:
        """Queue the complete lines of ``text``; the unfinished rest (shorter than a line's
        bound) is returned."""
        *lines, rest = text.split("\n")
        for line in lines:
            self._add_line(stream, line)
        while len(rest) >= LINE_CHARS:
            self.add(stream, rest[:LINE_CHARS])
            rest = rest[LINE_CHARS:]
        return rest

    def _add_line(self, stream: str, line: str) -> None:
        line = line.removesuffix("\r")
        for start in range(0, len(line), LINE_CHARS):
            self.add(stream, line[start : start + LINE_CHARS])

    async def _run(self) -> None:
        while True:
            while not (self._queue or self._dropped):
                await self._wait()
            if not self._flushing and self._oldest is not None:
                with anyio.move_on_after(self._oldest + self._batch_seconds - anyio.current_time()):
                    while not self._flushing and len(self._queue) < self._max_batch:
                        await self._wait()
            batch = self._take()
            try:
                await self._deliver(batch)
            finally:
                self._in_flight = 0
                self._progress.set()
                self._progress = anyio.Event()

    async def _wait(self) -> None:
        await self._wake.wait()
        self._wake = anyio.Event()

    def _take(self) -> list[LogEntry]:
        batch: list[LogEntry] = []
        chars = 0
        if self._dropped:
            batch.append(LogEntry(stream=DROPPED_STREAM, text=DROPPED_TEXT.format(count=self._dropped)))
            self._dropped = 0
        while self._queue and len(batch) < self._max_batch:
            size = len(self._queue[0].text)
            if batch and chars + size > BATCH_CHARS:
                break
            entry = self._queue.popleft()
            self._queued_chars -= size
            chars += size
            batch.append(entry)
        if not self._queue:
            self._oldest = None  # else the rest was read earlier still: it goes out next
        self._in_flight = len(batch)
        return batch

    async def _deliver(self, batch: list[LogEntry]) -> None:
        try:
            await retrying(
                lambda: self._send(batch), self._backoff, self._retry_later, final=(RequestRejected, Conflict)
            )
        except (RequestRejected, Conflict) as exc:
            log.warning("the server refused job log lines; dropped", lines=len(batch), error=str(exc))

    def _retry_later(self, error: ApiError, delay: float) -> None:
        log.info("sending job log lines failed; retrying", error=str(error), retry_in=round(delay, 2))
