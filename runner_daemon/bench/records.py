"""What the bench measures and keeps: its options, each command's final record, each runner's
figures (``--jobs``: the jobs' latencies; ``--repeat``: every run's, their medians and each
ratio's spread over the rounds) and the report, in one place so the bench
(:mod:`.run`) fills them and the output (:mod:`.report`) reads them without either knowing
the other.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal, Self, TypeVar

from runner_daemon import __version__

RunnerKind = Literal["runner-daemon", "opik"]
KINDS: tuple[RunnerKind, ...] = ("runner-daemon", "opik")

# -n when not given: bridge commands take milliseconds, a cancelled job up to a heartbeat.
DEFAULT_COMMANDS = 1000
DEFAULT_JOBS = 50
# --repeat: enough rounds for a median, few enough that a typo does not run for hours.
MAX_REPEAT = 50
# --link's defaults: a few large ReadFile results, one at a time, so each command's latency is
# its own trip over the link (a run takes well under a minute at 2mbit).
LINK_COMMANDS = 20
LINK_WARMUP = 2
LINK_WINDOW = 1
LINK_SIZE = 512_000
# ReadFile cuts a result at 512,000 characters: a larger --size would not be read whole.
MAX_SIZE = 512_000
MAX_RATE_BITS = 1_000_000_000
MIN_RATE_BITS = 64_000
MAX_DELAY_SECONDS = 2.0


class BenchError(Exception):
    """The bench could not measure (a child did not start, commands did not finish)."""


_RATE = re.compile(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit)", re.IGNORECASE)
_DELAY = re.compile(r"(\d+(?:\.\d+)?)(ms|s)", re.IGNORECASE)
_RATE_UNITS = {"kbit": 1_000, "mbit": 1_000_000, "gbit": 1_000_000_000}


@dataclass(frozen=True)
class Link:
    """``--link``: a link's rate (bits per second, each way) and its one-way delay (seconds);
    :mod:`.link` builds it."""

    rate_bits: int
    delay: float

    @classmethod
    def parse(cls, text: str) -> Link:
        """``RATE[/DELAY]`` as tc spells them: ``2mbit/40ms``, ``512kbit/0.1s``, ``1gbit``."""
        rate_text, _, delay_text = text.partition("/")
        rate = _RATE.fullmatch(rate_text.strip())
        if rate is None:
            raise ValueError(f"rate {rate_text!r}: a number and kbit, mbit or gbit (2mbit)")
        delay = _DELAY.fullmatch(delay_text.strip() or "0ms")
        if delay is None:
            raise ValueError(f"delay {delay_text!r}: a number and ms or s (40ms)")
        bits = round(float(rate[1]) * _RATE_UNITS[rate[2].lower()])
        seconds = float(delay[1]) * (0.001 if delay[2].lower() == "ms" else 1.0)
        if not MIN_RATE_BITS <= bits <= MAX_RATE_BITS:
            raise ValueError("rate: from 64kbit to 1gbit")
        if seconds > MAX_DELAY_SECONDS:
            raise ValueError(f"delay: at most {MAX_DELAY_SECONDS:g} s")
        return cls(bits, seconds)

    def seconds_for(self, size: int) -> float:
        """What ``size`` bytes of payload take over the link, with room for headers, and a round trip."""
        return size * 8 * 1.1 / self.rate_bits + 2 * self.delay

    def describe(self) -> str:
        return f"{self.rate_bits / 1e6:g} Mbit/s and {self.delay * 1000:g} ms each way"


@dataclass
class Options:
    """The ``bench`` command's options, defaults derived once; kept whole in the report."""

    count: int
    concurrency: int
    command_type: str
    rate: float | None
    window: int
    warmup: int
    idle: float | None
    compare: str | None
    opik_python: str
    # The Python that runs the daemon: a venv with runner-daemon alone is what users run.
    daemon_python: str
    opik_client: str
    timeout: float
    json: bool
    jobs: bool = False
    # The daemon's heartbeat_interval_seconds under --jobs; None: its own default.
    heartbeat: float | None = None
    # Rounds: each runner runs this many times, alternating; medians are reported.
    repeat: int = 1
    # RATE/DELAY: the runners reach the dev server over a simulated slow link (:mod:`.link`).
    link: str | None = None
    # ReadFile reads a file of this many bytes of source text; None: a small README.
    size: int | None = None
    # Opik's client sends its request bodies plain (OPIK_ENABLE_JSON_REQUEST_COMPRESSION=false).
    opik_plain: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        link = args.link
        if args.count is not None:
            count = args.count
        else:
            count = DEFAULT_JOBS if args.jobs else LINK_COMMANDS if link else DEFAULT_COMMANDS
        size = args.size
        if size is None and link and args.type == "ReadFile":
            size = LINK_SIZE
        # The time one result takes over the link, sent plain: a run's bound grows with it.
        try:
            per_command = Link.parse(link).seconds_for(size or 0) if link else 0.0
        except ValueError:
            per_command = 0.0  # check() says what is wrong with it
        warmup = args.warmup if args.warmup is not None else min(LINK_WARMUP if link else 100, count)
        return cls(
            count=count,
            concurrency=args.concurrency,
            command_type=args.type,
            rate=args.rate,
            window=args.window if args.window is not None else LINK_WINDOW if link else 100,
            warmup=warmup,
            idle=args.idle,
            compare=args.compare,
            opik_python=args.opik_python or sys.executable,
            daemon_python=args.daemon_python or sys.executable,
            # Opik's runner builds its client as the SDK does (`opik runner`: Opik().rest_client).
            opik_client=args.opik_client or "sdk",
            timeout=args.timeout if args.timeout is not None else 120.0 + count * (0.05 + per_command),
            json=args.json,
            jobs=args.jobs,
            heartbeat=args.heartbeat,
            repeat=args.repeat,
            link=link,
            size=size,
            opik_plain=args.opik_plain,
        )

    @property
    def link_spec(self) -> Link | None:
        """The parsed ``--link`` (once :meth:`check` passed), or None."""
        return Link.parse(self.link) if self.link else None

    def stall_seconds(self, idle: float) -> float:
        """How long a run may go without a result: ``idle``, plus over a link the time the
        window's results take to cross it, sent plain."""
        link = self.link_spec
        return idle if link is None else idle + self.window * link.seconds_for(self.size or 0)

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
        if self.heartbeat is not None and not self.jobs:
            return "--heartbeat goes with --jobs"
        if self.heartbeat is not None and not 0 < self.heartbeat <= 60:
            return "--heartbeat must be more than 0 and at most 60 seconds"
        if not 1 <= self.repeat <= MAX_REPEAT:
            return f"--repeat must be between 1 and {MAX_REPEAT}"
        if self.jobs and (self.idle is not None or self.compare is not None or self.repeat != 1):
            return "--jobs measures runner-daemon's jobs alone, once: no --idle, --compare or --repeat"
        if self.size is not None and self.command_type != "ReadFile":
            return "--size goes with --type ReadFile"
        if self.size is not None and not 1 <= self.size <= MAX_SIZE:
            return f"--size must be between 1 and {MAX_SIZE:,} (ReadFile's cap)"
        if self.opik_plain and self.compare != "opik":
            return "--opik-plain goes with --compare opik"
        if self.opik_plain and self.opik_client != "sdk":
            return "--opik-plain goes with --opik-client sdk (a bare OpikApi sends plain anyway)"
        if self.link is not None:
            if self.jobs or self.idle is not None:
                return "--link measures a load run: not with --jobs or --idle"
            try:
                Link.parse(self.link)
            except ValueError as exc:
                return f"--link {self.link}: {exc}"
        return None


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

    @classmethod
    def median_of(cls, items: Sequence[Self]) -> Self:
        """Each percentile the median of the runs' (``--repeat``)."""
        return cls(
            median_of(item.p50 for item in items),
            median_of(item.p90 for item in items),
            median_of(item.p99 for item in items),
            median_of(item.max for item in items),
        )


@dataclass
class Memory:
    start: float  # right after READY
    before: float  # after the warm-up, when measuring starts
    after: float  # when the last command finished
    peak: float  # VmHWM: the most the process ever held

    @classmethod
    def median_of(cls, items: Sequence[Self]) -> Self:
        """Each figure the median of the runs' (``--repeat``)."""
        return cls(
            median_of(item.start for item in items),
            median_of(item.before for item in items),
            median_of(item.after for item in items),
            median_of(item.peak for item in items),
        )

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
    reports: int = 0  # results the dev server accepted while measured
    reports_gzipped: int = 0  # of those, how many came gzipped
    # --link: bytes the link carried while measured, TCP/IP headers included.
    link_up_bytes: float = math.nan
    link_down_bytes: float = math.nan
    round: int = 1  # which of --repeat's rounds; 0 for a median
    runs: int = 1  # how many runs these figures are the median of

    @property
    def cpu_per_1000(self) -> float:
        return self.cpu_seconds / self.count * 1000 if self.count else math.nan

    @classmethod
    def median_of(cls, runs: Sequence[LoadRun]) -> LoadRun:
        """One runner's ``--repeat`` runs as one: every figure the median of theirs, except the
        commands completed, the fewest of any run (a median would hide a run that lost some);
        no statuses or exit status (each run has its own)."""
        first = runs[0]
        return cls(
            runner=first.runner,
            version=first.version,
            count=first.count,
            completed=min(run.completed for run in runs),
            statuses={},
            error_codes={},
            seconds=median_of(run.seconds for run in runs),
            throughput=median_of(run.throughput for run in runs),
            latency_ms=Latency.median_of([run.latency_ms for run in runs]),
            cpu_seconds=median_of(run.cpu_seconds for run in runs),
            memory_mb=Memory.median_of([run.memory_mb for run in runs]),
            ready_seconds=median_of(run.ready_seconds for run in runs),
            late_submissions=statistics.median_low(run.late_submissions for run in runs),
            devserver_cpu_seconds=median_of(run.devserver_cpu_seconds for run in runs),
            bench_cpu_seconds=median_of(run.bench_cpu_seconds for run in runs),
            in_runner_ms=Latency.median_of([run.in_runner_ms for run in runs]),
            polls=statistics.median_low(run.polls for run in runs),
            reports=statistics.median_low(run.reports for run in runs),
            reports_gzipped=statistics.median_low(run.reports_gzipped for run in runs),
            link_up_bytes=median_of(run.link_up_bytes for run in runs),
            link_down_bytes=median_of(run.link_down_bytes for run in runs),
            round=0,
            runs=len(runs),
        )

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["cpu_seconds_per_1000"] = self.cpu_per_1000
        data["memory_mb"]["growth"] = self.memory_mb.growth
        data["memory_mb"]["growth_from_start"] = self.memory_mb.growth_from_start
        return data

    def as_median_json(self) -> dict[str, Any]:
        """A median's figures, without what belongs to each run alone."""
        per_run = ("round", "statuses", "error_codes", "exit_status")
        return {key: value for key, value in self.as_json().items() if key not in per_run}


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
    round: int = 1  # which of --repeat's rounds; 0 for a median
    runs: int = 1  # how many runs these figures are the median of

    @property
    def cpu_percent(self) -> float:
        return self.cpu_seconds / self.seconds * 100 if self.seconds else math.nan

    @classmethod
    def median_of(cls, runs: Sequence[IdleRun]) -> IdleRun:
        """One runner's ``--repeat`` idle runs as one: every figure the median of theirs."""
        first = runs[0]
        return cls(
            runner=first.runner,
            version=first.version,
            seconds=median_of(run.seconds for run in runs),
            cpu_seconds=median_of(run.cpu_seconds for run in runs),
            rss_mb=median_of(run.rss_mb for run in runs),
            peak_mb=median_of(run.peak_mb for run in runs),
            ready_seconds=median_of(run.ready_seconds for run in runs),
            round=0,
            runs=len(runs),
        )

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "cpu_percent_of_one_core": self.cpu_percent}

    def as_median_json(self) -> dict[str, Any]:
        """A median's figures, without what belongs to each run alone."""
        return {key: value for key, value in self.as_json().items() if key not in ("round", "exit_status")}


@dataclass
class JobsRun:
    """``--jobs``: the latencies of one declared agent's jobs, run one at a time."""

    version: str
    count: int  # jobs of each kind: short ones for the start, long ones for the cancel
    heartbeat_seconds: float
    kill_grace_seconds: float
    max_jobs: int
    poll_hold_seconds: float
    # The server's created_at → the agent's first statement (one machine's wall clock).
    start_ms: Latency
    # The server's started_at (the poll took the job) → the agent's first statement.
    start_in_daemon_ms: Latency
    # Cancel call returned → the agent's pid gone from /proc (or a zombie: it has exited).
    cancel_ms: Latency
    completed: int  # short jobs that ended completed
    cancelled: int  # long jobs that ended cancelled with their process gone
    statuses: dict[str, int]  # the final status of every job
    ready_seconds: float
    exit_status: int | None = None

    @property
    def cancel_bound_seconds(self) -> float:
        """What a cancel may take: until the next heartbeat, then the kill's grace."""
        return self.heartbeat_seconds + self.kill_grace_seconds

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "cancel_bound_seconds": self.cancel_bound_seconds}


# The ratios (ours / Opik's) the bench prints, by name: of a load run, of an idle run.
LOAD_RATIOS: dict[str, Callable[[LoadRun], float]] = {
    "throughput": lambda run: run.throughput,
    "p50": lambda run: run.latency_ms.p50,
    "p99": lambda run: run.latency_ms.p99,
    "cpu_per_1000": lambda run: run.cpu_per_1000,
    "rss_after": lambda run: run.memory_mb.after,
    "rss_peak": lambda run: run.memory_mb.peak,
    "ready": lambda run: run.ready_seconds,
}
IDLE_RATIOS: dict[str, Callable[[IdleRun], float]] = {
    "idle_cpu": lambda run: run.cpu_seconds,
    "idle_rss": lambda run: run.rss_mb,
    "idle_peak": lambda run: run.peak_mb,
    "ready": lambda run: run.ready_seconds,
}


Run = TypeVar("Run", LoadRun, IdleRun)


@dataclass(frozen=True)
class Spread:
    """One ratio over ``--repeat``'s pairs (round i of ours / round i of Opik's): its median
    and its range, so a single lucky or unlucky pair shows as such."""

    pairs: tuple[float, ...]

    @property
    def median(self) -> float:
        return median_of(self.pairs)

    @property
    def low(self) -> float:
        return min((value for value in self.pairs if math.isfinite(value)), default=math.nan)

    @property
    def high(self) -> float:
        return max((value for value in self.pairs if math.isfinite(value)), default=math.nan)

    def as_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.low, "max": self.high, "pairs": list(self.pairs)}


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
    jobs: JobsRun | None = None
    targets: list[Target] = field(default_factory=list)
    rounds: int = 1  # --repeat: each runner's runs, alternating
    devserver_url: str = ""
    # Other work on the machine skews every figure: the 1-minute load average as the bench began.
    load_average: float = field(default_factory=lambda: os.getloadavg()[0])

    def median(self, kind: RunnerKind) -> LoadRun | None:
        """A runner's load figures: its run, or with ``--repeat`` the medians of its runs."""
        runs = [run for run in self.load if run.runner == kind]
        if len(runs) <= 1:
            return runs[0] if runs else None
        return LoadRun.median_of(runs)

    def idle_median(self, kind: RunnerKind) -> IdleRun | None:
        """A runner's idle figures: its run, or with ``--repeat`` the medians of its runs."""
        runs = [run for run in self.idle if run.runner == kind]
        if len(runs) <= 1:
            return runs[0] if runs else None
        return IdleRun.median_of(runs)

    def medians(self) -> list[LoadRun]:
        return [run for kind in KINDS if (run := self.median(kind)) is not None]

    def idle_medians(self) -> list[IdleRun]:
        return [run for kind in KINDS if (run := self.idle_median(kind)) is not None]

    def ratio_spread(self) -> dict[str, Spread] | None:
        """Each ratio (ours / Opik's) pair by pair, the load's or else the idle run's; None
        without ``--compare``."""
        if load := _pairs(self.load):
            return {
                name: Spread(tuple(ratio_of(figure(ours), figure(theirs)) for ours, theirs in load))
                for name, figure in LOAD_RATIOS.items()
            }
        if idle := _pairs(self.idle):
            return {
                name: Spread(tuple(ratio_of(figure(ours), figure(theirs)) for ours, theirs in idle))
                for name, figure in IDLE_RATIOS.items()
            }
        return None

    def ratios(self) -> dict[str, float] | None:
        """Each ratio's median over the pairs (with one round: the ratio itself)."""
        spread = self.ratio_spread()
        return None if spread is None else {name: ratios.median for name, ratios in spread.items()}

    def as_json(self) -> dict[str, Any]:
        spread = self.ratio_spread()
        return {
            "runner_daemon_version": __version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "devserver_url": self.devserver_url,
            "load_average": self.load_average,
            "options": self.options,
            "rounds": self.rounds,
            "load": [run.as_json() for run in self.load],
            "idle": [run.as_json() for run in self.idle],
            "jobs": self.jobs.as_json() if self.jobs is not None else None,
            "medians": {
                "load": [run.as_median_json() for run in self.medians()],
                "idle": [run.as_median_json() for run in self.idle_medians()],
            },
            "ratios": self.ratios(),
            "ratio_spread": None if spread is None else {name: s.as_json() for name, s in spread.items()},
            "targets": [asdict(target) for target in self.targets],
        }


def _pairs(runs: Sequence[Run]) -> list[tuple[Run, Run]]:
    """(ours, Opik's) of each round that has both."""
    ours = {run.round: run for run in runs if run.runner == "runner-daemon"}
    return [(ours[run.round], run) for run in runs if run.runner == "opik" and run.round in ours]


def median_of(values: Iterable[float]) -> float:
    """The median of the figures that were measured (NaN ones left out), or NaN."""
    measured = [value for value in values if math.isfinite(value)]
    return statistics.median(measured) if measured else math.nan


def ratio_of(ours: float, theirs: float) -> float:
    """ours / theirs; NaN when theirs is nothing to divide by."""
    return ours / theirs if theirs else math.nan


def summarise(kind: RunnerKind, version: str, count: int, records: list[Finished], cpu: float) -> LoadRun:
    """A runner's figures from its measured commands' final records, by the server's clock."""
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
