"""The durable result outbox: an append-only journal in the state directory.

Three kinds of line, each one JSON object:

- ``started``: a command was claimed; written before its handler runs, so a crash
  mid-command is known afterwards and reported ``interrupted`` instead of re-run. It is
  written at once but fsynced with the next result: a daemon that dies keeps it (the page
  cache outlives the process), and only a power cut in that moment loses it, leaving that
  command for the server to time out. An fsync and a thread hop before every handler were
  a quarter of a command's latency (``runner-daemon bench --rate``);
- ``result``: the encoded report, written (and fsynced) before it is first sent;
- ``done``: the server accepted it, answered 409, or it was dropped for good.

On start the journal is read back (a torn last line, or any corrupt line, is skipped), the
results still owed are handed to the loop to deliver before it polls, and the file is
rewritten with only what is still owed. It is compacted again whenever it grows past its
size bound. Appends are group-committed: many commands finishing together share one fsync.
Only one daemon may use a journal at a time (an exclusive ``flock``).
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import structlog

from runner_daemon.errors import ConfigError
from runner_daemon.statedir import fsync_folder

log = structlog.get_logger("runner_daemon.outbox")

JOURNAL_FILE = "outbox.jsonl"
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class OwedResult:
    """A result the server has not confirmed yet."""

    runner_id: str
    command_id: str
    command_type: str
    body: bytes
    created: float  # wall-clock seconds, so the result's time to live survives a restart


@dataclass(frozen=True)
class Interrupted:
    """A command that was running when the daemon last stopped without reporting it."""

    runner_id: str
    command_id: str
    command_type: str


class Outbox:
    def __init__(self, path: Path, fd: int, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = path
        self._fd = fd  # holds the flock for the daemon's life
        self._max_bytes = max_bytes
        self._started: dict[str, Interrupted] = {}
        self._owed: dict[str, OwedResult] = {}
        self._buffer: list[bytes] = []
        self._appended = 0  # sequence of the last line buffered
        self._flushed = 0  # sequence of the last line on disk
        self._lock = anyio.Lock()
        self._compacting = False
        self._size = 0

    # --- opening and recovery -------------------------------------------------------------

    @classmethod
    def open(
        cls, directory: Path, *, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> tuple[Outbox, list[OwedResult], list[Interrupted]]:
        """Lock and read the journal; returns it with what a previous run still owed."""
        path = directory / JOURNAL_FILE
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
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
        outbox._replay()
        owed = list(outbox._owed.values())
        interrupted = [entry for key, entry in outbox._started.items() if key not in outbox._owed]
        outbox._rewrite(b"".join(outbox._live_lines()))
        return outbox, owed, interrupted

    def _replay(self) -> None:
        with open(self._fd, "rb", closefd=False) as stream:
            stream.seek(0)
            lines = stream.read().split(b"\n")
        skipped = 0
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self._apply(record)
            except (ValueError, KeyError, TypeError, AttributeError):
                skipped += 1
        if skipped:
            log.warning("skipped unreadable outbox lines (a torn write?)", lines=skipped, path=str(self.path))

    def _apply(self, record: dict[str, Any]) -> None:
        op, command_id = record["op"], str(record["id"])
        if op == "started":
            self._started[command_id] = Interrupted(str(record["runner"]), command_id, str(record["type"]))
        elif op == "result":
            self._owed[command_id] = OwedResult(
                str(record["runner"]),
                command_id,
                str(record["type"]),
                str(record["body"]).encode(),
                float(record["at"]),
            )
        elif op == "done":
            self._started.pop(command_id, None)
            self._owed.pop(command_id, None)

    def _live_lines(self) -> list[bytes]:
        lines = [
            _line({"op": "started", "id": s.command_id, "runner": s.runner_id, "type": s.command_type})
            for key, s in self._started.items()
            if key not in self._owed
        ]
        lines += [_result_line(entry) for entry in self._owed.values()]
        return lines

    def _rewrite(self, data: bytes) -> None:
        """Replace the journal by ``data``, the lines still owed (temp file, fsync, rename)."""
        temp = self.path.with_name(self.path.name + ".compact")
        with open(temp, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp, 0o600)
        new_fd = os.open(temp, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        fcntl.flock(new_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(temp, self.path)
        fsync_folder(self.path.parent)
        os.close(self._fd)  # the old file's lock goes with it; the new one holds the path now
        self._fd = new_fd
        self._size = len(data)

    # --- appends ----------------------------------------------------------------------------

    async def started(self, runner_id: str, command_id: str, command_type: str) -> None:
        self._started[command_id] = Interrupted(runner_id, command_id, command_type)
        line = _line({"op": "started", "id": command_id, "runner": runner_id, "type": command_type})
        if self._compacting:
            # The file is being replaced: the line goes into the new one, after the swap.
            await self._append(line, durable=True)
            return
        # One small O_APPEND write to the page cache, like a log line, done here: from a
        # thread it would need the journal's lock (the descriptor changes at a compaction)
        # and wait there behind other commands' fsyncs.
        os.write(self._fd, line)
        self._size += len(line)

    async def result(self, entry: OwedResult) -> None:
        self._owed[entry.command_id] = entry
        await self._append(_result_line(entry), durable=True)

    async def done(self, command_id: str) -> None:
        """Forget a result; not fsynced (if lost, a restart re-sends it and gets a harmless 409)."""
        self._started.pop(command_id, None)
        self._owed.pop(command_id, None)
        await self._append(_line({"op": "done", "id": command_id}), durable=False)

    @property
    def owed(self) -> int:
        return len(self._owed)

    async def _append(self, line: bytes, *, durable: bool) -> None:
        self._buffer.append(line)
        self._appended += 1
        mine = self._appended
        if not durable and len(self._buffer) < 64:
            return  # rides along with the next durable append
        async with self._lock:
            if self._flushed >= mine:
                return  # another task's flush wrote (and synced) this line already
            batch, self._buffer = self._buffer, []
            upto = self._appended
            data = b"".join(batch)
            await anyio.to_thread.run_sync(self._write, data, durable)
            self._size += len(data)
            self._flushed = upto
            if self._size > self._max_bytes:
                # The snapshot is taken here, on the event loop, where the tables change.
                self._compacting = True
                try:
                    await anyio.to_thread.run_sync(self._rewrite, b"".join(self._live_lines()))
                finally:
                    self._compacting = False

    def _write(self, data: bytes, durable: bool) -> None:
        os.write(self._fd, data)
        if durable:
            os.fsync(self._fd)

    async def close(self) -> None:
        """Flush what is buffered and release the journal."""
        with anyio.CancelScope(shield=True):
            async with self._lock:
                if self._buffer:
                    batch, self._buffer = self._buffer, []
                    await anyio.to_thread.run_sync(self._write, b"".join(batch), True)
            os.close(self._fd)


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _result_line(entry: OwedResult) -> bytes:
    return _line(
        {
            "op": "result",
            "id": entry.command_id,
            "runner": entry.runner_id,
            "type": entry.command_type,
            "at": entry.created,
            "body": entry.body.decode(),
        }
    )
