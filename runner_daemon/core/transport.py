"""The wire under the runner API: the only module that imports httpx.

It sends a request and hands back an :class:`Answer`, our own small immutable record read
whole; what a status code means is the API's business (:mod:`runner_daemon.core.api`).
Requests go through a connection pool of our own (:mod:`runner_daemon.core.wire`: HTTP/1.1
framed by h11), which costs a fraction of httpx's CPU per request; httpx is left with the
URL rules (parsing an unusual base URL, quoting an unusual path and its query), the TLS
context and :func:`probe`, and is imported only when one of them is needed. Network
failures and timeouts become :class:`TransportError`. Each request carries a wall-clock
deadline on top of its per-phase timeouts, because a read timeout alone does not bound a
server that trickles bytes. Each answer's body is bounded too, raw and decoded
(:class:`_BoundedBody`), so no answer can grow the daemon's memory past a few payloads; a
larger 2xx is a retryable :class:`UnreadableAnswer`. A request body of
:data:`GZIP_MIN_BYTES` or more is sent gzipped, as Opik's own client sends it.
"""

from __future__ import annotations

import re
import ssl
import urllib.parse
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from runner_daemon.core.errors import TransportError, UnreadableAnswer
from runner_daemon.core.logs import Scrubber
from runner_daemon.core.wire import Head, Pool, WireError

# Slack on top of the per-phase timeouts before the wall-clock guard fires.
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
DEFAULT_PORTS = {"http": 80, "https": 443}
# httpx sends "Content-Length: 0" for these when they have no body; so do we.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Paths of these characters need no quoting and have no dot segments: sent as they are.
_PLAIN_PATH = re.compile(r"[A-Za-z0-9_~/-]*")
# Host names of these characters read the same by the standard library as by httpx.
_PLAIN_HOST = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?")


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
        import httpx  # see _Base

        return httpx.create_ssl_context()
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


@dataclass(frozen=True, slots=True)
class _Base:
    """The base URL's parts, as httpx.URL gives them.

    httpx is imported only when a URL needs its rules: importing it costs about 30 ms, an
    eighth of the daemon's start-up. A base URL of plain characters (an ASCII host name or
    IPv4 address, an optional port, a path of :data:`_PLAIN_PATH`, nothing else) is read by
    the standard library with the same result; any other goes through httpx.URL as before.
    """

    url: str  # the base URL, ending with "/"
    scheme: str
    host: str
    port: int
    netloc: str  # host[:port], the default port left out: the Host header
    target: bytes  # the path as sent
    path: str  # the path as answers name it
    plain: bool  # no query or fragment: a plain path is appended as it is

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.netloc}"

    @classmethod
    def parse(cls, base_url: str) -> _Base:
        return cls.parse_plain(base_url) or cls.parse_with_httpx(base_url)

    @classmethod
    def parse_with_httpx(cls, base_url: str) -> _Base:
        import httpx

        url = httpx.URL(base_url)
        if url.scheme not in DEFAULT_PORTS:
            raise ValueError(f"not an http:// or https:// URL: {url.scheme}://...")
        text = str(url)
        if not text.endswith("/"):
            text += "/"
        base = httpx.URL(text)
        return cls(
            url=text,
            scheme=base.scheme,
            host=url.raw_host.decode("ascii"),
            port=url.port or DEFAULT_PORTS[url.scheme],
            netloc=base.netloc.decode("ascii"),
            target=base.raw_path,
            path=base.path,
            plain=not base.query and not base.fragment,
        )

    @classmethod
    def parse_plain(cls, base_url: str) -> _Base | None:
        """Read with the standard library; None unless every part is plain."""
        if "?" in base_url or "#" in base_url or "@" in base_url:
            return None
        try:
            parts = urllib.parse.urlsplit(base_url)
            port = parts.port
        except ValueError:
            return None
        host = parts.hostname or ""
        if (
            parts.scheme not in DEFAULT_PORTS
            or not _PLAIN_HOST.fullmatch(host)
            or not _PLAIN_PATH.fullmatch(parts.path)
        ):
            return None
        default = DEFAULT_PORTS[parts.scheme]
        netloc = host if port is None or port == default else f"{host}:{port}"
        path = parts.path if parts.path.endswith("/") else parts.path + "/"
        return cls(
            url=f"{parts.scheme}://{netloc}{path}",
            scheme=parts.scheme,
            host=host,
            port=default if port is None else port,
            netloc=netloc,
            target=path.encode("ascii"),
            path=path,
            plain=True,
        )


class _Reading:
    """Where an answer's body goes once its status is known: a 2xx's is bounded by the
    caller's limit, an error answer's by :data:`MAX_ERROR_BODY_BYTES`."""

    __slots__ = ("body", "head", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.head: Head | None = None
        self.body: _BoundedBody | None = None

    def start(self, head: Head) -> Callable[[bytes], None]:
        self.head = head
        limit = self.limit if 200 <= head.status < 300 else MAX_ERROR_BODY_BYTES
        self.body = _BoundedBody(head.get(b"content-encoding"), limit)
        return self.body.feed


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
        base = _Base.parse(base_url)
        self._scrub = Scrubber(secrets)
        self._keep_headers = tuple((name, name.lower().encode("ascii")) for name in keep_headers)
        self._request_timeout = request_timeout
        tls = None
        if base.scheme == "https":
            tls = tls_context(base_url)
            tls.set_alpn_protocols(["http/1.1"])
        # Requests go to a pool of our own (see wire.py for why), not through httpx: the
        # parts of each request are made once here.
        self._pool = Pool(
            base.host, base.port, tls, max_connections=max_connections, connect_timeout=connect_timeout
        )
        self._base = base.url
        # A path of these characters is taken as it is; any other goes through httpx.URL,
        # which quotes it and resolves dot segments as before.
        self._plain = base.plain
        self._base_target = base.target
        self._base_path = base.path
        self._origin = base.origin
        sent = [
            (b"Host", base.netloc.encode("ascii")),
            *((name.encode("ascii"), value.encode("ascii")) for name, value in headers.items()),
            (b"Accept-Encoding", b"gzip, deflate"),  # what _BoundedBody decodes
        ]
        self._headers = sent
        self._empty_body_headers = [*sent, (b"Content-Length", b"0")]  # as httpx sends
        self._json_headers = [*sent, (b"Content-Type", b"application/json")]
        self._gzip_headers = [*self._json_headers, (b"Content-Encoding", b"gzip")]

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
            budget = self._request_timeout
        deadline = budget + DEADLINE_SLACK_SECONDS
        if content is None:
            headers = self._empty_body_headers if method in BODY_METHODS else self._headers
        else:
            fixed = self._json_headers
            if len(content) >= GZIP_MIN_BYTES:
                content, fixed = await _gzipped(content), self._gzip_headers
            headers = [*fixed, (b"Content-Length", b"%d" % len(content))]
        if params is None and self._plain and _PLAIN_PATH.fullmatch(path):
            target, url_path = self._base_target + path.encode("ascii"), self._base_path + path
        else:
            import httpx  # imported only here and where needed: see _Base

            url = httpx.URL(self._base + path, params=params)
            target, url_path = url.raw_path, url.path
        reading = _Reading(limit)
        try:
            await self._pool.request(
                method.encode("ascii"),
                target,
                headers,
                content,
                timeout=budget,
                deadline=deadline,
                on_head=reading.start,
            )
        except TimeoutError:
            raise TransportError(
                f"{method} {self._base}{path}: no complete answer within {deadline:.0f}s"
            ) from None
        except WireError as exc:
            raise TransportError(f"{method} {self._base}{path}: {self._scrub(str(exc))}") from None
        except (_AnswerTooLarge, zlib.error) as exc:
            # Raised by the body's sink, so the head is known. An error answer is only cut
            # short: its first words are all that is shown.
            status = reading.head.status if reading.head is not None else 0
            if 200 <= status < 300:
                if isinstance(exc, zlib.error):
                    raise UnreadableAnswer(
                        f"{method} {path}: answer body does not decode", status=status
                    ) from None
                raise UnreadableAnswer(
                    f"{method} {path}: answer larger than {limit} bytes; refused", status=status
                ) from None
        head, body = reading.head, reading.body
        assert head is not None and body is not None  # both set before any byte of a body
        kept = {name: value for name, key in self._keep_headers if (value := head.get(key)) is not None}
        content = body.content()
        if not 200 <= head.status < 300:
            # Cleared of our key: a proxy may echo request headers.
            content = self._scrub(content.decode("utf-8", "replace")).encode()
        return Answer(
            method=method,
            url=self._origin + url_path,
            path=url_path,
            status=head.status,
            reason=head.reason,
            headers=kept,
            body=content,
        )


async def probe(url: str, timeout: float = 3.0) -> int | None:
    """The HTTP status of a GET (health checks); None when nothing answered."""
    import httpx  # see _Base

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
