"""The API client against the dev server: status mapping, Retry-After, cancellation under load."""

from __future__ import annotations

import gzip
import json
import random
import socket
import ssl
import subprocess
import sys

import anyio
import anyio.abc
import pytest

from runner_daemon.core.api import RunnerApi, retry_after_seconds
from runner_daemon.core.errors import (
    AlreadyReported,
    Conflict,
    RateLimited,
    RequestRejected,
    RunnerEvicted,
    RunnerGone,
    ServerError,
    TransportError,
    Unauthorized,
)
from runner_daemon.core.models import ResultReport
from runner_daemon.core.transport import Answer, _Base, tls_context
from runner_daemon.core.wire import _readable
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.server import DevServer

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (404, RunnerGone),
        (410, RunnerEvicted),
        (409, Conflict),
        (401, Unauthorized),
        (403, Unauthorized),
        (400, RequestRejected),
        (422, RequestRejected),
        (500, ServerError),
        (502, ServerError),
        (503, ServerError),
    ],
)
async def test_status_codes_map_to_the_error_tree(
    api: DevClient, runner_id: str, status: int, error: type[Exception]
) -> None:
    await api.dev_post("faults", {"route": "heartbeat", "status": status})
    with pytest.raises(error) as info:
        await api.heartbeat(runner_id, ["bridge"])
    assert f"HTTP {status}" in str(info.value)
    assert "injected fault" in str(info.value)


async def test_rate_limit_carries_retry_after(api: DevClient, runner_id: str) -> None:
    await api.dev_post("faults", {"route": "heartbeat", "status": 429, "retry_after": 7})
    with pytest.raises(RateLimited) as info:
        await api.heartbeat(runner_id, ["bridge"])
    assert info.value.retry_after == 7


async def test_report_conflict_is_already_reported(api: DevClient, runner_id: str) -> None:
    await api.heartbeat(runner_id, ["bridge"])
    command_id = await api.submit_command(runner_id, "ReadFile", {"path": "x"})
    body = ResultReport(status="completed", result={}).model_dump_json().encode()
    await api.report(runner_id, command_id, body)
    with pytest.raises(AlreadyReported):
        await api.report(runner_id, command_id, body)


async def test_unreachable_server_is_a_transport_error() -> None:
    with anyio.fail_after(10):
        async with RunnerApi("http://127.0.0.1:9/api/", connect_timeout=1) as client:
            with pytest.raises(TransportError):
                await client.heartbeat("r", ["bridge"])


def _response(headers: dict[str, str]) -> Answer:
    return Answer("POST", "http://x/", "/", 429, "Too Many Requests", headers, b"")


def test_retry_after_forms() -> None:
    assert retry_after_seconds(_response({"Retry-After": "3"})) == 3
    assert retry_after_seconds(_response({"RateLimit-Reset": "2.5"})) == 2.5
    assert retry_after_seconds(_response({"Retry-After": "Thu, 01 Jan 1970 00:01:40 GMT"}), now=90) == 10
    assert retry_after_seconds(_response({"Retry-After": "99999"})) == 300
    assert retry_after_seconds(_response({"Retry-After": "-4"})) == 0
    assert retry_after_seconds(_response({"Retry-After": "soon"})) == 1
    assert retry_after_seconds(_response({})) == 1


async def _wait_for(client: DevClient, runner_id: str, command_id: str, seconds: float) -> None:
    await client.get_command(runner_id, command_id, wait=seconds)


async def test_cancelling_requests_under_a_contended_pool_leaks_no_slot(
    devserver: DevServer, runner_id: str
) -> None:
    """httpcore #1093: cancellations while waiting for a pooled connection must free it."""
    async with DevClient(devserver.url, max_connections=4, request_timeout=5) as client:
        await client.heartbeat(runner_id, ["bridge"])
        command_id = await client.submit_command(runner_id, "ReadFile", {"path": "x"})
        rng = random.Random(1093)
        for _ in range(5):
            async with anyio.create_task_group() as tg:
                for _ in range(40):
                    tg.start_soon(_wait_for, client, runner_id, command_id, 0.5)
                await anyio.sleep(rng.uniform(0.001, 0.05))
                tg.cancel_scope.cancel()
        # All four connections must be usable again: four long waits at once, then more.
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(_wait_for, client, runner_id, command_id, 1)
            for _ in range(20):
                await client.get_runner(runner_id)


COMMON_BASES = [
    "http://localhost:5173/api/",
    "http://127.0.0.1:5173/api",
    "https://www.comet.com/opik/api/",
    "HTTP://Opik.Example.COM:443/Opik/Api",
    "https://opik.internal:443/",
    "http://h:80",
    "http://h:0080/x",
    "http://h:/api/",
    "http://h//api",
    "http://h-1.example.com:8080/a_b/c~d/",
]
UNUSUAL_BASES = [
    "http://[::1]:8080/api/",
    "http://h/a b/",
    "http://u:p@h/api/",
    "http://h/api?x=1",
    "http://h/api#x",
    "http://bücher.de/api/",
    "http://h:65536/",
    "http://h./api/",
    "http://h/./api/",
    "http://h/%7Eapi/",
    "http://-h/",
    "http://h:+80/x",
]


@pytest.mark.parametrize("base_url", COMMON_BASES + UNUSUAL_BASES)
def test_a_base_url_read_without_httpx_reads_as_httpx_reads_it(base_url: str) -> None:
    plain = _Base.parse_plain(base_url)
    assert (plain is not None) == (base_url in COMMON_BASES)
    if plain is not None:
        assert plain == _Base.parse_with_httpx(base_url)


def test_the_daemon_imports_httpx_only_for_a_url_that_needs_it() -> None:
    """Importing httpx is about an eighth of the daemon's start-up."""
    script = (
        "import sys\n"
        "import runner_daemon.cli, runner_daemon.service.daemon\n"
        "from runner_daemon.core.transport import Transport\n"
        "kw = dict(headers={}, request_timeout=1, connect_timeout=1, max_connections=1)\n"
        "Transport('http://127.0.0.1:5173/api/', **kw)\n"
        "print('httpx' in sys.modules)\n"
        "Transport('http://[::1]:5173/api/', **kw)\n"
        "print('httpx' in sys.modules)\n"
    )
    argv = [sys.executable, "-c", script]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["False", "True"]


def test_tls_context_verifies_https_and_trusts_nothing_for_plain_http() -> None:
    checked = tls_context("https://www.comet.com/opik/api/")  # httpx's default: certifi's bundle
    assert checked.verify_mode == ssl.CERT_REQUIRED and checked.cert_store_stats()["x509_ca"] > 0
    context = tls_context("http://127.0.0.1:5173/api/")
    assert isinstance(context, ssl.SSLContext)
    # No CA loaded (the bundle costs ~50 ms and 1 MB) and verification still required:
    # a TLS connection through it, were one ever attempted, would fail closed.
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] == 0


def test_readable_means_the_peer_closed_or_sent() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert not _readable(ours)
        theirs.send(b"x")
        assert _readable(ours)
        ours.recv(1)
        assert not _readable(ours)
        theirs.close()
        assert _readable(ours)
    assert _readable(ours)  # closed here: fileno -1


async def test_requests_carry_host_and_credentials_and_gzip_answers_are_decoded() -> None:
    """The client sends straight to the transport, so what AsyncClient added is checked here."""
    seen: list[bytes] = []
    payload = json.dumps({"hello": "world", "n": list(range(200))}).encode()
    body = gzip.compress(payload)

    async def answer(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive()
            seen.append(head)
            await stream.send(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, answer)
        async with DevClient(f"http://127.0.0.1:{port}/api", api_key="k-123", workspace="ws") as api:
            assert await api.dev_get("anything") == json.loads(payload)
        tasks.cancel_scope.cancel()
    request_line, *header_lines = seen[0].decode().split("\r\n")
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in header_lines if line)}
    assert request_line == "GET /api/dev/anything HTTP/1.1"
    assert headers["host"] == f"127.0.0.1:{port}"
    assert headers["authorization"] == "k-123"
    assert headers["comet-workspace"] == "ws"
    assert "gzip" in headers["accept-encoding"]
