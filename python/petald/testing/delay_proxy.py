"""A TCP proxy that delays every byte by a fixed time in each direction, in order: a WAN link's
latency for benchmarks where the kernel has no `tc netem` (this machine's kernel lacks
sch_netem; `tc qdisc add ... netem` answers "Specified qdisc kind is unknown").

    python -m petald.testing.delay_proxy --delay 0.025 LISTEN_HOST:PORT=TARGET_HOST:PORT ...

Each accepted connection gets one to its target; what arrives on one side is written to the
other `delay` seconds after it arrived (a timer per direction, so throughput is not bounded by
the delay, as on a real long link with large windows). Prints "ready" once listening. Runs
until killed. petald.testing.wan places it between network namespaces."""

from __future__ import annotations

import argparse
import math
import sys
from functools import partial

import trio

# Chunks in flight per direction before the reader waits (bounds the proxy's memory).
MAX_CHUNKS = 1024


async def _pump(src: trio.SocketStream, dst: trio.SocketStream, delay: float) -> None:
    send, recv = trio.open_memory_channel[tuple[float, bytes]](MAX_CHUNKS)

    async def read() -> None:
        async with send:
            while data := await src.receive_some(65536):
                await send.send((trio.current_time() + delay, data))

    async def write() -> None:
        async with recv:
            async for due, data in recv:
                await trio.sleep_until(due)
                await dst.send_all(data)
        await dst.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        nursery.start_soon(write)


async def _relay(target: tuple[str, int], delay: float, client: trio.SocketStream) -> None:
    try:
        async with client, await trio.open_tcp_stream(*target) as upstream:
            for s in (client, upstream):
                s.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump, client, upstream, delay)
                nursery.start_soon(_pump, upstream, client, delay)
    except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        # Either side went away: so does the connection. except*: a reset seen by one pump
        # arrives wrapped in the nurseries' exception groups, and one uncaught would end
        # serve_tcp, i.e. the whole proxy (every later connection refused).
        pass


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def main(delay: float, routes: list[tuple[tuple[str, int], tuple[str, int]]]) -> None:
    async with trio.open_nursery() as nursery:
        for (host, port), target in routes:
            handler = partial(_relay, target, delay)
            await nursery.start(partial(trio.serve_tcp, handler, port, host=host))
        print("ready", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--delay", type=float, required=True, help="seconds, each direction")
    p.add_argument("routes", nargs="+", metavar="LISTEN=TARGET")
    args = p.parse_args()
    if not (0 <= args.delay < 10 and math.isfinite(args.delay)):
        sys.exit("--delay must be in [0, 10) seconds")
    pairs = [r.split("=", 1) for r in args.routes]
    trio.run(main, args.delay, [(_hostport(a), _hostport(b)) for a, b in pairs])
