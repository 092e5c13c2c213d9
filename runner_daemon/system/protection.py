"""Whether the Exec launcher can make a folder read-only here (mount namespaces allowed).

Finding out takes one launcher run, about 20 ms: a tenth of the daemon's start-up. So
:meth:`ProtectionProbe.for_command_line` begins that run before the daemon's imports
(:mod:`runner_daemon.entry`) and :meth:`ProtectionProbe.result` collects it, long finished,
where the sandbox is set up. Standard library only, so that importing this module costs
the start-up nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from runner_daemon.system import sandbox_exec

PROBE_TIMEOUT_SECONDS = 30.0


class ProtectionProbe:
    """One launcher run that bind-mounts a folder read-only, started at once."""

    def __init__(self) -> None:
        self._folder = tempfile.mkdtemp(prefix="runner-daemon-probe-")
        inner = os.path.join(self._folder, "inner")
        os.mkdir(inner)
        argv = sandbox_exec.launcher_argv(
            (sys.executable, "-I", "-S", sandbox_exec.__file__),
            ("/",),
            (self._folder,),
            (inner,),
            True,
            (sys.executable, "-I", "-S", "-c", ""),
        )
        self._result: bool | None = None
        try:
            self._process: subprocess.Popen[bytes] | None = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        except OSError:
            self._process = None

    @classmethod
    def for_command_line(cls, argv: Sequence[str]) -> ProtectionProbe | None:
        """Begun for ``run`` on Linux only: whether the settings want it is not known yet
        (an unwanted one is discarded, a short process killed)."""
        if sys.platform != "linux" or list(argv[:1]) != ["run"]:
            return None
        try:
            return cls()
        except OSError:  # no temporary folder: the sandbox set-up probes again, and says why
            return None

    def result(self) -> bool:
        """Whether the run succeeded (waited for, at most :data:`PROBE_TIMEOUT_SECONDS`)."""
        if self._result is None:
            self._result = self._finish(kill=False)
        return self._result

    def discard(self) -> None:
        if self._result is None:
            self._result = self._finish(kill=True)

    def _finish(self, *, kill: bool) -> bool:
        process = self._process
        try:
            if process is None:
                return False
            if kill:
                process.kill()
            try:
                return process.wait(PROBE_TIMEOUT_SECONDS) == 0 and not kill
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                return False
        finally:
            shutil.rmtree(self._folder, ignore_errors=True)
