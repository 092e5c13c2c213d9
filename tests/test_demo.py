"""The README's first command: the demo runs every command type and two jobs, and exits 0.

Its stdout is the table (a job's log lines indented under its row) and one summary line,
nothing else; the log lines of the daemon go to the file the summary names, or to stderr with
``--verbose``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support import environ_without_settings

REPO = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(r"(\d+) of (\d+) commands and jobs ended as expected(?:; the daemon's log: (\S+))?")
JOB_LOG_LINE = re.compile(r" {6}(stdout|stderr) \| (.*)")


def run_demo(*flags: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "runner_daemon", "demo", "--log-format", "json", *flags],
        cwd=REPO,
        env=environ_without_settings(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def table_and_summary(stdout: str) -> tuple[list[str], dict[str, list[str]], re.Match[str]]:
    """The rows, each job row's log lines, and the summary; fails on any other line."""
    *lines, last = stdout.rstrip("\n").split("\n")
    rows: list[str] = []
    logs: dict[str, list[str]] = {}
    for line in lines:
        log_line = JOB_LOG_LINE.fullmatch(line)
        if log_line is not None and rows:
            logs.setdefault(rows[-1], []).append(f"{log_line.group(1)}: {log_line.group(2)}")
        else:
            assert line.startswith("ok "), stdout
            rows.append(line)
    summary = SUMMARY.fullmatch(last)
    assert summary is not None, stdout
    assert summary.group(1) == summary.group(2) == str(len(rows)), stdout
    return rows, logs, summary


def log_events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def finished_events(text: str) -> list[str]:
    """The command types of the daemon's "command finished" JSON log lines."""
    return [event["type"] for event in log_events(text) if event.get("event") == "command finished"]


def assert_jobs_shown(rows: list[str], logs: dict[str, list[str]]) -> None:
    """A job ran to its result with its log lines; a long one was cancelled and its process gone."""
    jobs = {row.split()[2]: row for row in rows if row.split()[1] == "Job"}
    assert set(jobs) == {"greet", "nap"}, rows
    greet, nap = jobs["greet"], jobs["nap"]
    assert "-> completed" in greet and greet.endswith('{"greeting": "hello Ada", "times": 3}'), greet
    # All the lines the agent printed, in order, there once the job completed.
    assert logs[greet] == [f"stdout: hello Ada ({n}/3)" for n in (1, 2, 3)]
    assert "-> cancelled" in nap and re.search(r"process \d+ gone [\d.]+ s after the cancel$", nap), nap
    assert logs[nap] == ["stdout: napping for 600 s"]


def test_demo_runs_every_command_type_and_two_jobs() -> None:
    proc = run_demo()
    rows, logs, summary = table_and_summary(proc.stdout)
    kinds = {row.split()[1] for row in rows}
    assert {"ReadFile", "ListFiles", "WriteFile", "EditFile", "SearchFiles", "Exec"} <= kinds
    assert_jobs_shown(rows, logs)
    # The log lines are in the file the summary names, not on stdout or stderr.
    assert summary.group(3) is not None, proc.stdout
    log_file = Path(summary.group(3))
    try:
        text = log_file.read_text()
        assert "Exec" in finished_events(text)
        jobs = {event["agent"]: event["event"] for event in log_events(text) if "agent" in event}
        assert jobs.get("greet") == "job finished" and jobs.get("nap") == "job stopped: cancelled from Opik"
        assert log_file.stat().st_mode & 0o077 == 0
    finally:
        log_file.unlink()
    assert not finished_events(proc.stderr), proc.stderr


def test_demo_verbose_logs_on_stderr() -> None:
    proc = run_demo("--verbose")
    rows, logs, summary = table_and_summary(proc.stdout)
    assert_jobs_shown(rows, logs)
    assert summary.group(3) is None, proc.stdout
    assert "Exec" in finished_events(proc.stderr), proc.stderr
