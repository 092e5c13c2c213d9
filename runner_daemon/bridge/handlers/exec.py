"""``Exec``: run a shell command (``bash -c``) in the workspace root.

Wire shapes follow Opik's runner. What we add: a policy (``[exec]``: enabled, allow-list,
deny-list), a scrubbed environment (the daemon's secrets, in any encoding, never reach the
child), stdin on /dev/null, and real cancellation: when the command's time is over, or the
daemon stops, the child's whole process group is terminated (SIGTERM, SIGKILL after a
grace) and reaped. A foreground command leaves nothing behind: what it started in its
process group ends with it.

Foreground output is read from both pipes at once; each keeps its first 512 KiB (cut on a
UTF-8 character boundary) and the rest is read and dropped, so a chatty child never blocks
on a full pipe. Background children are described in :mod:`runner_daemon.system.processes`.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from pydantic import Field

from runner_daemon.bridge.handlers.base import Args, Handler, HandlerContext
from runner_daemon.core.errors import CommandFailed
from runner_daemon.core.settings import ExecSettings
from runner_daemon.system.environment import child_environment
from runner_daemon.system.processes import (
    BackgroundProcess,
    GroupWatcher,
    background_argv,
    group_alive,
    kill_process_group,
    poll_until,
)

MAX_OUTPUT_BYTES = 512 * 1024
DEFAULT_TIMEOUT_SECONDS = 30
MAX_TIMEOUT_SECONDS = 120
# SIGTERM → SIGKILL grace when a foreground command is timed out or cancelled.
KILL_GRACE_SECONDS = 2.0
# How long a background start waits for early output or an early exit (Opik: 3 s).
STARTUP_WAIT_SECONDS = 3.0
# A background start returns this long before the command's own deadline at the latest.
DEADLINE_MARGIN_SECONDS = 0.5
BLOCKED_MESSAGE = "Command blocked by safety filter"

# Where a new simple command can begin: the start of a line, after a control operator
# (; & && | || and newlines), or inside a subshell, group or command substitution.
_START = r"(?:^|[;&|\n(){`]|\$\()\s*"
_DISKS = r"/dev/(?:sd[a-z]|nvme\d|vd[a-z]|xvd[a-z]|hd[a-z])"
_SHELL_NAMES = r"bash|sh|zsh|fish|dash|ksh|python[\d.]*"
_SHELLS = f"(?:{_SHELL_NAMES})"

# Opik's built-in blocklist, each entry at least as wide as Opik's own pattern.
BLOCKLIST: tuple[re.Pattern[str], ...] = (
    # Privilege escalation, anywhere (Opik blocks these words wherever they appear).
    re.compile(r"\b(?:sudo|su|doas)\b"),
    # Detaching from the runner's control (setsid too, which we add: it escapes the group kill).
    re.compile(_START + r"(?:nohup|disown|setsid)\b", re.MULTILINE),
    # rm with -r (or --recursive) and -f (or --force), in any order or combined, with an
    # operand starting with /, ~ or * (also quoted), within one pipeline segment.
    re.compile(
        r"\brm\b"
        r"(?=[^|;]*-(?:[a-zA-Z]*[rR]|-recursive\b))"
        r"(?=[^|;]*-(?:[a-zA-Z]*f|-force\b))"
        r"[^|;]*\s['\"]?[/~*]"
    ),
    # The classic fork bomb :(){ :|:& };: and the same with a named function.
    re.compile(r":\s*\(\)\s*\{.*:\s*\|\s*:.*\}"),
    re.compile(r"\b([A-Za-z_]\w*)\s*\(\)\s*\{[^}]*\b\1\s*\|\s*\1\b"),
    # Raw disk and file-system destruction.
    re.compile(r"\bdd\b[^|;&]*\bif="),
    re.compile(r"\bmkfs\b"),
    re.compile(r"\bshred\b"),
    # Piping a download into an interpreter, or running it through process substitution.
    re.compile(r"\b(?:curl|wget)\b.*\|\s*(?:\S*/)?" + _SHELLS + r"\b"),
    re.compile(r"\b(?:" + _SHELL_NAMES + r"|source|eval)\b[^|;]*(?:<\(|\$\(|`)\s*(?:curl|wget)\b"),
    # World-writable root.
    re.compile(r"\bchmod\s+(?:-\S+\s+)*0?777\s+/"),
    # Writing to a raw disk device.
    re.compile(r">\|?\s*" + _DISKS),
    re.compile(r"\bof=" + _DISKS),
)


# Operators, substitutions and redirections that chain or hide another command.
SHELL_CONTROL = re.compile(r"[;&|\n`<>]|\$\(")


def is_blocked(command: str, deny_patterns: Iterable[str] = ()) -> bool:
    """Whether the built-in blocklist or one of the extra ``deny_patterns`` matches."""
    if any(pattern.search(command) for pattern in BLOCKLIST):
        return True
    return any(re.search(pattern, command) for pattern in deny_patterns)


def check_policy(command: str, policy: ExecSettings) -> None:
    """Raise the ``CommandFailed`` the ``[exec]`` policy and the blocklist call for, if any."""
    if not policy.enabled:
        raise CommandFailed("exec_disabled", "Exec is disabled on this runner ([exec] enabled = false)")
    stripped = command.strip()
    if not stripped:
        raise CommandFailed("invalid_command", "Empty command")
    if is_blocked(command, policy.deny_patterns):
        raise CommandFailed("blocked", BLOCKED_MESSAGE)
    if policy.allow_prefixes:
        # An allow-list means one simple command: "git status; rm -rf x" must not pass "git ".
        if SHELL_CONTROL.search(stripped):
            raise CommandFailed("blocked", "Only a single simple command may run under [exec] allow_prefixes")
        if not stripped.startswith(policy.allow_prefixes):
            raise CommandFailed(
                "blocked", "Command does not start with an allowed prefix ([exec] allow_prefixes)"
            )


def utf8_prefix(data: bytes) -> bytes:
    """``data`` without a multi-byte UTF-8 sequence left incomplete at its end."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue  # a continuation byte: the sequence starts further back
        if byte >= 0xF0:
            size = 4
        elif byte >= 0xE0:
            size = 3
        elif byte >= 0xC0:
            size = 2
        else:
            size = 1
        return data if back >= size else data[:-back]
    return data


class OutputCapture:
    """The first ``limit`` bytes of a stream; everything after is read and dropped."""

    def __init__(self, limit: int = MAX_OUTPUT_BYTES) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self.truncated = False

    def feed(self, chunk: bytes) -> None:
        room = self._limit - len(self._buffer)
        if len(chunk) > room:
            self.truncated = True
        if room > 0:
            self._buffer += chunk[:room]

    async def drain(self, stream: anyio.abc.ByteReceiveStream) -> None:
        async for chunk in stream:
            self.feed(chunk)

    def text(self) -> str:
        data = bytes(self._buffer)
        if self.truncated:
            data = utf8_prefix(data)
        return data.decode("utf-8", errors="replace")


class ExecArgs(Args):
    command: str
    timeout: int | None = Field(None, ge=1, le=MAX_TIMEOUT_SECONDS)
    background: bool = False


async def run_foreground(
    argv: Sequence[str], cwd: Path, env: Mapping[str, str], timeout: int, watcher: GroupWatcher
) -> dict[str, Any]:
    """Run to completion within ``timeout`` seconds, or kill the process group.

    Output is read until both pipes close, as Opik does; once they have and the command
    exited, whatever it left running in its process group is killed. A cancellation from
    outside (the command's deadline, the daemon stopping) kills the group too and propagates.
    """
    with anyio.CancelScope(shield=True):  # never lose the handle of a child just spawned
        try:
            process = await anyio.open_process(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise CommandFailed("exec_failed", f"Could not start the command: {exc.strerror}") from None
        watcher.watch(process.pid)
    stdout, stderr = OutputCapture(), OutputCapture()
    exit_code: int | None = None
    try:
        assert process.stdout is not None and process.stderr is not None
        with anyio.move_on_after(timeout):
            async with anyio.create_task_group() as readers:
                readers.start_soon(stdout.drain, process.stdout)
                readers.start_soon(stderr.drain, process.stderr)
            exit_code = await process.wait()
    finally:
        # Timed out, cancelled or failed while reading; or done, with something it started
        # (`server >/dev/null 2>&1 &`) still in its group: nothing outlives the command.
        if exit_code is None or group_alive(process.pid):
            await kill_process_group(process, KILL_GRACE_SECONDS)
        if not group_alive(process.pid):
            watcher.forget(process.pid)
        await _release(process)
    if exit_code is None:
        raise CommandFailed("timeout", f"Command timed out after {timeout}s")
    return {
        "stdout": stdout.text(),
        "stderr": stderr.text(),
        "exit_code": exit_code,
        "truncated": stdout.truncated or stderr.truncated,
    }


async def _release(process: anyio.abc.Process) -> None:
    """Close our ends of the pipes (shielded, never blocks on a live child)."""
    with anyio.CancelScope(shield=True):
        if process.returncode is not None:
            await process.aclose()  # the child is reaped: this only closes the pipes
            return
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                await stream.aclose()


def read_initial_output(path: Path) -> str:
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_OUTPUT_BYTES)
    except OSError:
        return ""
    if len(data) == MAX_OUTPUT_BYTES:
        data = utf8_prefix(data)
    return data.decode("utf-8", errors="replace")


def _startup_wait() -> float:
    """Opik's ~3 s, but never past the command's own deadline."""
    remaining = anyio.current_effective_deadline() - anyio.current_time()
    if math.isinf(remaining):
        return STARTUP_WAIT_SECONDS
    return max(0.0, min(STARTUP_WAIT_SECONDS, remaining - DEADLINE_MARGIN_SECONDS))


async def run_background(
    argv: Sequence[str], ctx: HandlerContext, env: Mapping[str, str], temporary: Path | None
) -> dict[str, Any]:
    registry = ctx.services.background
    entry: BackgroundProcess = registry.start(
        argv, cwd=ctx.workspace.root, env=env, limit=ctx.settings.exec.max_background, temporary=temporary
    )
    try:
        # Returns early when the process exits; its exit code is set by the reaper thread.
        with anyio.move_on_after(_startup_wait()):
            await poll_until(lambda: entry.exit_code is not None)
        initial_output = await ctx.in_thread(read_initial_output, entry.log_file)
    except BaseException:
        # The caller never learns the pid: do not leave an unknown process behind.
        await registry.stop(entry, KILL_GRACE_SECONDS)
        raise
    exit_code = entry.exit_code
    result: dict[str, Any] = {
        "pid": entry.pid,
        "status": "running" if exit_code is None else "exited",
        "log_file": str(entry.log_file),
        "initial_output": initial_output,
    }
    if exit_code is not None:
        result["exit_code"] = exit_code
    return result


class ExecHandler(Handler[ExecArgs]):
    command_type = "Exec"
    args_model = ExecArgs
    mutating = True

    async def run(self, args: ExecArgs, ctx: HandlerContext) -> dict[str, Any]:
        check_policy(args.command, ctx.settings.exec)
        env = child_environment(ctx.settings, bridge_key=ctx.services.bridge_key)
        argv = background_argv(args.command) if args.background else ["bash", "-c", args.command]
        temporary = None
        if ctx.services.sandbox is not None:
            temporary, argv = await ctx.in_thread(confine, argv, ctx)
            env["TMPDIR"] = str(temporary)
        if args.background:
            # The folder goes when the process group is gone (see BackgroundProcesses).
            return await run_background(argv, ctx, env, temporary)
        # The loop's own deadline may come first; it then cancels us and reports the timeout.
        timeout = args.timeout if args.timeout is not None else DEFAULT_TIMEOUT_SECONDS
        watcher = ctx.services.background.watcher
        try:
            return await run_foreground(argv, ctx.workspace.root, env, timeout, watcher)
        finally:
            if temporary is not None:
                with anyio.CancelScope(shield=True):
                    await ctx.in_thread_to_completion(shutil.rmtree, temporary, True)


def confine(argv: list[str], ctx: HandlerContext) -> tuple[Path, list[str]]:
    """A private temporary folder, and ``argv`` under the sandbox with it writable and the
    workspace's write-denied entries (``.git``) read-only. Blocking: run in a worker thread."""
    assert ctx.services.sandbox is not None
    temporary = Path(tempfile.mkdtemp(prefix="runner-daemon-cmd-"))
    return temporary, ctx.services.sandbox.for_command(ctx.workspace, temporary).wrap(argv)


HANDLER = ExecHandler()
