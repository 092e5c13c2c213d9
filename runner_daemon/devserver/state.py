"""The dev server's in-memory state: runners, commands, counters and injected faults.

Every method is synchronous and runs on the server's event loop, so each one is atomic with
respect to concurrent requests; the routes only await *between* calls (long polls, waits).
:meth:`DevState.snapshot` and :meth:`DevState.restore` turn it into JSON and back (times kept
on the monotonic clock become Unix times on the way out and back), so a dev server can be
stopped and started again with the same runners and commands.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from runner_daemon.bridge.signing import HMAC_FIELD, derive_bridge_key, sign
from runner_daemon.core.statedir import write_private_file
from runner_daemon.devserver.faults import FaultInjector
from runner_daemon.service.pairing import activation_hmac

DEFAULT_WORKSPACE = "default"  # a request without Comet-Workspace acts in it, as on a local Opik
WRITE_TYPES = frozenset({"WriteFile", "EditFile", "Exec"})
TERMINAL = frozenset({"completed", "failed", "timed_out"})


@dataclass(frozen=True)
class DevServerConfig:
    """Opik's server defaults, shortened by the tests where waiting would only slow them."""

    poll_hold_seconds: float = 30.0
    heartbeat_ttl_seconds: float = 15.0
    default_timeout_seconds: int = 30
    max_timeout_seconds: int = 120
    stale_grace_seconds: float = 10.0
    reaper_interval_seconds: float = 5.0
    finished_ttl_seconds: float = 3600.0
    max_pending: int = 50
    submissions_per_minute: int = 600
    writes_per_minute: int = 120
    payload_cap_chars: int = 1_048_576
    default_max_commands: int = 10
    max_max_commands: int = 20
    wait_default_seconds: int = 30

    @property
    def max_body_bytes(self) -> int:
        """The largest request body, raw or inflated: a report with result and error at the cap.

        (A UTF-8 body is never longer than the JSON measured against the cap.)
        """
        return 2 * self.payload_cap_chars + 65_536


class ApiFailure(Exception):
    """An error answer: status and Opik's ``{"errors": [...]}`` body."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class Signal:
    """Wakes every current waiter; later waiters wait for the next notify."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = anyio.Event()

    async def wait(self) -> None:
        await self._event.wait()


@dataclass
class RunnerCounters:
    heartbeats: int = 0
    polls: int = 0
    polls_open: int = 0  # being handled now: a test sees when a poll it abandoned has ended
    max_commands_asked: list[int] = field(default_factory=list)
    reports_accepted: int = 0
    reports_conflict: int = 0
    reports_not_found: int = 0
    reports_rejected: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Runner:
    id: str
    name: str
    project_id: str
    created_at: str
    capabilities: list[str] | None = None
    connected_at: str | None = None
    last_heartbeat: float | None = None
    removed: bool = False  # disconnected (DELETE), purged or evicted: endpoints answer 404
    visible: bool = True  # False while its pairing session waits for the browser
    bridge_key: bytes | None = None  # known when the dev server played the browser's part
    workspace: str = DEFAULT_WORKSPACE  # the owner: every other workspace gets 404 (410 on heartbeat)
    type: str = "connect"
    submitted: Signal = field(default_factory=Signal)
    submit_times: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    write_times: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    counters: RunnerCounters = field(default_factory=RunnerCounters)
    malformed: deque[str] = field(default_factory=lambda: deque(maxlen=1000))  # spoiled poll answers
    # Ids of commands handed out once already, to hand out again (a hostile or buggy server).
    redeliver: deque[str] = field(default_factory=lambda: deque(maxlen=1000))


@dataclass
class Command:
    id: str
    runner_id: str
    type: str
    args: dict[str, Any]
    timeout_seconds: int
    submitted_at: str
    submitted_mono: float
    status: str = "pending"
    picked_up_at: str | None = None
    picked_up_mono: float | None = None
    completed_at: str | None = None
    finished_mono: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    duration_ms: int | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    report_attempts: int = 0  # report requests that reached the server, faults included
    accepted_reports: int = 0  # reports that stored a result: 0 or 1, unless something is wrong

    def as_item(self) -> dict[str, Any]:
        return {
            "command_id": self.id,
            "type": self.type,
            "args": self.args,
            "timeout_seconds": self.timeout_seconds,
            "submitted_at": self.submitted_at,
        }

    def as_record(self) -> dict[str, Any]:
        return {
            "command_id": self.id,
            "runner_id": self.runner_id,
            "type": self.type,
            "status": self.status,
            "args": self.args,
            "result": self.result,
            "error": self.error,
            "timeout_seconds": self.timeout_seconds,
            "submitted_at": self.submitted_at,
            "picked_up_at": self.picked_up_at,
            "completed_at": self.completed_at,
            "duration_ms": self.duration_ms,
        }

    def as_dev_record(self) -> dict[str, Any]:
        return {
            **self.as_record(),
            "report_attempts": self.report_attempts,
            "accepted_reports": self.accepted_reports,
        }


@dataclass
class PairingSession:
    id: str
    runner_id: str
    project_id: str
    activation_key: bytes
    expires: float
    activated: bool = False
    type: str = "connect"


@dataclass
class Fault:
    """An answer forced onto the next ``count`` requests of one route."""

    route: str
    status: int
    count: int = 1
    retry_after: float | None = None


class DevState:
    def __init__(self, config: DevServerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self.runners: dict[str, Runner] = {}
        self.commands: dict[str, Command] = {}
        self.faults: deque[Fault] = deque(maxlen=1000)
        self.pairings: dict[str, PairingSession] = {}
        self.injector = FaultInjector(clock)
        # Set when the server stops: held polls and waits answer at once instead of holding.
        self.closed = anyio.Event()

    # --- runners ------------------------------------------------------------------------

    def create_runner(
        self,
        name: str = "dev-runner",
        *,
        bridge_key: bytes | None = None,
        project_id: str | None = None,
        workspace: str = DEFAULT_WORKSPACE,
    ) -> Runner:
        runner = Runner(
            id=str(uuid.uuid4()),
            name=name,
            project_id=project_id or str(uuid.uuid4()),
            created_at=now_iso(),
            bridge_key=bridge_key,
            workspace=workspace,
        )
        self.runners[runner.id] = runner
        return runner

    # --- pairing ------------------------------------------------------------------------

    def create_pairing(self, body: Any, workspace: str = DEFAULT_WORKSPACE) -> PairingSession:
        if not isinstance(body, dict):
            raise ApiFailure(400, "Body must be a JSON object")
        try:
            project_id = str(uuid.UUID(str(body.get("project_id"))))
            activation_key = base64.b64decode(str(body.get("activation_key")), validate=True)
        except ValueError:
            raise ApiFailure(400, "project_id must be a UUID and activation_key base64") from None
        ttl = body.get("ttl_seconds", 300)
        if len(activation_key) != 32 or body.get("type") not in ("connect", "endpoint"):
            raise ApiFailure(400, "activation_key must be 32 bytes and type connect or endpoint")
        if not isinstance(ttl, int) or not 60 <= ttl <= 600:
            raise ApiFailure(400, "ttl_seconds must be between 60 and 600")
        runner = self.create_runner("pairing", project_id=project_id, workspace=workspace)
        runner.visible, runner.type = False, body["type"]
        session = PairingSession(
            str(uuid.uuid4()), runner.id, project_id, activation_key, self._clock() + ttl, type=body["type"]
        )
        self.pairings[session.id] = session
        return session

    def activate_pairing(self, session_id: str, body: Any, workspace: str | None = None) -> Runner:
        """The browser approves: the runner becomes visible, owned by the approver's workspace
        (``None``: the workspace that opened the session), and evicts the older runner of its
        type for the same project and owner, as Opik does."""
        session = self.pairings.get(session_id)
        if session is None or self._clock() > session.expires:
            raise ApiFailure(404, "Pairing session not found")
        if not isinstance(body, dict) or not isinstance(body.get("runner_name"), str):
            raise ApiFailure(422, "runner_name and hmac are required")
        if session.activated:
            raise ApiFailure(409, "Pairing session already activated")
        name = body["runner_name"]
        expected = activation_hmac(session.activation_key, session_id, name)
        if not hmac.compare_digest(expected, str(body.get("hmac", ""))):
            raise ApiFailure(403, "Invalid activation HMAC")
        session.activated = True
        runner = self.runners[session.runner_id]
        if workspace is not None:
            runner.workspace = workspace
        for older in list(self.runners.values()):
            if (
                older is not runner
                and older.visible
                and (older.type, older.project_id, older.workspace)
                == (
                    runner.type,
                    runner.project_id,
                    runner.workspace,
                )
            ):
                self.remove_runner(older.id)
        runner.name, runner.visible = name, True
        runner.last_heartbeat, runner.connected_at = self._clock(), now_iso()
        # The browser keeps the bridge key to sign commands; the dev server plays that part.
        runner.bridge_key = derive_bridge_key(session.activation_key, session_id)
        return runner

    def runner(self, runner_id: str) -> Runner:
        runner = self.runners.get(runner_id)
        if runner is None or runner.removed or not runner.visible:
            raise ApiFailure(404, "Runner not found")
        return runner

    def check_owner(self, runner_id: str, workspace: str) -> None:
        """404 unless ``workspace`` owns a live record of the runner (heartbeats make it 410)."""
        runner = self.runner(runner_id)
        if runner.workspace != workspace:
            raise ApiFailure(404, "Runner not found")

    def alive(self, runner: Runner) -> bool:
        return (
            not runner.removed
            and runner.last_heartbeat is not None
            and self._clock() - runner.last_heartbeat <= self.config.heartbeat_ttl_seconds
        )

    def runner_view(self, runner: Runner) -> dict[str, Any]:
        return {
            "id": runner.id,
            "name": runner.name,
            "project_id": runner.project_id,
            "status": "connected" if self.alive(runner) else "disconnected",
            "connected_at": runner.connected_at,
            "type": runner.type,
            "capabilities": runner.capabilities if runner.capabilities is not None else ["jobs"],
            "agents": [],
            "checklist": {},
        }

    def heartbeat(self, runner_id: str, workspace: str, capabilities: list[str] | None) -> None:
        """Refresh the alive mark; a non-empty list replaces the capabilities, else they stay.

        410 whenever ``workspace`` does not own a live record of the runner: never 404.
        """
        try:
            self.check_owner(runner_id, workspace)
        except ApiFailure:
            raise ApiFailure(410, "Runner not found") from None
        runner = self.runners[runner_id]
        runner.counters.heartbeats += 1
        if not self.alive(runner):
            runner.connected_at = now_iso()
        runner.last_heartbeat = self._clock()
        if capabilities:
            runner.capabilities = list(capabilities)

    def remove_runner(self, runner_id: str) -> None:
        """DELETE (or eviction): fail every open command, then answer 404 (410 to heartbeats)."""
        runner = self.runners.get(runner_id)
        if runner is None or runner.removed:
            return
        runner.removed = True
        for command in self.commands.values():
            if command.runner_id == runner_id and command.status not in TERMINAL:
                self._finish(command, "timed_out")
        runner.submitted.notify()

    # --- commands -----------------------------------------------------------------------

    def submit(self, runner_id: str, command_type: str, args: dict[str, Any], timeout: int | None) -> Command:
        runner = self.runner(runner_id)
        if not self.alive(runner):
            raise ApiFailure(404, "Runner not connected")
        if "bridge" not in (runner.capabilities or ["jobs"]):
            raise ApiFailure(409, "Runner does not support bridge commands")
        if len(json.dumps(args)) > self.config.payload_cap_chars:
            raise ApiFailure(400, "Command args exceed the maximum payload size")
        pending = sum(1 for c in self.commands.values() if c.runner_id == runner_id and c.status == "pending")
        if pending >= self.config.max_pending:
            raise ApiFailure(429, "Too many pending commands")
        now = self._clock()
        self._check_rate(runner.submit_times, now, self.config.submissions_per_minute)
        if command_type in WRITE_TYPES:
            self._check_rate(runner.write_times, now, self.config.writes_per_minute)
            runner.write_times.append(now)
        runner.submit_times.append(now)
        if timeout is None or timeout <= 0:
            timeout = self.config.default_timeout_seconds
        if runner.bridge_key is not None and HMAC_FIELD not in args:
            args = {**args, HMAC_FIELD: sign(runner.bridge_key, command_type, args)}
        command = Command(
            id=str(uuid.uuid4()),
            runner_id=runner_id,
            type=command_type,
            args=args,
            timeout_seconds=min(timeout, self.config.max_timeout_seconds),
            submitted_at=now_iso(),
            submitted_mono=now,
        )
        self.commands[command.id] = command
        runner.submitted.notify()
        return command

    @staticmethod
    def _check_rate(times: deque[float], now: float, per_minute: int) -> None:
        while times and now - times[0] > 60.0:
            times.popleft()
        if len(times) >= per_minute:
            raise ApiFailure(429, "Too many commands per minute", {"Retry-After": "60"})

    def take_pending(self, runner_id: str, max_commands: int) -> list[Command]:
        """Move up to ``max_commands`` pending commands to picked_up, oldest first.

        Commands queued with ``/dev/runners/{id}/redeliver`` come first, as they are: what a
        server with at-least-once delivery (or a hostile one) does, and Opik never should.
        """
        taken: list[Command] = []
        runner = self.runners.get(runner_id)
        while runner is not None and runner.redeliver and len(taken) < max_commands:
            again = self.commands.get(runner.redeliver.popleft())
            if again is not None:
                taken.append(again)
        for command in self.commands.values():  # insertion order = submission order
            if len(taken) >= max_commands:
                break
            if command.runner_id == runner_id and command.status == "pending":
                command.status = "picked_up"
                command.picked_up_at = now_iso()
                command.picked_up_mono = self._clock()
                taken.append(command)
        return taken

    def command(self, runner_id: str, command_id: str) -> Command:
        self.runner(runner_id)
        command = self.commands.get(command_id)
        if command is None or command.runner_id != runner_id:
            raise ApiFailure(404, "Command not found")
        return command

    def report(self, runner_id: str, command_id: str, body: Any) -> None:
        runner = self.runners.get(runner_id)
        try:
            command = self.command(runner_id, command_id)
        except ApiFailure:
            if runner is not None:
                runner.counters.reports_not_found += 1
            raise
        counters = self.runner(runner_id).counters
        problem = self._report_problem(body)
        if problem:
            counters.reports_rejected += 1
            raise ApiFailure(400, problem)
        if command.status in TERMINAL:
            counters.reports_conflict += 1
            raise ApiFailure(409, "Command already completed")
        counters.reports_accepted += 1
        command.accepted_reports += 1
        command.result = body.get("result")
        command.error = body.get("error")
        duration = body.get("duration_ms")
        command.duration_ms = duration if isinstance(duration, int) else None
        self._finish(command, body["status"])

    def _report_problem(self, body: Any) -> str | None:
        if not isinstance(body, dict):
            return "Body must be a JSON object"
        if body.get("status") not in ("completed", "failed"):
            return "status must be 'completed' or 'failed'"
        if body.get("result") is None and body.get("error") is None:
            return "Either result or error must be present"
        for key in ("result", "error"):
            value = body.get(key)
            if value is not None and not isinstance(value, dict):
                return f"{key} must be an object"
            if value is not None and len(json.dumps(value)) > self.config.payload_cap_chars:
                return f"{key} exceeds the maximum payload size"
        duration = body.get("duration_ms")
        if duration is not None and (not isinstance(duration, int) or isinstance(duration, bool)):
            return "duration_ms must be an integer"
        return None

    def _finish(self, command: Command, status: str) -> None:
        command.status = status
        command.completed_at = now_iso()
        command.finished_mono = self._clock()
        command.done.set()

    def reap(self) -> None:
        """Time out stale picked-up commands and forget old records, as Opik's reaper does."""
        now = self._clock()
        for command in list(self.commands.values()):
            if command.status == "picked_up" and command.picked_up_mono is not None:
                if now > command.picked_up_mono + command.timeout_seconds + self.config.stale_grace_seconds:
                    self._finish(command, "timed_out")
            elif command.status == "pending":
                if now > command.submitted_mono + 2 * command.timeout_seconds + 60:
                    del self.commands[command.id]
            elif (
                command.finished_mono is not None
                and now - command.finished_mono > self.config.finished_ttl_seconds
            ):
                del self.commands[command.id]

    def count_report_attempt(self, runner_id: str, command_id: str) -> None:
        command = self.commands.get(command_id)
        if command is not None and command.runner_id == runner_id:
            command.report_attempts += 1

    def runner_commands(self, runner_id: str) -> list[Command]:
        """Every command of the runner the server still keeps, in submission order."""
        if runner_id not in self.runners:
            raise ApiFailure(404, "Runner not found")
        return [c for c in self.commands.values() if c.runner_id == runner_id]

    def begin_close(self) -> None:
        """The server is stopping: release every held poll (empty) and wait (as it is)."""
        self.closed.set()
        for runner in self.runners.values():
            runner.submitted.notify()

    # --- faults (dev only) --------------------------------------------------------------

    def add_fault(self, fault: Fault) -> None:
        self.faults.append(fault)

    def take_fault(self, route: str) -> Fault | None:
        for fault in self.faults:
            if fault.route in (route, "*"):
                fault.count -= 1
                if fault.count <= 0:
                    self.faults.remove(fault)
                return fault
        return None


# --- persistence ------------------------------------------------------------------------------

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
    clocks = _Clocks(state._clock)
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
        }
        for r in state.runners.values()
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
        "pairings": pairings,
        "queued_faults": [dict(f.__dict__) for f in state.faults],
        "injector": state.injector.snapshot(),
    }


def restore(state: DevState, data: dict[str, Any]) -> None:
    """Add what :func:`snapshot` saved to ``state`` (entries with the same id are replaced).

    Must run on the server's event loop (it creates the loop's events)."""
    if data.get("version") != STATE_VERSION:
        raise ValueError(f"unsupported state version {data.get('version')!r}")
    clocks = _Clocks(state._clock)
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
