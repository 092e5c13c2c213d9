"""The optional health listener: ``/healthz``, ``/readyz`` and ``/metrics`` over plain HTTP.

A few lines of HTTP/1.0 on an anyio TCP listener are enough for probes and a Prometheus
scraper, and keep a web framework out of the daemon. Every connection has a deadline and
a size cap, so a slow or hostile client cannot hold the listener.
"""

from __future__ import annotations

from typing import Protocol

import anyio
import structlog
from anyio.abc import SocketStream, TaskStatus
from prometheus_client import CollectorRegistry

from runner_daemon.core.settings import parse_listen
from runner_daemon.service.metrics import CONTENT_TYPE, render

log = structlog.get_logger(__name__)

MAX_REQUEST_BYTES = 8192
REQUEST_DEADLINE_SECONDS = 5.0


class HealthView(Protocol):
    def healthy(self) -> bool: ...

    def ready(self) -> bool: ...


class HealthServer:
    def __init__(self, view: HealthView, registry: CollectorRegistry) -> None:
        self._view = view
        self._registry = registry

    async def serve(self, listen: str, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        host, port = parse_listen(listen)
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port, reuse_port=False)
        bound = listener.extra(anyio.abc.SocketAttribute.local_port)
        log.info("health listener ready", listen=f"{host}:{bound}")
        task_status.started(bound)
        async with listener:
            await listener.serve(self._handle)

    async def _handle(self, stream: SocketStream) -> None:
        async with stream:
            with anyio.move_on_after(REQUEST_DEADLINE_SECONDS):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST_BYTES:
                    try:
                        request += await stream.receive(4096)
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return
                status, content_type, body = self._answer(request.split(b"\r\n", 1)[0])
                head = (
                    f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
                try:
                    await stream.send(head.encode() + body)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return

    def _answer(self, request_line: bytes) -> tuple[str, str, bytes]:
        parts = request_line.split()
        if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", "text/plain", b"only GET\n"
        path = parts[1].split(b"?", 1)[0]
        if path == b"/healthz":
            ok = self._view.healthy()
            return (
                ("200 OK" if ok else "503 Service Unavailable"),
                "text/plain",
                b"ok\n" if ok else b"unhealthy\n",
            )
        if path == b"/readyz":
            ok = self._view.ready()
            return (
                ("200 OK" if ok else "503 Service Unavailable"),
                "text/plain",
                b"ready\n" if ok else b"not ready\n",
            )
        if path == b"/metrics":
            return "200 OK", CONTENT_TYPE, render(self._registry)
        return "404 Not Found", "text/plain", b"not found\n"
