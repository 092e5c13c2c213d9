"""The ``runner-daemon`` command's entry point: what start-up waits on begins first.

The Exec sandbox's protection probe runs a process of its own for about 20 ms; begun here,
before the imports of :mod:`runner_daemon.cli` (most of the start-up), it is done by the
time the sandbox is set up.
"""

from __future__ import annotations

import sys

from runner_daemon.system.protection import ProtectionProbe


def main() -> int:
    probe = ProtectionProbe.for_command_line(sys.argv[1:])
    try:
        from runner_daemon.cli import main as cli_main  # after the probe began: see above

        return cli_main(probe=probe)
    finally:
        if probe is not None:
            probe.discard()  # unused when the settings were refused, or the sandbox is off
