"""``runner-daemon bench`` end to end, small enough for the default suite (50 commands, a few
seconds): it runs, every command completes, the JSON holds every figure. No timing is
asserted: the figures belong to the machine, not to the test."""

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


def test_bench_refuses_bad_options() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "runner_daemon", "bench", "-n", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--count" in done.stderr
