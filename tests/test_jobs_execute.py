"""One job, run for real: inputs, environment, result file, bootstrap, timeout, cancel, logs."""

from __future__ import annotations

import base64
import gzip
import http.server
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from runner_daemon.core.errors import InvalidInputs, RequestRejected, RunnerGone, ServerError
from runner_daemon.core.models import AgentParam, Job, LogEntry
from runner_daemon.core.retry import Backoff
from runner_daemon.core.settings import Settings, load_settings
from runner_daemon.jobs.agents import BOOTSTRAP, AgentSpec
from runner_daemon.jobs.execute import SANDBOX_MISSING, JobOutcome, read_outcome, run_job
from runner_daemon.jobs.inputs import validate_inputs
from runner_daemon.jobs.logs import LINE_CHARS, LogShipper
from runner_daemon.system.processes import GroupWatcher
from runner_daemon.system.sandbox import SandboxSupport, sandbox_for
from tests.support import until

pytestmark = pytest.mark.anyio

TRACE_ID = "0192f0c0-0000-7000-8000-000000000001"
API_KEY = "opik-api-key-for-the-agent"
BRIDGE_KEY = b"bridge-key-bytes-0123456789abcdef"
OPIK_VENV_PYTHON = Path("/tmp/opikvenv/bin/python")

AGENTS = """
import asyncio
import datetime


def as_dict(query, n=1):
    return {"query": query, "n": n}


def scalar(x):
    return x * 2


def not_json():
    return datetime.date(2024, 1, 2)


def nested_not_json():
    return {"when": datetime.date(2024, 1, 2), "ok": True}


def boom(why):
    raise ValueError(why)


async def slow_echo(text):
    await asyncio.sleep(0)
    return text


if __name__ == "__main__":
    raise SystemExit("imported as __main__")
"""


class Recorder:
    """A ``send`` for the shipper: records batches; fails while told to."""

    def __init__(self, failures: int = 0, error: Exception | None = None) -> None:
        self.batches: list[list[LogEntry]] = []
        self.failures = failures
        self.error = error or ServerError("down", status=503)
        self.attempts = 0

    async def send(self, entries: list[LogEntry]) -> None:
        self.attempts += 1
        if self.failures:
            self.failures -= 1
            raise self.error
        self.batches.append(list(entries))

    def texts(self, stream: str | None = None) -> list[str]:
        return [e.text for batch in self.batches for e in batch if stream is None or e.stream == stream]


def settings_for(root: Path, **overrides: Any) -> Settings:
    return load_settings(
        None,
        {"workspace_root": root, "api_key": API_KEY, "jobs": {"kill_grace_seconds": 0.5}, **overrides},
    )


def spec_for(argv: list[str], params: tuple[AgentParam, ...] = (), sandbox: bool = False) -> AgentSpec:
    return AgentSpec(
        name="agent",
        description="",
        params=params,
        timeout=None,
        argv=tuple(argv),
        source="test",
        sandbox=sandbox,
    )


def job_for(inputs: Any = None, timeout: int = 60) -> Job:
    return Job(id="job-1", agent_name="agent", status="running", inputs=inputs, timeout=timeout)


def script(folder: Path, name: str, text: str) -> str:
    path = folder / name
    path.write_text(text)
    return str(path)


async def run(
    root: Path,
    argv: list[str],
    inputs: Any = None,
    *,
    recorder: Recorder | None = None,
    timeout: int = 60,
    params: tuple[AgentParam, ...] = (),
    **kwargs: Any,
) -> JobOutcome:
    recorder = recorder or Recorder()
    settings = kwargs.pop("settings", None) or settings_for(root)
    async with LogShipper(recorder.send, max_lines=100_000) as logs:
        return await run_job(
            spec_for(argv, params),
            job_for(inputs, timeout),
            TRACE_ID,
            settings=settings,
            logs=logs,
            **kwargs,
        )


def real(path: Path) -> str:
    return os.path.realpath(path)


def group_members(pgid: int) -> list[int]:
    """Processes (not zombies) whose process group is ``pgid``, from /proc."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields[0] not in (b"Z", b"X") and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "ws"
    folder.mkdir()
    return folder


@pytest.fixture
def watcher() -> Iterator[GroupWatcher]:
    groups = GroupWatcher(0.5)
    yield groups
    groups.close()


# ---------------------------------------------------------------- inputs


def param(name: str, type_: str = "string", presence: str | None = "required") -> AgentParam:
    return AgentParam.model_validate({"name": name, "type": type_, "presence": presence})


async def test_inputs_are_cast_as_opik_casts_them() -> None:
    spec = spec_for(
        ["x"],
        (
            param("s"),
            param("i", "integer"),
            param("f", "float"),
            param("b", "boolean"),
            param("p", "prompt"),
            param("o", "string", "optional"),
        ),
    )
    given = {"s": {"a": 1}, "i": "3.0", "f": "2.5", "b": "Yes", "p": "commit-1", "extra": [1]}
    assert validate_inputs(spec, given) == {
        "s": '{"a": 1}',
        "i": 3,
        "f": 2.5,
        "b": True,
        "p": "commit-1",
        "extra": [1],
    }
    assert validate_inputs(spec_for(["x"], (param("o", presence="optional"),)), None) == {}
    assert validate_inputs(spec_for(["x"], (param("s"),)), {"s": None}) == {"s": None}
    assert validate_inputs(spec_for(["x"], (param("s"),)), {"s": True}) == {"s": "True"}


@pytest.mark.parametrize(
    ("params", "inputs", "message"),
    [
        ((param("query"),), {}, "Missing required param 'query'"),
        ((param("query", presence=None),), {}, "Missing required param 'query'"),
        ((param("n", "integer"),), {"n": "abc"}, "Param 'n' must be an integer, got 'abc'"),
        ((param("n", "integer"),), {"n": "3.5"}, "Param 'n' must be an integer, got '3.5'"),
        ((param("n", "integer"),), {"n": True}, "Param 'n' must be an integer, got 'true'"),
        ((param("x", "float"),), {"x": "NaN"}, "Param 'x' must be a number, got 'NaN'"),
        ((param("x", "float"),), {"x": [1]}, "Param 'x' must be a number, got '[1]'"),
        ((param("b", "boolean"),), {"b": "maybe"}, "Param 'b' must be a boolean, got 'maybe'"),
        ((), [1, 2], "Inputs must be a JSON object, got an array"),
        ((), "text", "Inputs must be a JSON object, got a string"),
    ],
)
async def test_invalid_inputs_name_the_param(
    params: tuple[AgentParam, ...], inputs: Any, message: str
) -> None:
    with pytest.raises(InvalidInputs) as caught:
        validate_inputs(spec_for(["x"], params), inputs)
    assert str(caught.value) == message


async def test_invalid_inputs_fail_the_job_before_anything_starts(root: Path) -> None:
    marker = root / "started"
    outcome = await run(root, ["touch", str(marker)], {}, params=(param("query"),))
    assert outcome == JobOutcome("failed", error="Missing required param 'query'")
    assert not marker.exists()


# ---------------------------------------------------------------- declared agents

DECLARED = """
import json, os, sys
inputs = json.load(sys.stdin)
names = ["OPIK_AGENT", "OPIK_JOB_ID", "OPIK_TRACE_ID", "OPIK_API_KEY", "OPIK_URL_OVERRIDE",
         "RUNNER_DAEMON_BRIDGE_KEY", "RUNNER_DAEMON_LOG_LEVEL", "OPIK_RUNNER_MODE", "SMUGGLED",
         "OPENAI_API_KEY"]
env = {name: os.environ.get(name) for name in names}
result = {"inputs": inputs, "env": env, "cwd": os.getcwd(), "file": os.environ["OPIK_RESULT_FILE"]}
with open(os.environ["OPIK_RESULT_FILE"], "w") as f:
    json.dump({"result": result}, f)
"""


async def test_declared_agent_gets_inputs_on_stdin_and_its_environment(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(root)  # read before the variables below: they name no setting
    monkeypatch.setenv("RUNNER_DAEMON_BRIDGE_KEY", base64.b64encode(BRIDGE_KEY).decode())
    monkeypatch.setenv("RUNNER_DAEMON_LOG_LEVEL", "debug")
    monkeypatch.setenv("OPIK_RUNNER_MODE", "true")
    monkeypatch.setenv("SMUGGLED", "x:" + BRIDGE_KEY.hex())
    monkeypatch.setenv("OPENAI_API_KEY", "the-users-own-key")
    agent = script(root, "agent.py", DECLARED)
    outcome = await run(
        root,
        [sys.executable, agent],
        {"query": "hi", "n": "2"},
        params=(param("query"), param("n", "integer")),
        bridge_key=BRIDGE_KEY,
        settings=settings,
    )
    assert outcome.status == "completed", outcome.error
    result = outcome.result
    assert result["inputs"] == {"query": "hi", "n": 2}
    assert result["env"] == {
        "OPIK_AGENT": "agent",
        "OPIK_JOB_ID": "job-1",
        "OPIK_TRACE_ID": TRACE_ID,
        "OPIK_API_KEY": API_KEY,  # the agent logs its traces with it
        "OPIK_URL_OVERRIDE": "http://localhost:5173/api",
        "RUNNER_DAEMON_BRIDGE_KEY": None,
        "RUNNER_DAEMON_LOG_LEVEL": None,
        "OPIK_RUNNER_MODE": None,
        "SMUGGLED": None,
        "OPENAI_API_KEY": "the-users-own-key",
    }
    assert result["cwd"] == real(root)
    # The job's private folder is gone with the job.
    assert not Path(result["file"]).parent.exists()


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        ("sys.exit(3)", JobOutcome("failed", error="Process exited with code 3")),
        ("write({'error': 'no key'}); sys.exit(2)", JobOutcome("failed", error="no key")),
        ("write({'error': 'no key'})", JobOutcome("failed", error="no key")),
        ("os.kill(os.getpid(), 9)", JobOutcome("failed", error="Process was killed by signal SIGKILL")),
        ("pass", JobOutcome("completed", result=None)),
        ("write([1, 2])", JobOutcome("completed", result=[1, 2])),
        ("write({'answer': 42})", JobOutcome("completed", result={"answer": 42})),
        ("write({'result': 'x', 'error': 'ignored'})", JobOutcome("completed", result="x")),
        ("open(os.environ['OPIK_RESULT_FILE'], 'w').write('{not json')", None),
    ],
)
async def test_exit_status_and_result_file_make_the_outcome(
    root: Path, code: str, outcome: JobOutcome | None
) -> None:
    text = (
        "import json, os, sys\n"
        "def write(value):\n"
        "    with open(os.environ['OPIK_RESULT_FILE'], 'w') as f: json.dump(value, f)\n" + code + "\n"
    )
    got = await run(root, [sys.executable, script(root, "agent.py", text)])
    if outcome is None:
        assert got.status == "failed" and got.error is not None
        assert got.error.startswith("The result file is not valid JSON")
    else:
        assert got == outcome


@pytest.mark.adversarial
async def test_result_file_is_never_read_through_a_symlink(root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "daemon-secret"
    secret.write_text('{"result": "the secret"}')
    text = f"import os\np = os.environ['OPIK_RESULT_FILE']\nos.unlink(p)\nos.symlink({str(secret)!r}, p)\n"
    outcome = await run(root, [sys.executable, script(root, "agent.py", text)])
    assert outcome.status == "failed"
    assert "the secret" not in json.dumps(outcome.result) + str(outcome.error)


async def test_read_outcome_bounds_the_result_file(tmp_path: Path) -> None:
    big = tmp_path / "result.json"
    big.write_text(json.dumps({"result": "x" * (5 * 1024 * 1024)}))
    outcome = read_outcome(0, big)
    assert outcome.status == "failed" and outcome.error is not None and "larger than" in outcome.error


async def test_an_agent_that_cannot_start_fails_with_the_reason(root: Path) -> None:
    outcome = await run(root, [str(root / "missing-program")])
    assert outcome.status == "failed" and outcome.error is not None
    assert outcome.error.startswith(f"Could not start {root / 'missing-program'}")


async def test_a_sandboxed_agent_without_a_sandbox_never_runs(root: Path) -> None:
    marker = root / "started"
    async with LogShipper(Recorder().send, max_lines=100) as logs:
        outcome = await run_job(
            spec_for(["touch", str(marker)], sandbox=True),
            job_for(),
            TRACE_ID,
            settings=settings_for(root),
            logs=logs,
        )
    assert outcome == JobOutcome("failed", error=SANDBOX_MISSING)
    assert not marker.exists()


# ---------------------------------------------------------------- bootstrap


@pytest.mark.parametrize(
    ("function", "inputs", "outcome"),
    [
        ("as_dict", {"query": "q"}, JobOutcome("completed", result={"query": "q", "n": 1})),
        ("scalar", {"x": 21}, JobOutcome("completed", result={"result": 42})),
        ("not_json", {}, JobOutcome("completed", result={"result": "2024-01-02"})),
        ("nested_not_json", {}, JobOutcome("completed", result={"when": "2024-01-02", "ok": True})),
        ("boom", {"why": "bad input"}, JobOutcome("failed", error="ValueError: bad input")),
        ("slow_echo", {"text": "awaited"}, JobOutcome("completed", result={"result": "awaited"})),
        ("missing", {}, None),
    ],
)
async def test_bootstrap_calls_the_function_and_shapes_its_value(
    root: Path, function: str, inputs: dict[str, Any], outcome: JobOutcome | None
) -> None:
    (root / "pkg").mkdir()
    source = script(root / "pkg", "agents.py", AGENTS)
    got = await run(root, [sys.executable, str(BOOTSTRAP), source, function], inputs)
    if outcome is None:
        assert got.status == "failed" and got.error is not None
        assert got.error.startswith("AttributeError:") and "'missing'" in got.error
    else:
        assert got == outcome


async def test_bootstrap_imports_next_to_the_agent_and_not_the_daemon(root: Path) -> None:
    # "agents" is also a module next to bootstrap.py (runner_daemon/jobs/agents.py).
    (root / "src").mkdir()
    script(root / "src", "agents.py", "WHO = 'the user'\n")
    source = script(root / "src", "main.py", "import agents\n\ndef who():\n    return agents.WHO\n")
    got = await run(root, [sys.executable, str(BOOTSTRAP), source, "who"])
    assert got == JobOutcome("completed", result={"result": "the user"})


class _Collector(http.server.BaseHTTPRequestHandler):
    """Opik's ingestion endpoints, as far as the SDK needs them: everything succeeds."""

    bodies: list[bytes]

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.bodies.append(body)
        self._answer()

    def _answer(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[bytes]]]:
    bodies: list[bytes] = []
    handler = type("Collector", (_Collector,), {"bodies": bodies})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api/", bodies
    server.shutdown()
    server.server_close()


@pytest.mark.skipif(not OPIK_VENV_PYTHON.exists(), reason="needs opik installed in /tmp/opikvenv")
async def test_bootstrap_gives_the_trace_the_reported_id(
    root: Path, collector: tuple[str, list[bytes]]
) -> None:
    url, bodies = collector
    source = script(
        root,
        "traced.py",
        "import opik\nfrom opik import opik_context\n\n"
        "@opik.track(entrypoint=True)\n"
        "def traced(query: str) -> dict:\n"
        "    return {'trace_id': opik_context.get_current_trace_data().id, 'query': query}\n",
    )
    outcome = await run(
        root,
        [str(OPIK_VENV_PYTHON), str(BOOTSTRAP), source, "traced"],
        {"query": "q"},
        settings=settings_for(root, url=url),
    )
    assert outcome == JobOutcome("completed", result={"trace_id": TRACE_ID, "query": "q"})
    # flush_tracker ran before the exit: the trace reached the server with that id.
    assert any(TRACE_ID.encode() in body for body in bodies)


# ---------------------------------------------------------------- timeout and cancel

STUBBORN = """
trap '' TERM
echo $$ > "$1/leader"
bash -c 'trap "" TERM; sleep 300' &
echo $! > "$1/grandchild"
echo started
sleep 300
"""


async def test_timeout_kills_the_whole_group(root: Path, tmp_path: Path, watcher: GroupWatcher) -> None:
    agent = script(root, "agent.sh", STUBBORN)
    recorder = Recorder()
    outcome = await run(root, ["bash", agent, str(tmp_path)], recorder=recorder, timeout=1, watcher=watcher)
    assert outcome == JobOutcome("failed", error="Job timed out after 1s")
    leader = int((tmp_path / "leader").read_text())
    assert group_members(leader) == []
    assert recorder.texts() == ["started"]


async def test_cancelling_the_job_kills_the_group_and_propagates(
    root: Path, tmp_path: Path, watcher: GroupWatcher
) -> None:
    agent = script(root, "agent.sh", STUBBORN)
    finished: list[JobOutcome] = []

    async def job() -> None:
        finished.append(await run(root, ["bash", agent, str(tmp_path)], watcher=watcher))

    async with anyio.create_task_group() as group:
        group.start_soon(job)
        await until(lambda: (tmp_path / "grandchild").exists() and (tmp_path / "grandchild").read_text())
        group.cancel_scope.cancel()
    assert finished == []
    assert group_members(int((tmp_path / "leader").read_text())) == []


async def test_what_the_agent_leaves_running_ends_with_it(root: Path, tmp_path: Path) -> None:
    text = 'echo $$ > "$1/leader"\n(sleep 300 &)\nsleep 300 >/dev/null 2>&1 &\necho done\n'
    outcome = await run(root, ["bash", script(root, "agent.sh", text), str(tmp_path)])
    assert outcome == JobOutcome("completed", result=None)
    assert group_members(int((tmp_path / "leader").read_text())) == []


# ---------------------------------------------------------------- logs


async def test_logs_are_complete_and_ordered_before_run_job_returns(root: Path) -> None:
    long_line = "".join(chr(0x41 + i % 26) for i in range(LINE_CHARS * 2 + 100))
    text = (
        "import sys\n"
        "for i in range(2500):\n"
        "    print(f'out {i}')\n"
        "print()\nprint('   ')\n"
        "sys.stdout.write('crlf\\r\\n')\n"
        f"print({long_line!r})\n"
        "sys.stdout.buffer.write(b'bad \\xff byte\\n')\n"
        "print('to stderr', file=sys.stderr)\n"
        "sys.stdout.write('no newline at the end')\n"
    )
    recorder = Recorder()
    outcome = await run(root, [sys.executable, script(root, "agent.py", text)], recorder=recorder)
    assert outcome.status == "completed"
    stdout = recorder.texts("stdout")
    assert stdout[:2500] == [f"out {i}" for i in range(2500)]
    assert stdout[2500] == "crlf"
    pieces = stdout[2501:2504]
    assert "".join(pieces) == long_line and all(len(piece) <= LINE_CHARS for piece in pieces)
    assert stdout[2504:] == ["bad \ufffd byte", "no newline at the end"]
    assert recorder.texts("stderr") == ["to stderr"]
    assert all(entry.text.strip() for batch in recorder.batches for entry in batch)
    assert all(len(batch) <= 1000 for batch in recorder.batches)


async def test_a_flood_drops_the_oldest_unsent_lines_and_says_how_many() -> None:
    gate = anyio.Event()
    in_flight = anyio.Event()
    sent: list[str] = []

    async def send(entries: list[LogEntry]) -> None:
        in_flight.set()
        await gate.wait()
        sent.extend(entry.text for entry in entries)

    async with LogShipper(send, max_lines=100, batch_seconds=0) as logs:
        logs.add("stdout", "first")
        with anyio.fail_after(10):
            await in_flight.wait()
        for i in range(500):
            logs.add("stdout", f"line {i}")
        gate.set()
        assert await logs.flush(10)
    assert sent == ["first", "[runner-daemon] 400 log lines dropped"] + [f"line {i}" for i in range(400, 500)]


async def test_failed_sends_are_retried_in_order() -> None:
    recorder = Recorder(failures=3)
    async with LogShipper(recorder.send, max_lines=1000, backoff=Backoff(0.01, 0.05)) as logs:
        for i in range(50):
            logs.add("stdout", f"line {i}")
        assert await logs.flush(30)
    assert recorder.texts() == [f"line {i}" for i in range(50)]
    assert recorder.attempts > 3


async def test_a_refused_batch_is_dropped_and_the_rest_goes_on() -> None:
    recorder = Recorder(failures=1, error=RequestRejected("blank entry", status=422))
    async with LogShipper(recorder.send, max_lines=1000, batch_seconds=0) as logs:
        logs.add("stdout", "refused")
        assert await logs.flush(10)
        logs.add("stdout", "accepted")
        assert await logs.flush(10)
    assert recorder.texts() == ["accepted"]


async def test_a_fatal_error_from_send_propagates() -> None:
    recorder = Recorder(failures=1, error=RunnerGone("gone", status=404))
    with pytest.raises(BaseException) as caught:
        async with LogShipper(recorder.send, max_lines=1000, batch_seconds=0) as logs:
            logs.add("stdout", "line")
            await anyio.sleep(30)
    assert (
        caught.group_contains(RunnerGone)
        if isinstance(caught.value, BaseExceptionGroup)
        else (isinstance(caught.value, RunnerGone))
    )


SANDBOXED = """
import json, os, sys
try:
    open(sys.argv[1]).read()
    outside = "read"
except OSError as exc:
    outside = type(exc).__name__
open("written-in-the-workspace", "w").write("ok")
print(json.dumps({"inputs": json.load(sys.stdin), "outside": outside}))
"""


@pytest.mark.adversarial
@pytest.mark.skipif(SandboxSupport.probe().abi < 1, reason="needs Landlock")
async def test_a_sandboxed_agent_runs_confined(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("not for the agent")
    settings = settings_for(root)
    policy = sandbox_for(settings)[0]
    assert policy is not None
    (root / "pkg").mkdir()
    source = script(root / "pkg", "agents.py", AGENTS)
    agent = script(root, "agent.py", SANDBOXED)
    recorder = Recorder()
    async with LogShipper(recorder.send, max_lines=100) as logs:
        confined = await run_job(
            spec_for([sys.executable, agent, str(outside)], sandbox=True),
            job_for({"q": 1}),
            TRACE_ID,
            settings=settings,
            logs=logs,
            sandbox=policy,
        )
        # The bootstrap lives with the daemon's code; the sandbox still lets it run.
        bootstrapped = await run_job(
            spec_for([sys.executable, str(BOOTSTRAP), source, "scalar"], sandbox=True),
            job_for({"x": 2}),
            TRACE_ID,
            settings=settings,
            logs=logs,
            sandbox=policy,
        )
    assert confined == JobOutcome("completed", result=None), recorder.texts()
    assert json.loads(recorder.texts("stdout")[0]) == {"inputs": {"q": 1}, "outside": "PermissionError"}
    assert (root / "written-in-the-workspace").exists()
    assert bootstrapped == JobOutcome("completed", result={"result": 4}), recorder.texts()
