#!/usr/bin/env python3
"""Developer tasks that need nothing but python3: a virtualenv is made on first use.

python3 tasks.py demo        # the daemon against the embedded dev server, commands flowing
python3 tasks.py test        # ruff, mypy --strict and the test suite (what CI runs)
python3 tasks.py devserver   # the Opik-compatible dev server on 127.0.0.1:5173
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
STAMP = VENV / ".installed"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def ensure_venv() -> None:
    """Create .venv and install the project with its test extra, again when pyproject changes."""
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        print("creating .venv", file=sys.stderr)
        venv.create(VENV, with_pip=True)
    subprocess.run(
        [BIN / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", ".[test]"],
        cwd=ROOT,
        check=True,
    )
    STAMP.write_text(wanted)


def run(*argv: str | Path) -> int:
    """Run a step; a SIGTERM, SIGINT or SIGHUP sent to this script goes to the step too, and
    the script waits for it, so stopping `tasks.py devserver` stops the server.

    The step has a process group of its own, so a Ctrl-C or a hang-up of the terminal reaches
    it once, through this script, not twice (a second signal means "exit now" to the daemon).
    """
    child = subprocess.Popen([str(a) for a in argv], cwd=ROOT, process_group=0)

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED}
    try:
        return child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str]) -> int:
    task, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if task not in {"demo", "test", "devserver"}:
        print(__doc__, file=sys.stderr)
        return 2
    ensure_venv()
    if task == "demo":
        return run(BIN / "runner-daemon", "demo", *rest)
    if task == "devserver":
        return run(BIN / "runner-daemon", "devserver", *rest)
    for step in (
        (BIN / "ruff", "check", "runner_daemon", "tests", "tasks.py"),
        (BIN / "ruff", "format", "--check", "runner_daemon", "tests", "tasks.py"),
        (BIN / "mypy", "runner_daemon", "tests"),
        (BIN / "pytest", *rest),
    ):
        print(
            "+ " + " ".join(Path(str(step[0])).name if i == 0 else str(a) for i, a in enumerate(step)),
            flush=True,
        )
        if (status := run(*step)) != 0:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
