"""``python -m tests.slow_daemon``: the real ``run`` path, plus the test-only handlers.

Settings come from ``RUNNER_DAEMON_*`` variables, as in a container.
"""

from __future__ import annotations

import sys

import anyio

from runner_daemon.cli import serve
from runner_daemon.logs import configure_logging
from runner_daemon.settings import load_settings
from tests.support import registry_for_tests

if __name__ == "__main__":
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format, settings.secret_values())
    sys.exit(anyio.run(serve, settings, registry_for_tests()))
