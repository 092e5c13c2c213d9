"""The dev server's state on disk: :func:`snapshot` and :func:`restore` turn it into JSON and
back (times kept on the monotonic clock become Unix times on the way out and back), so a dev
server can be stopped and started again with the same runners and commands.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner_daemon.core.statedir import write_private_file
from runner_daemon.devserver.jobs import JobRecord
from runner_daemon.devserver.records import (
    DEFAULT_WORKSPACE,
    TERMINAL,
    Command,
    Fault,
    PairingSession,
    Runner,
    RunnerCounters,
    now_iso,
)
from runner_daemon.devserver.state import DevState

STATE_VERSION = 1


def _b64(key: bytes | None) -> str | None:
    return base64.b64encode(key).decode() if key is not None else None


def _unb64(text: str | None) -> bytes | None:
    return base64.b64decode(text) if text is not None else None


class _Clocks:
    """Converts between the state's monotonic clock and Unix time, at one instant."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.mono, self.wall = clock(), time.time()

    def to_wall(self, mono: float | None) -> float | None:
        return None if mono is None else self.wall + (mono - self.mono)

    def to_mono(self, wall: float | None) -> float | None:
        return None if wall is None else self.mono + (float(wall) - self.wall)


def snapshot(state: DevState) -> dict[str, Any]:
    """The whole state as JSON-ready data; monotonic times as Unix times."""
    clocks = _Clocks(state.clock)
    runners = [
        {
            "id": r.id,
            "name": r.name,
            "project_id": r.project_id,
            "created_at": r.created_at,
            "capabilities": r.capabilities,
            "connected_at": r.connected_at,
            "last_heartbeat": clocks.to_wall(r.last_heartbeat),
            "removed": r.removed,
            "visible": r.visible,
            "bridge_key": _b64(r.bridge_key),
            "workspace": r.workspace,
            "type": r.type,
            "submit_times": [clocks.to_wall(t) for t in r.submit_times],
            "write_times": [clocks.to_wall(t) for t in r.write_times],
            "counters": r.counters.as_dict(),
            "agents": r.agents,
            "checklist": r.checklist,
            "cancelled_jobs": r.cancelled_jobs,
            "expired_jobs": r.expired_jobs,
        }
        for r in state.runners.values()
    ]
    jobs = [
        {
            **{k: v for k, v in j.__dict__.items() if not k.endswith("_mono")},
            "created_wall": clocks.to_wall(j.created_mono),
            "started_wall": clocks.to_wall(j.started_mono),
            "finished_wall": clocks.to_wall(j.finished_mono),
        }
        for j in state.jobs.jobs.values()
    ]
    commands = [
        {
            **{k: v for k, v in c.__dict__.items() if not k.endswith("_mono") and k != "done"},
            "submitted_wall": clocks.to_wall(c.submitted_mono),
            "picked_up_wall": clocks.to_wall(c.picked_up_mono),
            "finished_wall": clocks.to_wall(c.finished_mono),
        }
        for c in state.commands.values()
    ]
    pairings = [
        {
            "id": p.id,
            "runner_id": p.runner_id,
            "project_id": p.project_id,
            "activation_key": _b64(p.activation_key),
            "expires_wall": clocks.to_wall(p.expires),
            "activated": p.activated,
            "type": p.type,
        }
        for p in state.pairings.values()
    ]
    return {
        "version": STATE_VERSION,
        "saved_at": now_iso(),
        "runners": runners,
        "commands": commands,
        "jobs": jobs,
        "pairings": pairings,
        "queued_faults": [dict(f.__dict__) for f in state.faults],
        "injector": state.injector.snapshot(),
    }


def restore(state: DevState, data: dict[str, Any]) -> None:
    """Add what :func:`snapshot` saved to ``state`` (entries with the same id are replaced).

    Must run on the server's event loop (it creates the loop's events)."""
    if data.get("version") != STATE_VERSION:
        raise ValueError(f"unsupported state version {data.get('version')!r}")
    clocks = _Clocks(state.clock)
    for item in data["runners"]:
        runner = Runner(
            id=item["id"],
            name=item["name"],
            project_id=item["project_id"],
            created_at=item["created_at"],
            capabilities=item["capabilities"],
            connected_at=item["connected_at"],
            last_heartbeat=clocks.to_mono(item["last_heartbeat"]),
            removed=item["removed"],
            visible=item["visible"],
            bridge_key=_unb64(item["bridge_key"]),
            workspace=item.get("workspace", DEFAULT_WORKSPACE),
            type=item.get("type", "connect"),
        )
        runner.submit_times.extend(t for t in map(clocks.to_mono, item["submit_times"]) if t is not None)
        runner.write_times.extend(t for t in map(clocks.to_mono, item["write_times"]) if t is not None)
        known = RunnerCounters.__dataclass_fields__
        runner.counters = RunnerCounters(**{k: v for k, v in item["counters"].items() if k in known})
        runner.agents = item.get("agents", {})
        runner.checklist = item.get("checklist")
        runner.cancelled_jobs = item.get("cancelled_jobs", [])
        runner.expired_jobs = item.get("expired_jobs", 0)
        state.runners[runner.id] = runner
    for item in data["commands"]:
        fields = {k: v for k, v in item.items() if k in Command.__dataclass_fields__}
        submitted = clocks.to_mono(item["submitted_wall"])
        command = Command(
            **fields,
            submitted_mono=submitted if submitted is not None else clocks.mono,
            picked_up_mono=clocks.to_mono(item["picked_up_wall"]),
            finished_mono=clocks.to_mono(item["finished_wall"]),
        )
        if command.status in TERMINAL:
            command.done.set()
        state.commands[command.id] = command
    for item in data.get("jobs", []):
        fields = {k: v for k, v in item.items() if k in JobRecord.__dataclass_fields__}
        created = clocks.to_mono(item["created_wall"])
        job = JobRecord(
            **fields,
            created_mono=created if created is not None else clocks.mono,
            started_mono=clocks.to_mono(item["started_wall"]),
            finished_mono=clocks.to_mono(item["finished_wall"]),
        )
        state.jobs.jobs[job.id] = job
    for item in data["pairings"]:
        expires = clocks.to_mono(item["expires_wall"])
        key = _unb64(item["activation_key"])
        assert expires is not None and key is not None
        state.pairings[item["id"]] = PairingSession(
            item["id"],
            item["runner_id"],
            item["project_id"],
            key,
            expires,
            item["activated"],
            item.get("type", "connect"),
        )
    state.faults.extend(Fault(**f) for f in data.get("queued_faults", []))
    state.injector.restore(data.get("injector") or {})


def save_state(state: DevState, path: os.PathLike[str] | str) -> None:
    """Write the snapshot atomically, 0600: it holds bridge keys."""
    write_private_file(Path(path), json.dumps(snapshot(state), separators=(",", ":")).encode())


def load_state(state: DevState, path: os.PathLike[str] | str) -> bool:
    """Restore from ``path`` if it exists; False when there is no file. ValueError if unreadable."""
    try:
        with open(path, "rb") as source:
            raw = source.read()
    except FileNotFoundError:
        return False
    try:
        data = json.loads(raw)
        restore(state, data)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot load the dev server's state from {os.fspath(path)}: {exc!r}") from None
    return True
