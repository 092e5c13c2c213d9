"""``bench --link RATE/DELAY``: the runners' traffic over a simulated slow link, on this machine.

The bench runs itself again inside a private network namespace (``unshare --net``, root
only): its ``lo`` is the bench's own, so no other tenant's traffic is shaped, and the
namespace goes, queueing rules and all, when the bench ends. In there:

- the runners reach the dev server through :class:`DelayProxy`, a child process that holds
  every chunk it reads for DELAY before passing it on, each direction apart (a round trip
  costs 2 x DELAY); the load client and the dev server talk directly;
- ``tc`` limits the traffic to and from the proxy's port, and nothing else, to RATE each way:
  an ``htb`` root (this kernel has neither ``prio`` nor ``netem``) files packets to that port
  in one class and packets from it in another, each with a ``tbf`` of RATE; any other packet
  takes htb's direct queue, unshaped, so the bench's own requests and the proxy's leg to the
  dev server run at loopback speed and only the runner's link is measured;
- ``lo``'s MTU is 1500, an Internet path's: tbf cannot pass a packet larger than its bucket,
  and lo's own 64 KiB packets would need a bucket of 64 KiB, a burst no slow link has.

One namespace rather than two joined by a veth pair (a tbf on each end, nothing to classify):
the runners would then live in a namespace of their own, entered with nsenter, for the same
measurement. Measured here: 2 MB through a 2mbit link took 8.4 s each way (1.91 Mbit/s of
payload, the rest TCP/IP headers), through a 100mbit one 0.17 s (96 Mbit/s); through an
unshaped port 0.01 s. The byte counters of the two tbf qdiscs give each run's bytes on the
wire, headers included.

Not emulated: TCP sees loopback round trips (the delay is added above it), so slow start and
loss on a long path do not show. The proxy holds at most :data:`MAX_CHUNKS` reads of
:data:`CHUNK_BYTES` per direction of a connection, which bounds its memory and caps one
connection at 1 MiB per DELAY (26 MB/s at 40 ms), far above the rates this is for.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from runner_daemon.bench.records import BenchError, Link

CHUNK_BYTES = 65_536
MAX_CHUNKS = 16
MTU = 1500
# Bytes queued in a tbf before it drops: more than a few reports in flight.
QUEUE_BYTES = 4 * 1024 * 1024
# The htb classes only sort packets: their own rate is far above any link's.
CLASS_RATE = "10gbit"
UPLINK, DOWNLINK = "10:", "20:"  # the tbf qdiscs: to the proxy's port, and from it

PROXY_LISTENING = "link proxy listening on port "
_PROXY_ENV = "RD_BENCH_LINK_PROXY"
_OUTER_NAMESPACE_ENV = "RD_BENCH_OUTER_NETNS"

# --- the delaying proxy ---------------------------------------------------------------------------


class DelayProxy:
    """Forwards each connection it accepts to ``host:port``, every byte held ``delay`` seconds.

    Each direction has one reader and one writer, so bytes leave in the order they came; the
    end of a direction (EOF) is passed on in its turn, and a connection is closed once both
    ends are; an error on either side closes both at once.
    """

    def __init__(self, host: str, port: int, delay: float) -> None:
        self.host = host
        self.port = port
        self.delay = delay

    async def serve(self, listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
        await listener.serve(self.handle)

    async def handle(self, downstream: anyio.abc.SocketStream) -> None:
        async with downstream:
            try:
                upstream = await anyio.connect_tcp(self.host, self.port)
            except OSError:
                return
            async with upstream, anyio.create_task_group() as tg:
                tg.start_soon(self.relay, downstream, upstream, tg.cancel_scope)
                tg.start_soon(self.relay, upstream, downstream, tg.cancel_scope)

    async def relay(
        self, source: anyio.abc.ByteStream, sink: anyio.abc.ByteStream, connection: anyio.CancelScope
    ) -> None:
        """One direction, until its end is passed on; an error cancels ``connection``."""
        send, receive = anyio.create_memory_object_stream[tuple[float, bytes]](MAX_CHUNKS)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._read, source, send, connection)
            await self._write(receive, sink, connection)

    async def _read(
        self,
        source: anyio.abc.ByteStream,
        send: MemoryObjectSendStream[tuple[float, bytes]],
        connection: anyio.CancelScope,
    ) -> None:
        """Each chunk with the time it may leave; b"" for the end. A full queue stops the
        reading, and TCP's window then slows the sender."""
        async with send:
            try:
                while True:
                    data = await source.receive(CHUNK_BYTES)
                    await send.send((anyio.current_time() + self.delay, data))
            except anyio.EndOfStream:
                await send.send((anyio.current_time() + self.delay, b""))
            except (anyio.BrokenResourceError, OSError):
                connection.cancel()

    async def _write(
        self,
        receive: MemoryObjectReceiveStream[tuple[float, bytes]],
        sink: anyio.abc.ByteStream,
        connection: anyio.CancelScope,
    ) -> None:
        async with receive:
            try:
                async for due, data in receive:
                    await anyio.sleep_until(due)
                    if data:
                        await sink.send(data)
                    else:
                        await sink.send_eof()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                connection.cancel()


def proxy_command(upstream_port: int, delay: float) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the proxy child; it prints :data:`PROXY_LISTENING` and its port."""
    env = {**os.environ, _PROXY_ENV: json.dumps({"port": upstream_port, "delay": delay})}
    entry = "from runner_daemon.bench.link import serve_proxy; serve_proxy()"
    return [sys.executable, "-c", entry], env


def serve_proxy() -> None:
    """Entry point of the proxy child: to the dev server's port on 127.0.0.1."""
    config = json.loads(os.environ[_PROXY_ENV])

    async def serve() -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        print(PROXY_LISTENING + str(listener.extra(anyio.abc.SocketAttribute.local_port)), flush=True)
        await DelayProxy("127.0.0.1", int(config["port"]), float(config["delay"])).serve(listener)

    anyio.run(serve)


# --- the namespace and its shaping ----------------------------------------------------------------


def unavailable() -> str | None:
    """Why ``--link`` cannot run here, or None."""
    if os.geteuid() != 0:
        return "--link needs root (a network namespace of its own, and tc in it)"
    missing = [tool for tool in ("unshare", "ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"--link needs {', '.join(missing)} (util-linux, iproute2): not found"
    done = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"--link needs a network namespace, and `unshare --net` failed: {done.stderr.strip()}"
    return None


def namespace_command(entry: str, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """``python -c entry`` in a new network namespace of its own; ``env`` with the name of
    this one, which it checks it has left before it shapes anything."""
    command = ["unshare", "--net", "--", sys.executable, "-c", entry]
    return command, {**env, _OUTER_NAMESPACE_ENV: _namespace()}


def _namespace() -> str:
    return os.readlink("/proc/self/ns/net")


def in_private_namespace() -> bool:
    """Started by :func:`namespace_command` and in another network namespace than the one
    that started it: shaping ``lo`` here touches no one else's traffic."""
    outer = os.environ.get(_OUTER_NAMESPACE_ENV)
    try:
        return outer is not None and _namespace() != outer
    except OSError:
        return False


async def _run(*argv: str) -> bytes:
    done = await anyio.run_process(list(argv), check=False)
    if done.returncode != 0:
        raise BenchError(f"`{' '.join(argv)}` failed: {done.stderr.decode(errors='replace').strip()}")
    return bytes(done.stdout)


async def loopback_up() -> None:
    """``lo`` up (a new namespace's is down) with an Internet path's MTU."""
    if not in_private_namespace():
        raise BenchError("--link shapes lo only inside a network namespace of its own")
    await _run("ip", "link", "set", "lo", "up", "mtu", str(MTU))


async def shape(port: int, link: Link) -> None:
    """A tbf of the link's rate on the packets to ``port`` (up) and on those from it (down)."""
    if not in_private_namespace():
        raise BenchError("--link shapes lo only inside a network namespace of its own")
    # tbf needs a bucket of at least a packet; 4 ms of the rate at higher rates.
    burst = max(2 * (MTU + 14), link.rate_bits // 8 // 250)
    await _run("tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "0")
    for number, (handle, field) in enumerate(((UPLINK, "dport"), (DOWNLINK, "sport")), start=1):
        classid = f"1:{number}"
        htb = ["htb", "rate", CLASS_RATE, "quantum", "200000"]
        await _run("tc", "class", "add", "dev", "lo", "parent", "1:", "classid", classid, *htb)
        tbf = ["tbf", "rate", f"{link.rate_bits}bit", "burst", str(burst), "limit", str(QUEUE_BYTES)]
        await _run("tc", "qdisc", "add", "dev", "lo", "parent", classid, "handle", handle, *tbf)
        match = ["u32", "match", "ip", field, str(port), "0xffff", "flowid", classid]
        await _run("tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", *match)


async def shaped_bytes() -> tuple[int, int]:
    """Bytes the uplink's and the downlink's tbf have sent so far, TCP/IP headers included."""
    qdiscs = json.loads(await _run("tc", "-s", "-j", "qdisc", "show", "dev", "lo"))
    sent = {str(qdisc.get("handle")): int(qdisc.get("bytes", 0)) for qdisc in qdiscs}
    if UPLINK not in sent or DOWNLINK not in sent:
        raise BenchError("the link's tbf qdiscs are gone from lo")
    return sent[UPLINK], sent[DOWNLINK]
