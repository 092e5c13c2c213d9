"""The load generator's HTTP/1.1 client, the two UI calls the bench makes per command, and
the playground's job creation (``--jobs``).

httpx costs about a millisecond of CPU per request on a small machine; the bench makes two
requests per command, and on two cores that CPU would come out of the runners' share. This
client costs a fraction of it, so the figures measure the runners, not the bench. It speaks
just enough HTTP for the dev server (Content-Length bodies, keep-alive), nothing more.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from typing import Any

import anyio
import anyio.abc

from runner_daemon.bench.records import BenchError, Finished

RUNNERS = "v1/private/local-runners"
# uvicorn closes a kept-alive connection idle for 5 s.
IDLE_CONNECTION_SECONDS = 3.0


class HttpError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200].decode(errors='replace')}")
        self.status = status


class _Connection:
    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.used = 0.0  # when it last answered; 0 while new

    async def _fill(self) -> None:
        self.buffer += await self.stream.receive(65536)

    async def exchange(self, request: bytes) -> tuple[int, bytes, dict[str, str]]:
        """Send one request, read its answer: (status, body, headers by lower-case name)."""
        await self.stream.send(request)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            await self._fill()
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        del self.buffer[: end + 4]
        status = int(head[0].split(" ", 2)[1])
        headers = {
            name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in head[1:])
        }
        if "chunked" in headers.get("transfer-encoding", ""):
            raise BenchError("the dev server answered chunked; the bench's client reads Content-Length only")
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            await self._fill()
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return status, body, headers


class LoadClient:
    """The bench's HTTP/1.1 client: keep-alive connections, one request on each at a time."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self._netloc = parts.netloc
        self._prefix = parts.path.rstrip("/")
        self._idle: list[_Connection] = []

    async def request(self, method: str, path: str, payload: Any = None, timeout: float = 60.0) -> Any:
        """``path`` is relative to the API base URL; returns the decoded JSON answer (or None)."""
        answer, _ = await self.exchange(method, path, payload, timeout)
        return json.loads(answer) if answer else None

    async def exchange(
        self, method: str, path: str, payload: Any = None, timeout: float = 60.0
    ) -> tuple[bytes, dict[str, str]]:
        """As :meth:`request`, but the raw body and the headers (a 201's ``Location``)."""
        body = b"" if payload is None else json.dumps(payload).encode()
        request = (
            f"{method} {self._prefix}/{path} HTTP/1.1\r\nHost: {self._netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        with anyio.fail_after(timeout):
            connection = await self._take()
            try:
                status, answer, headers = await connection.exchange(request)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                await connection.stream.aclose()
                if connection.used == 0 or connection.buffer:
                    raise
                # The server closed a kept-alive connection as we sent: once more on a new one.
                connection = await self._connect()
                status, answer, headers = await connection.exchange(request)
            except BaseException:
                await connection.stream.aclose()
                raise
            if headers.get("connection", "").lower() != "close":
                connection.used = time.monotonic()
                self._idle.append(connection)
            else:
                await connection.stream.aclose()
        if status >= 300:
            raise HttpError(status, answer)
        return answer, headers

    async def _take(self) -> _Connection:
        """An idle connection used lately (uvicorn closes them after 5 s), or a new one."""
        while self._idle:
            connection = self._idle.pop()
            if time.monotonic() - connection.used < IDLE_CONNECTION_SECONDS:
                return connection
            await connection.stream.aclose()
        return await self._connect()

    async def _connect(self) -> _Connection:
        return _Connection(await anyio.connect_tcp(self._host, self._port))

    async def aclose(self) -> None:
        while self._idle:
            await self._idle.pop().stream.aclose()


async def submit(client: LoadClient, runner_id: str, command_type: str, args: dict[str, Any]) -> str:
    """Submit one command as Opik's UI does; a dev server at its limit (429) is asked again."""
    path = f"{RUNNERS}/{runner_id}/bridge/commands"
    for attempt in range(20):
        try:
            answer = await client.request("POST", path, {"type": command_type, "args": args})
            return str(answer["command_id"])
        except HttpError as exc:
            if exc.status != 429 and attempt >= 5:
                raise
            await anyio.sleep(0.1 * (attempt + 1))
    raise BenchError("the dev server kept refusing submissions (429)")


async def wait_final(client: LoadClient, runner_id: str, command_id: str) -> Finished:
    """A command's final record, read with held GETs as the UI does."""
    path = f"{RUNNERS}/{runner_id}/bridge/commands/{command_id}?wait=true&timeout=60"
    while True:  # bounded by the caller's fail_after
        record = await client.request("GET", path, timeout=90)
        if record.get("status") in ("completed", "failed", "timed_out"):
            return Finished.of(record)


async def create_job(client: LoadClient, project_id: str, agent_name: str, inputs: dict[str, Any]) -> str:
    """Create a job as Opik's playground does: 201, no body, its id at the end of ``Location``."""
    body = {"agent_name": agent_name, "project_id": project_id, "inputs": inputs}
    _, headers = await client.exchange("POST", f"{RUNNERS}/jobs", body)
    job_id = headers.get("location", "").rstrip("/").rpartition("/")[2]
    if not job_id:
        raise BenchError("the dev server created a job without a Location")
    return job_id
