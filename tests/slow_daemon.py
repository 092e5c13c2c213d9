"""``python -m tests.slow_daemon``: the real ``run`` path, plus the test-only handlers.

Settings come from ``RUNNER_DAEMON_*`` variables, as in a container.
"""

from __future__ import annotations

import sys

from runner_daemon.cli import start_daemon
from runner_daemon.core.settings import load_settings
from tests.support import registry_for_tests

if __name__ == "__main__":
    sys.exit(start_daemon(load_settings(), registry_for_tests()))
