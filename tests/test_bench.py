"""``runner-daemon bench`` end to end, small enough for the default suite (50 commands, a few
seconds; 3 + 3 jobs with a fast heartbeat): it runs, every command or job completes, the
output holds every figure. No timing is asserted: the figures belong to the machine, not to
the test."""

from __future__ import annotations

import json
import subprocess
import sys

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
    done = subprocess.run(
        [sys.executable, "-m", "runner_daemon", "bench", "-n", "50", "--json"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
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
    assert {"throughput", "latency p99", "RSS growth", "start to READY"} <= targets.keys()
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


def bench(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runner_daemon", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


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
    ]:
        done = bench(*args, timeout=60)
        assert done.returncode == 2, args
        assert named in done.stderr
