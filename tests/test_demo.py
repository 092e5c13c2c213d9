"""The README's first command: the demo runs every command type and exits 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support import environ_without_settings

REPO = Path(__file__).resolve().parent.parent


def test_demo_runs_every_command_type() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "runner_daemon", "demo", "--log-format", "json"],
        cwd=REPO,
        env=environ_without_settings(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line[:3] in ("ok ", "BAD")]
    assert lines and all(line.startswith("ok ") for line in lines)
    kinds = {line.split()[1] for line in lines}
    assert {"ReadFile", "ListFiles", "WriteFile", "EditFile", "SearchFiles", "Exec"} <= kinds
    assert proc.stdout.rstrip().endswith(f"{len(lines)} of {len(lines)} commands ended as expected")
