"""A hostile HTTP server on 127.0.0.1 for answers the dev server cannot give.

Each connection carries one request; the test's ``respond`` function returns the raw bytes
to send (an iterable, so an answer can drip, or never end). Runs in threads, so it serves a
test's event loop on either backend and daemon processes alike.
"""

from __future__ import annotations

import socketserver
import struct
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from types import TracebackType
from typing import Self

MIB = 1024 * 1024


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes


Responder = Callable[[Request], Iterable[bytes]]


def answer(status: int = 200, body: bytes = b"", headers: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    """A complete HTTP/1.1 answer with a Content-Length, closing the connection after it."""
    lines = [f"HTTP/1.1 {status} Hostile", f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    return [("\r\n".join(lines) + "\r\n\r\n").encode() + body]


def json_answer(body: bytes, status: int = 200, encoding: str | None = None) -> list[bytes]:
    headers = [("Content-Type", "application/json")]
    if encoding is not None:
        headers.append(("Content-Encoding", encoding))
    return answer(status, body, headers)


@cache
def _zero_blocks() -> bytes:
    """Raw deflate of 1 MiB of zeros ending in a full flush: it can be repeated as is."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflate.compress(bytes(MIB)) + deflate.flush(zlib.Z_FULL_FLUSH)


# A final, empty, fixed-Huffman deflate block: the end of the stream.
_LAST_BLOCK = b"\x03\x00"


@cache
def bomb(encoding: str, mebibytes: int) -> bytes:
    """A valid gzip or zlib ("deflate") body of ``mebibytes`` MiB of zeros, about 1/1000 the size."""
    blocks = _zero_blocks() * mebibytes + _LAST_BLOCK
    zeros = bytes(MIB)
    if encoding == "gzip":
        crc = 0
        for _ in range(mebibytes):
            crc = zlib.crc32(zeros, crc)
        trailer = struct.pack("<II", crc, (mebibytes * MIB) & 0xFFFFFFFF)
        return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + blocks + trailer
    adler = 1
    for _ in range(mebibytes):
        adler = zlib.adler32(zeros, adler)
    return b"\x78\xda" + blocks + struct.pack(">I", adler)


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        request_line = self.rfile.readline(65536).decode("latin-1").strip()
        if not request_line:
            return
        method, path, _ = request_line.split(" ", 2)
        headers: dict[str, str] = {}
        while (line := self.rfile.readline(65536).decode("latin-1")) not in ("\r\n", "\n", ""):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self.rfile.read(int(headers.get("content-length", "0")))
        request = Request(method, path, headers, body)
        self.server.hostile.record(request)
        try:
            for chunk in self.server.hostile.respond(request):
                self.wfile.write(chunk)
                self.wfile.flush()
        except OSError:
            pass  # the client hung up: what a bounded client does


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, hostile: HostileServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hostile = hostile


class HostileServer:
    """``with HostileServer(respond) as server:``; ``server.url`` is an API base URL."""

    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self._requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/api/"

    def record(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def count(self, path_suffix: str) -> int:
        return sum(1 for request in self.requests if request.path.endswith(path_suffix))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
