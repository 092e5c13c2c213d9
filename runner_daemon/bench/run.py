"""The bench itself: a dev server, then each runner in turn under the same load (or idle side
by side), measured from outside; and ``run_bench``, the ``bench`` command's body.

Which process does what is in the package's docstring (:mod:`runner_daemon.bench`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.to_thread

import runner_daemon
from runner_daemon import __version__
from runner_daemon.bench import link
from runner_daemon.bench.children import (
    FINISHED_TTL_SECONDS,
    LISTENING,
    STOP_TIMEOUT_SECONDS,
    Children,
    clean_environ,
    devserver_command,
    opik_environ,
    signals_raise,
)
from runner_daemon.bench.jobs import JobsBench, jobs_heartbeat
from runner_daemon.bench.load_client import LoadClient, submit, wait_final
from runner_daemon.bench.probes import cpu_seconds, memory_mb
from runner_daemon.bench.records import (
    BenchError,
    Finished,
    IdleRun,
    Link,
    LoadRun,
    Memory,
    Options,
    Report,
    RunnerKind,
    summarise,
)
from runner_daemon.bench.report import evaluate_targets, format_json, format_report

START_TIMEOUT_SECONDS = 30.0
IDLE_SETTLE_SECONDS = 3.0
# A load run gives up when no command finished for this long.
STALL_SECONDS = 30.0
# Run by path with --opik-python, isolated: it imports opik, never runner_daemon.
OPIK_DRIVER = Path(__file__).with_name("opik_driver.py")

COMMAND_ARGS: Mapping[str, dict[str, Any]] = {
    "ReadFile": {"path": "README.md"},
    "ListFiles": {"path": "src"},
}
# ReadFile's target with --size.
SOURCE_FILE = "source.py"
# ReadFile returns at most this many lines.
READ_FILE_LINES = 2000
# The link scenario's options reach the bench re-run in its network namespace (:mod:`.link`).
_OPTIONS_ENV = "RD_BENCH_OPTIONS"


def source_text(size: int) -> str:
    """``size`` bytes of ASCII source text, this package's own, in at most ReadFile's 2,000
    lines: gzip gets the ratio it gets on code (about 3.3x), not the one of random or
    repeated bytes. Consecutive lines are joined (by a space) as long as that window needs."""
    sources = sorted(Path(runner_daemon.__file__).parent.rglob("*.py"))
    lines = [
        line.rstrip().encode("ascii", "replace").decode()
        for path in sources
        for line in path.read_text().splitlines()
        if line.strip()
    ]
    width = math.ceil(size / (READ_FILE_LINES - 1))
    out: list[str] = []
    total, current, i = 0, "", 0
    while total < size:
        line = lines[i % len(lines)]
        i += 1
        current = f"{current} {line.strip()}" if current else line
        if len(current) >= width:
            out.append(current + "\n")
            total += len(current) + 1
            current = ""
    return "".join(out)[: size - 1] + "\n"


@dataclass
class Runner:
    """A runner process under test, and the notify socket it reports to."""

    kind: RunnerKind
    runner_id: str
    proc: subprocess.Popen[bytes]
    ready_seconds: float
    notify: socket.socket

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> int:
        # Opik's loop only looks at its stop event between polls (a poll is held 30 s).
        status = Children.stop(self.proc, STOP_TIMEOUT_SECONDS if self.kind == "runner-daemon" else 1.0)
        self.notify.close()
        return status


class Bench:
    """One ``bench`` command's set-up and runs, in the scratch folder it is given."""

    def __init__(self, options: Options, children: Children, scratch: Path) -> None:
        self.options = options
        self.children = children
        self.scratch = scratch
        self.workspace = scratch / "workspace"
        self.logs = scratch / "logs"
        self.url = ""
        self.runner_url = ""  # the dev server, or with --link the proxy in front of it
        self.link = options.link_spec
        self.opik_version = ""
        self.daemon_version = __version__
        self.devserver_pid = 0
        self.client = LoadClient("http://127.0.0.1/")  # replaced once the dev server listens

    # --- set-up -------------------------------------------------------------------------

    def make_workspace(self) -> None:
        (self.workspace / "src").mkdir(parents=True)
        self.logs.mkdir()
        lines = [f"line {i}: a small file for runner-daemon bench to read\n" for i in range(20)]
        (self.workspace / "README.md").write_text("# bench\n" + "".join(lines))
        for i in range(10):
            (self.workspace / "src" / f"module_{i}.py").write_text(f"VALUE = {i}\n")
        if self.options.size is not None:
            (self.workspace / SOURCE_FILE).write_text(source_text(self.options.size))

    def command_args(self) -> dict[str, Any]:
        if self.options.command_type == "ReadFile" and self.options.size is not None:
            return {"path": SOURCE_FILE}
        return dict(COMMAND_ARGS[self.options.command_type])

    def _log(self, name: str) -> IO[bytes]:
        """A child's output file, kept in the scratch folder (which stays when the bench fails)."""
        return open(self.logs / name, "wb")

    async def _start_listener(
        self, name: str, command: tuple[list[str], dict[str, str]], prefix: str
    ) -> tuple[subprocess.Popen[bytes], str]:
        """Spawn a child that prints ``prefix`` and where it listens as its first line: that rest."""
        argv, env = command
        with self._log(f"{name.replace(' ', '')}.log") as stderr:
            proc = self.children.spawn(argv, env, stdout=subprocess.PIPE, stderr=stderr, cwd=self.scratch)
        assert proc.stdout is not None
        stdout = proc.stdout

        def first_line() -> bytes:
            return stdout.readline()

        line = b""
        with anyio.move_on_after(START_TIMEOUT_SECONDS):
            line = await anyio.to_thread.run_sync(first_line, abandon_on_cancel=True)
        text = line.decode(errors="replace").strip()
        if not text.startswith(prefix):
            proc.kill()
            raise BenchError(f"the {name} did not start: {text or 'no output'}")
        return proc, text.removeprefix(prefix)

    async def start_devserver(self, heartbeat_ttl: float = 15.0) -> None:
        command = devserver_command(max_pending=self.options.window + 50, heartbeat_ttl=heartbeat_ttl)
        proc, self.url = await self._start_listener("dev server", command, LISTENING)
        self.runner_url = self.url
        self.devserver_pid = proc.pid

    async def start_link(self, spec: Link) -> None:
        """The delaying proxy in front of the dev server, its port shaped: the runners' way in."""
        parts = urllib.parse.urlsplit(self.url)
        command = link.proxy_command(parts.port or 80, spec.delay)
        _, port = await self._start_listener("link proxy", command, link.PROXY_LISTENING)
        await link.shape(int(port), spec)
        self.runner_url = urllib.parse.urlunsplit(parts._replace(netloc=f"127.0.0.1:{port}"))

    async def check_opik(self) -> None:
        argv = [self.options.opik_python, "-I", "-c", "import opik; print(opik.__version__)"]
        try:
            with anyio.fail_after(120):
                done = await anyio.run_process(argv, check=False, env=opik_environ(self.url or None))
        except (OSError, TimeoutError) as exc:
            raise BenchError(f"cannot run {self.options.opik_python}: {exc}") from None
        if done.returncode != 0:
            raise BenchError(
                f"opik is not importable by {self.options.opik_python}; install the 'compare' extra "
                "(pip install 'runner-daemon[compare]') or pass --opik-python"
            )
        self.opik_version = done.stdout.decode().strip()

    async def check_daemon(self) -> None:
        """With --daemon-python: that Python runs runner-daemon, and which version."""
        python = self.options.daemon_python
        if python == sys.executable:
            return
        argv = [python, "-m", "runner_daemon", "--version"]
        try:
            with anyio.fail_after(120):
                done = await anyio.run_process(argv, check=False, env=clean_environ())
        except (OSError, TimeoutError) as exc:
            raise BenchError(f"cannot run {python}: {exc}") from None
        if done.returncode != 0:
            raise BenchError(f"runner-daemon is not importable by {python} (--daemon-python)")
        self.daemon_version = done.stdout.decode().split()[1]

    # --- one runner -----------------------------------------------------------------------

    def _runner_command(
        self, kind: RunnerKind, runner_id: str, address: str
    ) -> tuple[list[str], dict[str, str]]:
        if kind == "runner-daemon":
            env = {
                **clean_environ(),
                "RUNNER_DAEMON_URL": self.runner_url,
                "RUNNER_DAEMON_RUNNER_ID": runner_id,
                "RUNNER_DAEMON_WORKSPACE_ROOT": str(self.workspace),
                "RUNNER_DAEMON_STATE_DIRECTORY": str(self.scratch / f"state-{runner_id}"),
                "RUNNER_DAEMON_ALLOW_UNSIGNED_COMMANDS": "true",
                "RUNNER_DAEMON_LOG_LEVEL": "warning",
                "RUNNER_DAEMON_LOG_FORMAT": "json",
                "RUNNER_DAEMON_MAX_CONCURRENCY": str(self.options.concurrency),
                # Nothing runs when the bench stops it: the grace only bounds the wait for its
                # open poll (held 30 s by the dev server), which it keeps at a stop.
                "RUNNER_DAEMON_SHUTDOWN_GRACE_SECONDS": "2",
                "NOTIFY_SOCKET": address,
            }
            return [self.options.daemon_python, "-m", "runner_daemon", "run"], env
        url = self.runner_url
        argv = [self.options.opik_python, "-I", str(OPIK_DRIVER), url, runner_id, str(self.workspace)]
        env = opik_environ(url, compress=not self.options.opik_plain)
        return [*argv, self.options.opik_client], {**env, "NOTIFY_SOCKET": address}

    async def start_runner(self, kind: RunnerKind, name: str) -> Runner:
        """Create a runner on the dev server and spawn its process (:meth:`spawn_runner`)."""
        created = await self.client.request("POST", "dev/runners", {"name": name})
        runner_id = str(created["runner_id"])
        return await self.spawn_runner(
            kind, runner_id, lambda address: self._runner_command(kind, runner_id, address)
        )

    async def spawn_runner(
        self, kind: RunnerKind, runner_id: str, command: Callable[[str], tuple[list[str], dict[str, str]]]
    ) -> Runner:
        """Spawn ``command(notify address)`` with a NOTIFY_SOCKET of ours; the time from the
        spawn to its READY=1 is its start-up time."""
        address = str(self.scratch / f"notify-{runner_id[:8]}.sock")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            notify.bind(address)
            notify.settimeout(0.1)
            argv, env = command(address)
            with self._log(f"{kind}-{runner_id[:8]}.log") as log:
                spawned = time.monotonic()
                proc = self.children.spawn(argv, env, stdout=log, stderr=log, cwd=self.scratch)

            def wait_ready() -> float | None:
                deadline = spawned + START_TIMEOUT_SECONDS
                while time.monotonic() < deadline and proc.poll() is None:
                    try:
                        message = notify.recv(4096)
                    except TimeoutError:
                        continue
                    if b"READY=1" in message.split(b"\n"):
                        return time.monotonic() - spawned
                return None

            ready = await anyio.to_thread.run_sync(wait_ready)
            if ready is None:
                Children.stop(proc, 1.0)
                raise BenchError(f"{kind} did not become ready (exit status {proc.poll()})")
        except BaseException:
            notify.close()
            raise
        # Later STATUS= messages pile up unread in the socket's buffer: the daemon never blocks.
        notify.setblocking(False)
        return Runner(kind, runner_id, proc, ready, notify)

    def _version(self, kind: RunnerKind) -> str:
        return self.daemon_version if kind == "runner-daemon" else self.opik_version

    async def load(self, kind: RunnerKind, round_number: int) -> LoadRun:
        """One run of ``kind``: a fresh runner process, the warm-up, then the measured load."""
        options = self.options
        runner = await self.start_runner(kind, f"bench-{kind}-{round_number}")
        runner_id = runner.runner_id
        try:
            start_rss, _ = memory_mb(runner.pid)
            if options.warmup:
                await self.drive(runner_id, options.warmup, None)
            stats_before = await self._stats(runner_id)
            wire_before = await link.shaped_bytes() if self.link else (0, 0)
            cpu_before, rss_before = cpu_seconds(runner.pid), memory_mb(runner.pid)[0]
            server_before, own_before = cpu_seconds(self.devserver_pid), cpu_seconds(os.getpid())
            records, late = await self.drive(runner_id, options.count, options.rate)
            cpu_after, (rss_after, peak) = cpu_seconds(runner.pid), memory_mb(runner.pid)
            server_cpu = cpu_seconds(self.devserver_pid) - server_before
            wire_after = await link.shaped_bytes() if self.link else (0, 0)
            stats = await self._stats(runner_id)
            own_cpu = cpu_seconds(os.getpid()) - own_before
        finally:
            status = runner.stop()
        run = summarise(kind, self._version(kind), options.count, records, cpu_after - cpu_before)
        run.memory_mb = Memory(start_rss, rss_before, rss_after, peak)
        run.ready_seconds = runner.ready_seconds
        run.late_submissions = late
        run.exit_status = status
        run.devserver_cpu_seconds = server_cpu
        run.bench_cpu_seconds = own_cpu
        run.polls = stats["polls"] - stats_before["polls"]
        run.reports = stats["reports_accepted"] - stats_before["reports_accepted"]
        run.reports_gzipped = stats["reports_gzipped"] - stats_before["reports_gzipped"]
        if self.link:
            run.link_up_bytes = wire_after[0] - wire_before[0]
            run.link_down_bytes = wire_after[1] - wire_before[1]
        run.round = round_number
        return run

    async def _stats(self, runner_id: str) -> dict[str, int]:
        """The dev server's counters of a runner: polls, reports accepted and gzipped."""
        stats = await self.client.request("GET", f"dev/runners/{runner_id}/stats")
        return {key: int(stats[key]) for key in ("polls", "reports_accepted", "reports_gzipped")}

    async def drive(self, runner_id: str, count: int, rate: float | None) -> tuple[list[Finished], int]:
        """Submit ``count`` commands (a burst, or ``rate`` per second) with at most ``window``
        unfinished at a time; returns every final record and how many submissions were late."""
        options = self.options
        args = self.command_args()
        records: list[Finished] = []
        window = anyio.Semaphore(options.window)
        late = 0
        stall = options.stall_seconds(STALL_SECONDS)

        async def one() -> None:
            try:
                command_id = await submit(self.client, runner_id, options.command_type, args)
                records.append(await wait_final(self.client, runner_id, command_id))
            finally:
                window.release()

        async def watch_progress() -> None:
            """Give up early when results stop coming (a runner that dropped some, or died)."""
            seen, since = -1, time.monotonic()
            while len(records) < count:
                if len(records) != seen:
                    seen, since = len(records), time.monotonic()
                elif time.monotonic() - since > stall:
                    raise BenchError(f"no result for {stall:.0f} s; {seen} of {count} commands finished")
                await anyio.sleep(0.5)

        try:
            with anyio.fail_after(options.timeout):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch_progress)
                    started = time.monotonic()
                    for i in range(count):
                        if rate is not None:
                            due = started + i / rate
                            now = time.monotonic()
                            if due > now:
                                await anyio.sleep(due - now)
                            elif now - due > 0.01:
                                late += 1
                        await window.acquire()
                        tg.start_soon(one)
        except TimeoutError:
            raise BenchError(
                f"only {len(records)} of {count} commands finished within {options.timeout:.0f} s (--timeout)"
            ) from None
        except ExceptionGroup as group:
            first = group.exceptions[0]
            if isinstance(first, BenchError):
                raise first from None
            raise BenchError(f"a request of the bench failed: {first!r}") from None
        return records, late

    async def idle(self, kinds: list[RunnerKind], seconds: float, round_number: int) -> list[IdleRun]:
        """Start the runners together, let them settle, then watch them idle side by side."""
        runners: list[Runner] = []
        try:
            for kind in kinds:
                runners.append(await self.start_runner(kind, f"bench-idle-{kind}-{round_number}"))
            await anyio.sleep(IDLE_SETTLE_SECONDS)
            before = [cpu_seconds(runner.pid) for runner in runners]
            clock = time.monotonic()
            await anyio.sleep(seconds)
            elapsed = time.monotonic() - clock
            runs = []
            for runner, cpu in zip(runners, before, strict=True):
                used = cpu_seconds(runner.pid) - cpu
                rss, peak = memory_mb(runner.pid)
                version = self._version(runner.kind)
                runs.append(
                    IdleRun(
                        runner.kind,
                        version,
                        elapsed,
                        used,
                        rss,
                        peak,
                        runner.ready_seconds,
                        round=round_number,
                    )
                )
        finally:
            statuses = [runner.stop() for runner in runners]
        for run, status in zip(runs, statuses, strict=True):
            run.exit_status = status
        return runs

    async def run(self) -> Report:
        """The dev server, then ``--repeat`` rounds: in each, every runner in turn under the same
        load (ours first, then Opik's), or both idle side by side. Alternating spreads the
        machine's drift (other tenants come and go) over both runners alike."""
        options = self.options
        report = Report(options=asdict(options), rounds=options.repeat)
        self.make_workspace()
        if options.jobs:
            return await self.run_jobs(report)
        if self.link:
            await link.loopback_up()
        await self.start_devserver()
        report.devserver_url = self.url
        if self.link:
            await self.start_link(self.link)
        await self.check_daemon()
        kinds: list[RunnerKind] = ["runner-daemon"]
        if options.compare == "opik":
            await self.check_opik()
            kinds.append("opik")
        self.client = LoadClient(self.url)
        try:
            for round_number in range(1, options.repeat + 1):
                if options.idle is not None:
                    report.idle += await self.idle(kinds, options.idle, round_number)
                    continue
                for kind in kinds:
                    if report.load:  # let the dev server forget the previous runner's commands
                        await anyio.sleep(FINISHED_TTL_SECONDS + 1.0)
                    report.load.append(await self.load(kind, round_number))
        finally:
            await self.client.aclose()
        report.targets = evaluate_targets(report, options)
        return report

    async def run_jobs(self, report: Report) -> Report:
        """``--jobs``: the dev server, then the daemon serving an endpoint runner (:mod:`.jobs`)."""
        heartbeat = jobs_heartbeat(self.options)
        await self.start_devserver(heartbeat_ttl=max(15.0, 3 * heartbeat))
        report.devserver_url = self.url
        await self.check_daemon()
        self.client = LoadClient(self.url)
        try:
            report.jobs = await JobsBench(self, heartbeat).run()
        finally:
            await self.client.aclose()
        report.targets = evaluate_targets(report, options=self.options)
        return report


def run_bench(args: argparse.Namespace) -> int:
    """The ``bench`` command's body; exit 1 when the bench could not measure or commands (jobs)
    failed. With ``--link``, the bench runs again in a network namespace of its own."""
    options = Options.from_args(args)
    problem = options.check()
    if problem:
        print(f"runner-daemon bench: {problem}", file=sys.stderr)
        return 2
    if not sys.platform.startswith("linux"):
        print("runner-daemon bench: needs Linux (/proc)", file=sys.stderr)
        return 1
    if options.link is not None:
        return _run_in_namespace(options)
    return _measure(options)


def _run_in_namespace(options: Options) -> int:
    """The whole bench, again, in a new network namespace (:mod:`.link`): its output is this
    command's, its exit status too."""
    problem = link.unavailable()
    if problem:
        print(f"runner-daemon bench: {problem}", file=sys.stderr)
        return 1
    entry = (
        "from runner_daemon.bench.run import measure_in_namespace; raise SystemExit(measure_in_namespace())"
    )
    argv, env = link.namespace_command(entry, {**os.environ, _OPTIONS_ENV: json.dumps(asdict(options))})
    try:
        with signals_raise(), Children() as children:
            proc = children.spawn(argv, env, stdout=None, stderr=None, cwd=Path.cwd())
            try:
                return proc.wait()
            except KeyboardInterrupt as exc:
                if exc.args:  # SIGTERM or SIGHUP to this process alone (a Ctrl-C reaches both)
                    proc.send_signal(signal.SIGTERM)
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(STOP_TIMEOUT_SECONDS)  # it cleans up after itself
                raise
    except KeyboardInterrupt:
        return 130  # the bench in the namespace said so


def measure_in_namespace() -> int:
    """Entry point of the bench re-run by :func:`_run_in_namespace`."""
    return _measure(Options(**json.loads(os.environ[_OPTIONS_ENV])))


def _measure(options: Options) -> int:
    """Run the bench and print its report."""
    # Short: a unix socket path must fit in 108 bytes.
    scratch = Path(tempfile.mkdtemp(prefix="rd-bench-"))
    try:
        with signals_raise(), Children() as children:
            report = anyio.run(Bench(options, children, scratch).run)
    except BenchError as exc:
        print(f"runner-daemon bench: {exc}; the children's logs are in {scratch / 'logs'}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        shutil.rmtree(scratch, ignore_errors=True)
        print("runner-daemon bench: interrupted", file=sys.stderr)
        return 130
    shutil.rmtree(scratch, ignore_errors=True)
    if options.json:
        print(format_json(report))
    else:
        print(format_report(report))
    incomplete = any(run.completed != run.count for run in report.load)
    jobs = report.jobs
    if jobs is not None and not jobs.completed == jobs.cancelled == jobs.count:
        incomplete = True
    return 1 if incomplete else 0
