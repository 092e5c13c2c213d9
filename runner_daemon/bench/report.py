"""The bench's verdict and output: each target of the issue PASS/FAIL/n/a, then Markdown tables
a terminal reads as well as a pull request does, or JSON (``--json``) for scripts.

With ``--repeat`` every run has its row (and each round its ratios), then a table of the
medians, each ratio's median over the rounds and its min-max; the targets judge the medians.

Only figures already measured come in here (:mod:`.records`); nothing is measured here.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Callable, Mapping
from typing import Any

from runner_daemon.bench.children import POLL_HOLD_SECONDS
from runner_daemon.bench.records import (
    IDLE_RATIOS,
    LOAD_RATIOS,
    IdleRun,
    JobsRun,
    Latency,
    Link,
    LoadRun,
    Options,
    Report,
    Run,
    RunnerKind,
    Spread,
    Target,
    ratio_of,
)

# Opik's BridgePollLoop runs at most this many commands at once (its _MAX_WORKERS).
OPIK_WORKERS = 10

# The absolute targets of the first performance issue.
TARGET_P99_OVER_P50 = 2.0
TARGET_IDLE_RSS_MB = 45.0
TARGET_IDLE_CPU_PERCENT = 0.5
TARGET_RSS_GROWTH_MB = 5.0
TARGET_RSS_GROWTH_COUNT = 50_000
TARGET_READY_SECONDS = 0.5

# The ratios to Opik's runner of issue 17 (ours / Opik's): at most, or for throughput at least.
RATIO_GOALS: dict[str, float] = {
    "p50": 0.8,  # steady load (--rate)
    "p99": 1.0,  # steady load
    "cpu_per_1000": 0.8,
    "throughput": 1.0,  # a burst
    "idle_cpu": 1.0,
    "idle_rss": 0.5,
    "ready": 0.25,
}


def evaluate_targets(report: Report, options: Options) -> list[Target]:
    """Each target with PASS/FAIL, or n/a when this run's workload cannot tell; with
    ``--repeat``, of the medians (a ratio: its median over the rounds)."""
    targets: list[Target] = []

    def add(name: str, goal: str, measured: str, ok: bool | None) -> None:
        targets.append(Target(name, goal, measured, "n/a" if ok is None else "PASS" if ok else "FAIL"))

    ours, theirs = report.median("runner-daemon"), report.median("opik")
    ratios = report.ratios() or {}
    steady = options.rate is not None
    # Over --link every figure carries the link's round trips: what it measures is latency.
    linked = options.link is not None

    def against_opik(name: str, key: str, measured: str, judged: bool) -> None:
        """A ratio goal; a ratio's value is judged only where the workload can tell."""
        goal, ratio = RATIO_GOALS[key], ratios[key]
        wording = f">= {goal:g}x Opik's" if key == "throughput" else f"<= {goal:g}x Opik's"
        ok = ratio >= goal if key == "throughput" else ratio <= goal
        add(name, wording, f"{ratio:.2f}x ({measured})", ok if judged else None)

    if ours is not None:
        if theirs is not None:
            # At a fixed rate both keep up: throughput says nothing about capacity, and in a
            # burst latency is queueing, set by throughput.
            against_opik(
                "throughput (a burst)",
                "throughput",
                f"{_rate(ours.throughput)} vs {_rate(theirs.throughput)} cmd/s",
                not steady and not linked,
            )
            vs = f"{ours.latency_ms.p50:.1f} vs {theirs.latency_ms.p50:.1f} ms"
            against_opik("latency p50 (--rate)", "p50", vs, steady and not linked)
            vs = f"{ours.latency_ms.p99:.1f} vs {theirs.latency_ms.p99:.1f} ms"
            against_opik("latency p99 (--rate)", "p99", vs, steady and not linked)
            vs = f"{ours.cpu_per_1000:.2f} vs {theirs.cpu_per_1000:.2f} ms"  # CPU s per 1,000 = ms each
            against_opik("CPU per command", "cpu_per_1000", vs, not linked)
            vs = f"{ours.ready_seconds:.3f} vs {theirs.ready_seconds:.3f} s"
            against_opik("READY against Opik's", "ready", vs, not linked)
        ratio = ratio_of(ours.latency_ms.p99, ours.latency_ms.p50)
        measured = f"{ours.latency_ms.p99:.1f} ms = {ratio:.2f}x p50 ({ours.latency_ms.p50:.1f} ms)"
        goal = f"<= {TARGET_P99_OVER_P50:g}x p50 under a steady load (--rate)"
        add("p99 over p50", goal, measured, ratio <= TARGET_P99_OVER_P50 if steady else None)
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
            None if linked else ready <= TARGET_READY_SECONDS,
        )
    jobs = report.jobs
    if jobs is not None:
        bound = jobs.cancel_bound_seconds
        measured = f"max {jobs.cancel_ms.max:.0f} ms (p99 {jobs.cancel_ms.p99:.0f} ms)"
        goal = f"<= heartbeat + kill grace ({bound:g} s)"
        add("cancel latency", goal, measured, jobs.cancel_ms.max <= bound * 1000)
    idle, their_idle = report.idle_median("runner-daemon"), report.idle_median("opik")
    if idle is not None and their_idle is not None:
        vs = f"{idle.cpu_seconds:.3f} vs {their_idle.cpu_seconds:.3f} s"
        against_opik("idle CPU against Opik's", "idle_cpu", vs, True)
        against_opik(
            "idle RSS against Opik's", "idle_rss", f"{idle.rss_mb:.1f} vs {their_idle.rss_mb:.1f} MB", True
        )
        vs = f"{idle.ready_seconds:.3f} vs {their_idle.ready_seconds:.3f} s"
        against_opik("READY against Opik's", "ready", vs, True)
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


def _rate(commands_per_second: float) -> str:
    """Whole commands a second; a tenth below 10 (a slow link's one or two)."""
    return f"{commands_per_second:.{0 if commands_per_second >= 10 else 1}f}"


def _x(value: float) -> str:
    return f"{value:.2f}x"


def _range(spread: Spread) -> str:
    return f"{spread.low:.2f}-{spread.high:.2f}x"


LOAD_HEADER = ["runner", "done", "cmd/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "CPU s", "CPU s/1k"]
LOAD_HEADER += ["RSS MB start", "before", "after", "peak", "READY s"]
IDLE_HEADER = ["runner", "CPU s", "% of one core", "RSS MB", "peak MB", "READY s"]


def _load_row(run: LoadRun, label: str) -> list[str]:
    lat, mem = run.latency_ms, run.memory_mb
    return (
        [label, f"{run.completed:,}", _rate(run.throughput)]
        + [f"{value:.1f}" for value in (lat.p50, lat.p90, lat.p99, lat.max)]
        + [f"{run.cpu_seconds:.2f}", f"{run.cpu_per_1000:.3f}"]
        + [f"{value:.1f}" for value in (mem.start, mem.before, mem.after, mem.peak)]
        + [f"{run.ready_seconds:.3f}"]
    )


def _load_ratio_row(label: str, cells: dict[str, str]) -> list[str]:
    """The ratios (``cells``, by name) under their figures' columns."""
    throughput, p50, p99, cpu = cells["throughput"], cells["p50"], cells["p99"], cells["cpu_per_1000"]
    rss_after, rss_peak, ready = cells["rss_after"], cells["rss_peak"], cells["ready"]
    return [label, "", throughput, p50, "", p99, "", "", cpu, "", "", rss_after, rss_peak, ready]


def _idle_row(run: IdleRun, label: str) -> list[str]:
    figures = (run.cpu_seconds, run.cpu_percent, run.rss_mb, run.peak_mb, run.ready_seconds)
    return [label, *(f"{value:.{digits}f}" for value, digits in zip(figures, (2, 3, 1, 1, 3), strict=True))]


def _idle_ratio_row(label: str, cells: dict[str, str]) -> list[str]:
    return [label, cells["idle_cpu"], "", cells["idle_rss"], cells["idle_peak"], cells["ready"]]


def _runs_table(
    runs: list[Run],
    rounds: int,
    row: Callable[[Run, str], list[str]],
    ratio_row: Callable[[str, dict[str, str]], list[str]],
    figures: Mapping[str, Callable[[Run], float]],
) -> list[list[str]]:
    """Every run's row (numbered by round with ``--repeat``), each round's ratios under its pair."""
    rows: list[list[str]] = []
    ours: dict[int, Run] = {}
    for run in runs:
        number = f" #{run.round}" if rounds > 1 else ""
        rows.append(row(run, _label(run.runner, run.version) + number))
        if run.runner == "runner-daemon":
            ours[run.round] = run
        elif run.round in ours:
            mine = ours[run.round]
            cells = {name: _x(ratio_of(figure(mine), figure(run))) for name, figure in figures.items()}
            rows.append(ratio_row(f"ours / opik{number}", cells))
    return rows


def _medians_table(
    medians: list[Run],
    spread: dict[str, Spread] | None,
    row: Callable[[Run, str], list[str]],
    ratio_row: Callable[[str, dict[str, str]], list[str]],
) -> list[list[str]]:
    """``--repeat``: each runner's medians, each ratio's median over the rounds and its range."""
    rows = [row(run, f"{_label(run.runner, run.version)} median") for run in medians]
    if spread is not None:
        rows.append(ratio_row("ours / opik median", {name: _x(s.median) for name, s in spread.items()}))
        rows.append(ratio_row("ours / opik min-max", {name: _range(s) for name, s in spread.items()}))
    return rows


def format_report(report: Report) -> str:
    """The report as text: the workload and machine, a table per run kind (with ``--repeat``,
    every run, then the medians), then the targets."""
    options = report.options
    rounds = report.rounds
    lines: list[str] = []
    where = (
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average {report.load_average:.2f}"
    )
    if report.load:
        if options["rate"]:
            how = f"{options['rate']:g}/s steady"
        else:
            how = "one at a time" if options["window"] == 1 else f"burst, window {options['window']}"
        size = options.get("size")
        of = f" of {size:,} bytes" if size is not None else ""
        what = f"{options['count']:,} x {options['command_type']}{of} ({how})"
        lines.append(f"{what}, concurrency {options['concurrency']}, warm-up {options['warmup']}; {where}")
        if options.get("link"):
            lines += _link_lines(options)
        if rounds > 1:
            lines.append(f"{rounds} rounds, each runner in turn in each (a fresh process per run)")
        if any(run.runner == "opik" for run in report.load):
            lines.append(
                f"(Opik's BridgePollLoop runs {OPIK_WORKERS} commands at once whatever --concurrency)"
            )
        rows = _runs_table(report.load, rounds, _load_row, _load_ratio_row, LOAD_RATIOS)
        lines += ["", *_table(LOAD_HEADER, rows)]
        for run in report.load:
            name = f"{run.runner} #{run.round}" if rounds > 1 else run.runner
            problems = {k: v for k, v in run.statuses.items() if k != "completed"}
            if problems or run.error_codes:
                lines.append(f"{name}: not completed {problems} {run.error_codes}")
            lines.append(
                f"{name}: meanwhile the dev server used {run.devserver_cpu_seconds:.2f} s CPU and this "
                f"bench {run.bench_cpu_seconds:.2f} s; {run.polls:,} polls; claimed to stored p50 "
                f"{run.in_runner_ms.p50:.1f} ms, p99 {run.in_runner_ms.p99:.1f} ms; exit {run.exit_status}"
            )
            if run.late_submissions:
                lines.append(f"{name}: {run.late_submissions} submissions more than 10 ms late")
            if math.isfinite(run.link_up_bytes):
                lines.append(_link_figures(name, run))
        if rounds > 1:
            lines += [
                "",
                f"Medians of the {rounds} runs; ratios: the median of the {rounds} rounds' and their range",
            ]
            rows = _medians_table(report.medians(), report.ratio_spread(), _load_row, _load_ratio_row)
            lines += ["", *_table(LOAD_HEADER, rows)]
            lines += [
                _link_figures(f"{run.runner} median", run)
                for run in report.medians()
                if math.isfinite(run.link_up_bytes)
            ]
    if report.idle:
        seconds = report.idle[0].seconds
        lines.append(
            f"idle {seconds:.0f} s (poll hold {POLL_HOLD_SECONDS:g} s, heartbeat every 5 s); {where}"
        )
        if rounds > 1:
            lines.append(f"{rounds} rounds, the runners side by side in each (fresh processes per round)")
        rows = _runs_table(report.idle, rounds, _idle_row, _idle_ratio_row, IDLE_RATIOS)
        lines += ["", *_table(IDLE_HEADER, rows)]
        if rounds > 1:
            lines += [
                "",
                f"Medians of the {rounds} runs; ratios: the median of the {rounds} rounds' and their range",
            ]
            rows = _medians_table(report.idle_medians(), report.ratio_spread(), _idle_row, _idle_ratio_row)
            lines += ["", *_table(IDLE_HEADER, rows)]
    if report.jobs is not None:
        lines += _jobs_lines(report.jobs, where)
    if report.targets:
        if rounds > 1:
            lines += ["", f"Targets judged on the medians of the {rounds} runs"]
        lines += ["", *_table(["target", "goal", "measured", ""], [
            [target.name, target.goal, target.measured, target.status] for target in report.targets
        ])]  # fmt: skip
    return "\n".join(lines)


def _link_lines(options: Mapping[str, Any]) -> list[str]:
    """``--link``: the link, and how each runner's client sends its bodies."""
    link = Link.parse(str(options["link"]))
    lines = [
        f"over a simulated link of {link.describe()} (round trip {2 * link.delay * 1000:g} ms): the "
        "runners' traffic only (tc tbf in a network namespace of its own, a delaying proxy)"
    ]
    if options["compare"] == "opik":
        if options["opik_client"] == "rest":
            how = "a bare OpikApi: plain"
        elif options["opik_plain"]:
            how = "Opik()'s, OPIK_ENABLE_JSON_REQUEST_COMPRESSION=false: plain"
        else:
            how = "Opik()'s, as Opik's runner builds it: gzip from 256 bytes"
        lines.append(f"Opik's client: {how}; runner-daemon's: gzip from 256 bytes")
    return lines


def _link_figures(name: str, run: LoadRun) -> str:
    """What one run put on the link (headers included) and how many of its reports were gzipped."""
    per_command = run.link_up_bytes / run.count / 1000 if run.count else math.nan
    return (
        f"{name}: over the link {run.link_up_bytes / 1e6:.2f} MB up ({per_command:.0f} KB a command), "
        f"{run.link_down_bytes / 1e6:.2f} MB down; {run.reports_gzipped} of {run.reports} reports gzipped"
    )


def _jobs_lines(jobs: JobsRun, where: str) -> list[str]:
    """``--jobs``: the workload, the latencies' table, and what bounds a cancel."""
    lines = [
        f"{jobs.count:,} short jobs, then {jobs.count:,} long ones cancelled, one at a time; "
        f"runner-daemon {jobs.version}, max_jobs {jobs.max_jobs}, jobs/next held "
        f"{jobs.poll_hold_seconds:g} s; heartbeat every {jobs.heartbeat_seconds:g} s, kill grace "
        f"{jobs.kill_grace_seconds:g} s; {where}"
    ]
    rows: list[tuple[str, Latency]] = [
        ("start: created -> agent running", jobs.start_ms),
        ("  of which polled -> agent running", jobs.start_in_daemon_ms),
        ("cancel: cancel -> process gone", jobs.cancel_ms),
    ]
    table = [
        [name, str(jobs.count)] + [f"{value:.1f}" for value in (lat.p50, lat.p90, lat.p99, lat.max)]
        for name, lat in rows
    ]
    lines += ["", *_table(["jobs", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"], table), ""]
    lines.append(
        f"cancel <= heartbeat interval + kill grace = {jobs.cancel_bound_seconds:g} s: the cancel reaches "
        "the daemon in the endpoint runner's next heartbeat, then the job's process group gets "
        "SIGTERM, SIGKILL after the grace (this agent exits at SIGTERM); each cancel is sent at a "
        "random moment of the heartbeat period."
    )
    lines.append(
        "start: from the job's created_at on the server to the agent's first statement (one "
        "machine, one clock), its Python interpreter's start-up included; polled: from the "
        "server's started_at, when the daemon's held jobs/next took the job."
    )
    lines.append(
        f"jobs: {jobs.completed} of {jobs.count} completed, {jobs.cancelled} of {jobs.count} cancelled "
        f"{jobs.statuses}; READY in {jobs.ready_seconds:.3f} s; exit {jobs.exit_status}"
    )
    return lines


def format_json(report: Report) -> str:
    """The report as JSON, every figure that could not be measured as null."""
    return json.dumps(_finite(report.as_json()), indent=2)


def _finite(value: Any) -> Any:
    """NaN (a figure that could not be measured) becomes null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value
