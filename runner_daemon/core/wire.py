"""HTTP/1.1 to one origin: anyio streams, h11's framing, and a keep-alive pool of our own.

Why not httpcore's pool: profiles of the daemon at a steady 100 commands/s put about 60 % of
the event loop's time in the HTTP stack, about 1.05 ms of CPU per request, most of it around
the bytes rather than in them: the pool's assignment pass over every connection on every
request, anyio locks and shielded cancel scopes around each connection's state, trace
contexts, and httpx's Request/Response models. Here a request is one cancel scope (its
timeouts and deadline), a counter of free slots, a LIFO list of idle connections and h11's
events: 0.40-0.55 ms of CPU per small POST instead of 0.93-1.02 (interleaved runs; README.md,
"What the profiles changed").

The pool's promises:

- At most ``max_connections`` exchanges at once; the next one waits for a slot within its own
  timeouts. A slot is given back in a ``finally`` and handed straight to the first waiter; a
  waiter cancelled after being handed one gives it on (httpcore #1093's kind of leak).
- Idle connections are reused newest first, dropped after ``keepalive_expiry`` seconds idle,
  and dropped when their socket is readable (the server closed it, or sent bytes nobody
  asked for). Only the connection about to be used is checked: one ``poll`` per request.
- A connection goes back to the pool only after a clean exchange (h11 has both sides DONE,
  nothing unread); after an error, a cancellation, a timeout or ``Connection: close`` it is
  closed, never reused.
- A request is sent again, once and on a new connection, only when it failed on a *reused*
  connection before any byte of an answer, and either its write failed or the server ended
  the connection cleanly (EOF). That is a server closing an idle connection while the request
  was on its way (its keep-alive ran out first): it never read the request, or read an
  incomplete one. A reset (RST) after a complete write is not retried: a server may reset
  after processing (the dev server's reset faults do). Nor is anything on a new connection.
  Were a server to process a request and then close cleanly without answering, the retry would
  send it twice; but the daemon sends every request again after a
  :class:`~runner_daemon.core.errors.TransportError` anyway (reports, polls, heartbeats, job
  reports and log batches all retry), so that is no duplicate it would not make already.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import anyio
import anyio.abc
import h11

# What h11 may buffer of an incomplete event (an answer's head): httpcore's bound.
MAX_INCOMPLETE_EVENT_BYTES = 100 * 1024
READ_BYTES = 64 * 1024
# A body up to this size goes out in the same write as the head (one syscall, one copy).
JOINED_BODY_BYTES = 64 * 1024
# Moving a cancel scope's deadline costs about 10 µs. A request written within this of its
# start keeps ``start + timeout`` as the time its answer must begin by.
PROMPT_SECONDS = 0.01
KEEPALIVE_EXPIRY_SECONDS = 30.0

_IO_ERRORS = (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream)


class WireError(Exception):
    """A failed exchange, named as httpx names its errors (logs read as they did)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


class _Stale(Exception):
    """A reused connection the server had closed before it read the request."""


def _text(exc: BaseException) -> str:
    """anyio's stream errors carry the socket error as their cause, not as their text."""
    return str(exc) or str(exc.__cause__ or "") or type(exc).__name__


@dataclass(frozen=True, slots=True)
class Head:
    """An answer's status line and headers (names in lower case, as h11 gives them)."""

    status: int
    reason: str
    headers: Mapping[bytes, bytes]

    def get(self, name: bytes) -> str | None:
        """The lower-case header ``name``'s value, repeats joined by ", " (as httpx joins them)."""
        value = self.headers.get(name)
        if value is None:
            return None
        try:
            return value.decode()
        except UnicodeDecodeError:
            return value.decode("latin-1")


def _header_values(headers: Iterable[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """One pass over h11's headers (each step of which is a ``__getitem__`` call)."""
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        found[name] = found[name] + b", " + value if name in found else value
    return found


def _readable(sock: socket.socket) -> bool:
    """Whether an idle connection's socket has something to read: the server closed it."""
    if sock.fileno() < 0:
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class _Connection:
    __slots__ = ("idle_since", "socket", "state", "stream")

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        # Looked up once: anyio rebuilds every socket attribute on each lookup.
        self.socket: socket.socket = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        self.state = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_INCOMPLETE_EVENT_BYTES)
        self.idle_since = 0.0  # time.monotonic()


class Pool:
    """Keep-alive connections to one origin, at most ``max_connections`` in use at once."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        *,
        max_connections: int,
        connect_timeout: float,
        keepalive_expiry: float = KEEPALIVE_EXPIRY_SECONDS,
    ) -> None:
        self._host = host
        self._port = port
        self._tls = tls
        self._connect_timeout = connect_timeout
        self._expiry = keepalive_expiry
        self._free = max_connections
        self._waiters: deque[anyio.Event] = deque()
        self._idle: list[_Connection] = []  # oldest first
        self._closed = False

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
        *,
        timeout: float,
        deadline: float,
        on_head: Callable[[Head], Callable[[bytes], None]],
    ) -> Head:
        """One exchange: ``on_head`` gets the answer's head and gives where its body goes.

        ``timeout`` bounds, as httpx's per-phase timeouts did, the wait for a slot, the write,
        and the wait for the answer to begin (the connect has ``connect_timeout``);
        ``deadline`` bounds the whole exchange, so a server that trickles its answer is cut
        off: :class:`TimeoutError`. Whatever ``on_head`` or the body's sink raise comes
        through (the connection is closed). Failures are :class:`WireError`.
        """
        try:
            event = h11.Request(method=method, target=target, headers=headers)
        except h11.LocalProtocolError as exc:  # may quote a header's value: the caller scrubs
            raise WireError("LocalProtocolError", str(exc)) from None
        return await _Exchange(self, event, body).run(timeout, deadline, on_head)

    async def aclose(self) -> None:
        """Close the idle connections; those in use are closed when their exchange ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        await _close_all(idle)

    # --- slots ----------------------------------------------------------------------------

    def _take_slot(self) -> bool:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    async def _wait_for_slot(self) -> None:
        waiter = anyio.Event()
        self._waiters.append(waiter)
        try:
            await waiter.wait()
        except BaseException:
            if waiter.is_set():
                self._release()  # handed a slot it will not use
            else:
                self._waiters.remove(waiter)
            raise

    def _release(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()
        else:
            self._free += 1

    # --- connections ----------------------------------------------------------------------

    async def _checkout(self, fresh: bool) -> tuple[_Connection, bool]:
        """An idle connection that still looks open, else a new one; and whether it was reused."""
        idle = self._idle
        if idle and not fresh:
            now = time.monotonic()
            if now - idle[0].idle_since >= self._expiry:
                kept = 0
                while kept < len(idle) and now - idle[kept].idle_since >= self._expiry:
                    kept += 1
                expired = idle[:kept]
                del idle[:kept]
                await _close_all(expired)
            while idle:
                connection = idle.pop()
                if not _readable(connection.socket):
                    return connection, True
                await _close_all([connection])
        return await self._connect(), False

    async def _connect(self) -> _Connection:
        try:
            with anyio.fail_after(self._connect_timeout):
                stream: anyio.abc.ByteStream
                if self._tls is None:
                    stream = await anyio.connect_tcp(self._host, self._port)
                else:
                    stream = await anyio.connect_tcp(
                        self._host,
                        self._port,
                        ssl_context=self._tls,
                        tls_hostname=self._host,
                        # No TLS close_notify is sent or awaited: closing never blocks.
                        tls_standard_compatible=False,
                    )
        except TimeoutError:
            raise WireError("ConnectTimeout", f"no connection within {self._connect_timeout:g}s") from None
        except _IO_ERRORS as exc:
            raise WireError("ConnectError", _text(exc)) from None
        return _Connection(stream)

    async def _check_in(self, connection: _Connection) -> None:
        """Back to the pool after a clean exchange; closed otherwise."""
        state = connection.state
        if not self._closed and state.our_state is h11.DONE and state.their_state is h11.DONE:
            state.start_next_cycle()
            if not state.trailing_data[0]:
                connection.idle_since = time.monotonic()
                self._idle.append(connection)
                return
        await _close_all([connection])


async def _close_all(connections: list[_Connection]) -> None:
    """Shielded, so a cancellation cannot leave a socket open; anyio closes a socket at
    once (no TLS close_notify here), and only then yields."""
    if connections:
        with anyio.CancelScope(shield=True):
            for connection in connections:
                await connection.stream.aclose()


class _Exchange:
    """One request's way through the pool: its slot, its connection(s), its timeouts."""

    __slots__ = ("body", "event", "phase", "pool", "started")

    def __init__(self, pool: Pool, event: h11.Request, body: bytes | None) -> None:
        self.pool = pool
        self.event = event
        self.body = body
        self.phase = "PoolTimeout"  # what a timeout is called, until the answer has begun
        self.started = 0.0

    async def run(
        self, timeout: float, deadline: float, on_head: Callable[[Head], Callable[[bytes], None]]
    ) -> Head:
        pool = self.pool
        # The event loop's clock for the deadlines, the cheaper monotonic one to measure time
        # spent (anyio.current_time() looks the backend up on each call).
        start, self.started = anyio.current_time(), time.monotonic()
        end = start + deadline
        with anyio.CancelScope(deadline=min(end, start + timeout)) as scope:
            if not pool._take_slot():
                await pool._wait_for_slot()
            try:
                fresh = False
                while True:
                    self.phase = "ConnectTimeout"
                    connection, reused = await pool._checkout(fresh)
                    try:
                        head = await self._attempt(connection, reused, scope, start, timeout, end, on_head)
                    except _Stale:
                        await _close_all([connection])
                        fresh = True
                        continue
                    except BaseException:
                        await _close_all([connection])
                        raise
                    await pool._check_in(connection)
                    return head
            finally:
                pool._release()
        if scope.deadline >= end:
            raise TimeoutError
        raise WireError(self.phase, f"nothing within {timeout:g}s")

    def _restart_clock(self, scope: anyio.CancelScope, start: float, timeout: float, end: float) -> None:
        spent = time.monotonic() - self.started
        if spent > PROMPT_SECONDS:
            scope.deadline = min(end, start + spent + timeout)

    async def _attempt(
        self,
        connection: _Connection,
        reused: bool,
        scope: anyio.CancelScope,
        start: float,
        timeout: float,
        end: float,
        on_head: Callable[[Head], Callable[[bytes], None]],
    ) -> Head:
        state, stream = connection.state, connection.stream
        data = state.send(self.event)
        payload = state.send(h11.Data(data=self.body)) if self.body else b""
        state.send(h11.EndOfMessage())
        self.phase = "WriteTimeout"
        self._restart_clock(scope, start, timeout, end)
        failed_write: BaseException | None = None
        try:
            if len(payload) <= JOINED_BODY_BYTES:
                await stream.send(data + payload)
            else:
                await stream.send(data)
                await stream.send(payload)
        except _IO_ERRORS as exc:
            # A server may answer and close before reading all of a request: read on.
            failed_write = exc
        self.phase = "ReadTimeout"
        self._restart_clock(scope, start, timeout, end)
        head: Head | None = None
        sink: Callable[[bytes], None] | None = None
        answered = False  # any byte of an answer
        try:
            while True:
                event = state.next_event()
                if event is h11.NEED_DATA:
                    if head is not None and scope.deadline < end:
                        scope.deadline = end  # the body: bounded by the deadline alone
                    try:
                        chunk = await stream.receive(READ_BYTES)
                    except anyio.EndOfStream:
                        chunk = b""
                    except _IO_ERRORS as exc:
                        if answered or failed_write is None:
                            raise WireError("ReadError", _text(exc)) from None
                        chunk = b""
                    if not chunk and not answered:
                        if reused:
                            raise _Stale
                        if failed_write is not None:
                            raise WireError("WriteError", _text(failed_write))
                        raise WireError(
                            "RemoteProtocolError", "Server disconnected without sending a response."
                        )
                    answered = True
                    state.receive_data(chunk)
                elif type(event) is h11.Response:
                    reason = event.reason.decode("ascii", "ignore")
                    head = Head(event.status_code, reason, _header_values(event.headers))
                    sink = on_head(head)
                elif type(event) is h11.Data:
                    assert sink is not None  # h11 gives a body only after its head
                    sink(event.data)
                elif type(event) is h11.EndOfMessage:
                    assert head is not None
                    return head
                elif type(event) is not h11.InformationalResponse:  # a 1xx is skipped
                    raise WireError("RemoteProtocolError", f"unexpected {event!r}")
        except h11.RemoteProtocolError as exc:
            raise WireError("RemoteProtocolError", str(exc)) from None
