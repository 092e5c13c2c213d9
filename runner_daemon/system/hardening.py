"""Process hardening of the daemon itself: its memory and environment stay its own.

Exec's children run as the daemon's user. Without this, any of them could read the API key
and the bridge key from ``/proc/<daemon pid>/environ``, ``/proc/<daemon pid>/mem`` or by
attaching a debugger, since a process may inspect its own user's processes.
``prctl(PR_SET_DUMPABLE, 0)`` closes all three (and core dumps, which would hold the keys
too): the daemon's ``/proc`` entries then belong to root, and ptrace needs CAP_SYS_PTRACE.
The flag is per process and not inherited across ``execve``, so children are unaffected.
"""

from __future__ import annotations

import ctypes
import os
import sys

import structlog

PR_SET_DUMPABLE = 4

log = structlog.get_logger(__name__)


def forbid_inspection() -> bool:
    """Make this process non-dumpable; False where that is not possible (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0:
            return True
        error = os.strerror(ctypes.get_errno())
    except (OSError, AttributeError) as exc:  # no libc, or a libc without prctl
        error = str(exc)
    log.warning("cannot make the daemon non-dumpable; Exec commands may read its secrets", error=error)
    return False
