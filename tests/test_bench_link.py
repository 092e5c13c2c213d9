"""``bench --link``: the delaying proxy, the options, the workload's text, and the link itself.

The proxy is tested in-process (bytes, order, ends, its bound); the shaping and the whole
scenario only as root with tc and a network namespace (skipped otherwise). Timings are
asserted only as lower bounds that hold by construction: the proxy never sends a byte
before its delay is up, and a tbf never passes more than its bucket plus its rate.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import zlib
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from runner_daemon.bench import link
from runner_daemon.bench.link import MAX_CHUNKS, MTU, DelayProxy
from runner_daemon.bench.records import LINK_SIZE, BenchError, Link, Options
from runner_daemon.bench.run import READ_FILE_LINES, source_text
from runner_daemon.cli import build_parser, main
from tests.support import REPO, bench

pytestmark = pytest.mark.anyio

LINK_UNAVAILABLE = link.unavailable()
needs_link = pytest.mark.skipif(LINK_UNAVAILABLE is not None, reason=str(LINK_UNAVAILABLE))


# --- the proxy ------------------------------------------------------------------------------------


async def _echo(stream: anyio.abc.SocketStream) -> None:
    """The upstream: sends back what it reads, then ends its side when the client has."""
    async with stream:
        try:
            while True:
                await stream.send(await stream.receive())
        except anyio.EndOfStream:
            await stream.send_eof()


async def _exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` through the proxy, end our side, and read everything until its end."""
    received = bytearray()
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:

        async def send() -> None:
            for start in range(0, len(data), 10_000):
                await stream.send(data[start : start + 10_000])
            await stream.send_eof()

        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            try:
                while True:
                    received += await stream.receive()
            except anyio.EndOfStream:
                pass
    return bytes(received)


async def _proxy(tg: anyio.abc.TaskGroup, upstream: Any, delay: float) -> int:
    """An upstream server and a proxy in front of it, in ``tg``; the proxy's port."""
    server = await anyio.create_tcp_listener(local_host="127.0.0.1")
    tg.start_soon(server.serve, upstream)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    proxy = DelayProxy("127.0.0.1", server.extra(anyio.abc.SocketAttribute.local_port), delay)
    tg.start_soon(proxy.serve, listener)
    return int(listener.extra(anyio.abc.SocketAttribute.local_port))


async def test_the_proxy_passes_every_byte_in_order_both_ways_on_many_connections() -> None:
    """30 connections at once, each 300 KB of its own bytes (several chunks, interleaved with
    the others): each comes back whole and in order, and each connection ends cleanly."""
    rng = random.Random(17)
    payloads = [rng.randbytes(300_000) for _ in range(30)]
    answers: dict[int, bytes] = {}
    async with anyio.create_task_group() as tg:
        port = await _proxy(tg, _echo, 0.005)

        async def one(i: int) -> None:
            answers[i] = await _exchange(port, payloads[i])

        with anyio.fail_after(60):
            async with anyio.create_task_group() as clients:
                for i in range(len(payloads)):
                    clients.start_soon(one, i)
        tg.cancel_scope.cancel()
    assert [answers[i] == payloads[i] for i in range(len(payloads))] == [True] * len(payloads)


async def test_the_proxy_holds_each_direction_at_least_its_delay() -> None:
    delay = 0.05
    arrivals: list[float] = []

    async def upstream(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.receive()
            arrivals.append(anyio.current_time())
            await stream.send(b"pong")

    async with anyio.create_task_group() as tg:
        port = await _proxy(tg, upstream, delay)
        with anyio.fail_after(10):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                sent = anyio.current_time()
                await stream.send(b"ping")
                assert await stream.receive() == b"pong"
                back = anyio.current_time()
        tg.cancel_scope.cancel()
    (arrived,) = arrivals
    assert arrived - sent >= delay  # up
    assert back - arrived >= delay  # down
    assert back - sent >= 2 * delay


async def test_the_proxy_closes_the_client_when_the_upstream_is_gone() -> None:
    async def upstream(stream: anyio.abc.SocketStream) -> None:
        await stream.aclose()

    async with anyio.create_task_group() as tg:
        port = await _proxy(tg, upstream, 0.0)
        with anyio.fail_after(10):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await stream.receive()
        tg.cancel_scope.cancel()


class _Endless(anyio.abc.ByteStream):
    """A source that always has a full chunk to give, and a sink that never takes one."""

    def __init__(self) -> None:
        self.reads = 0

    async def receive(self, max_bytes: int = 65536) -> bytes:
        self.reads += 1
        await anyio.lowlevel.checkpoint()
        return b"x" * max_bytes

    async def send(self, item: bytes) -> None:
        await anyio.sleep_forever()

    async def send_eof(self) -> None:
        await anyio.sleep_forever()

    async def aclose(self) -> None:
        pass


async def test_the_proxy_stops_reading_when_its_queue_is_full() -> None:
    """A sink that takes nothing: the proxy holds at most its queue, plus the chunk being
    written and the one waiting for room, however much the source has."""
    stream = _Endless()
    async with anyio.create_task_group() as tg:
        tg.start_soon(DelayProxy("127.0.0.1", 9, 0.0).relay, stream, stream, tg.cancel_scope)
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert 0 < stream.reads <= MAX_CHUNKS + 2


# --- the options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "link_"),
    [
        ("2mbit/40ms", Link(2_000_000, 0.04)),
        ("512kbit/0.1s", Link(512_000, 0.1)),
        ("1.5Mbit/5ms", Link(1_500_000, 0.005)),
        ("1gbit", Link(1_000_000_000, 0.0)),
        ("64kbit/0ms", Link(64_000, 0.0)),
    ],
)
def test_a_link_is_a_rate_and_a_delay_as_tc_spells_them(text: str, link_: Link) -> None:
    assert Link.parse(text) == link_


@pytest.mark.parametrize(
    "text", ["2mb/40ms", "2mbit/40", "2 mbit", "fast", "", "10kbit/1ms", "2gbit", "2mbit/3s", "2mbit/-1ms"]
)
def test_a_link_is_refused_without_its_units_or_out_of_range(text: str) -> None:
    with pytest.raises(ValueError):
        Link.parse(text)


def _options(*args: str) -> Options:
    return Options.from_args(build_parser().parse_args(["bench", *args]))


def test_link_defaults_are_a_few_large_reads_one_at_a_time_and_opiks_sdk_client() -> None:
    options = _options("--link", "2mbit/40ms")
    assert options.check() is None
    assert (options.count, options.window, options.warmup, options.size) == (20, 1, 2, LINK_SIZE)
    assert options.opik_client == "sdk"  # as Opik's runner builds it: it gzips
    assert options.link_spec == Link(2_000_000, 0.04)
    # Every result may take the time of 512 KB at 2 Mbit/s: the run's bounds allow for it.
    assert options.timeout >= 120 + 20 * LINK_SIZE * 8 / 2_000_000
    assert options.stall_seconds(30) >= 30 + LINK_SIZE * 8 / 2_000_000


def test_given_options_win_over_the_link_defaults_and_no_link_keeps_the_old_ones() -> None:
    options = _options("--link", "2mbit", "-n", "5", "--window", "3", "--warmup", "0", "--size", "1000")
    options_rest = _options("--link", "2mbit", "--opik-client", "rest", "--repeat", "3")
    assert (options.count, options.window, options.warmup, options.size) == (5, 3, 0, 1000)
    assert (options_rest.opik_client, options_rest.repeat) == ("rest", 3)
    plain = _options()
    assert (plain.count, plain.window, plain.warmup, plain.size, plain.link) == (1000, 100, 100, None, None)
    assert plain.opik_client == "sdk"  # what Opik's runner builds, with or without a link
    assert plain.stall_seconds(30) == 30
    assert _options("--type", "ListFiles", "--link", "2mbit").size is None


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--link", "2mbit/40"], "--link"),
        (["--link", "2mbit", "--jobs"], "--link"),
        (["--link", "2mbit", "--idle", "5"], "--link"),
        (["--size", "0"], "--size"),
        (["--size", "512001"], "--size"),
        (["--size", "1000", "--type", "ListFiles"], "--size"),
        (["--opik-plain"], "--opik-plain"),
        (["--opik-plain", "--compare", "opik", "--opik-client", "rest"], "--opik-client sdk"),  # plain anyway
    ],
)
def test_link_options_are_checked(args: list[str], named: str) -> None:
    problem = _options(*args).check()
    assert problem is not None and named in problem


def test_the_opik_plain_option_turns_opiks_compression_off() -> None:
    from runner_daemon.bench.children import opik_environ

    assert _options("--compare", "opik", "--opik-client", "sdk", "--opik-plain").check() is None
    assert opik_environ("http://x/", compress=False)["OPIK_ENABLE_JSON_REQUEST_COMPRESSION"] == "false"
    assert opik_environ("http://x/")["OPIK_ENABLE_JSON_REQUEST_COMPRESSION"] == "true"


@pytest.mark.parametrize("size", [1, 100, 4_000, 64_000, LINK_SIZE])
def test_the_read_file_target_is_size_bytes_of_source_text_in_readfiles_window(size: int) -> None:
    text = source_text(size)
    assert len(text.encode()) == len(text) == size
    assert text.endswith("\n")
    assert text.count("\n") <= READ_FILE_LINES  # ReadFile returns all of it, not truncated
    if size >= 4_000:  # gzip does on it what it does on code: not random, not repeated
        assert 2 < len(text) / len(zlib.compress(text.encode(), 6)) < 8


# --- where --link cannot run ----------------------------------------------------------------------


def test_link_without_root_or_tools_is_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert main(["bench", "--link", "2mbit/40ms"]) == 1
    assert "--link needs root" in capsys.readouterr().err
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("shutil.which", lambda tool: None if tool == "tc" else f"/usr/bin/{tool}")
    assert main(["bench", "--link", "2mbit/40ms"]) == 1
    err = capsys.readouterr().err
    assert "--link needs tc" in err and "Traceback" not in err


async def test_nothing_is_shaped_outside_a_namespace_of_the_benchs_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def never(*argv: str) -> bytes:
        raise AssertionError(f"ran {argv}")

    monkeypatch.setattr(link, "_run", never)
    monkeypatch.delenv("RD_BENCH_OUTER_NETNS", raising=False)
    assert not link.in_private_namespace()
    with pytest.raises(BenchError, match="namespace"):
        await link.shape(9, Link(2_000_000, 0.0))
    with pytest.raises(BenchError, match="namespace"):
        await link.loopback_up()


# --- the link, for real ---------------------------------------------------------------------------

SHAPED_RATE_BITS = 1_000_000
SHAPED_PAYLOAD = 200_000


def measure_shaped_link() -> None:
    """Run in a namespace of its own: ``SHAPED_PAYLOAD`` bytes up through the shaped proxy
    port; prints the seconds it took and the bytes the two tbf qdiscs passed."""

    async def measure() -> dict[str, float]:
        await link.loopback_up()
        spec = Link(SHAPED_RATE_BITS, 0.02)

        async def sink(stream: anyio.abc.SocketStream) -> None:
            async with stream:
                total = 0
                while total < SHAPED_PAYLOAD:
                    total += len(await stream.receive())
                await stream.send(b"done")

        async def through(port: int) -> float:
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                started = anyio.current_time()
                await stream.send(b"x" * SHAPED_PAYLOAD)
                await stream.receive()
                return anyio.current_time() - started

        async with anyio.create_task_group() as tg:
            server = await anyio.create_tcp_listener(local_host="127.0.0.1")
            server_port = server.extra(anyio.abc.SocketAttribute.local_port)
            tg.start_soon(server.serve, sink)
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
            proxy_port = listener.extra(anyio.abc.SocketAttribute.local_port)
            tg.start_soon(DelayProxy("127.0.0.1", server_port, spec.delay).serve, listener)
            await link.shape(proxy_port, spec)
            seconds = await through(proxy_port)
            up, down = await link.shaped_bytes()
            tg.cancel_scope.cancel()
        return {"seconds": seconds, "up": up, "down": down}

    print(json.dumps(anyio.run(measure)))


@needs_link
def test_the_link_limits_the_proxys_port_to_its_rate() -> None:
    """A tbf of 1 Mbit/s passes at most its bucket and then its rate: 200 KB up take at least
    (200 KB - bucket) / rate, and every byte of it (headers on top) is counted by the tbf."""
    entry = "from tests.test_bench_link import measure_shaped_link; measure_shaped_link()"
    argv, env = link.namespace_command(entry, dict(os.environ))
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    bucket = max(2 * (MTU + 14), SHAPED_RATE_BITS // 8 // 250)
    assert figures["seconds"] >= (SHAPED_PAYLOAD - bucket) * 8 / SHAPED_RATE_BITS
    assert figures["up"] >= SHAPED_PAYLOAD
    assert figures["down"] > 0  # the answer and the ACKs came back through the other tbf


@needs_link
def test_bench_link_runs_every_command_over_the_link() -> None:
    """A small run over a fast link: every command completes, its bytes crossed the link
    gzipped, and each latency holds at least a round trip of the link's delay."""
    delay = 0.01
    link_args = ["--link", f"20mbit/{delay * 1000:g}ms", "-n", "3", "--size", "50000", "--json"]
    done = bench(*link_args)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["options"]["link"] == "20mbit/10ms"
    (run,) = report["load"]
    assert run["completed"] == run["count"] == 3
    assert run["exit_status"] == 0
    assert run["reports"] == run["reports_gzipped"] == 3
    assert run["link_up_bytes"] >= 3 * 10_000  # 50 KB of source text gzipped is still 15 KB
    assert run["link_down_bytes"] > 0
    # Submitted -> stored: the command down through the proxy, the result up through it.
    assert run["latency_ms"]["p50"] >= 2 * delay * 1000
