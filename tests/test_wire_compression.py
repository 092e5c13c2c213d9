"""Request bodies of 256 bytes or more go out gzipped (level 6), as Opik's own client sends
them; smaller ones go plain; the dev server inflates them within its payload cap."""

from __future__ import annotations

import gzip
import tracemalloc
from pathlib import Path

import httpx
import pytest

from runner_daemon.core.api import RunnerApi
from runner_daemon.core.models import LogEntry
from runner_daemon.devserver.client import DevClient
from runner_daemon.devserver.server import DevServer
from tests.hostile import MIB, HostileServer, Request, answer, bomb
from tests.support import make_settings, running_daemon, wait_terminal

pytestmark = pytest.mark.anyio

RUNNER = "00000000-0000-4000-8000-000000000001"


def sent_plain(request: Request) -> bytes:
    """The JSON a request carried, inflated if it came gzipped."""
    if request.headers.get("content-encoding") == "gzip":
        return gzip.decompress(request.body)
    return request.body


async def test_reports_from_256_bytes_reach_the_server_gzipped_and_read_back_the_same(
    devserver: DevServer, api: DevClient, runner_id: str, workspace: Path
) -> None:
    # 2,000 lines of 250 characters: ReadFile's whole window, under its 512,000-character cap
    # (and large enough to be compressed in a worker thread).
    text = "".join(f"{i:05d} " + "lorem ipsum dolor sit amet " * 9 + "\n" for i in range(2000))
    (workspace / "big.txt").write_text(text)
    stats = f"runners/{runner_id}/stats"
    async with running_daemon(make_settings(devserver.url, runner_id, workspace)):
        small = await api.submit_command(runner_id, "ReadFile", {"path": "src/pkg/mod.py"})
        assert (await wait_terminal(api, runner_id, small)).result == {
            "content": "x = 1\n",
            "total_lines": 1,
            "truncated": False,
            "encoding": "utf-8",
        }
        counters = await api.dev_get(stats)
        assert (counters["reports_accepted"], counters["reports_gzipped"]) == (1, 0)
        large = await api.submit_command(runner_id, "ReadFile", {"path": "big.txt"})
        record = await wait_terminal(api, runner_id, large, 30)
        counters = await api.dev_get(stats)
    assert record.status == "completed", record.error
    assert record.result == {"content": text, "total_lines": 2000, "truncated": False, "encoding": "utf-8"}
    assert counters["reports_accepted"] == 2
    assert counters["reports_gzipped"] >= 1  # a retry would send it again, gzipped again


async def test_the_threshold_is_256_bytes_and_every_call_with_a_body_compresses() -> None:
    with HostileServer(lambda request: answer(204)) as server:
        async with RunnerApi(server.url) as api:
            await api.report(RUNNER, "c1", b" " * 255)
            await api.report(RUNNER, "c2", b" " * 256)
            logs = [LogEntry(stream="stdout", text=f"line {i}") for i in range(50)]
            await api.post_job_logs("j1", logs)
        below, at, batch = server.requests
    assert "content-encoding" not in below.headers and below.body == b" " * 255
    assert at.headers["content-encoding"] == "gzip" and at.headers["content-type"] == "application/json"
    assert len(at.body) < 256 and sent_plain(at) == b" " * 256
    assert batch.headers["content-encoding"] == "gzip"
    assert sent_plain(batch) == b"[" + b",".join(e.model_dump_json().encode() for e in logs) + b"]"


@pytest.mark.adversarial
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the dev server runs in its own thread
async def test_the_dev_server_refuses_a_gzip_bomb_without_inflating_it(
    devserver: DevServer, api: DevClient, runner_id: str
) -> None:
    """One gzip member of 512 MiB of zeros (about 0.5 MiB on the wire): 413, and the server
    never held more than about its payload cap of it."""
    await api.heartbeat(runner_id, ["bridge"])
    command_id = await api.submit_command(runner_id, "ReadFile", {"path": "a"})
    assert len(await api.poll(runner_id, 1)) == 1
    url = f"v1/private/local-runners/{runner_id}/bridge/commands/{command_id}/results"
    body = bomb("gzip", 512)
    async with httpx.AsyncClient(base_url=devserver.url, timeout=60) as raw:
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            response = await raw.post(url, content=body, headers={"Content-Encoding": "gzip"})
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    assert response.status_code == 413
    assert peak < 64 * MIB, f"peak {peak // MIB} MiB"
    assert (await api.get_command(runner_id, command_id)).status != "completed"
