"""``runner-daemon bench``: throughput, latency, CPU, memory and start-up time of the daemon.

Every party runs in a process of its own, so their costs never mix:

- the dev server, started by :func:`serve_devserver` in a child (``python -c``); its limits
  (pending commands, submissions per minute, how long finished commands are kept) are raised
  for the bench through the ``RD_BENCH_DEVSERVER`` variable, read only here;
- the daemon, ``python -m runner_daemon run`` configured by ``RUNNER_DAEMON_*`` variables,
  with a ``NOTIFY_SOCKET`` this process listens on to time spawn-to-``READY=1``;
- with ``--compare opik``, Opik's own ``BridgePollLoop`` in a driver (:data:`OPIK_DRIVER`),
  run by the Python given with ``--opik-python``; ``opik`` is imported there and nowhere else;
- this process, which submits the commands as Opik's UI does and waits for each result.

Latencies are the server's own times, ``completed_at - submitted_at`` of each command's
record; CPU is utime + stime and memory VmRSS / VmHWM of the runner process, from /proc.
Children are killed on any exit of the bench: an exception, Ctrl-C, SIGTERM or SIGHUP, and
(on Linux) they get SIGTERM from the kernel if the bench itself is killed.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Literal, Self

import anyio
import anyio.abc
import anyio.to_thread

from runner_daemon import __version__

RunnerKind = Literal["runner-daemon", "opik"]

DEVSERVER_ENV = "RD_BENCH_DEVSERVER"
LISTENING = "Opik-compatible dev server listening on "
# Opik's own hold; the bench keeps it so an idle runner long-polls as it would in production.
POLL_HOLD_SECONDS = 30.0
# Finished commands are forgotten this soon: the dev server scans its whole table on every
# submission and poll, and each result is read the moment it is stored (a held GET).
FINISHED_TTL_SECONDS = 3.0
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
IDLE_SETTLE_SECONDS = 3.0
# A load run gives up when no command finished for this long.
STALL_SECONDS = 30.0
# Opik's BridgePollLoop runs at most this many commands at once (its _MAX_WORKERS).
OPIK_WORKERS = 10

# The targets of issue "Performance: runner-daemon bench".
TARGET_THROUGHPUT_RATIO = 3.0
TARGET_P99_OVER_P50 = 2.0
TARGET_IDLE_RSS_MB = 45.0
TARGET_IDLE_CPU_PERCENT = 0.5
TARGET_RSS_GROWTH_MB = 5.0
TARGET_RSS_GROWTH_COUNT = 50_000
TARGET_READY_SECONDS = 0.5

COMMAND_ARGS: Mapping[str, dict[str, Any]] = {
    "ReadFile": {"path": "README.md"},
    "ListFiles": {"path": "src"},
}

# Opik's runner in a child of its own: a heartbeat thread (as its Supervisor keeps) and its
# BridgePollLoop with its ReadFile and ListFiles handlers over the same workspace. It sends
# READY=1 to $NOTIFY_SOCKET once the first heartbeat was answered, as runner-daemon does.
# argv: base URL, runner id, workspace root, "rest" (a bare OpikApi) or "sdk" (Opik().rest_client).
OPIK_DRIVER = r"""
import os, signal, socket, sys, threading, time
from pathlib import Path

url, runner_id, root, client_kind = sys.argv[1:5]
from opik.rest_api.client import OpikApi
from opik.runner.bridge_loop import BridgePollLoop
from opik.runner.bridge_handlers.list_files import ListFilesHandler
from opik.runner.bridge_handlers.read_file import ReadFileHandler

if client_kind == "sdk":
    import opik
    client = opik.Opik(host=url, project_name="runner-daemon-bench", _show_misconfiguration_message=False)
    api = client.rest_client
else:
    api = OpikApi(base_url=url.rstrip("/"))
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
signal.signal(signal.SIGINT, lambda *_: stop.set())
deadline = time.monotonic() + 30
while True:
    try:
        api.runners.heartbeat(runner_id, capabilities=["bridge"])
        break
    except Exception:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)

def beat():
    while not stop.wait(5.0):
        try:
            api.runners.heartbeat(runner_id, capabilities=["bridge"])
        except Exception:
            pass

threading.Thread(target=beat, name="heartbeat", daemon=True).start()
handlers = {"ReadFile": ReadFileHandler(Path(root)), "ListFiles": ListFilesHandler(Path(root))}
loop = BridgePollLoop(api, runner_id, handlers, stop)
address = os.environ.get("NOTIFY_SOCKET")
if address:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.sendto(b"READY=1", address)
loop.run()
"""


class BenchError(Exception):
    """The bench could not measure (a child did not start, commands did not finish)."""


# --- the dev server child -------------------------------------------------------------------


def serve_devserver() -> None:
    """Entry point of the bench's dev server process: ``DevServerConfig`` from the environment."""
    from runner_daemon.devserver.server import DevServer, DevServerConfig

    config = DevServerConfig(**json.loads(os.environ.get(DEVSERVER_ENV, "{}")))
    server = DevServer("127.0.0.1", 0, config)
    # Without TCP_NODELAY on the connections it accepts, every answer written in two pieces
    # (head, then body) waits out the client's delayed ACK, about 40 ms a request. asyncio
    # sets it only when the listening socket's proto says TCP (server.py binds it so now);
    # accepted sockets inherit it from the listening one, so this holds either way.
    listening = getattr(server, "_socket", None)
    if isinstance(listening, socket.socket):
        listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # As the daemon does once it is up: the dev server's full collections would otherwise add
    # their 10-20 ms pauses to whichever runner's latency tail they land in.
    gc.freeze()
    print(LISTENING + server.url, flush=True)
    server.serve_forever()


# --- processes --------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to SIGTERM the child when the bench dies (even by SIGKILL)."""
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return hook


class Children:
    """The bench's child processes; every one still running is killed when the block ends."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        self._hook = _die_with_parent_hook()

    def spawn(
        self,
        argv: list[str],
        env: Mapping[str, str],
        *,
        stdout: IO[bytes] | int,
        stderr: IO[bytes] | int,
        cwd: Path,
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            argv,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            preexec_fn=self._hook,  # noqa: PLW1509 (one prctl call, resolved before the fork)
        )
        self._procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_SECONDS) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait(STOP_TIMEOUT_SECONDS)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs:
            with suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT_SECONDS)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


@contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP end the bench as Ctrl-C does, so the children are cleaned up."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as stream:
        data = stream.read()
    fields = data[data.rindex(b")") + 2 :].split()  # after "pid (comm) "; fields[0] is the state
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB (10^6 bytes), from /proc/<pid>/status."""
    values: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as stream:
        for line in stream:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024 / 1e6
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


# --- the load generator's HTTP client ---------------------------------------------------------


class HttpError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200].decode(errors='replace')}")
        self.status = status


# uvicorn closes a kept-alive connection idle for 5 s.
IDLE_CONNECTION_SECONDS = 3.0


class _Connection:
    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.used = 0.0  # when it last answered; 0 while new

    async def _fill(self) -> None:
        self.buffer += await self.stream.receive(65536)

    async def exchange(self, request: bytes) -> tuple[int, bytes, bool]:
        """Send one request, read its answer: (status, body, keep the connection)."""
        await self.stream.send(request)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            await self._fill()
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        del self.buffer[: end + 4]
        status = int(head[0].split(" ", 2)[1])
        headers = {
            name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in head[1:])
        }
        if "chunked" in headers.get("transfer-encoding", ""):
            raise BenchError("the dev server answered chunked; the bench's client reads Content-Length only")
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            await self._fill()
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return status, body, headers.get("connection", "").lower() != "close"


class LoadClient:
    """The bench's HTTP/1.1 client: keep-alive connections, one request on each at a time.

    httpx costs about a millisecond of CPU per request on a small machine; the bench makes two
    requests per command, and on two cores that CPU would come out of the runners' share.
    This client costs a fraction of it, so the figures measure the runners, not the bench.
    """

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self._netloc = parts.netloc
        self._prefix = parts.path.rstrip("/")
        self._idle: list[_Connection] = []

    async def request(self, method: str, path: str, payload: Any = None, timeout: float = 60.0) -> Any:
        """``path`` is relative to the API base URL; returns the decoded JSON answer (or None)."""
        body = b"" if payload is None else json.dumps(payload).encode()
        request = (
            f"{method} {self._prefix}/{path} HTTP/1.1\r\nHost: {self._netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        with anyio.fail_after(timeout):
            connection = await self._take()
            try:
                status, answer, keep = await connection.exchange(request)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                await connection.stream.aclose()
                if connection.used == 0 or connection.buffer:
                    raise
                # The server closed a kept-alive connection as we sent: once more on a new one.
                connection = await self._connect()
                status, answer, keep = await connection.exchange(request)
            except BaseException:
                await connection.stream.aclose()
                raise
            if keep:
                connection.used = time.monotonic()
                self._idle.append(connection)
            else:
                await connection.stream.aclose()
        if status >= 300:
            raise HttpError(status, answer)
        return json.loads(answer) if answer else None

    async def _take(self) -> _Connection:
        """An idle connection used lately (uvicorn closes them after 5 s), or a new one."""
        while self._idle:
            connection = self._idle.pop()
            if time.monotonic() - connection.used < IDLE_CONNECTION_SECONDS:
                return connection
            await connection.stream.aclose()
        return await self._connect()

    async def _connect(self) -> _Connection:
        return _Connection(await anyio.connect_tcp(self._host, self._port))

    async def aclose(self) -> None:
        while self._idle:
            await self._idle.pop().stream.aclose()


RUNNERS = "v1/private/local-runners"


@dataclass(frozen=True)
class Finished:
    """What the bench keeps of a command's final record: its status and the server's times."""

    status: str
    error_code: str | None
    submitted_at: datetime | None
    picked_up_at: datetime | None
    completed_at: datetime | None

    @classmethod
    def of(cls, record: dict[str, Any]) -> Finished:
        error = record.get("error")

        def when(key: str) -> datetime | None:
            value = record.get(key)
            return datetime.fromisoformat(value) if isinstance(value, str) else None

        code = error.get("code") if isinstance(error, dict) else None
        status = str(record.get("status"))
        return cls(status, code, when("submitted_at"), when("picked_up_at"), when("completed_at"))


async def _submit(client: LoadClient, runner_id: str, command_type: str, args: dict[str, Any]) -> str:
    path = f"{RUNNERS}/{runner_id}/bridge/commands"
    for attempt in range(20):
        try:
            answer = await client.request("POST", path, {"type": command_type, "args": args})
            return str(answer["command_id"])
        except HttpError as exc:
            if exc.status != 429 and attempt >= 5:
                raise
            await anyio.sleep(0.1 * (attempt + 1))
    raise BenchError("the dev server kept refusing submissions (429)")


async def _wait_final(client: LoadClient, runner_id: str, command_id: str) -> Finished:
    path = f"{RUNNERS}/{runner_id}/bridge/commands/{command_id}?wait=true&timeout=60"
    while True:  # bounded by the caller's fail_after
        record = await client.request("GET", path, timeout=90)
        if record.get("status") in ("completed", "failed", "timed_out"):
            return Finished.of(record)


# --- results ----------------------------------------------------------------------------------


@dataclass
class Latency:
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values_ms: list[float]) -> Latency:
        if not values_ms:
            return cls(math.nan, math.nan, math.nan, math.nan)
        if len(values_ms) == 1:
            return cls(values_ms[0], values_ms[0], values_ms[0], values_ms[0])
        cuts = statistics.quantiles(values_ms, n=100, method="inclusive")
        return cls(cuts[49], cuts[89], cuts[98], max(values_ms))


@dataclass
class Memory:
    start: float  # right after READY
    before: float  # after the warm-up, when measuring starts
    after: float  # when the last command finished
    peak: float  # VmHWM: the most the process ever held

    @property
    def growth(self) -> float:
        return self.after - self.before

    @property
    def growth_from_start(self) -> float:
        return self.after - self.start


@dataclass
class LoadRun:
    runner: RunnerKind
    version: str
    count: int
    completed: int
    statuses: dict[str, int]
    error_codes: dict[str, int]
    seconds: float  # first submission to last result, by the server's clock
    throughput: float
    latency_ms: Latency
    cpu_seconds: float
    memory_mb: Memory = field(default_factory=lambda: Memory(math.nan, math.nan, math.nan, math.nan))
    ready_seconds: float = math.nan
    late_submissions: int = 0
    exit_status: int | None = None
    # Context: what the dev server and this process spent meanwhile (the machine is shared).
    devserver_cpu_seconds: float = math.nan
    bench_cpu_seconds: float = math.nan
    # From the poll that claimed it to its result stored: the runner's own share of the latency.
    in_runner_ms: Latency = field(default_factory=lambda: Latency.of([]))
    polls: int = 0  # long polls the runner made while measured (the dev server counts them)

    @property
    def cpu_per_1000(self) -> float:
        return self.cpu_seconds / self.count * 1000 if self.count else math.nan

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["cpu_seconds_per_1000"] = self.cpu_per_1000
        data["memory_mb"]["growth"] = self.memory_mb.growth
        data["memory_mb"]["growth_from_start"] = self.memory_mb.growth_from_start
        return data


@dataclass
class IdleRun:
    runner: RunnerKind
    version: str
    seconds: float
    cpu_seconds: float
    rss_mb: float
    peak_mb: float
    ready_seconds: float
    exit_status: int | None = None

    @property
    def cpu_percent(self) -> float:
        return self.cpu_seconds / self.seconds * 100 if self.seconds else math.nan

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "cpu_percent_of_one_core": self.cpu_percent}


@dataclass
class Target:
    name: str
    goal: str
    measured: str
    status: Literal["PASS", "FAIL", "n/a"]


@dataclass
class Report:
    options: dict[str, Any]
    load: list[LoadRun] = field(default_factory=list)
    idle: list[IdleRun] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    devserver_url: str = ""
    # Other work on the machine skews every figure: the 1-minute load average as the bench began.
    load_average: float = field(default_factory=lambda: os.getloadavg()[0])

    def run(self, kind: RunnerKind) -> LoadRun | None:
        return next((run for run in self.load if run.runner == kind), None)

    def ratios(self) -> dict[str, float] | None:
        ours, theirs = self.run("runner-daemon"), self.run("opik")
        if ours is None or theirs is None:
            return None
        return {
            "throughput": _ratio(ours.throughput, theirs.throughput),
            "p50": _ratio(ours.latency_ms.p50, theirs.latency_ms.p50),
            "p99": _ratio(ours.latency_ms.p99, theirs.latency_ms.p99),
            "cpu_per_1000": _ratio(ours.cpu_per_1000, theirs.cpu_per_1000),
            "rss_after": _ratio(ours.memory_mb.after, theirs.memory_mb.after),
            "rss_peak": _ratio(ours.memory_mb.peak, theirs.memory_mb.peak),
            "ready": _ratio(ours.ready_seconds, theirs.ready_seconds),
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "runner_daemon_version": __version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "devserver_url": self.devserver_url,
            "load_average": self.load_average,
            "options": self.options,
            "load": [run.as_json() for run in self.load],
            "idle": [run.as_json() for run in self.idle],
            "ratios": self.ratios(),
            "targets": [asdict(target) for target in self.targets],
        }


def _ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs else math.nan


# --- the bench --------------------------------------------------------------------------------


@dataclass
class Options:
    count: int
    concurrency: int
    command_type: str
    rate: float | None
    window: int
    warmup: int
    idle: float | None
    compare: str | None
    opik_python: str
    opik_client: str
    timeout: float
    json: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        return cls(
            count=args.count,
            concurrency=args.concurrency,
            command_type=args.type,
            rate=args.rate,
            window=args.window,
            warmup=args.warmup if args.warmup is not None else min(100, args.count),
            idle=args.idle,
            compare=args.compare,
            opik_python=args.opik_python or sys.executable,
            opik_client=args.opik_client,
            timeout=args.timeout if args.timeout is not None else 120.0 + args.count * 0.05,
            json=args.json,
        )

    def check(self) -> str | None:
        if self.count < 1:
            return "--count must be at least 1"
        if not 1 <= self.concurrency <= 64:
            return "--concurrency must be between 1 and 64"
        if self.rate is not None and self.rate <= 0:
            return "--rate must be positive"
        if self.window < 1:
            return "--window must be at least 1"
        if self.idle is not None and self.idle <= 0:
            return "--idle must be positive"
        return None


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
    def __init__(self, options: Options, children: Children, scratch: Path) -> None:
        self.options = options
        self.children = children
        self.scratch = scratch
        self.workspace = scratch / "workspace"
        self.logs = scratch / "logs"
        self.url = ""
        self.opik_version = ""
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

    def _log(self, name: str) -> IO[bytes]:
        """A child's output file, kept in the scratch folder (which stays when the bench fails)."""
        return open(self.logs / name, "wb")

    async def start_devserver(self) -> None:
        config = {
            "poll_hold_seconds": POLL_HOLD_SECONDS,
            "max_pending": self.options.window + 50,
            "submissions_per_minute": 1_000_000_000,
            "finished_ttl_seconds": FINISHED_TTL_SECONDS,
            "reaper_interval_seconds": 0.5,
            "max_timeout_seconds": 300,
        }
        env = {**_clean_environ(), DEVSERVER_ENV: json.dumps(config)}
        argv = [sys.executable, "-c", "from runner_daemon.bench import serve_devserver; serve_devserver()"]
        with self._log("devserver.log") as stderr:
            proc = self.children.spawn(argv, env, stdout=subprocess.PIPE, stderr=stderr, cwd=self.scratch)
        assert proc.stdout is not None
        stdout = proc.stdout

        def first_line() -> bytes:
            return stdout.readline()

        line = b""
        with anyio.move_on_after(START_TIMEOUT_SECONDS):
            line = await anyio.to_thread.run_sync(first_line, abandon_on_cancel=True)
        text = line.decode(errors="replace").strip()
        if not text.startswith(LISTENING):
            proc.kill()
            raise BenchError(f"the dev server did not start: {text or 'no output'}")
        self.url = text.removeprefix(LISTENING)
        self.devserver_pid = proc.pid

    async def check_opik(self) -> None:
        argv = [self.options.opik_python, "-c", "import opik; print(opik.__version__)"]
        try:
            with anyio.fail_after(120):
                done = await anyio.run_process(argv, check=False, env=_opik_environ(self.url or None))
        except (OSError, TimeoutError) as exc:
            raise BenchError(f"cannot run {self.options.opik_python}: {exc}") from None
        if done.returncode != 0:
            raise BenchError(
                f"opik is not importable by {self.options.opik_python}; install the 'compare' extra "
                "(pip install 'runner-daemon[compare]') or pass --opik-python"
            )
        self.opik_version = done.stdout.decode().strip()

    # --- one runner -----------------------------------------------------------------------

    def _runner_command(
        self, kind: RunnerKind, runner_id: str, address: str
    ) -> tuple[list[str], dict[str, str]]:
        if kind == "runner-daemon":
            env = {
                **_clean_environ(),
                "RUNNER_DAEMON_URL": self.url,
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
            return [sys.executable, "-m", "runner_daemon", "run"], env
        argv = [self.options.opik_python, "-c", OPIK_DRIVER, self.url, runner_id, str(self.workspace)]
        return [*argv, self.options.opik_client], {**_opik_environ(self.url), "NOTIFY_SOCKET": address}

    async def start_runner(self, kind: RunnerKind, name: str) -> Runner:
        """Create a runner on the dev server and spawn its process with a NOTIFY_SOCKET of ours;
        the time from the spawn to its READY=1 is its start-up time."""
        created = await self.client.request("POST", "dev/runners", {"name": name})
        runner_id = str(created["runner_id"])
        address = str(self.scratch / f"notify-{runner_id[:8]}.sock")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            notify.bind(address)
            notify.settimeout(0.1)
            argv, env = self._runner_command(kind, runner_id, address)
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
        return __version__ if kind == "runner-daemon" else self.opik_version

    async def load(self, kind: RunnerKind) -> LoadRun:
        options = self.options
        runner = await self.start_runner(kind, f"bench-{kind}")
        runner_id = runner.runner_id
        try:
            start_rss, _ = memory_mb(runner.pid)
            if options.warmup:
                await self.drive(runner_id, options.warmup, None)
            polls_before = await self._polls(runner_id)
            cpu_before, rss_before = cpu_seconds(runner.pid), memory_mb(runner.pid)[0]
            server_before, own_before = cpu_seconds(self.devserver_pid), cpu_seconds(os.getpid())
            records, late = await self.drive(runner_id, options.count, options.rate)
            cpu_after, (rss_after, peak) = cpu_seconds(runner.pid), memory_mb(runner.pid)
            server_cpu = cpu_seconds(self.devserver_pid) - server_before
            polls = await self._polls(runner_id) - polls_before
            own_cpu = cpu_seconds(os.getpid()) - own_before
        finally:
            status = runner.stop()
        run = _summarise(kind, self._version(kind), options.count, records, cpu_after - cpu_before)
        run.memory_mb = Memory(start_rss, rss_before, rss_after, peak)
        run.ready_seconds = runner.ready_seconds
        run.late_submissions = late
        run.exit_status = status
        run.devserver_cpu_seconds = server_cpu
        run.bench_cpu_seconds = own_cpu
        run.polls = polls
        return run

    async def _polls(self, runner_id: str) -> int:
        return int((await self.client.request("GET", f"dev/runners/{runner_id}/stats"))["polls"])

    async def drive(self, runner_id: str, count: int, rate: float | None) -> tuple[list[Finished], int]:
        """Submit ``count`` commands (a burst, or ``rate`` per second) with at most ``window``
        unfinished at a time; returns every final record and how many submissions were late."""
        options = self.options
        args = COMMAND_ARGS[options.command_type]
        records: list[Finished] = []
        window = anyio.Semaphore(options.window)
        late = 0

        async def one() -> None:
            try:
                command_id = await _submit(self.client, runner_id, options.command_type, args)
                records.append(await _wait_final(self.client, runner_id, command_id))
            finally:
                window.release()

        async def watch_progress() -> None:
            """Give up early when results stop coming (a runner that dropped some, or died)."""
            seen, since = -1, time.monotonic()
            while len(records) < count:
                if len(records) != seen:
                    seen, since = len(records), time.monotonic()
                elif time.monotonic() - since > STALL_SECONDS:
                    raise BenchError(
                        f"no result for {STALL_SECONDS:g} s; {seen} of {count} commands finished"
                    )
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

    async def idle(self, kinds: list[RunnerKind], seconds: float) -> list[IdleRun]:
        """Start the runners together, let them settle, then watch them idle side by side."""
        runners: list[Runner] = []
        try:
            for kind in kinds:
                runners.append(await self.start_runner(kind, f"bench-idle-{kind}"))
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
                runs.append(IdleRun(runner.kind, version, elapsed, used, rss, peak, runner.ready_seconds))
        finally:
            statuses = [runner.stop() for runner in runners]
        for run, status in zip(runs, statuses, strict=True):
            run.exit_status = status
        return runs

    async def run(self) -> Report:
        options = self.options
        report = Report(options=asdict(options))
        self.make_workspace()
        await self.start_devserver()
        report.devserver_url = self.url
        kinds: list[RunnerKind] = ["runner-daemon"]
        if options.compare == "opik":
            await self.check_opik()
            kinds.append("opik")
        self.client = LoadClient(self.url)
        try:
            if options.idle is not None:
                report.idle = await self.idle(kinds, options.idle)
            else:
                for i, kind in enumerate(kinds):
                    if i:  # let the dev server forget the first runner's commands
                        await anyio.sleep(FINISHED_TTL_SECONDS + 1.0)
                    report.load.append(await self.load(kind))
        finally:
            await self.client.aclose()
        report.targets = evaluate_targets(report, options)
        return report


def _summarise(kind: RunnerKind, version: str, count: int, records: list[Finished], cpu: float) -> LoadRun:
    statuses: dict[str, int] = {}
    codes: dict[str, int] = {}
    latencies: list[float] = []
    in_runner: list[float] = []
    firsts: list[float] = []
    lasts: list[float] = []
    for record in records:
        statuses[record.status] = statuses.get(record.status, 0) + 1
        if record.error_code is not None:
            codes[record.error_code] = codes.get(record.error_code, 0) + 1
        if record.submitted_at is not None and record.completed_at is not None:
            latencies.append((record.completed_at - record.submitted_at).total_seconds() * 1000)
            firsts.append(record.submitted_at.timestamp())
            if record.picked_up_at is not None:
                in_runner.append((record.completed_at - record.picked_up_at).total_seconds() * 1000)
            lasts.append(record.completed_at.timestamp())
    span = max(lasts) - min(firsts) if lasts else math.nan
    return LoadRun(
        runner=kind,
        version=version,
        count=count,
        completed=statuses.get("completed", 0),
        statuses=statuses,
        error_codes=codes,
        seconds=span,
        throughput=len(latencies) / span if span and span > 0 else math.nan,
        latency_ms=Latency.of(latencies),
        cpu_seconds=cpu,
        in_runner_ms=Latency.of(in_runner),
    )


def _clean_environ() -> dict[str, str]:
    """This environment without settings meant for a real daemon or a real Opik."""
    prefixes = ("RUNNER_DAEMON_", "OPIK_")
    names = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "STATE_DIRECTORY")
    return {
        key: value for key, value in os.environ.items() if not key.startswith(prefixes) and key not in names
    }


def _opik_environ(url: str | None) -> dict[str, str]:
    """For the opik child: no error reports or usage analytics sent anywhere, the dev server as Opik."""
    env = {**_clean_environ(), "OPIK_SENTRY_ENABLE": "false", "OPIK_ANALYTICS_ENABLE": "false"}
    # Opik() gzips request bodies over 256 bytes (Opik's server inflates them; the dev server does
    # not), which would turn every ReadFile report into a 400.
    env["OPIK_ENABLE_JSON_REQUEST_COMPRESSION"] = "false"
    if url:
        env["OPIK_URL_OVERRIDE"] = url
    return env


# --- targets and output -------------------------------------------------------------------------


def evaluate_targets(report: Report, options: Options) -> list[Target]:
    """Each target with PASS/FAIL, or n/a when this run's workload cannot tell."""
    targets: list[Target] = []

    def add(name: str, goal: str, measured: str, ok: bool | None) -> None:
        targets.append(Target(name, goal, measured, "n/a" if ok is None else "PASS" if ok else "FAIL"))

    ours, theirs = report.run("runner-daemon"), report.run("opik")
    steady = options.rate is not None
    if ours is not None:
        goal = f">= {TARGET_THROUGHPUT_RATIO:g}x Opik's loop, a burst"
        if theirs is None:
            add(
                "throughput", goal, f"{ours.throughput:.0f} cmd/s; Opik's not measured (--compare opik)", None
            )
        else:
            ratio = _ratio(ours.throughput, theirs.throughput)
            measured = f"{ratio:.2f}x ({ours.throughput:.0f} vs {theirs.throughput:.0f} cmd/s)"
            # At a fixed rate both keep up: the ratio says nothing about capacity.
            add("throughput", goal, measured, None if steady else ratio >= TARGET_THROUGHPUT_RATIO)
            p50, their_p50 = ours.latency_ms.p50, theirs.latency_ms.p50
            add("latency p50", "<= Opik's p50", f"{p50:.1f} ms vs {their_p50:.1f} ms", p50 <= their_p50)
        ratio = _ratio(ours.latency_ms.p99, ours.latency_ms.p50)
        measured = f"{ours.latency_ms.p99:.1f} ms = {ratio:.2f}x p50 ({ours.latency_ms.p50:.1f} ms)"
        goal = f"<= {TARGET_P99_OVER_P50:g}x p50 under a steady load (--rate)"
        add("latency p99", goal, measured, ratio <= TARGET_P99_OVER_P50 if steady else None)
        memory = ours.memory_mb
        enough = ours.count >= TARGET_RSS_GROWTH_COUNT
        goal = f"<= {TARGET_RSS_GROWTH_MB:g} MB over {TARGET_RSS_GROWTH_COUNT:,} commands"
        measured = (
            f"{memory.growth:+.1f} MB over {ours.count:,} after warm-up "
            f"({memory.growth_from_start:+.1f} MB from READY)"
        )
        add(
            "RSS growth", goal, measured, memory.growth_from_start <= TARGET_RSS_GROWTH_MB if enough else None
        )
        ready = ours.ready_seconds
        add(
            "start to READY",
            f"<= {TARGET_READY_SECONDS:g} s",
            f"{ready:.3f} s",
            ready <= TARGET_READY_SECONDS,
        )
    idle = next((run for run in report.idle if run.runner == "runner-daemon"), None)
    if idle is not None:
        measured = f"{idle.rss_mb:.1f} MB (peak {idle.peak_mb:.1f} MB)"
        add("idle RSS", f"<= {TARGET_IDLE_RSS_MB:g} MB", measured, idle.rss_mb <= TARGET_IDLE_RSS_MB)
        measured = f"{idle.cpu_percent:.3f}% ({idle.cpu_seconds:.2f} s CPU in {idle.seconds:.0f} s)"
        goal = f"< {TARGET_IDLE_CPU_PERCENT:g}% of one core"
        add("idle CPU", goal, measured, idle.cpu_percent < TARGET_IDLE_CPU_PERCENT)
        ready = idle.ready_seconds
        add(
            "start to READY",
            f"<= {TARGET_READY_SECONDS:g} s",
            f"{ready:.3f} s",
            ready <= TARGET_READY_SECONDS,
        )
    return targets


def _label(kind: RunnerKind, version: str) -> str:
    return f"{kind} {version}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, columns padded so it reads in a terminal too."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return [line(header), rule, *[line(row) for row in rows]]


def _x(value: float) -> str:
    return f"{value:.2f}x"


def format_report(report: Report) -> str:
    options = report.options
    lines: list[str] = []
    where = (
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average {report.load_average:.2f}"
    )
    if report.load:
        how = f"{options['rate']:g}/s steady" if options["rate"] else f"burst, window {options['window']}"
        what = f"{options['count']:,} x {options['command_type']} ({how})"
        lines.append(f"{what}, concurrency {options['concurrency']}, warm-up {options['warmup']}; {where}")
        if any(run.runner == "opik" for run in report.load):
            lines.append(
                f"(Opik's BridgePollLoop runs {OPIK_WORKERS} commands at once whatever --concurrency)"
            )
        header = ["runner", "done", "cmd/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "CPU s", "CPU s/1k"]
        header += ["RSS MB start", "before", "after", "peak", "READY s"]
        rows = []
        for run in report.load:
            lat, mem = run.latency_ms, run.memory_mb
            rows.append(
                [_label(run.runner, run.version), f"{run.completed:,}", f"{run.throughput:.0f}"]
                + [f"{value:.1f}" for value in (lat.p50, lat.p90, lat.p99, lat.max)]
                + [f"{run.cpu_seconds:.2f}", f"{run.cpu_per_1000:.3f}"]
                + [f"{value:.1f}" for value in (mem.start, mem.before, mem.after, mem.peak)]
                + [f"{run.ready_seconds:.3f}"]
            )
        ratios = report.ratios()
        if ratios is not None:
            ratio_cells = [_x(ratios[key]) for key in ("throughput", "p50", "p99", "cpu_per_1000")]
            ratio_cells += [_x(ratios[key]) for key in ("rss_after", "rss_peak", "ready")]
            throughput, p50, p99, cpu, rss_after, rss_peak, ready = ratio_cells
            rows.append(
                ["ours / opik", "", throughput, p50, "", p99, "", "", cpu, "", "", rss_after, rss_peak, ready]
            )
        lines += ["", *_table(header, rows)]
        for run in report.load:
            problems = {k: v for k, v in run.statuses.items() if k != "completed"}
            if problems or run.error_codes:
                lines.append(f"{run.runner}: not completed {problems} {run.error_codes}")
            lines.append(
                f"{run.runner}: meanwhile the dev server used {run.devserver_cpu_seconds:.2f} s CPU and this "
                f"bench {run.bench_cpu_seconds:.2f} s; {run.polls:,} polls; claimed to stored p50 "
                f"{run.in_runner_ms.p50:.1f} ms, p99 {run.in_runner_ms.p99:.1f} ms; exit {run.exit_status}"
            )
            if run.late_submissions:
                lines.append(f"{run.runner}: {run.late_submissions} submissions more than 10 ms late")
    if report.idle:
        seconds = report.idle[0].seconds
        lines.append(
            f"idle {seconds:.0f} s (poll hold {POLL_HOLD_SECONDS:g} s, heartbeat every 5 s); {where}"
        )
        rows = [
            [
                _label(idle.runner, idle.version),
                f"{idle.cpu_seconds:.2f}",
                f"{idle.cpu_percent:.3f}",
                f"{idle.rss_mb:.1f}",
                f"{idle.peak_mb:.1f}",
                f"{idle.ready_seconds:.3f}",
            ]
            for idle in report.idle
        ]
        lines += ["", *_table(["runner", "CPU s", "% of one core", "RSS MB", "peak MB", "READY s"], rows)]
    if report.targets:
        lines += ["", *_table(["target", "goal", "measured", ""], [
            [target.name, target.goal, target.measured, target.status] for target in report.targets
        ])]  # fmt: skip
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> int:
    """The ``bench`` command's body; exit 1 when the bench could not measure or commands failed."""
    options = Options.from_args(args)
    problem = options.check()
    if problem:
        print(f"runner-daemon bench: {problem}", file=sys.stderr)
        return 2
    if not sys.platform.startswith("linux"):
        print("runner-daemon bench: needs Linux (/proc)", file=sys.stderr)
        return 1
    # Short: a unix socket path must fit in 108 bytes.
    scratch = Path(tempfile.mkdtemp(prefix="rd-bench-"))
    try:
        with _signals_raise(), Children() as children:
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
        print(json.dumps(_finite(report.as_json()), indent=2))
    else:
        print(format_report(report))
    incomplete = [run for run in report.load if run.completed != run.count]
    return 1 if incomplete else 0


def _finite(value: Any) -> Any:
    """NaN (a figure that could not be measured) becomes null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value
