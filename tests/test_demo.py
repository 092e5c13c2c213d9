"""The README's first command: the demo runs every command type and exits 0.

Its stdout is the table and one summary line, nothing else; the log lines go to the file the
summary names, or to stderr with ``--verbose``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.support import environ_without_settings

REPO = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(r"(\d+) of (\d+) commands ended as expected(?:; the daemon's log: (\S+))?")


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


def table_and_summary(stdout: str) -> tuple[list[str], re.Match[str]]:
    """The rows and the summary; fails on any other line (a log line, a banner)."""
    *rows, last = stdout.rstrip("\n").split("\n")
    assert rows and all(row.startswith("ok ") for row in rows), stdout
    summary = SUMMARY.fullmatch(last)
    assert summary is not None, stdout
    assert summary.group(1) == summary.group(2) == str(len(rows)), stdout
    return rows, summary


def finished_events(text: str) -> list[str]:
    """The command types of the daemon's "command finished" JSON log lines."""
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [event["type"] for event in events if event.get("event") == "command finished"]


def test_demo_runs_every_command_type() -> None:
    proc = run_demo()
    rows, summary = table_and_summary(proc.stdout)
    kinds = {row.split()[1] for row in rows}
    assert {"ReadFile", "ListFiles", "WriteFile", "EditFile", "SearchFiles", "Exec"} <= kinds
    # The log lines are in the file the summary names, not on stdout or stderr.
    assert summary.group(3) is not None, proc.stdout
    log_file = Path(summary.group(3))
    try:
        assert "Exec" in finished_events(log_file.read_text())
        assert log_file.stat().st_mode & 0o077 == 0
    finally:
        log_file.unlink()
    assert not finished_events(proc.stderr), proc.stderr


def test_demo_verbose_logs_on_stderr() -> None:
    proc = run_demo("--verbose")
    _, summary = table_and_summary(proc.stdout)
    assert summary.group(3) is None, proc.stdout
    assert "Exec" in finished_events(proc.stderr), proc.stderr
