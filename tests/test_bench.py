"""``runner-daemon bench`` end to end, small enough for the default suite (50 commands, a few
seconds; 3 + 3 jobs with a fast heartbeat): it runs, every command or job completes, the
output holds every figure. No timing is asserted: the figures belong to the machine, not to
the test."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from runner_daemon import __version__
from runner_daemon.bench.records import Latency, LoadRun, Memory, Options, Report, RunnerKind
from runner_daemon.bench.report import evaluate_targets, format_report
from runner_daemon.cli import build_parser
from tests.support import bench

LOAD_FIELDS = {
    "runner",
    "version",
    "count",
    "completed",
    "statuses",
    "error_codes",
    "seconds",
    "throughput",
    "latency_ms",
    "in_runner_ms",
    "cpu_seconds",
    "cpu_seconds_per_1000",
    "memory_mb",
    "ready_seconds",
    "polls",
    "exit_status",
}


def test_bench_runs_every_command_and_reports_every_figure() -> None:
    done = bench("-n", "50", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["options"]["count"] == 50
    assert report["idle"] == []
    assert report["ratios"] is None  # no --compare
    (run,) = report["load"]
    assert run.keys() >= LOAD_FIELDS
    assert run["runner"] == "runner-daemon"
    assert run["completed"] == run["count"] == 50
    assert run["statuses"] == {"completed": 50}
    assert run["error_codes"] == {}
    assert run["exit_status"] == 0  # the daemon drained and stopped cleanly
    assert set(run["latency_ms"]) == {"p50", "p90", "p99", "max"}
    assert run["latency_ms"]["p50"] <= run["latency_ms"]["p99"] <= run["latency_ms"]["max"]
    assert {"start", "before", "after", "peak", "growth", "growth_from_start"} <= run["memory_mb"].keys()
    assert run["cpu_seconds"] >= 0
    assert run["ready_seconds"] > 0
    targets = {target["name"]: target for target in report["targets"]}
    assert {"p99 over p50", "RSS growth", "start to READY"} <= targets.keys()
    assert all(target["status"] in ("PASS", "FAIL", "n/a") for target in report["targets"])


JOBS_FIELDS = {
    "version",
    "count",
    "heartbeat_seconds",
    "kill_grace_seconds",
    "cancel_bound_seconds",
    "max_jobs",
    "poll_hold_seconds",
    "start_ms",
    "start_in_daemon_ms",
    "cancel_ms",
    "completed",
    "cancelled",
    "statuses",
    "ready_seconds",
    "exit_status",
}


def test_bench_jobs_reports_start_and_cancel_latency() -> None:
    """Short jobs complete, long ones are cancelled with their process gone, and both latencies
    are printed with the heartbeat interval and the bound of a cancel."""
    done = bench("--jobs", "-n", "3", "--heartbeat", "0.5")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for figure in (
        "start: created -> agent running",
        "polled -> agent running",
        "cancel: cancel -> process gone",
    ):
        (row,) = [line for line in text.splitlines() if figure in line]
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1] == "3"
        assert all(float(cell) >= 0 for cell in cells[2:6])  # p50, p90, p99, max: numbers
    assert "p50 ms" in text and "p99 ms" in text and "max ms" in text
    assert "heartbeat every 0.5 s" in text
    assert "cancel <= heartbeat interval + kill grace" in text
    assert "3 of 3 completed, 3 of 3 cancelled" in text
    assert "| cancel latency" in text


def test_bench_jobs_json_holds_every_figure() -> None:
    done = bench("--jobs", "-n", "2", "--heartbeat", "0.5", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["load"] == [] and report["idle"] == []
    jobs = report["jobs"]
    assert jobs.keys() >= JOBS_FIELDS
    assert jobs["count"] == jobs["completed"] == jobs["cancelled"] == 2
    assert jobs["statuses"] == {"completed": 2, "cancelled": 2}
    assert jobs["heartbeat_seconds"] == 0.5
    assert jobs["exit_status"] == 0
    for key in ("start_ms", "start_in_daemon_ms", "cancel_ms"):
        latency = jobs[key]
        assert set(latency) == {"p50", "p90", "p99", "max"}
        assert latency["p50"] <= latency["p99"] <= latency["max"]
    assert [target["name"] for target in report["targets"]] == ["cancel latency"]


def test_bench_refuses_bad_options() -> None:
    for args, named in [
        (["-n", "0"], "--count"),
        (["--heartbeat", "1"], "--heartbeat"),  # only with --jobs
        (["--jobs", "--heartbeat", "0"], "--heartbeat"),
        (["--jobs", "--compare", "opik"], "--jobs"),
        (["--repeat", "0"], "--repeat"),
        (["--jobs", "--repeat", "2"], "--repeat"),
    ]:
        done = bench(*args, timeout=60)
        assert done.returncode == 2, args
        assert named in done.stderr


def test_bench_repeat_prints_every_run_then_the_medians() -> None:
    """``--repeat 2``: a row per run, numbered by round, then a table of the medians."""
    done = bench("--repeat", "2", "-n", "20", "--warmup", "5")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "2 rounds" in text
    for round_number in (1, 2):
        (row,) = [
            line
            for line in text.splitlines()
            if line.startswith(f"| runner-daemon {__version__} #{round_number} ")
        ]
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1] == "20"  # done
        assert f"runner-daemon #{round_number}: meanwhile the dev server used" in text
    assert "Medians of the 2 runs" in text
    (median,) = [
        line for line in text.splitlines() if line.startswith(f"| runner-daemon {__version__} median ")
    ]
    assert all(float(cell.strip().replace(",", "")) >= 0 for cell in median.strip("|").split("|")[1:])
    assert "Targets judged on the medians of the 2 runs" in text


def test_bench_repeat_json_holds_every_run_and_the_medians() -> None:
    done = bench("--repeat", "2", "-n", "20", "--warmup", "5", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["rounds"] == report["options"]["repeat"] == 2
    runs = report["load"]
    assert [(run["runner"], run["round"]) for run in runs] == [("runner-daemon", 1), ("runner-daemon", 2)]
    assert all(run.keys() >= LOAD_FIELDS and run["completed"] == 20 for run in runs)
    (median,) = report["medians"]["load"]
    assert median["runner"] == "runner-daemon" and median["runs"] == 2
    assert median.keys() >= LOAD_FIELDS - {"statuses", "error_codes", "exit_status"}
    assert set(median["latency_ms"]) == {"p50", "p90", "p99", "max"}
    assert report["medians"]["idle"] == []
    assert report["ratios"] is None and report["ratio_spread"] is None  # no --compare
    assert {"p99 over p50", "RSS growth", "start to READY"} <= {t["name"] for t in report["targets"]}


def test_bench_repeat_idle_json_holds_every_round() -> None:
    done = bench("--idle", "0.5", "--repeat", "2", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [(run["runner"], run["round"]) for run in report["idle"]] == [
        ("runner-daemon", 1),
        ("runner-daemon", 2),
    ]
    (median,) = report["medians"]["idle"]
    assert median["runs"] == 2
    assert {"cpu_seconds", "rss_mb", "peak_mb", "ready_seconds", "cpu_percent_of_one_core"} <= median.keys()
    assert "idle RSS" in {target["name"] for target in report["targets"]}


def _load_run(kind: RunnerKind, round_number: int, throughput: float, p50: float) -> LoadRun:
    return LoadRun(
        runner=kind,
        version="x",
        count=100,
        completed=100,
        statuses={"completed": 100},
        error_codes={},
        seconds=1.0,
        throughput=throughput,
        latency_ms=Latency(p50, p50, p50, p50),
        cpu_seconds=0.5,
        memory_mb=Memory(40.0, 41.0, 42.0, 43.0),
        ready_seconds=0.4,
        round=round_number,
    )


def test_repeat_ratios_are_the_median_of_each_round_and_their_range() -> None:
    """Pure logic: round i of ours against round i of Opik's, a NaN pair left out of the median."""
    options = Options.from_args(build_parser().parse_args(["bench", "--repeat", "4", "--compare", "opik"]))
    report = Report(options=asdict(options), rounds=4)
    ours = [(100.0, 10.0), (300.0, 30.0), (200.0, 20.0), (250.0, math.nan)]
    theirs = [(100.0, 20.0), (100.0, 20.0), (400.0, 20.0), (100.0, 20.0)]
    for number, (mine, other) in enumerate(zip(ours, theirs, strict=True), start=1):
        report.load += [_load_run("runner-daemon", number, *mine), _load_run("opik", number, *other)]
    spread = report.ratio_spread()
    assert spread is not None
    assert spread["throughput"].pairs == (1.0, 3.0, 0.5, 2.5)
    assert (spread["throughput"].median, spread["throughput"].low, spread["throughput"].high) == (
        1.75,
        0.5,
        3.0,
    )
    assert (spread["p50"].median, spread["p50"].low, spread["p50"].high) == (1.0, 0.5, 1.5)
    assert report.ratios() == {name: value.median for name, value in spread.items()}
    median = report.median("runner-daemon")
    assert median is not None and median.runs == 4
    assert (median.throughput, median.latency_ms.p50) == (225.0, 20.0)
    assert [round(value, 2) for value in (median.memory_mb.after, median.ready_seconds)] == [42.0, 0.4]
    text = format_report(report)
    assert "| ours / opik #3 " in text
    assert "| ours / opik median " in text and "1.75x" in text
    assert "| ours / opik min-max " in text and "0.50-3.00x" in text


@pytest.mark.parametrize(
    ("args", "judged"),
    [
        (["--rate", "100"], {"latency p50 (--rate)", "latency p99 (--rate)", "CPU per command"}),
        ([], {"throughput (a burst)", "CPU per command"}),
    ],
)
def test_the_ratio_goals_judge_only_what_the_workload_tells(args: list[str], judged: set[str]) -> None:
    """Pure logic: steady runs judge latency, bursts throughput; each against its goal."""
    options = Options.from_args(build_parser().parse_args(["bench", "--compare", "opik", *args]))
    report = Report(options=asdict(options))
    # Ours: p50 0.75x (within 0.8x), throughput 0.9x (short of 1.0x), CPU 0.5/0.5 = 1.0x (over 0.8x).
    report.load += [_load_run("runner-daemon", 1, 90.0, 3.0), _load_run("opik", 1, 100.0, 4.0)]
    verdicts = {target.name: target.status for target in evaluate_targets(report, options)}
    ratio_targets = {
        "throughput (a burst)": "FAIL",
        "latency p50 (--rate)": "PASS",
        "latency p99 (--rate)": "PASS",
        "CPU per command": "FAIL",
        "READY against Opik's": "FAIL",
    }
    for name, status in ratio_targets.items():
        assert verdicts[name] == (status if name in judged or name.startswith("READY") else "n/a"), name


def test_the_daemon_can_run_from_another_python(tmp_path: Path) -> None:
    """--daemon-python: the daemon as users install it, the bench from its own venv."""
    python = tmp_path / "python3"  # another path to this venv's Python
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    done = bench("--daemon-python", str(python), "-n", "10", "--warmup", "2", "--json")
    assert done.returncode == 0, done.stderr
    (run,) = json.loads(done.stdout)["load"]
    assert (run["completed"], run["version"]) == (10, __version__)


def test_a_daemon_python_that_cannot_run_it_is_refused_with_a_reason(tmp_path: Path) -> None:
    missing = tmp_path / "no-python"
    done = bench("--daemon-python", str(missing), "-n", "5")
    assert done.returncode != 0
    assert f"cannot run {missing}" in done.stderr
    assert "Traceback" not in done.stderr
