"""The connection pool under the transport (core/wire.py) against a keep-alive server of the
test's own: reuse and its checks, slots under cancellation, the one retry, framing, timeouts."""

from __future__ import annotations

import gzip
import random
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import anyio
import anyio.abc
import httpx
import pytest
from anyio.streams.tls import TLSListener

from runner_daemon.core import transport as transport_module
from runner_daemon.core.errors import TransportError, UnreadableAnswer
from runner_daemon.core.transport import Answer, Transport
from runner_daemon.core.wire import Head, Pool, _readable
from tests.support import EVERY_LOOP, until

# Every loop the daemon may run on: uvloop too, its default where installed.
pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", EVERY_LOOP)]

LIMIT = 1 << 20


@dataclass(frozen=True)
class Seen:
    """One request as the server read it."""

    connection: int  # in the order the server accepted them
    index: int  # the request's place on its connection
    method: str
    target: str
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclass(frozen=True)
class Reply:
    """Chunks to send, a short pause between them; then the connection is closed, if asked."""

    chunks: list[bytes]
    close: bool = False


# What the server does with a request: a Reply, or CLOSE (a FIN) or RESET (an RST) instead.
CLOSE = "close"
RESET = "reset"
Action = Reply | str
Respond = Callable[[Seen], Awaitable[Action]]


def ok(body: bytes = b"{}", *extra: str) -> Reply:
    head = ["HTTP/1.1 200 OK", "Content-Type: application/json", f"Content-Length: {len(body)}", *extra]
    return Reply([("\r\n".join(head) + "\r\n\r\n").encode() + body])


@dataclass
class Backend:
    respond: Respond
    seen: list[Seen] = field(default_factory=list)
    accepted: int = 0
    answered: int = 0  # replies sent in full
    ended: set[int] = field(default_factory=set)  # connections the client closed
    streams: dict[int, anyio.abc.ByteStream] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)  # the client's port of each connection

    async def serve(self, stream: anyio.abc.ByteStream) -> None:
        number = self.accepted
        self.accepted += 1
        self.streams[number] = stream
        self.ports[number] = stream.extra(anyio.abc.SocketAttribute.remote_port)
        try:
            async with stream:
                await self._requests(number, stream)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self.ended.add(number)

    async def _requests(self, number: int, stream: anyio.abc.ByteStream) -> None:
        buffer = b""
        index = 0
        while True:
            try:
                while b"\r\n\r\n" not in buffer:
                    buffer += await stream.receive()
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                request_line, *lines = head.decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)
                }
                length = int(headers.get("content-length", "0"))
                while len(buffer) < length:
                    buffer += await stream.receive()
            except anyio.EndOfStream:
                self.ended.add(number)
                return
            body, buffer = buffer[:length], buffer[length:]
            method, target, _ = request_line.split(" ")
            seen = Seen(number, index, method, target, headers, body)
            self.seen.append(seen)
            index += 1
            action = await self.respond(seen)
            if action == RESET:
                sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            if action == CLOSE:
                return
            assert isinstance(action, Reply)
            for position, chunk in enumerate(action.chunks):
                if position:
                    await anyio.sleep(0.001)
                await stream.send(chunk)
            self.answered += 1
            if action.close:
                return


@asynccontextmanager
async def serving(respond: Respond) -> AsyncIterator[tuple[Backend, str]]:
    backend = Backend(respond)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, backend.serve)
        yield backend, f"http://127.0.0.1:{port}/api/"
        tasks.cancel_scope.cancel()


async def answer_ok(seen: Seen) -> Action:
    return ok()


def transport(url: str, *, max_connections: int = 4, request_timeout: float = 5) -> Transport:
    return Transport(
        url,
        headers={"Authorization": "k-secret"},
        secrets=["k-secret"],
        request_timeout=request_timeout,
        connect_timeout=5,
        max_connections=max_connections,
    )


async def get(client: Transport, path: str = "x", budget: float | None = None) -> Answer:
    return await client.send("GET", path, budget=budget, limit=LIMIT)


# --- reuse ---------------------------------------------------------------------------------


async def test_a_connection_is_reused_newest_first_and_only_after_a_clean_exchange() -> None:
    async with serving(answer_ok) as (backend, url):
        client = transport(url)
        await get(client)
        await get(client)
        assert [s.connection for s in backend.seen] == [0, 0]
        assert client._pool.idle_connections == 1
        # Two at once need a second connection; then both are idle, and the newest goes first.
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(get, client)
            tasks.start_soon(get, client)
        assert client._pool.idle_connections == 2
        newest = client._pool._idle[-1].socket.getsockname()[1]
        await get(client)
        assert backend.ports[backend.seen[-1].connection] == newest
        await client.aclose()
        await until(lambda: backend.ended == {0, 1})  # aclose closed both


async def test_connection_close_is_honoured() -> None:
    async def respond(seen: Seen) -> Action:
        return ok(b"{}", "Connection: close")

    async with serving(respond) as (backend, url):
        client = transport(url)
        await get(client)
        assert client._pool.idle_connections == 0
        await get(client)
        assert [s.connection for s in backend.seen] == [0, 1]
        await client.aclose()


async def test_an_answer_read_only_in_part_closes_its_connection() -> None:
    """An error answer is cut short at 64 KiB, a 2xx over its limit refused: neither
    connection may carry another request (the rest of the body is still on its way)."""
    big = b'{"errors": ["' + b"x" * (1024 * 1024) + b'"]}'

    async def respond(seen: Seen) -> Action:
        if seen.target.endswith("/error"):
            return Reply([f"HTTP/1.1 503 Busy\r\nContent-Length: {len(big)}\r\n\r\n".encode(), big])
        return ok(big if seen.target.endswith("/large") else b"{}")

    async with serving(respond) as (backend, url):
        client = transport(url)
        answer = await get(client, "error")
        assert answer.status == 503 and len(answer.body) <= 64 * 1024
        assert client._pool.idle_connections == 0
        with pytest.raises(UnreadableAnswer):
            await client.send("GET", "large", limit=1000)
        assert client._pool.idle_connections == 0
        assert (await get(client, "small")).status == 200
        assert [s.connection for s in backend.seen] == [0, 1, 2]
        await client.aclose()


@pytest.mark.parametrize("spoil", ["close", "garbage"])
async def test_an_idle_connection_the_server_closed_or_wrote_on_is_not_reused(spoil: str) -> None:
    async with serving(answer_ok) as (backend, url):
        client = transport(url)
        await get(client)
        await until(lambda: backend.answered == 1)  # the server's task is done writing
        stream = backend.streams[0]
        if spoil == "close":
            await stream.aclose()
        else:
            await stream.send(b"HTTP/1.1 200 OK\r\n")
        (connection,) = client._pool._idle
        await until(lambda: _readable(connection.socket))
        answer = await get(client)
        assert answer.status == 200
        assert [s.connection for s in backend.seen] == [0, 1]
        await client.aclose()


async def test_an_idle_connection_expires() -> None:
    async with serving(answer_ok) as (backend, url):
        host, port = url.removeprefix("http://").split("/")[0].split(":")
        pool = Pool(host, int(port), None, max_connections=2, connect_timeout=5, keepalive_expiry=0.05)
        heads: list[Head] = []

        def on_head(head: Head) -> Callable[[bytes], None]:
            heads.append(head)
            return lambda data: None

        async def one() -> None:
            await pool.request(
                b"GET", b"/api/x", [(b"Host", b"h")], None, timeout=5, deadline=10, on_head=on_head
            )

        await one()
        await anyio.sleep(0.1)
        await one()
        assert [s.connection for s in backend.seen] == [0, 1]
        await until(lambda: 0 in backend.ended)  # the expired one was closed, not left open
        assert [h.status for h in heads] == [200, 200]
        await pool.aclose()


# --- slots under cancellation ----------------------------------------------------------------


async def test_requests_cancelled_at_any_point_leak_no_slot() -> None:
    """Hundreds of requests cancelled at random points (waiting for a slot, connecting,
    writing, waiting for the head, between head and body); then every slot still works:
    the server answers only once ``max_connections`` requests are in flight at once."""
    rng = random.Random(1093)
    in_flight = 0
    all_in = anyio.Event()

    async def respond(seen: Seen) -> Action:
        nonlocal in_flight
        if seen.target.endswith("/together"):
            in_flight += 1
            if in_flight == 4:
                all_in.set()
            await all_in.wait()
            return ok()
        await anyio.sleep(rng.uniform(0, 0.01))
        body = b'{"pad": "' + b"x" * rng.randrange(0, 4000) + b'"}'
        # The head, then the body a moment later: a cancellation may land in between.
        whole = ok(body).chunks[0]
        cut = rng.randrange(1, len(whole))
        return Reply([whole[:cut], whole[cut:]])

    async def one(client: Transport, delay: float) -> None:
        # A budget of 5 ms may run out: that must free the slot too.
        with anyio.move_on_after(delay), suppress(TransportError):
            await get(client, budget=rng.choice([None, 0.005, 0.02]))

    async with serving(respond) as (_, url):
        client = transport(url, max_connections=4)
        for _ in range(10):
            async with anyio.create_task_group() as tasks:
                for _ in range(30):
                    tasks.start_soon(one, client, rng.uniform(0, 0.03))
                await anyio.sleep(rng.uniform(0, 0.02))
                if rng.random() < 0.5:
                    tasks.cancel_scope.cancel()
        pool = client._pool
        assert pool._free == 4 and not pool._waiters
        assert pool.idle_connections <= 4
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tasks:
                for _ in range(4):
                    tasks.start_soon(get, client, "together")
            for _ in range(20):
                assert (await get(client)).status == 200
        assert pool._free == 4
        await client.aclose()


async def test_waiting_for_a_slot_is_bounded_by_the_budget() -> None:
    release = anyio.Event()

    async def respond(seen: Seen) -> Action:
        if seen.target.endswith("/hold"):
            await release.wait()
        return ok()

    async with serving(respond) as (_, url), anyio.create_task_group() as tasks:
        client = transport(url, max_connections=1)
        tasks.start_soon(get, client, "hold")
        await until(lambda: client._pool._free == 0)
        with pytest.raises(TransportError, match="PoolTimeout"):
            await get(client, budget=0.1)
        release.set()
        await until(lambda: client._pool._free == 1)
        assert (await get(client)).status == 200
        await client.aclose()


# --- the one retry -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_reused_connection_closed_under_a_request_is_retried_once_on_a_new_one(method: str) -> None:
    """The server's keep-alive ran out as the request arrived: it read it and closed (FIN)."""

    async def respond(seen: Seen) -> Action:
        return CLOSE if (seen.connection, seen.index) == (0, 1) else ok()

    async with serving(respond) as (backend, url):
        client = transport(url)
        await get(client)
        answer = await client.send(method, "again", content=b'{"a": 1}', limit=LIMIT)
        assert answer.status == 200
        again = [(s.connection, s.index) for s in backend.seen if s.target.endswith("/again")]
        assert again == [(0, 1), (1, 0)]
        await client.aclose()


@pytest.mark.parametrize("how", [CLOSE, RESET])
async def test_a_new_connection_closed_under_a_request_is_not_retried(how: str) -> None:
    async def respond(seen: Seen) -> Action:
        return how

    async with serving(respond) as (backend, url):
        client = transport(url)
        with pytest.raises(TransportError) as info:
            await get(client)
        assert len(backend.seen) == 1
        assert "k-secret" not in str(info.value)
        await client.aclose()


async def test_a_reset_after_a_complete_request_is_not_retried_even_when_reused() -> None:
    """An RST may come after the server processed the request: not sent twice."""

    async def respond(seen: Seen) -> Action:
        return RESET if seen.index == 1 else ok()

    async with serving(respond) as (backend, url):
        client = transport(url)
        await get(client)
        with pytest.raises(TransportError):
            await client.send("POST", "report", content=b"{}", limit=LIMIT)
        assert [s.target for s in backend.seen].count("/api/report") == 1
        await client.aclose()


async def test_a_partial_answer_then_a_close_is_not_retried() -> None:
    async def respond(seen: Seen) -> Action:
        if seen.index == 1:
            return Reply([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}"], close=True)
        return ok()

    async with serving(respond) as (backend, url):
        client = transport(url)
        await get(client)
        with pytest.raises(TransportError, match="RemoteProtocolError"):
            await get(client)
        assert len(backend.seen) == 2
        await client.aclose()


# --- framing -------------------------------------------------------------------------------------


async def test_chunked_and_close_delimited_bodies_are_read_and_decoded() -> None:
    payload = b'{"n": [' + b",".join(b"%d" % i for i in range(3000)) + b"]}"
    packed = gzip.compress(payload)

    async def respond(seen: Seen) -> Action:
        if seen.target.endswith("/chunked"):
            chunks = [packed[i : i + 1000] for i in range(0, len(packed), 1000)]
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n"
            return Reply([head, *(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks), b"0\r\n\r\n"])
        return Reply(
            [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", payload[:100], payload[100:]], close=True
        )

    async with serving(respond) as (_, url):
        client = transport(url)
        assert (await get(client, "chunked")).body == payload
        assert client._pool.idle_connections == 1  # chunked: kept alive
        assert (await get(client, "until-close")).body == payload
        await client.aclose()


async def test_requests_are_framed_as_httpx_framed_them() -> None:
    async with serving(answer_ok) as (backend, url):
        client = transport(url)
        await client.send("POST", "empty", limit=LIMIT)
        await client.send("DELETE", "gone", limit=LIMIT)
        await client.send("GET", "odd path/ü/../x", params={"wait": "true", "q": "a b&c/é"}, limit=LIMIT)
        answer = await client.send("GET", "a/b", params={"timeout": "3"}, limit=LIMIT)
        await client.aclose()
    empty, gone, odd, plain = backend.seen
    assert empty.headers["content-length"] == "0" and empty.body == b""
    assert "content-length" not in gone.headers
    expected = httpx.URL(url + "odd path/ü/../x", params={"wait": "true", "q": "a b&c/é"})
    assert odd.target == expected.raw_path.decode()
    assert plain.target == "/api/a/b?timeout=3"
    assert answer.url == url + "a/b" and answer.path == "/api/a/b"
    assert empty.headers["host"] == url.split("/")[2]
    assert empty.headers["accept-encoding"] == "gzip, deflate"


async def test_an_oversized_answer_head_is_refused() -> None:
    async def respond(seen: Seen) -> Action:
        return Reply([b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * (200 * 1024) + b"\r\nContent-Length: 0\r\n\r\n"])

    async with serving(respond) as (_, url):
        client = transport(url)
        with pytest.raises(TransportError, match="RemoteProtocolError"):
            await get(client)
        await client.aclose()


async def test_repeated_and_differently_cased_kept_headers_read_as_httpx_read_them() -> None:
    async def respond(seen: Seen) -> Action:
        return ok(b"{}", "retry-after: 3", "Location: /a", "LOCATION: /b")

    async with serving(respond) as (_, url):
        client = Transport(
            url,
            headers={},
            keep_headers=("Retry-After", "Location", "RateLimit-Reset"),
            request_timeout=5,
            connect_timeout=5,
            max_connections=1,
        )
        answer = await get(client)
        await client.aclose()
    assert answer.headers == {"Retry-After": "3", "Location": "/a, /b"}


# --- timeouts ------------------------------------------------------------------------------------


async def test_a_silent_server_is_a_read_timeout_within_the_budget() -> None:
    async def respond(seen: Seen) -> Action:
        await anyio.sleep_forever()
        raise AssertionError

    async with serving(respond) as (_, url):
        client = transport(url, request_timeout=0.2)
        with pytest.raises(TransportError, match="ReadTimeout") as info:
            await get(client)
        assert "k-secret" not in str(info.value)
        assert client._pool._free == 4 and client._pool.idle_connections == 0
        await client.aclose()


# --- TLS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for "localhost" (and no IP address), made by openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl to make a certificate with")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=DNS:localhost"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_https_goes_over_tls_with_the_host_name_checked_and_keeps_alive(
    certificate: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    names: list[str | None] = []
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    server_context.sni_callback = lambda sock, name, context: names.append(name)
    client_context = ssl.create_default_context(cafile=cert)
    monkeypatch.setattr(transport_module, "tls_context", lambda url: client_context)
    backend = Backend(answer_ok)
    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = tcp.extra(anyio.abc.SocketAttribute.local_port)
    listener = TLSListener(tcp, server_context, standard_compatible=False)
    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, backend.serve)
        client = transport(f"https://localhost:{port}/api/")
        assert (await get(client)).status == 200
        assert (await get(client)).url == f"https://localhost:{port}/api/x"
        assert [s.connection for s in backend.seen] == [0, 0]
        assert names == ["localhost"]
        assert backend.seen[0].headers["host"] == f"localhost:{port}"
        await client.aclose()
        # The certificate names localhost, not the address: refused before any request.
        client = transport(f"https://127.0.0.1:{port}/api/")
        with pytest.raises(TransportError, match=r"ConnectError.*CERTIFICATE_VERIFY_FAILED"):
            await get(client)
        await client.aclose()
        assert len(backend.seen) == 2
        tasks.cancel_scope.cancel()
