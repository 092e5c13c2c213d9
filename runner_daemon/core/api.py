"""The async client of Opik's local-runner API: the only module that imports httpx.

Every status code is turned into :mod:`runner_daemon.core.errors` here, in
:func:`raise_for_status`, and every httpx exception into :class:`TransportError`, so callers
never see an httpx type. Each request carries a wall-clock deadline on top of httpx's
per-phase timeouts, because a read timeout alone does not bound a server that trickles bytes.
Each answer's body is bounded too, raw and decoded (:class:`_BoundedBody`), so no answer can
grow the daemon's memory past a few payloads; a larger 2xx is a retryable ProtocolError.
"""

from __future__ import annotations

import base64
import email.utils
import json
import math
import select
import socket
import ssl
import time
import zlib
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import httpcore
import httpx
import pydantic_core
from pydantic import BaseModel, ValidationError

from runner_daemon import __version__
from runner_daemon.core.errors import (
    AlreadyReported,
    Conflict,
    ProtocolError,
    RateLimited,
    RequestRejected,
    RunnerEvicted,
    RunnerGone,
    ServerError,
    TransportError,
    Unauthorized,
)
from runner_daemon.core.logs import Scrubber
from runner_daemon.core.models import (
    CommandRecord,
    DevRunnerCreated,
    HeartbeatRequest,
    HeartbeatResponse,
    PairingActivation,
    PairingSession,
    PairingSessionRequest,
    PollRequest,
    PollResponse,
    Runner,
    SubmitRequest,
    SubmitResponse,
)
from runner_daemon.core.settings import Settings, header_value

RUNNERS_PATH = "v1/private/local-runners"
PAIRING_PATH = "v1/private/pairing/sessions"
DEFAULT_RETRY_AFTER_SECONDS = 1.0
MAX_RETRY_AFTER_SECONDS = 300.0
# Slack on top of httpx's own timeouts before the wall-clock guard fires.
DEADLINE_SLACK_SECONDS = 5.0
# Opik's cap on a command's args (and on a result, an error), as serialized JSON characters.
PAYLOAD_CAP_CHARS = 1_048_576
# The most a 2xx answer may hold, decoded: twice the payload cap (a heartbeat, a runner)...
MAX_ANSWER_BYTES = 2 * PAYLOAD_CAP_CHARS
# ...and for each command a poll asks for, one payload at 3 bytes per character (UTF-8 for
# what Opik counts as one character) plus the item's other fields.
POLL_BYTES_PER_COMMAND = 3 * PAYLOAD_CAP_CHARS + 64 * 1024
# An error answer is read only for a short message: the rest is dropped unread.
MAX_ERROR_BODY_BYTES = 64 * 1024
INFLATE_STEP_BYTES = 256 * 1024
_JSON_HEADERS = {"Content-Type": "application/json"}
M = TypeVar("M", bound=BaseModel)


def raise_for_status(
    response: httpx.Response,
    *,
    conflict: type[Conflict] = Conflict,
) -> None:
    """Map a non-2xx answer to the error tree; the single place that knows status codes."""
    status = response.status_code
    if status < 300:
        return
    url = response.request.url
    message = f"HTTP {status} from {response.request.method} {url.scheme}://{url.netloc.decode()}{url.path}: "
    message += _error_text(response)
    if status == 404:
        raise RunnerGone(message, status=status)
    if status == 410:
        raise RunnerEvicted(message, status=status)
    if status == 409:
        raise conflict(message, status=status)
    if status == 429:
        raise RateLimited(message, status=status, retry_after=retry_after_seconds(response))
    if status in (401, 403):
        raise Unauthorized(message, status=status)
    if status >= 500 or status == 408:
        raise ServerError(message, status=status)
    raise RequestRejected(message, status=status)


def retry_after_seconds(response: httpx.Response, now: float | None = None) -> float:
    """Seconds to wait from ``Retry-After`` (delta or HTTP date) or ``RateLimit-Reset``."""
    for header in ("Retry-After", "RateLimit-Reset"):
        raw = response.headers.get(header)
        if raw is None:
            continue
        raw = raw.strip()
        try:
            seconds = float(raw)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                continue
            seconds = when.timestamp() - (time.time() if now is None else now)
        if math.isfinite(seconds):
            return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)
    return DEFAULT_RETRY_AFTER_SECONDS


def _error_text(response: httpx.Response) -> str:
    """A short description from Opik's ``{"errors": [...]}`` or ``{"message": ...}`` bodies."""
    try:
        # pydantic's parser, not json.loads: CPython 3.11's C decoder, on "[[[[..." nested past
        # the stack, raises a RecursionError that leaves the interpreter's depth count wrong.
        body = pydantic_core.from_json(response.content)
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list) and errors:
            return "; ".join(str(item) for item in errors)[:200]
        if body.get("message"):
            return str(body["message"])[:200]
    return str(body)[:200]


def _parse(model: type[M], response: httpx.Response) -> M:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise ProtocolError(
            f"unexpected answer from {response.request.url.path}: "
            f"{exc.error_count()} problem(s), first: {exc.errors()[0]['msg']}",
            status=response.status_code,
        ) from None


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
            raise ProtocolError(f"unsupported Content-Encoding {header[:40]!r}")
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


class RunnerApi:
    """One shared connection pool to Opik for the daemon's whole life."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        workspace: str | None = None,
        request_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        poll_timeout: float = 45.0,
        max_connections: int = 16,
    ) -> None:
        headers = {
            "User-Agent": f"runner-daemon/{__version__}",
            "Accept": "application/json",
            "Accept-Encoding": "gzip, deflate",
        }
        if api_key:
            headers["Authorization"] = header_value(api_key, spaces=False)
        if workspace:
            headers["Comet-Workspace"] = header_value(workspace, spaces=True)
        self._scrub = Scrubber([api_key] if api_key else [])
        self._request_timeout = request_timeout
        self._poll_timeout = poll_timeout
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
        self._transport = _Transport(tls_context(base_url), limits)
        self._base = str(httpx.URL(base_url))
        if not self._base.endswith("/"):
            self._base += "/"
        self._headers = httpx.Headers(headers)
        self._json_headers = httpx.Headers({**headers, **_JSON_HEADERS})
        self._timeout_extension = {"timeout": self._timeout.as_dict()}

    @classmethod
    def from_settings(cls, settings: Settings) -> RunnerApi:
        return cls(
            settings.url,
            api_key=settings.api_key.get_secret_value() if settings.api_key else None,
            workspace=settings.workspace,
            request_timeout=settings.request_timeout_seconds,
            connect_timeout=settings.connect_timeout_seconds,
            poll_timeout=settings.poll_timeout_seconds,
            # Every execution slot may report at once, plus the poll and the heartbeat.
            max_connections=settings.max_concurrency + 2,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await self._transport.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        params: Mapping[str, str] | None = None,
        budget: float | None = None,
        conflict: type[Conflict] = Conflict,
        limit: int = MAX_ANSWER_BYTES,
    ) -> httpx.Response:
        """``budget``: how long the answer may take (a held request), else ``request_timeout``.

        ``limit``: the most a 2xx body may hold, raw or decoded; a larger one is a
        :class:`ProtocolError` (retryable), read no further than the limit.
        """
        if budget is None:
            budget, extensions = self._request_timeout, self._timeout_extension
        else:
            extensions = {"timeout": httpx.Timeout(budget, connect=self._timeout.connect).as_dict()}
        deadline = budget + DEADLINE_SLACK_SECONDS
        request = httpx.Request(
            method,
            self._base + path,
            params=params,
            headers=self._json_headers if content is not None else self._headers,
            content=content,
            extensions=extensions,
        )
        try:
            with anyio.fail_after(deadline):
                response = await self._transport.handle_async_request(request)
                response.request = request
                try:
                    # Kept as httpx's own read keeps a body (``content``, ``json()`` read it
                    # from there): a second Response would cost 20-50 µs a request.
                    response._content = await self._read(response, limit, f"{method} {path}")
                finally:
                    await response.aclose()
        except TimeoutError:
            raise TransportError(
                f"{method} {self._base}{path}: no complete answer within {deadline:.0f}s"
            ) from None
        except httpx.HTTPError as exc:
            text = self._scrub(f"{type(exc).__name__}: {exc}")
            raise TransportError(f"{method} {self._base}{path}: {text}") from None
        raise_for_status(response, conflict=conflict)
        return response

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
                raise ProtocolError(
                    f"{what}: answer larger than {limit} bytes; refused", status=response.status_code
                ) from None
        except zlib.error:
            if success:
                raise ProtocolError(
                    f"{what}: answer body does not decode", status=response.status_code
                ) from None
        if success:
            return body.content()
        return self._scrub(body.content().decode("utf-8", "replace")).encode()

    # --- the runner's side -------------------------------------------------------------

    async def heartbeat(self, runner_id: str, capabilities: list[str]) -> HeartbeatResponse:
        body = HeartbeatRequest(capabilities=capabilities).model_dump_json().encode()
        response = await self._request("POST", f"{RUNNERS_PATH}/{runner_id}/heartbeats", content=body)
        return _parse(HeartbeatResponse, response)

    async def poll(self, runner_id: str, max_commands: int, wait: float | None = None) -> list[Any]:
        """Long-poll for commands (at most ``wait`` seconds when given); raw items."""
        body = PollRequest(max_commands=max_commands).model_dump_json().encode()
        response = await self._request(
            "POST",
            f"{RUNNERS_PATH}/{runner_id}/bridge/commands/next",
            content=body,
            budget=self._poll_timeout if wait is None else wait,
            limit=max(1, max_commands) * POLL_BYTES_PER_COMMAND,
        )
        return _parse(PollResponse, response).commands

    async def report(self, runner_id: str, command_id: str, body: bytes) -> None:
        """Post an encoded :class:`~runner_daemon.core.models.ResultReport`; a 409 here means
        the command is already terminal: :class:`AlreadyReported`."""
        try:
            await self._request(
                "POST", f"{RUNNERS_PATH}/{runner_id}/bridge/commands/{command_id}/results", content=body
            )
        except Conflict as exc:
            raise AlreadyReported(str(exc), status=exc.status) from None

    async def disconnect(self, runner_id: str) -> None:
        await self._request("DELETE", f"{RUNNERS_PATH}/{runner_id}")

    async def get_runner(self, runner_id: str) -> Runner:
        return _parse(Runner, await self._request("GET", f"{RUNNERS_PATH}/{runner_id}"))

    async def create_pairing_session(self, request: PairingSessionRequest) -> PairingSession:
        response = await self._request("POST", PAIRING_PATH, content=request.model_dump_json().encode())
        return _parse(PairingSession, response)

    # --- the UI's side, used by the demo, the tests and the benchmark ---------------------

    async def activate_pairing_session(self, session_id: str, activation: PairingActivation) -> None:
        """What the user's browser does when the pairing link is opened."""
        await self._request(
            "POST", f"{PAIRING_PATH}/{session_id}/activate", content=activation.model_dump_json().encode()
        )

    async def submit_command(
        self,
        runner_id: str,
        command_type: str,
        args: Mapping[str, Any],
        timeout_seconds: int | None = None,
    ) -> str:
        body = SubmitRequest(type=command_type, args=dict(args), timeout_seconds=timeout_seconds)
        response = await self._request(
            "POST",
            f"{RUNNERS_PATH}/{runner_id}/bridge/commands",
            content=body.model_dump_json(exclude_none=True).encode(),
        )
        return _parse(SubmitResponse, response).command_id

    async def get_command(
        self, runner_id: str, command_id: str, *, wait: float | None = None
    ) -> CommandRecord:
        """Read a command; with ``wait``, the server holds until it is terminal or time passes."""
        params = {"wait": "true", "timeout": str(math.ceil(wait))} if wait else None
        response = await self._request(
            "GET",
            f"{RUNNERS_PATH}/{runner_id}/bridge/commands/{command_id}",
            params=params,
            budget=(wait or 0) + self._request_timeout,
            limit=3 * POLL_BYTES_PER_COMMAND,  # args, result and error
        )
        return _parse(CommandRecord, response)

    # --- the dev server's own control routes (not Opik's API) ----------------------------

    async def dev_create_runner(self, name: str = "runner-daemon", bridge_key: bytes | None = None) -> str:
        """A connected runner; with ``bridge_key``, the dev server signs its commands."""
        payload: dict[str, Any] = {"name": name}
        if bridge_key is not None:
            payload["bridge_key"] = base64.b64encode(bridge_key).decode()
        body = json.dumps(payload).encode()
        return _parse(DevRunnerCreated, await self._request("POST", "dev/runners", content=body)).runner_id

    async def dev_post(self, path: str, payload: Mapping[str, Any]) -> Any:
        """POST a control request to the dev server (faults, eviction) and return its JSON."""
        response = await self._request("POST", f"dev/{path}", content=json.dumps(payload).encode())
        return response.json() if response.content else None

    async def dev_get(self, path: str) -> Any:
        response = await self._request("GET", f"dev/{path}")
        return response.json()


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
