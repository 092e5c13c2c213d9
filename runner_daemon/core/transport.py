"""The wire under the runner API: the only module that imports httpx (and httpcore).

It sends a request and hands back an :class:`Answer`, our own small immutable record read
whole, so no httpx type leaves this module; what a status code means is the API's business
(:mod:`runner_daemon.core.api`). Network failures and timeouts become :class:`TransportError`.
Each request carries a wall-clock deadline on top of httpx's per-phase timeouts, because a
read timeout alone does not bound a server that trickles bytes. Each answer's body is bounded
too, raw and decoded (:class:`_BoundedBody`), so no answer can grow the daemon's memory past
a few payloads; a larger 2xx is a retryable :class:`UnreadableAnswer`. A request body of
:data:`GZIP_MIN_BYTES` or more is sent gzipped, as Opik's own client sends it.
"""

from __future__ import annotations

import select
import socket
import ssl
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import httpcore
import httpx

from runner_daemon.core.errors import TransportError, UnreadableAnswer
from runner_daemon.core.logs import Scrubber

# Slack on top of httpx's own timeouts before the wall-clock guard fires.
DEADLINE_SLACK_SECONDS = 5.0
# An error answer is read only for a short message: the rest is dropped unread.
MAX_ERROR_BODY_BYTES = 64 * 1024
INFLATE_STEP_BYTES = 256 * 1024
# Opik's own client gzips every JSON request body from 256 bytes, at level 6, and Opik's
# server inflates it: a 512,000-character ReadFile result of source code goes out as ~150 KB.
GZIP_MIN_BYTES = 256
GZIP_LEVEL = 6
# zlib at level 6 takes about 0.2 ms per 4 KiB here, 1.7 ms per 32 KiB, 35-40 ms per 512 KiB,
# and a hop to a worker thread about 0.2 ms: from 32 KiB on, the event loop is not held for it.
GZIP_IN_THREAD_BYTES = 32 * 1024


@dataclass(frozen=True, slots=True)
class Answer:
    """One answer, its body read whole (and bounded): all the API layer gets to see of it."""

    method: str
    url: str  # scheme://host:port/path of the request, without its query: what messages name
    path: str  # the URL's path alone
    status: int
    reason: str
    headers: Mapping[str, str]  # only those the transport was asked to keep, by their given names
    body: bytes  # an error answer's: cut short, and cleared of the API key


class _AnswerTooLarge(Exception):
    """More than the limit arrived, raw or decoded."""


class _BoundedBody:
    """Collects an answer's body, decoding gzip or deflate itself, up to ``limit`` bytes.

    httpx's own decoders inflate each chunk whole: a 1 MB gzip chunk of zeros becomes 1 GB
    in one call. Here each step inflates at most what still fits, so neither the raw nor the
    decoded body can hold more than ``limit`` bytes before :class:`_AnswerTooLarge`.
    """

    def __init__(self, content_encoding: str | None, limit: int) -> None:
        self._limit = limit
        self._raw = 0
        self._size = 0
        self._chunks: list[bytes] = []
        self._inflate: Any = None
        # For "deflate": the first bytes, until they tell zlib-wrapped from raw deflate.
        self._sniff: bytes | None = None
        header = content_encoding or ""
        codings = [
            c for c in (part.strip().lower() for part in header.split(",")) if c not in ("", "identity")
        ]
        if len(codings) > 1:
            raise UnreadableAnswer(f"unsupported Content-Encoding {header[:40]!r}")
        coding = codings[0] if codings else ""
        if coding in ("gzip", "x-gzip"):
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self._sniff = b""
        # Any other single coding is passed through undecoded, as httpx does.

    def feed(self, data: bytes) -> None:
        self._raw += len(data)
        if self._raw > self._limit:
            raise _AnswerTooLarge
        if self._sniff is not None:
            # "deflate" means zlib-wrapped, but some servers send it raw (httpx takes both).
            data, self._sniff = self._sniff + data, None
            if len(data) < 2:
                self._sniff = data
                return
            wrapped = data[0] & 0x0F == 8 and int.from_bytes(data[:2], "big") % 31 == 0
            self._inflate = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        if self._inflate is None:
            self._keep(data)
            return
        # Small steps: one call asked for all that fits may briefly hold twice that.
        while not self._inflate.eof:  # bytes after the end of the stream are ignored
            piece: bytes = self._inflate.decompress(data, INFLATE_STEP_BYTES)
            self._keep(piece)
            data = self._inflate.unconsumed_tail
            if not data and len(piece) < INFLATE_STEP_BYTES:
                break  # all input used, and no output held back for want of room

    def _keep(self, piece: bytes) -> None:
        self._size += len(piece)
        if self._size > self._limit:
            raise _AnswerTooLarge
        self._chunks.append(piece)

    def content(self) -> bytes:
        return b"".join(self._chunks)


def _compress(content: bytes) -> bytes:
    return zlib.compress(content, GZIP_LEVEL, wbits=16 + zlib.MAX_WBITS)


async def _gzipped(content: bytes) -> bytes:
    """``content`` as one gzip member, compressed off the event loop when it is large."""
    if len(content) < GZIP_IN_THREAD_BYTES:
        return _compress(content)
    # Abandoned on cancel: the thread only computes bytes nobody will read.
    return await anyio.to_thread.run_sync(_compress, content, abandon_on_cancel=True)


def tls_context(base_url: str) -> ssl.SSLContext:
    """Certificates checked against certifi's bundle (httpx's default) for an https:// URL.

    For a plain http:// URL no TLS connection is ever made (every request is a relative path
    and redirects are not followed), so the bundle is not loaded: that costs about 50 ms of
    start-up and 1 MB per client. The context given instead trusts no certificate at all,
    so a TLS connection, were one ever attempted, would fail instead of going unchecked.
    """
    if base_url.strip().lower().startswith("https://"):
        return httpx.create_ssl_context()
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def _readable(sock: socket.socket) -> bool:
    """Whether an idle connection's socket has something to read: the server closed it."""
    if sock.fileno() < 0:
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class _Stream(httpcore.AsyncNetworkStream):
    """A pooled connection whose raw socket is looked up once.

    On every request httpcore asks each idle connection in the pool whether its socket is
    readable; anyio answers by rebuilding all the socket's attributes (a ``getpeername``
    call included) each time. Profiles of the daemon under load put that at about 15 % of
    the event loop's time with a pool of 12.
    """

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._socket: socket.socket | None = inner.get_extra_info("socket")

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and self._socket is not None:
            return _readable(self._socket)
        return self._inner.get_extra_info(info)


class _Backend(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._inner.connect_tcp(host, port, timeout, local_address, socket_options))

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._inner.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _Transport(httpx.AsyncHTTPTransport):
    """httpx's transport over a pool whose connections use :class:`_Stream`.

    ``AsyncHTTPTransport.__init__`` only builds ``_pool`` (from arguments it cannot pass a
    network backend with), so it is not called; ``tests/test_client.py`` checks the pool in
    use is this one, should a later httpx change that.
    """

    def __init__(self, ssl_context: ssl.SSLContext, limits: httpx.Limits) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_Backend(),
        )


class Transport:
    """One bounded connection pool to a server, for a client's whole life.

    ``headers`` go with every request (a JSON ``Content-Type`` too when there is a body);
    ``secrets`` are scrubbed from what an error shows; ``keep_headers`` names the answer
    headers :attr:`Answer.headers` carries.
    """

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str],
        secrets: Iterable[str] = (),
        keep_headers: Iterable[str] = (),
        request_timeout: float,
        connect_timeout: float,
        max_connections: int,
    ) -> None:
        sent = {**headers, "Accept-Encoding": "gzip, deflate"}  # what _BoundedBody decodes
        self._scrub = Scrubber(secrets)
        self._keep_headers = tuple(keep_headers)
        self._request_timeout = request_timeout
        self._timeout = httpx.Timeout(request_timeout, connect=connect_timeout)
        # The pool is bounded so a leak or a storm shows up as a pool timeout, not a hang.
        limits = httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30.0,
        )
        # Requests go to the transport, not through httpx.AsyncClient: its layer (URL and
        # header merging, a cookie jar, auth and redirect flows, none of which this API uses)
        # cost 13-17 % of each request's CPU (1.21 → 1.05 ms measured). Requests are built
        # from parts made once here.
        self._pool = _Transport(tls_context(base_url), limits)
        self._base = str(httpx.URL(base_url))
        if not self._base.endswith("/"):
            self._base += "/"
        self._headers = httpx.Headers(sent)
        self._json_headers = httpx.Headers({**sent, "Content-Type": "application/json"})
        self._gzip_headers = httpx.Headers(
            {**sent, "Content-Type": "application/json", "Content-Encoding": "gzip"}
        )
        self._timeout_extension = {"timeout": self._timeout.as_dict()}

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await self._pool.aclose()

    async def send(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        params: Mapping[str, str] | None = None,
        budget: float | None = None,
        limit: int,
    ) -> Answer:
        """``path`` relative to the base URL; ``content`` a JSON body (gzipped here for the wire
        when it has :data:`GZIP_MIN_BYTES` or more: callers keep and journal it plain).

        ``budget``: how long the answer may take (a held request), else ``request_timeout``.
        ``limit``: the most a 2xx body may hold, raw or decoded; a larger one is an
        :class:`UnreadableAnswer` (retryable), read no further than the limit.
        """
        if budget is None:
            budget, extensions = self._request_timeout, self._timeout_extension
        else:
            extensions = {"timeout": httpx.Timeout(budget, connect=self._timeout.connect).as_dict()}
        deadline = budget + DEADLINE_SLACK_SECONDS
        headers = self._headers
        if content is not None:
            headers = self._json_headers
            if len(content) >= GZIP_MIN_BYTES:
                content, headers = await _gzipped(content), self._gzip_headers
        request = httpx.Request(
            method,
            self._base + path,
            params=params,
            headers=headers,
            content=content,
            extensions=extensions,
        )
        try:
            with anyio.fail_after(deadline):
                response = await self._pool.handle_async_request(request)
                try:
                    body = await self._read(response, limit, f"{method} {path}")
                finally:
                    await response.aclose()
        except TimeoutError:
            raise TransportError(
                f"{method} {self._base}{path}: no complete answer within {deadline:.0f}s"
            ) from None
        except httpx.HTTPError as exc:
            text = self._scrub(f"{type(exc).__name__}: {exc}")
            raise TransportError(f"{method} {self._base}{path}: {text}") from None
        url = request.url
        found = response.headers
        kept = {name: value for name in self._keep_headers if (value := found.get(name)) is not None}
        return Answer(
            method=method,
            url=f"{url.scheme}://{url.netloc.decode()}{url.path}",
            path=url.path,
            status=response.status_code,
            reason=response.reason_phrase,
            headers=kept,
            body=body,
        )

    async def _read(self, response: httpx.Response, limit: int, what: str) -> bytes:
        """The body, bounded. An error answer's is cut short (and cleared of our key: a proxy
        may echo request headers), since only its first words are shown."""
        success = 200 <= response.status_code < 300
        body = _BoundedBody(
            response.headers.get("Content-Encoding"), limit if success else MAX_ERROR_BODY_BYTES
        )
        try:
            async for chunk in response.aiter_raw():
                body.feed(chunk)
        except _AnswerTooLarge:
            if success:
                raise UnreadableAnswer(
                    f"{what}: answer larger than {limit} bytes; refused", status=response.status_code
                ) from None
        except zlib.error:
            if success:
                raise UnreadableAnswer(
                    f"{what}: answer body does not decode", status=response.status_code
                ) from None
        if success:
            return body.content()
        return self._scrub(body.content().decode("utf-8", "replace")).encode()


async def probe(url: str, timeout: float = 3.0) -> int | None:
    """The HTTP status of a GET (health checks); None when nothing answered."""
    try:
        with anyio.fail_after(timeout + 1):
            # Only the status matters: the body is never read, however large.
            async with (
                httpx.AsyncClient(timeout=timeout, trust_env=False) as client,
                client.stream("GET", url) as response,
            ):
                return response.status_code
    except (httpx.HTTPError, TimeoutError):
        return None
