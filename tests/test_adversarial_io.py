"""Attacks through the daemon's inputs and outputs: keys that are not header-safe, secrets in
every rendering, and answers from a hostile server (compression bombs, endless bodies, drips,
wrong types) that must neither leak, crash the daemon nor grow its memory."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import string
import subprocess
import sys
import time
import tracemalloc
import urllib.parse
import uuid
import zlib
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path

import anyio
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from runner_daemon.cli import main
from runner_daemon.core.api import RunnerApi
from runner_daemon.core.errors import (
    ConfigError,
    RunnerGone,
    ServerError,
    TransportError,
    Unauthorized,
    UnreadableAnswer,
)
from runner_daemon.core.logs import Scrubber, configure_logging, secret_forms
from runner_daemon.core.settings import load_settings
from runner_daemon.core.transport import _AnswerTooLarge, _BoundedBody
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.server import DevServer
from runner_daemon.service import credentials
from tests.hostile import MIB, HostileServer, Request, bomb, json_answer
from tests.support import (
    REPO,
    DaemonProcesses,
    daemon_environment,
    environ_without_settings,
    finish,
    runner_connected,
    until,
    wait_terminal,
)

pytestmark = pytest.mark.adversarial

RUNNER = str(uuid.UUID(int=7))
HEARTBEAT = "/heartbeats"
POLL = "/bridge/commands/next"
# What an answer may make the process allocate, whatever the answer: a property, not a timing.
MEMORY_BOUND = 100 * MIB


def new_key() -> str:
    return f"sk-{uuid.uuid4().hex}"


# --- every rendering of a secret ---------------------------------------------------------------


def _encodings(secret: str) -> list[str]:
    """How our code or a library may encode a text secret (written apart from the scrubber's)."""
    data = secret.encode()
    return [
        secret,
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        repr(secret)[1:-1],
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote_plus(secret),
        *_byte_encodings(data),
    ]


def _byte_encodings(data: bytes) -> list[str]:
    standard, urlsafe = base64.b64encode(data).decode(), base64.urlsafe_b64encode(data).decode()
    return [
        repr(data)[2:-1],
        data.hex(),
        data.hex().upper(),
        standard,
        standard.rstrip("="),
        urlsafe,
        urlsafe.rstrip("="),
    ]


def _shown(encodings: Iterable[str]) -> list[str]:
    """The encodings, and how a JSON log line or a ``repr`` would escape each again."""
    forms = []
    for form in encodings:
        forms += [form, json.dumps(form)[1:-1], repr(form)[1:-1], json.dumps(repr(form))[1:-1]]
    return forms


def _leaks(output: str, encodings: Iterable[str]) -> list[str]:
    return [form for form in _shown(encodings) if form in output]


def _contexts(encoded: str, data: bytes) -> list[str]:
    """Messages that carry an encoded secret, as libraries write them."""
    with_newline = data + b"\r\n"
    return [
        encoded,
        f"Illegal header value {with_newline!r}",
        repr(RuntimeError(f'failed: {encoded} ("quoted")')),
        json.dumps({"errors": [f"bad credentials {encoded}"]}),
    ]


def _log_everywhere(message: str, value: object, secrets: list[str | bytes]) -> str:
    """A message logged as the event, as a value and in an exception, in both formats."""
    rendered = []
    for log_format in ("json", "console"):
        stream = io.StringIO()
        configure_logging("info", log_format, secrets=secrets, stream=stream)
        log = structlog.get_logger("t")
        log.warning(f"upstream said: {message}")
        log.warning("heartbeat failed", error=message, raw=value, nested={"items": [value, message]})
        try:
            raise RuntimeError(f"library failure: {message}")
        except RuntimeError:
            log.exception("the daemon failed unexpectedly")
        rendered.append(stream.getvalue())
    return "\n".join(rendered)


# API keys as settings accept them: printable ASCII, no whitespace (and no '*', the mask).
key_text = st.text(
    alphabet=sorted(set(string.printable) - set(string.whitespace) - {"*"}), min_size=8, max_size=64
)


@settings(max_examples=60, deadline=None)
@given(secret=key_text, which=st.integers(min_value=0), context=st.integers(min_value=0, max_value=3))
def test_no_rendering_of_a_text_secret_survives_the_scrubber(secret: str, which: int, context: int) -> None:
    encodings = _encodings(secret)
    data = secret.encode()
    message = _contexts(encodings[which % len(encodings)], data)[context]
    assert not _leaks(_log_everywhere(message, data, [secret]), encodings)


@settings(max_examples=40, deadline=None)
@given(
    key=st.binary(min_size=32, max_size=32),
    which=st.integers(min_value=0),
    context=st.integers(min_value=0, max_value=3),
)
def test_no_rendering_of_the_bridge_key_survives_the_scrubber(key: bytes, which: int, context: int) -> None:
    encodings = [*_byte_encodings(key), *_encodings(base64.b64encode(key).decode())]
    message = _contexts(encodings[which % len(encodings)], key)[context]
    assert not _leaks(_log_everywhere(message, key, [key]), encodings)


@given(secret=key_text)
def test_secret_forms_is_pure_and_holds_the_secret(secret: str) -> None:
    forms = secret_forms(secret)
    assert forms == secret_forms(secret)
    assert set(_encodings(secret)) <= forms
    assert Scrubber([secret])(f"a {secret} b") == "a *** b"


def test_short_values_are_masked_only_as_they_are() -> None:
    assert secret_forms("abc") == {"abc"}
    assert secret_forms("") == frozenset()


# --- keys that are not header-safe -------------------------------------------------------------


@pytest.mark.parametrize("tail", ["\n", "\r\n", " ", "\t\n", "\n\n"])
@pytest.mark.parametrize("source", ["OPIK_API_KEY", "RUNNER_DAEMON_API_KEY", "toml"])
def test_surrounding_whitespace_of_the_api_key_is_trimmed(tmp_path: Path, source: str, tail: str) -> None:
    key = new_key()
    config = None
    environ: dict[str, str] = {"OPIK_WORKSPACE": f" team-a{tail}"}
    if source == "toml":
        config = tmp_path / "c.toml"
        config.write_text(f"api_key = {json.dumps(' ' + key + tail)}\n")
    else:
        environ[source] = key + tail
    settings_ = load_settings(config, environ=environ)
    assert settings_.api_key is not None and settings_.api_key.get_secret_value() == key
    assert settings_.workspace == "team-a"


@pytest.mark.parametrize(
    "bad", ["{k}\n{k}", "{k}\r{k}", "{k} {k}", "{k}\x00", "{k}\x7f", "{k}é", "{k}\u2028x"]
)
def test_a_key_that_cannot_be_a_header_is_refused_without_showing_it(bad: str) -> None:
    key = new_key()
    with pytest.raises(ConfigError) as info:
        load_settings(None, environ={"OPIK_API_KEY": bad.format(k=key)})
    message = str(info.value)
    assert message.startswith("api_key: ") and "\n" not in message
    assert not _leaks(message, _encodings(key))


@pytest.mark.parametrize("bad", ["team\na", "team\x00", "tëam"])
def test_a_workspace_that_cannot_be_a_header_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^workspace: "):
        load_settings(None, environ={"OPIK_WORKSPACE": bad})


def test_the_client_refuses_header_values_it_cannot_send() -> None:
    with pytest.raises(ValueError, match="HTTP header"):
        RunnerApi("http://127.0.0.1:9/api/", api_key="a\nb")


@pytest.mark.parametrize("tail", ["\n", "\r\n", "  \n"])
def test_a_bridge_key_file_with_a_trailing_newline_is_read(tmp_path: Path, tail: str) -> None:
    key = os.urandom(32)
    path = tmp_path / "bridge-key"
    path.write_text(base64.b64encode(key).decode() + tail)
    assert credentials.read_key_file(path) == key


@pytest.mark.parametrize("spoil", [lambda t: t[:10] + "\n" + t[10:], lambda t: t[:10] + "\xe9" + t[10:]])
def test_a_spoiled_bridge_key_file_is_refused_without_showing_it(
    tmp_path: Path, spoil: Callable[[str], str]
) -> None:
    key = os.urandom(32)
    path = tmp_path / "bridge-key"
    path.write_bytes(spoil(base64.b64encode(key).decode()).encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        credentials.read_key_file(path)
    assert not _leaks(str(info.value), [*_byte_encodings(key), base64.b64encode(key).decode()[:10]])


@pytest.mark.anyio
async def test_a_trimmed_key_is_what_the_server_receives() -> None:
    key = new_key()
    with HostileServer(lambda request: json_answer(b'{"cancelled_job_ids": []}')) as server:
        loaded = load_settings(None, environ={"OPIK_API_KEY": key + "\r\n", "OPIK_URL_OVERRIDE": server.url})
        async with RunnerApi.from_settings(loaded) as api:
            await api.heartbeat(RUNNER, ["bridge"])
    assert server.requests[0].headers["authorization"] == key


def _echo_the_key(request: Request) -> list[bytes]:
    """A proxy that quotes the request's headers in its error page."""
    echoed = json.dumps({"errors": [f"bad credentials {request.headers.get('authorization')!r}"]})
    return json_answer(echoed.encode(), status=401)


@pytest.mark.anyio
async def test_an_error_answer_quoting_the_key_is_scrubbed_at_the_source() -> None:
    key = new_key()
    with HostileServer(_echo_the_key) as server:
        async with RunnerApi(server.url, api_key=key) as api:
            with pytest.raises(Unauthorized) as info:
                await api.heartbeat(RUNNER, ["bridge"])
    assert "bad credentials" in str(info.value)
    assert not _leaks(str(info.value), _encodings(key))


def test_pair_prints_no_key_an_error_quotes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key = new_key()
    monkeypatch.setenv("OPIK_API_KEY", key + "\n")
    with HostileServer(_echo_the_key) as server:
        status = main(
            ["pair", "--url", server.url, "--project-id", str(uuid.uuid4()), "--log-format", "json"]
        )
    captured = capsys.readouterr()
    assert status == 77  # the key was refused
    assert "could not start pairing: HTTP 401" in captured.err
    assert not _leaks(captured.out + captured.err, _encodings(key))


# --- the same, in real daemon processes ---------------------------------------------------------


@pytest.fixture
async def signed_runner(api: DevClient, tmp_path: Path) -> tuple[str, bytes, Path]:
    """A runner whose commands the dev server signs, and its key in a file ending in a newline."""
    key = os.urandom(32)
    runner_id = await api.dev_create_runner("keyed", bridge_key=key)
    path = tmp_path / "bridge-key"
    path.write_text(base64.b64encode(key).decode() + "\n")
    return runner_id, key, path


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("source", ["OPIK_API_KEY", "toml"])
async def test_a_daemon_given_keys_with_newlines_starts_and_never_shows_them(
    devserver: DevServer,
    api: DevClient,
    workspace: Path,
    tmp_path: Path,
    daemons: DaemonProcesses,
    signed_runner: tuple[str, bytes, Path],
    source: str,
) -> None:
    runner_id, bridge_key, key_file = signed_runner
    key = new_key()
    env = daemon_environment(
        devserver.url, runner_id, workspace, allow_unsigned_commands="false", bridge_key_file=key_file
    )
    argv = ["runner_daemon", "run"]
    if source == "toml":
        config = tmp_path / "daemon.toml"
        config.write_text(f'api_key = "{key}\\r\\n"\n')
        argv += ["--config", str(config)]
    else:
        env[source] = key + "\n"
    proc = daemons.spawn(env, *argv)
    await until(lambda: runner_connected(api, runner_id), 30)
    command_id = await api.submit_command(runner_id, "ReadFile", {"path": "README.md"})
    record = await wait_terminal(api, runner_id, command_id, 20)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = await finish(proc)
    assert record.status == "completed", stderr
    secrets = [
        *_encodings(key),
        *_byte_encodings(bridge_key),
        *_encodings(base64.b64encode(bridge_key).decode()),
    ]
    assert not _leaks(stdout + stderr, secrets)


def test_a_key_with_an_inner_newline_exits_78_with_one_line_without_it(tmp_path: Path) -> None:
    key = new_key()
    env = environ_without_settings()
    env.update(
        OPIK_API_KEY=f"{key[:10]}\n{key[10:]}",
        RUNNER_DAEMON_RUNNER_ID=RUNNER,
        RUNNER_DAEMON_ALLOW_UNSIGNED_COMMANDS="true",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "runner_daemon", "run", "--workspace-root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 78
    assert proc.stderr.startswith("runner-daemon: config error: api_key: ")
    assert proc.stderr.count("\n") == 1
    assert not _leaks(proc.stdout + proc.stderr, [*_encodings(key), key[:10], key[10:]])


# --- hostile answers: memory, types, drips ------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=4096).map(lambda b: b * 97),
    wbits=st.sampled_from([31, 15, -15, None]),
    chunk=st.integers(min_value=1, max_value=70_000),
)
def test_the_bounded_decoder_gives_any_body_back_in_any_chunks(
    data: bytes, wbits: int | None, chunk: int
) -> None:
    """gzip, zlib-wrapped and raw deflate, or plain; a limit one byte short refuses it."""
    if wbits is None:
        encoding, sent = None, data
    else:
        deflate = zlib.compressobj(6, zlib.DEFLATED, wbits)
        encoding, sent = ("gzip" if wbits == 31 else "deflate"), deflate.compress(data) + deflate.flush()
    body = _BoundedBody(encoding, max(len(data), len(sent)))
    for start in range(0, len(sent), chunk):
        body.feed(sent[start : start + chunk])
    assert body.content() == data
    if data:
        short = _BoundedBody(encoding, len(data) - 1)
        with pytest.raises(_AnswerTooLarge):
            for start in range(0, len(sent), chunk):
                short.feed(sent[start : start + chunk])


def _bombs(encoding: str, *, heartbeat_ok: bool = False) -> Callable[[Request], list[bytes]]:
    """Every answer a compression bomb (heartbeats fine, if asked)."""
    body = bomb(encoding, 1024)  # 1 GiB of zeros in about 1 MB

    def respond(request: Request) -> list[bytes]:
        if heartbeat_ok and request.path.endswith(HEARTBEAT):
            return json_answer(b'{"cancelled_job_ids": []}')
        return json_answer(body, encoding=encoding)

    return respond


def _endless(request: Request) -> Iterator[bytes]:
    """Claims a GiB and sends zeros until the client hangs up."""
    yield b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n"
    chunk = bytes(64 * 1024)
    for _ in range(1024 * MIB // len(chunk)):
        yield chunk


async def _peak_growth(action: Callable[[], Awaitable[object]], expected: type[BaseException]) -> int:
    """Bytes allocated at the peak while ``action`` raises ``expected``."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        with pytest.raises(expected):
            await action()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.anyio
@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compression_bomb_is_an_unreadable_answer_in_bounded_memory(encoding: str) -> None:
    with HostileServer(_bombs(encoding)) as server:
        async with RunnerApi(server.url) as api:
            poll_peak = await _peak_growth(lambda: api.poll(RUNNER, 10), UnreadableAnswer)
            beat_peak = await _peak_growth(lambda: api.heartbeat(RUNNER, ["bridge"]), UnreadableAnswer)
    assert poll_peak < MEMORY_BOUND and beat_peak < MEMORY_BOUND


@pytest.mark.anyio
async def test_an_endless_plain_answer_is_refused_unread() -> None:
    with HostileServer(_endless) as server:
        async with RunnerApi(server.url) as api:
            poll_peak = await _peak_growth(lambda: api.poll(RUNNER, 10), UnreadableAnswer)
            beat_peak = await _peak_growth(lambda: api.heartbeat(RUNNER, ["bridge"]), UnreadableAnswer)
    assert poll_peak < MEMORY_BOUND and beat_peak < MEMORY_BOUND


@pytest.mark.anyio
async def test_a_huge_error_answer_keeps_its_meaning() -> None:
    def respond(request: Request) -> Iterable[bytes]:
        if request.path.endswith(POLL):
            return _endless(request)
        # Nested deeper than any parser allows (json.loads would raise RecursionError).
        return json_answer(b"[" * 200_000, status=503)

    with HostileServer(respond) as server:
        async with RunnerApi(server.url) as api:
            with pytest.raises(ServerError, match="HTTP 503"):
                await api.heartbeat(RUNNER, ["bridge"])

    def not_found(request: Request) -> Iterator[bytes]:
        yield b"HTTP/1.1 404 Not Found\r\nContent-Length: 1073741824\r\n\r\n"
        yield from list(_endless(request))[1:]

    with HostileServer(not_found) as server:
        async with RunnerApi(server.url) as api:
            peak = await _peak_growth(lambda: api.poll(RUNNER, 10), RunnerGone)
    assert peak < MEMORY_BOUND


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "body"),
    [
        (HEARTBEAT, b'{"cancelled_job_ids": "all"}'),
        (HEARTBEAT, b"[]"),
        (POLL, b'{"commands": {"a": 1}}'),
        (POLL, b"null"),
        (POLL, b'{"commands": [1, 2'),
        (POLL, b"\xff\xfe{}"),
        (POLL, b'{"commands": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ],
)
async def test_wrong_json_is_an_unreadable_answer(path: str, body: bytes) -> None:
    with HostileServer(lambda request: json_answer(body)) as server:
        async with RunnerApi(server.url) as api:
            with pytest.raises(UnreadableAnswer):
                if path == HEARTBEAT:
                    await api.heartbeat(RUNNER, ["bridge"])
                else:
                    await api.poll(RUNNER, 10)


@pytest.mark.anyio
async def test_stacked_encodings_are_refused() -> None:
    body = bomb("gzip", 1)
    with HostileServer(lambda request: json_answer(body, encoding="gzip, gzip")) as server:
        async with RunnerApi(server.url) as api:
            with pytest.raises(UnreadableAnswer, match="Content-Encoding"):
                await api.poll(RUNNER, 10)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_slow_drip_is_cut_by_the_deadline() -> None:
    def drip(request: Request) -> Iterator[bytes]:
        yield b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n"
        for _ in range(10_000):
            yield b" "
            time.sleep(0.05)

    with HostileServer(drip) as server:
        async with RunnerApi(server.url, request_timeout=0.5) as api:
            with pytest.raises(TransportError, match="no complete answer"):
                await api.heartbeat(RUNNER, ["bridge"])


@pytest.mark.anyio
async def test_a_legitimate_large_poll_answer_still_passes(api: DevClient, runner_id: str) -> None:
    """Two commands with args at Opik's payload cap, in one answer."""
    await api.heartbeat(runner_id, ["bridge"])
    padding = "x" * (1_048_576 - 100)
    for name in ("a", "b"):
        await api.submit_command(runner_id, "WriteFile", {"path": name, "content": padding})
    items: list[object] = []
    with anyio.fail_after(30):
        while len(items) < 2:
            items += await api.poll(runner_id, 2)
    assert len(items) == 2


def _vm_hwm_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_daemon_fed_a_gzip_bomb_keeps_polling_in_bounded_memory(
    workspace: Path, daemons: DaemonProcesses
) -> None:
    with HostileServer(_bombs("gzip", heartbeat_ok=True)) as server:
        proc = daemons.spawn(daemon_environment(server.url, RUNNER, workspace))
        await until(lambda: server.count(POLL) >= 2 or proc.poll() is not None, 60)
        assert proc.poll() is None, proc.output()[1]
        peak = _vm_hwm_bytes(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, stderr = await finish(proc)
    # About 50 MiB at rest; the bomb alone would take it past 1 GiB.
    assert peak < 50 * MIB + MEMORY_BOUND, f"peak RSS {peak // MIB} MiB"
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    failures = [event for event in events if event["event"] == "poll failed; retrying"]
    assert failures and "larger than" in failures[0]["error"]
    assert proc.returncode == 0
