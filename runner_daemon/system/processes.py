"""Child processes of ``Exec``: process groups, bounded kills, background tracking.

Every child runs in a new session, so its process id is also the id of its process group
and one ``killpg`` reaches everything it started (unless a descendant calls ``setsid``).
Killing is always: SIGTERM to the group, a grace period, SIGKILL to whatever is left, and a
bounded wait that reaps the leader. Nothing here waits without a time limit, and nothing
here raises while cleaning up.

Background processes outlive the command that started them, so they are not tied to any
event loop: they are spawned with :class:`subprocess.Popen` and each gets a small daemon
thread that blocks in ``wait()``, which reaps the process the moment it exits. That works
the same under asyncio and trio, and leaves no zombie behind even when the daemon is PID 1
of a container. (Grandchildren orphaned by a dead leader are re-parented to PID 1; a
container should use an init such as ``tini`` / ``docker run --init`` to reap those.)

A daemon that dies without cleaning up (SIGKILL, the OOM killer, a crash of the
interpreter) cannot kill anything, and its children, each in a session of its own, would
live on. :class:`GroupWatcher` covers that: a small ``bash`` process, started with the first
Exec command, that the daemon tells of every process group it starts and every one that
ended. When its input pipe reaches end-of-file, which the kernel causes whenever the daemon
exits, however, it terminates the groups still listed (SIGTERM, SIGKILL after the grace).
A group is listed just after it starts: one started in the very instant of a SIGKILL, and
anything that left its group with ``setsid``, escape it.

Their output goes to ``exec-<n>.log`` in one folder per daemon process: by default a fresh
``runner-daemon-<pid>-exec-*`` folder under the system temporary folder (``$TMPDIR``,
usually ``/tmp``), mode 0700, files mode 0600. It is outside the workspace on purpose
(logs must not show up in the workspace's files or its git status). That folder goes when
the daemon stops, with the processes whose output it held (a folder given in the settings
is left alone); a daemon killed outright leaves it for the system's temporary-file cleaner.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import structlog

from runner_daemon.core.errors import CommandFailed

# After SIGKILL, how long to wait for the kernel to let us reap the leader.
REAP_SECONDS = 2.0
# Process-group state cannot be awaited; it is polled this often.
POLL_SECONDS = 0.05
PROC = "/proc"
# SIGTERM → SIGKILL grace for background processes at daemon stop (Opik: 5 s).
BACKGROUND_GRACE_SECONDS = 5.0

log = structlog.get_logger(__name__)

# The group watcher: "+<pgid>" and "-<pgid>" lines on stdin; at their end (the daemon is
# gone), SIGTERM to every group still listed, then SIGKILL to those alive after $1 tenths
# of a second. Its own session keeps it out of reach of the terminal's signals.
WATCHER_SCRIPT = r"""
declare -A groups
while read -r line; do
  case $line in
    +*) groups[${line:1}]=1 ;;
    -*) unset "groups[${line:1}]" ;;
  esac
done
((${#groups[@]})) || exit 0
for group in "${!groups[@]}"; do kill -TERM -- "-$group"; done 2>/dev/null
for ((tick = 0; tick < $1; tick++)); do
  alive=
  for group in "${!groups[@]}"; do kill -0 -- "-$group" 2>/dev/null && alive=1; done
  [[ $alive ]] || exit 0
  sleep 0.1
done
for group in "${!groups[@]}"; do kill -KILL -- "-$group"; done 2>/dev/null
"""


def signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to the process group; False when there is no such group (of ours)."""
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def group_alive(pgid: int) -> bool:
    """Whether a process that is not a zombie is still in the group.

    Zombies count for ``killpg``, but a dead grandchild re-parented to PID 1 may stay a
    zombie for a while (some inits reap lazily): on Linux, ``/proc`` tells them apart.
    """
    if not signal_group(pgid, 0):
        return False
    try:
        entries = list(os.scandir(PROC))
    except OSError:
        return True  # no /proc: trust killpg
    return any(entry.name.isdigit() and _live_member(entry.path, pgid) for entry in entries)


def _live_member(proc_dir: str, pgid: int) -> bool:
    try:
        with open(os.path.join(proc_dir, "stat"), "rb") as stream:
            stat = stream.read()
    except OSError:
        return False  # gone meanwhile
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return len(fields) >= 3 and fields[0] not in (b"Z", b"X") and int(fields[2]) == pgid


async def kill_process_group(process: anyio.abc.Process, grace: float) -> None:
    """Terminate a foreground child's whole group and reap the leader.

    Shielded from cancellation (it runs while the command is being cancelled), bounded to
    about ``grace + REAP_SECONDS`` and never raises.
    """
    pgid = process.pid
    try:
        with anyio.CancelScope(shield=True):
            signal_group(pgid, signal.SIGTERM)
            with anyio.move_on_after(grace):
                await process.wait()
                await poll_until(lambda: not group_alive(pgid))
            if process.returncode is None or group_alive(pgid):
                log.warning("process group survived SIGTERM; sending SIGKILL", pid=pgid)
                signal_group(pgid, signal.SIGKILL)
                with anyio.move_on_after(REAP_SECONDS):
                    await process.wait()
            if process.returncode is None:
                log.error("child process could not be reaped", pid=pgid)
    except Exception:
        log.exception("killing a child process group failed", pid=pgid)


async def poll_until(done: Callable[[], bool]) -> None:
    """Wait for a state nothing can notify us of: group membership, a reaper thread's work.

    Unbounded by itself; callers put it under a time limit.
    """
    while not done():  # noqa: ASYNC110 - there is no event to wait for
        await anyio.sleep(POLL_SECONDS)


def _reap(popen: subprocess.Popen[bytes]) -> None:
    try:
        popen.wait()
    except Exception:  # a reaper thread must never die noisily
        log.exception("waiting for a background process failed", pid=popen.pid)


class GroupWatcher:
    """Ends the daemon's process groups if the daemon dies without ending them itself.

    :meth:`watch` and :meth:`forget` never block and never raise: the watcher is a second
    line of defence, and a daemon whose watcher failed to start only logs a warning.
    """

    def __init__(self, grace: float = BACKGROUND_GRACE_SECONDS) -> None:
        self._grace = grace
        self._pipe: int | None = None
        self._close_pipe: weakref.finalize[[int], GroupWatcher] | None = None
        self._off = False  # closed, or could not start: nothing is sent any more

    def watch(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def forget(self, pgid: int) -> None:
        self._send(f"-{pgid}\n")

    def close(self) -> None:
        """End the watcher: it exits, and ends whatever groups are still listed."""
        self._off = True
        self._pipe = None  # its number may soon name another file
        if self._close_pipe is not None:
            self._close_pipe()

    def _send(self, line: str) -> None:
        if self._pipe is None and not self._off:
            self._start()
        if self._pipe is None:
            return
        try:
            os.write(self._pipe, line.encode())
        except OSError as exc:  # the watcher died, or (never seen) its pipe is full
            log.warning("the process group watcher is not listening", error=exc.strerror)

    def _start(self) -> None:
        read_end, write_end = os.pipe()  # both close-on-exec: no child inherits them
        try:
            popen = subprocess.Popen(
                ["bash", "-c", WATCHER_SCRIPT, "runner-daemon-group-watcher", str(round(self._grace * 10))],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd="/",
                env={"PATH": os.environ.get("PATH", os.defpath)},  # no secret in its /proc
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            os.close(write_end)
            self._off = True
            log.warning(
                "cannot start the process group watcher; a killed daemon leaves its Exec processes",
                error=exc.strerror,
            )
            return
        finally:
            os.close(read_end)
        os.set_blocking(write_end, False)
        threading.Thread(target=_reap, args=(popen,), name="exec-group-watcher", daemon=True).start()
        self._pipe = write_end
        # A registry dropped without close() (tests, an aborted start) still ends its watcher.
        self._close_pipe = weakref.finalize(self, os.close, write_end)


@dataclass
class BackgroundProcess:
    """One background child: its Popen (reaped by ``reaper``) and its log file."""

    popen: subprocess.Popen[bytes]
    log_file: Path
    reaper: threading.Thread
    # The command's private temporary folder (sandboxed): removed once its group is gone.
    temporary: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def exit_code(self) -> int | None:
        """The leader's exit status once the reaper thread collected it."""
        return self.popen.returncode

    def alive(self) -> bool:
        """The leader runs, or something it started still runs in its process group."""
        return self.popen.returncode is None or group_alive(self.pid)


class BackgroundProcesses:
    """The background children of one daemon: the limit, the log folder, the stop."""

    def __init__(self, log_dir: Path | None = None, watcher: GroupWatcher | None = None) -> None:
        self._own_log_dir = log_dir is None  # made here, so removed here
        # Foreground commands report their groups to it too.
        self.watcher = watcher or GroupWatcher()
        self._log_dir = log_dir
        self._log_dir_ready = False
        self._entries: dict[int, BackgroundProcess] = {}
        self._numbers = itertools.count(1)
        self._closing = False

    def running(self) -> list[BackgroundProcess]:
        """The processes that still occupy a slot; finished ones are forgotten."""
        live = {pid: entry for pid, entry in self._entries.items() if entry.alive()}
        self._forget_ended([entry for pid, entry in self._entries.items() if pid not in live])
        self._entries = live
        return list(self._entries.values())

    def log_dir(self) -> Path:
        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix=f"runner-daemon-{os.getpid()}-exec-"))
        elif not self._log_dir_ready:
            self._log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._log_dir_ready = True
        return self._log_dir

    def start(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        limit: int,
        temporary: Path | None = None,
    ) -> BackgroundProcess:
        """Spawn ``argv`` (see :func:`background_argv`) with output to a new log file, or
        ``limit_reached``.

        Synchronous on purpose: between the limit check and the registration there is no
        await, so concurrent commands cannot both take the last slot.
        """
        if self._closing:
            raise CommandFailed("limit_reached", "The runner is stopping; no new background processes")
        if len(self.running()) >= limit:
            raise CommandFailed("limit_reached", f"Maximum background processes ({limit}) reached")
        log_file = self.log_dir() / f"exec-{next(self._numbers)}.log"
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            popen = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise CommandFailed("exec_failed", f"Could not start the command: {exc.strerror}") from None
        finally:
            os.close(fd)
        reaper = threading.Thread(target=_reap, args=(popen,), name=f"exec-reaper-{popen.pid}", daemon=True)
        reaper.start()
        entry = BackgroundProcess(popen, log_file, reaper, temporary)
        self._entries[popen.pid] = entry
        self.watcher.watch(popen.pid)
        return entry

    async def stop(self, entry: BackgroundProcess, grace: float) -> None:
        """Terminate one background process group; shielded, bounded, never raises."""
        self._entries.pop(entry.pid, None)
        await _terminate([entry], grace)
        self._forget_ended([entry])

    async def aclose(self, grace: float = BACKGROUND_GRACE_SECONDS) -> None:
        """Terminate every background process group: SIGTERM, SIGKILL after ``grace``.

        Later :meth:`start` calls fail, and the watcher ends (with any group that survived
        even SIGKILL). Shielded, bounded, never raises.
        """
        self._closing = True
        entries = list(self._entries.values())
        self._entries.clear()
        await _terminate(entries, grace)
        self._forget_ended(entries)
        self.watcher.close()
        if self._own_log_dir and self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)

    def _forget_ended(self, entries: Sequence[BackgroundProcess]) -> None:
        for entry in entries:
            if not entry.alive():
                self.watcher.forget(entry.pid)
                if entry.temporary is not None:
                    shutil.rmtree(entry.temporary, ignore_errors=True)


async def _terminate(entries: Sequence[BackgroundProcess], grace: float) -> None:
    try:
        with anyio.CancelScope(shield=True):
            live = [entry for entry in entries if entry.alive()]
            if not live:
                return
            log.info("terminating background processes", pids=[entry.pid for entry in live])
            for entry in live:
                signal_group(entry.pid, signal.SIGTERM)
            with anyio.move_on_after(grace):
                await poll_until(lambda: not any(entry.alive() for entry in live))
            stubborn = [entry for entry in live if entry.alive()]
            if not stubborn:
                return
            log.warning(
                "background processes survived SIGTERM; sending SIGKILL", pids=[e.pid for e in stubborn]
            )
            for entry in stubborn:
                signal_group(entry.pid, signal.SIGKILL)
            with anyio.move_on_after(REAP_SECONDS):
                await poll_until(lambda: all(entry.exit_code is not None for entry in stubborn))
    except Exception:
        log.exception("terminating background processes failed")


def background_argv(command: str) -> list[str]:
    # Line-buffered stdout (as Opik does) so the log file shows output as it happens.
    if shutil.which("stdbuf") is not None:
        return ["stdbuf", "-oL", "bash", "-c", command]
    return ["bash", "-c", command]
