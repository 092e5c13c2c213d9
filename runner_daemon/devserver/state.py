"""The dev server's in-memory state: runners, commands, pairing sessions, counters and faults.

Every method is synchronous and runs on the server's event loop, so each one is atomic with
respect to concurrent requests; the routes only await *between* calls (long polls, waits).
The records are in :mod:`.records`; :mod:`.persistence` saves and restores the state.
"""

from __future__ import annotations

import base64
import hmac
import json
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio

from runner_daemon.bridge.signing import HMAC_FIELD, derive_bridge_key, sign
from runner_daemon.devserver.faults import FaultInjector
from runner_daemon.devserver.jobs import JobBook
from runner_daemon.devserver.records import (
    DEFAULT_WORKSPACE,
    TERMINAL,
    WRITE_TYPES,
    ApiFailure,
    Command,
    DevServerConfig,
    Fault,
    PairingSession,
    Runner,
    now_iso,
)
from runner_daemon.devserver.traces import TraceStore
from runner_daemon.service.pairing import activation_hmac


class DevState:
    def __init__(self, config: DevServerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self.runners: dict[str, Runner] = {}
        self.commands: dict[str, Command] = {}
        self.faults: deque[Fault] = deque(maxlen=1000)
        self.pairings: dict[str, PairingSession] = {}
        self.injector = FaultInjector(clock)
        self.jobs = JobBook(config, self.runners, self.alive, clock)
        self.traces = TraceStore(config.max_traces, config.max_spans_per_trace)
        # Set when the server stops: held polls and waits answer at once instead of holding.
        self.closed = anyio.Event()

    @property
    def clock(self) -> Callable[[], float]:
        """The monotonic clock the state's times are kept on."""
        return self._clock

    # --- runners ------------------------------------------------------------------------

    def create_runner(
        self,
        name: str = "dev-runner",
        *,
        bridge_key: bytes | None = None,
        project_id: str | None = None,
        workspace: str = DEFAULT_WORKSPACE,
        type: str = "connect",
    ) -> Runner:
        """A runner, evicting the older one of its type for the same project and workspace."""
        runner = Runner(
            id=str(uuid.uuid4()),
            name=name,
            project_id=project_id or str(uuid.uuid4()),
            created_at=now_iso(),
            bridge_key=bridge_key,
            workspace=workspace,
            type=type,
        )
        self.runners[runner.id] = runner
        self._evict_older(runner)
        return runner

    def _evict_older(self, runner: Runner) -> None:
        """As Opik does: a runner evicts the one of its type before it, never the other type."""
        for older in list(self.runners.values()):
            if (
                older is not runner
                and older.visible
                and (older.type, older.project_id, older.workspace)
                == (runner.type, runner.project_id, runner.workspace)
            ):
                self.remove_runner(older.id)

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
        runner = Runner(
            id=str(uuid.uuid4()),
            name="pairing",
            project_id=project_id,
            created_at=now_iso(),
            workspace=workspace,
            type=body["type"],
            visible=False,
        )
        self.runners[runner.id] = runner
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
        self._evict_older(runner)
        runner.name, runner.visible = name, True
        runner.last_heartbeat, runner.connected_at = self._clock(), now_iso()
        if session.type == "connect":
            # The browser keeps the bridge key to sign commands; the dev server plays that part.
            # An endpoint pairing (often headless, activated by the runner itself) derives none.
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
        """As Opik's GET: the agents (named by their keys) only while the runner is connected."""
        alive = self.alive(runner)
        view = {
            "id": runner.id,
            "name": runner.name,
            "project_id": runner.project_id,
            "status": "connected" if alive else "disconnected",
            "connected_at": runner.connected_at,
            "type": runner.type,
            "capabilities": runner.capabilities if runner.capabilities is not None else ["jobs"],
            "agents": list(runner.agents.values()) if alive else [],
            "checklist": runner.checklist,
        }
        return {key: value for key, value in view.items() if value is not None}

    def heartbeat(self, runner_id: str, workspace: str, capabilities: list[str] | None) -> list[str]:
        """Refresh the alive mark; a non-empty list replaces the capabilities, else they stay.

        Returns the ids of the runner's jobs cancelled while running, each to one beat only.

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
        return self.jobs.take_cancelled(runner)

    def remove_runner(self, runner_id: str) -> None:
        """DELETE (or eviction): fail every open command, then answer 404 (410 to heartbeats)."""
        runner = self.runners.get(runner_id)
        if runner is None or runner.removed:
            return
        runner.removed = True
        for command in self.commands.values():
            if command.runner_id == runner_id and command.status not in TERMINAL:
                self._finish(command, "timed_out")
        self.jobs.runner_gone(runner_id)
        runner.submitted.notify()
        runner.jobs_queued.notify()

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
            runner.jobs_queued.notify()

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
