"""What a process has cost so far, read from /proc: the bench's CPU and memory figures.

The bench reads its children from outside, so their figures include nothing of its own and
the runners under test need no instrumentation; Linux only (``run_bench`` checks).
"""

from __future__ import annotations

import os

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as stream:
        data = stream.read()
    fields = data[data.rindex(b")") + 2 :].split()  # after "pid (comm) "; fields[0] is the state
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB (10^6 bytes), from /proc/<pid>/status."""
    values: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as stream:
        for line in stream:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024 / 1e6
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def process_exited(pid: int) -> bool:
    """Gone from /proc, or a zombie: it has exited and only its parent's reaping is left."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stream:
            data = stream.read()
    except (FileNotFoundError, ProcessLookupError):
        return True
    state = data[data.rindex(b")") + 2 : data.rindex(b")") + 3]
    return state in (b"Z", b"X")
