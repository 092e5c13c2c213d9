"""``runner-daemon demo``: the dev server and the daemon in one process, commands flowing.

It creates a small workspace, starts the dev server on a free port, runs the daemon against
it, submits a handful of commands as Opik's UI would, prints each result with its duration,
then stops the daemon gracefully. Exit 0 when every command reached the status expected.

Stdout is the table alone and then one summary line: the daemon's and the dev server's log
lines go to a file the summary names (they interleaved with the rows, and a row's own
"command finished" line could come after it), or to stderr with ``--verbose``.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

import anyio
import structlog

from runner_daemon.bridge.handlers import discover
from runner_daemon.core.logs import Secret, configure_logging
from runner_daemon.core.models import CommandRecord
from runner_daemon.core.settings import LogFormat, load_settings
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.server import DevServer, DevServerConfig
from runner_daemon.service.daemon import Daemon, ExitStatus

# (type, args, expected status, expected error code), run one after the other.
DEMO_COMMANDS: list[tuple[str, dict[str, Any], str, str | None]] = [
    ("ListFiles", {"path": "", "depth": 2}, "completed", None),
    ("ReadFile", {"path": "README.md"}, "completed", None),
    ("ReadFile", {"path": "src/app.py", "offset": 1, "limit": 2}, "completed", None),
    (
        "WriteFile",
        {"path": "src/greet.py", "content": "def greet(name):\n    return 'hi ' + name\n"},
        "completed",
        None,
    ),
    (
        "EditFile",
        {"path": "src/greet.py", "edits": [{"old_string": "'hi '", "new_string": "'hello '"}]},
        "completed",
        None,
    ),
    ("SearchFiles", {"pattern": "def \\w+", "glob": "*.py"}, "completed", None),
    ("Exec", {"command": "python3 -c 'import sys; print(sys.version_info[0])' && ls src"}, "completed", None),
    ("ReadFile", {"path": "missing.txt"}, "failed", "file_not_found"),
    ("ReadFile", {"path": "../../etc/passwd"}, "failed", "path_traversal"),
    ("WriteFile", {"path": ".env", "content": "TOKEN=stolen"}, "failed", "permission_denied"),
    ("Exec", {"command": "sudo rm -rf /"}, "failed", "blocked"),
    ("ReadFile", {"path": "README.md", "_hmac": "Zm9yZ2Vk"}, "failed", "auth_failed"),
    ("ReadFile", {"offset": 3}, "failed", "invalid_args"),
    ("Frobnicate", {}, "failed", "unknown_type"),
]


def _make_workspace(root: Path) -> None:
    (root / "src").mkdir()
    (root / "README.md").write_text("# demo project\nA workspace made up by runner-daemon demo.\n")
    (root / "src" / "app.py").write_text("import sys\n\ndef main():\n    print('hello')\n")
    (root / "src" / "notes.txt").write_text("not python\n")


def _summary(record: CommandRecord) -> str:
    payload = (
        record.result if record.status == "completed" else record.error.model_dump() if record.error else None
    )
    text = json.dumps(payload, ensure_ascii=False)
    return text if len(text) <= 110 else text[:107] + "..."


async def _demo(
    server: DevServer, workspace: Path, state: Path, log_format: LogFormat, log_stream: TextIO
) -> int:
    """Print a row for each command; return how many did not end as expected."""
    async with DevClient(server.url) as api:
        # The dev server signs this runner's commands with the key, as Opik's UI does.
        bridge_key = secrets.token_bytes(32)
        runner_id = await api.dev_create_runner("runner-daemon demo", bridge_key=bridge_key)
        settings = load_settings(
            None,
            {
                "url": server.url,
                "runner_id": runner_id,
                "workspace_root": workspace,
                "log_format": log_format,
                "state_directory": state,
                "shutdown_grace_seconds": 5,
            },
        )
        secrets_to_scrub: list[Secret] = [*settings.secret_values(), bridge_key]
        configure_logging(settings.log_level, settings.log_format, secrets_to_scrub, log_stream)
        structlog.get_logger(__name__).info(
            "demo started", dev_server=server.url, workspace=str(workspace), runner_id=runner_id
        )
        daemon = Daemon(settings, discover(), bridge_key=bridge_key)
        failures = 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            with anyio.fail_after(10):
                await daemon.running.wait()
            for kind, args, status, code in DEMO_COMMANDS:
                command_id = await api.submit_command(runner_id, kind, args)
                record = await api.get_command(runner_id, command_id, wait=30)
                got_code = record.error.code if record.error else None
                ok = record.status == status and got_code == code
                failures += not ok
                mark = "ok " if ok else "BAD"
                took = "-" if record.duration_ms is None else str(record.duration_ms)
                shown = json.dumps(args)
                shown = shown if len(shown) <= 38 else shown[:35] + "..."
                print(
                    f"{mark} {kind:<11} {shown:<38} -> {record.status:<9} {took:>4} ms  {_summary(record)}",
                    flush=True,
                )
            daemon.request_stop("demo finished")
        return failures


def _run(log_format: LogFormat, log_stream: TextIO) -> int:
    with tempfile.TemporaryDirectory(prefix="runner-daemon-demo-") as tmp:
        workspace, state = Path(tmp) / "workspace", Path(tmp) / "state"
        workspace.mkdir()
        _make_workspace(workspace)
        # Configured before the dev server starts, so its own log lines go the same way.
        configure_logging("info", log_format, (), log_stream)
        with DevServer(config=DevServerConfig(poll_hold_seconds=1)) as server:
            return anyio.run(_demo, server, workspace, state, log_format, log_stream)


def run_demo(log_format: LogFormat = "auto", verbose: bool = False) -> int:
    """The table on stdout, then a summary naming where the log lines went."""
    total = len(DEMO_COMMANDS)
    if verbose:
        failures = _run(log_format, sys.stderr)
        print(f"{total - failures} of {total} commands ended as expected", flush=True)
        return ExitStatus.OK if failures == 0 else ExitStatus.FAILURE
    # Kept after the demo (mode 0600, in the temp folder) for reading; named in the summary.
    fd, log_path = tempfile.mkstemp(prefix="runner-daemon-demo-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8", buffering=1) as log_file:
        try:
            failures = _run(log_format, log_file)
        except BaseException:
            print(f"runner-daemon demo: failed; the daemon's log: {log_path}", file=sys.stderr, flush=True)
            raise
    print(
        f"{total - failures} of {total} commands ended as expected; the daemon's log: {log_path}", flush=True
    )
    return ExitStatus.OK if failures == 0 else ExitStatus.FAILURE
