"""The durable result outbox: an append-only journal in the state directory.

Four kinds of line, each one JSON object:

- ``started``: a command was claimed; written before its handler runs, so a crash
  mid-command is known afterwards and reported ``interrupted`` instead of re-run. It is
  written at once but fsynced only with the next durable line (or written back by the
  kernel): a daemon that dies keeps it (the page cache outlives the process), and only a
  power cut before it reached the disk loses it, leaving that command for the server to
  time out. An fsync and a thread hop before every handler
  were a quarter of a command's latency (``runner-daemon bench --rate``);
- ``result``: the encoded report, written before it is first sent. A bridge result is
  fsynced only when its first send did not deliver it (:meth:`Outbox.write_result`, then
  :meth:`Outbox.sync` when the reporter decides), always before a second send: the
  README's "Nothing lost" states the guarantee. A job's result, and one owed from before,
  is fsynced before it is sent (:meth:`Outbox.result`);
- ``done``: the server accepted it, answered 409, or it was dropped for good. Done lines
  are kept for :data:`REMEMBER_SECONDS` (at most :data:`MAX_REMEMBERED` of them), so a
  command id the server delivers again, in this run or after a restart, is answered from
  here and never run twice;
- ``sig``: with ``reject_replayed_signatures``, the digest of an accepted command signature,
  fsynced before the command runs; the last :data:`MAX_SIGNATURES` are kept.

On start the journal is read back: a torn line, garbage, or a line that is JSON but not a
valid entry is skipped with one warning (and not written back), the results still owed are
handed to the loop to deliver before it polls, and the file is rewritten with what is still
live. It is compacted again whenever it grows past its size bound. Appends are
group-committed: many commands finishing together share one fsync.

A failing disk (ENOSPC, EIO, a short write) never loses what is in memory: the lines not
written stay buffered and are retried, the next write starts on a fresh line so a torn one
stands alone, and :attr:`Outbox.failure` tells the loop to stop taking commands until a
write succeeds again. Only one daemon may use a journal at a time (an exclusive ``flock``).

Over 400 lines on purpose: the journal's line format, its replay and its writes must agree
line by line, and reading them side by side is how that is checked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.to_thread
import pydantic_core
import structlog
from pydantic import BaseModel

from runner_daemon.core.errors import ConfigError, JournalUnavailable
from runner_daemon.core.models import JobReport, ResultReport
from runner_daemon.core.statedir import fsync_folder

log = structlog.get_logger(__name__)

JOURNAL_FILE = "outbox.jsonl"
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# A command id is remembered this long after its result was delivered: Opik keeps a finished
# command for 1 h, and a proxy retrying a lost poll answer does so within seconds.
REMEMBER_SECONDS = 24 * 3600.0
# ... and at most this many ids (Opik admits 600 submissions a minute: an hour of them).
MAX_REMEMBERED = 50_000
MAX_SIGNATURES = 50_000
# Bodies of recently delivered results, kept to answer a redelivery with the same result.
RECENT_BODY_BYTES = 4 * 1024 * 1024
MAX_ID_CHARS = 256
_COMPACT_SUFFIX = ".compact"


# A bridge command's result, or a job's report: each kind has its own loop and endpoint.
Kind = Literal["command", "job"]
_REPORT_MODELS: dict[str, type[BaseModel]] = {"command": ResultReport, "job": JobReport}


@dataclass(frozen=True)
class OwedResult:
    """A result the server has not confirmed yet."""

    runner_id: str
    command_id: str
    command_type: str
    body: bytes
    created: float  # wall-clock seconds, so the result's time to live survives a restart
    kind: Kind = "command"  # which loop delivers it, and where


@dataclass(frozen=True)
class StartedCommand:
    """A command that was running when the daemon last stopped without reporting it."""

    runner_id: str
    command_id: str
    command_type: str
    kind: Kind = "command"
    trace_id: str | None = None  # a job's: its final report carries the same trace id


@dataclass(frozen=True)
class Recovered:
    """What a previous run left: results to deliver and commands that were cut short."""

    results: list[OwedResult]
    interrupted: list[StartedCommand]


def signature_digest(signature: str) -> str:
    """What is remembered of an accepted command signature (the signature itself is not)."""
    return hashlib.sha256(signature.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class _PartialWrite(OSError):
    """A write that failed after ``written`` bytes reached the file."""

    def __init__(self, cause: OSError, written: int) -> None:
        super().__init__(cause.errno, cause.strerror)
        self.written = written


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written; a short write that stops is an error."""
    view = memoryview(data)
    written = 0
    while written < len(data):
        try:
            count = os.write(fd, view[written:])
        except OSError as exc:
            raise _PartialWrite(exc, written) from exc
        if count <= 0:
            raise _PartialWrite(OSError(28, os.strerror(28)), written)
        written += count


class Outbox:
    def __init__(self, path: Path, fd: int, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = path
        self._fd = fd  # holds the flock for the daemon's life
        self._max_bytes = max_bytes
        self._compact_at = max_bytes  # grows when what is live alone comes near the bound
        self._started: dict[str, StartedCommand] = {}
        self._owed: dict[str, OwedResult] = {}
        self._done: OrderedDict[str, float] = OrderedDict()
        self._bodies: OrderedDict[str, bytes] = OrderedDict()
        self._body_bytes = 0
        self._signatures: OrderedDict[str, float] = OrderedDict()
        self._buffer: list[bytes] = []
        self._appended = 0  # sequence of the last line written or buffered
        self._synced = 0  # sequence up to which every line is written and fsynced
        self._lock = anyio.Lock()
        self._write_lock = threading.Lock()  # one os.write at a time: lines never interleave
        self._compacting = False
        self._size = 0
        self._torn = False  # the file may end in a partial line: the next write starts afresh
        self.failure: OSError | None = None  # set while the journal cannot be written
        # What the journal held at open: delivered by the reporter before the first poll.
        self.recovered = Recovered([], [])

    # --- opening and recovery -------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Outbox:
        """Lock and read the journal; what a previous run still owed is in :attr:`recovered`."""
        path = directory / JOURNAL_FILE
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"state_directory: cannot keep the outbox in {directory}: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"state_directory: {directory} is in use by another runner-daemon") from None
        outbox = cls(path, fd, max_bytes=max_bytes)
        outbox._remove_stale_temporaries()
        outbox._replay()
        outbox.recovered = Recovered(
            list(outbox._owed.values()),
            [entry for key, entry in outbox._started.items() if key not in outbox._owed],
        )
        try:
            outbox._rewrite(b"".join(outbox._live_lines()))
        except OSError as exc:
            # The journal as it is still works (what could not be read is skipped each start).
            log.warning("could not compact the outbox journal at start", error=exc.strerror, path=str(path))
            outbox._size = os.fstat(outbox._fd).st_size
            outbox._torn = True
        return outbox

    def _remove_stale_temporaries(self) -> None:
        for stale in self.path.parent.glob(f".{self.path.name}.*{_COMPACT_SUFFIX}"):
            with contextlib.suppress(OSError):
                stale.unlink()

    def _replay(self) -> None:
        with open(self._fd, "rb", closefd=False) as stream:
            stream.seek(0)
            lines = stream.read().split(b"\n")
        skipped = 0
        for line in lines:
            if not line.strip():
                continue
            try:
                self._apply(pydantic_core.from_json(line))  # see client._error_text
            except Exception:  # anything unusable is skipped: a start must never crash-loop
                skipped += 1
        if skipped:
            log.warning(
                "skipped unusable outbox journal lines (a torn write, or damage)",
                lines=skipped,
                path=str(self.path),
            )

    def _apply(self, record: Any) -> None:
        """Apply one journal line; raises on anything that is not a valid entry."""
        if not isinstance(record, dict):
            raise TypeError("not an object")
        op = record["op"]
        if op == "sig":
            self._remember_signature(_text(record["sig"]), _instant(record["at"]))
            return
        command_id = _text(record["id"])
        if command_id in self._done and op != "done":
            return  # a finished command's id is final: nothing revives it
        kind = _kind(record.get("kind", "command"))
        if op == "started":
            trace = record.get("trace")
            self._started[command_id] = StartedCommand(
                _text(record["runner"]),
                command_id,
                _text(record["type"]),
                kind,
                None if trace is None else _text(trace),
            )
        elif op == "result":
            body = _text(record["body"], limit=None).encode()
            # A body that cannot be sent as it is must not be resent forever.
            _REPORT_MODELS[kind].model_validate_json(body)
            self._owed[command_id] = OwedResult(
                _text(record["runner"]), command_id, _text(record["type"]), body, _instant(record["at"]), kind
            )
        elif op == "done":
            self._forget(command_id, _instant(record.get("at", time.time())))
        else:
            raise ValueError("unknown op")

    def _live_lines(self) -> list[bytes]:
        lines = [_line({"op": "sig", "sig": sig, "at": at}) for sig, at in self._signatures.items()]
        lines += [_line({"op": "done", "id": key, "at": at}) for key, at in self._done.items()]
        lines += [_started_line(s) for key, s in self._started.items() if key not in self._owed]
        lines += [_result_line(entry) for entry in self._owed.values()]
        return lines

    def _rewrite(self, data: bytes) -> None:
        """Replace the journal by ``data``, the live lines (temp file 0600, fsync, rename)."""
        temp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}{_COMPACT_SUFFIX}")
        new_fd = os.open(
            temp, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            _write_all(new_fd, data)
            os.fsync(new_fd)
            fcntl.flock(new_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(temp, self.path)
        except BaseException:
            os.close(new_fd)
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        with contextlib.suppress(OSError):  # the rename is done; only its power-cut safety is at stake
            fsync_folder(self.path.parent)
        os.close(self._fd)  # the old file's lock goes with it; the new one holds the path now
        self._fd = new_fd
        self._size = len(data)
        self._compact_at = max(self._max_bytes, 2 * self._size)
        self._torn = False

    # --- what is known of a command id --------------------------------------------------------

    def known(self, command_id: str) -> bool:
        """Whether this runner claimed the command before (running, owed or finished)."""
        return command_id in self._done or command_id in self._started or command_id in self._owed

    def delivered_body(self, command_id: str) -> bytes | None:
        """The result already delivered for ``command_id``, while it is still kept."""
        return self._bodies.get(command_id)

    def _forget(self, command_id: str, at: float) -> None:
        self._started.pop(command_id, None)
        self._owed.pop(command_id, None)
        self._done[command_id] = at
        self._done.move_to_end(command_id)
        horizon = time.time() - REMEMBER_SECONDS
        while self._done and (len(self._done) > MAX_REMEMBERED or next(iter(self._done.values())) < horizon):
            oldest, _ = self._done.popitem(last=False)
            self._drop_body(oldest)

    def _keep_body(self, command_id: str, body: bytes) -> None:
        self._drop_body(command_id)
        self._bodies[command_id] = body
        self._body_bytes += len(body)
        while self._body_bytes > RECENT_BODY_BYTES and self._bodies:
            _, dropped = self._bodies.popitem(last=False)
            self._body_bytes -= len(dropped)

    def _drop_body(self, command_id: str) -> None:
        body = self._bodies.pop(command_id, None)
        if body is not None:
            self._body_bytes -= len(body)

    def _remember_signature(self, digest: str, at: float) -> None:
        self._signatures[digest] = at
        while len(self._signatures) > MAX_SIGNATURES:
            self._signatures.popitem(last=False)

    # --- appends ----------------------------------------------------------------------------

    async def started(
        self,
        runner_id: str,
        command_id: str,
        command_type: str,
        *,
        kind: Kind = "command",
        trace_id: str | None = None,
    ) -> None:
        """Record a claim before the handler runs; :class:`JournalUnavailable` if it cannot be."""
        if self.failure is not None:
            raise JournalUnavailable(self._failure_text())
        entry = StartedCommand(runner_id, command_id, command_type, kind, trace_id)
        self._started[command_id] = entry
        line = _started_line(entry)
        if not self._can_write_now():
            # The file is being replaced, or may end in a torn line: the line goes through
            # the buffer, after the swap or behind a fresh newline.
            try:
                await self._append_or_withdraw(line)
            except JournalUnavailable:
                self._started.pop(command_id, None)
                raise
            return
        try:
            self._write_now(line)
        except _PartialWrite:
            self._started.pop(command_id, None)
            raise JournalUnavailable(self._failure_text()) from None

    def write_result(self, entry: OwedResult) -> int:
        """Put a result's line in the journal file now, not yet fsynced; returns the mark
        :meth:`sync` takes. On a failing disk the line is kept in memory (and the result sent)."""
        self._owed[entry.command_id] = entry
        line = _result_line(entry)
        if self._can_write_now():
            with contextlib.suppress(_PartialWrite):
                self._write_now(line)
                return self._appended
        self._buffer.append(line)  # written by the next flush, or retry() once the disk works
        self._appended += 1
        return self._appended

    async def sync(self, mark: int) -> None:
        """Make every line up to ``mark`` durable; one fsync serves every line written before it.

        :class:`JournalUnavailable` if the disk refuses: the lines stay kept for :meth:`retry`.
        """
        async with self._lock:
            if self._synced >= mark:
                return  # another task's flush wrote (and synced) it already
            await self._flush()
            if self._size > self._compact_at:
                await self._compact()

    async def result(self, entry: OwedResult) -> None:
        """Record a result durably before it is sent; on a failing disk it is kept in memory and sent."""
        with contextlib.suppress(JournalUnavailable):
            await self.sync(self.write_result(entry))

    async def claim_signature(self, digest: str) -> bool:
        """Remember an accepted signature durably; False when it was accepted before."""
        if digest in self._signatures:
            return False
        at = time.time()
        self._remember_signature(digest, at)
        try:
            await self._append_or_withdraw(_line({"op": "sig", "sig": digest, "at": at}))
        except JournalUnavailable:
            # Not durable, so not accepted: the command will not run, and may come again.
            self._signatures.pop(digest, None)
            raise
        return True

    async def done(self, command_id: str) -> None:
        """Forget a result; not fsynced (if lost, a restart re-sends it and gets a harmless 409)."""
        entry = self._owed.get(command_id)
        if entry is not None:
            self._keep_body(command_id, entry.body)
        at = time.time()
        self._forget(command_id, at)
        with contextlib.suppress(JournalUnavailable):
            await self._append(_line({"op": "done", "id": command_id, "at": at}), durable=False)

    @property
    def undelivered(self) -> int:
        """How many results the server has not confirmed yet (the last log line says)."""
        return len(self._owed)

    def _can_write_now(self) -> bool:
        return not (self._compacting or self._torn or self.failure is not None)

    def _write_now(self, line: bytes) -> None:
        """One O_APPEND write to the page cache, like a log line, done on the event loop: from a
        thread it would wait behind other commands' fsyncs. :class:`_PartialWrite` if refused."""
        try:
            with self._write_lock:
                _write_all(self._fd, line)
        except _PartialWrite as exc:
            self._torn = self._torn or exc.written > 0
            self._fail(exc)
            raise
        self._appended += 1
        self._size += len(line)

    async def _append_or_withdraw(self, line: bytes) -> None:
        """A durable append whose line is taken back if the disk refuses it (its caller
        refuses the command, so the line must not be written later)."""
        try:
            await self._append(line, durable=True)
        except JournalUnavailable:
            self._buffer = [kept for kept in self._buffer if kept is not line]
            raise

    async def _append(self, line: bytes, *, durable: bool) -> None:
        self._buffer.append(line)
        self._appended += 1
        mine = self._appended
        if not durable and len(self._buffer) < 64:
            return  # rides along with the next durable append
        await self.sync(mine)

    async def _flush(self) -> None:
        """Write and fsync the buffer; on failure its unwritten lines stay buffered. Under the lock."""
        batch, self._buffer = self._buffer, []
        upto = self._appended
        data = b"".join(batch)
        prefix = b"\n" if self._torn else b""
        try:
            await anyio.to_thread.run_sync(self._write, prefix + data)
        except OSError as exc:
            written = max(0, exc.written - len(prefix)) if isinstance(exc, _PartialWrite) else 0
            self._torn = self._torn or (isinstance(exc, _PartialWrite) and exc.written > 0)
            self._buffer = _unwritten(batch, written) + self._buffer
            self._fail(exc)
            raise JournalUnavailable(self._failure_text()) from None
        self._torn = False
        self._size += len(prefix) + len(data)
        self._synced = upto
        if self.failure is not None:
            log.info("the outbox journal is writable again; taking commands", path=str(self.path))
            self.failure = None

    async def _compact(self) -> None:
        # The snapshot is taken here, on the event loop, where the tables change.
        self._compacting = True
        try:
            await anyio.to_thread.run_sync(self._rewrite, b"".join(self._live_lines()))
        except OSError as exc:
            # The journal itself is intact; try again once it has grown by another bound.
            log.warning("could not compact the outbox journal", error=exc.strerror, path=str(self.path))
            self._compact_at = self._size + self._max_bytes
        finally:
            self._compacting = False

    async def compact(self) -> None:
        """Rewrite the journal with only its live lines now (normally done past its bound)."""
        async with self._lock:
            await self._flush()
            await self._compact()

    async def retry(self) -> bool:
        """Try to write what a failing disk kept back; True once the journal works again."""
        async with self._lock:
            if not self._buffer:
                self._torn = True  # a lone newline probes the disk
            with contextlib.suppress(JournalUnavailable):
                await self._flush()
        return self.failure is None

    def _write(self, data: bytes) -> None:
        with self._write_lock:
            _write_all(self._fd, data)
        os.fsync(self._fd)

    def _fail(self, exc: OSError) -> None:
        if self.failure is None:
            log.error(
                "cannot write the outbox journal; not taking new commands until it can be written "
                "(results already owed are still delivered)",
                error=exc.strerror or str(exc),
                errno=exc.errno,
                path=str(self.path),
            )
        self.failure = exc

    def _failure_text(self) -> str:
        reason = self.failure.strerror if self.failure is not None else "unknown"
        return f"the runner cannot write its state directory ({reason})"

    async def close(self) -> None:
        """Flush what is buffered (as far as the disk lets us) and release the journal."""
        with anyio.CancelScope(shield=True):
            async with self._lock:
                if self._buffer or self._synced < self._appended:
                    with contextlib.suppress(JournalUnavailable):
                        await self._flush()
            os.close(self._fd)


def _unwritten(batch: list[bytes], written: int) -> list[bytes]:
    """The lines of ``batch`` not wholly among its first ``written`` bytes."""
    for index, line in enumerate(batch):
        if written < len(line):
            return batch[index:]
        written -= len(line)
    return []


def _text(value: Any, *, limit: int | None = MAX_ID_CHARS) -> str:
    if not isinstance(value, str) or not value or (limit is not None and len(value) > limit):
        raise ValueError("not a usable string")
    return value


def _instant(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("not a time")
    return float(value)


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _kind(value: Any) -> Kind:
    if value not in _REPORT_MODELS:
        raise ValueError("unknown kind")
    return "job" if value == "job" else "command"


def _started_line(entry: StartedCommand) -> bytes:
    record: dict[str, Any] = {
        "op": "started",
        "id": entry.command_id,
        "runner": entry.runner_id,
        "type": entry.command_type,
    }
    if entry.kind != "command":  # a bridge command's line stays as it always was
        record["kind"] = entry.kind
    if entry.trace_id is not None:
        record["trace"] = entry.trace_id
    return _line(record)


def _result_line(entry: OwedResult) -> bytes:
    record: dict[str, Any] = {
        "op": "result",
        "id": entry.command_id,
        "runner": entry.runner_id,
        "type": entry.command_type,
        "at": entry.created,
        "body": entry.body.decode(),
    }
    if entry.kind != "command":
        record["kind"] = entry.kind
    return _line(record)
