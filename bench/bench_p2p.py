"""Benchmarks of the p2p layer, each against a baseline measured in the same run.

1. DHT get latency in a 16-daemon loopback swarm (real `petald node` processes), from a client
   that joined through one daemon, against a single direct GET_VALUE round trip to one daemon.
2. Time for a new server's announcement to reach every peer of a 12-peer in-process swarm
   (real gossipsub + DHT), against the swarm's gossip heartbeat.
3. 16 KiB stream round trip over a libp2p connection (Noise + yamux) against a raw trio TCP
   socket on the same machine: the ratio is the cost of the secure, multiplexed stack.

Run: `just bench` (or `.venv/bin/python bench/bench_p2p.py`). Takes ~2 minutes."""

from __future__ import annotations

import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from petald.dht.announce import AnnounceConfig
from petald.dht.node import DhtConfig, DhtNode
from petald.dht.records import sign_record
from petald.p2p.config import P2PConfig
from petald.p2p.host import P2PHost
from petald.stack import start_stack
from petald.testing import start_swarm, stop_all
from petald.types import BlockRange, ServerInfo
from petald.wire.kad_messages import KadMessage, MessageType

ECHO = TProtocol("/petald/bench-echo/1.0.0")
PAYLOAD = 16 * 1024


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def client_peer(nursery: trio.Nursery, initial: list[str], *, serve: bool = False):
    key = create_new_key_pair()
    host = P2PHost(
        key,
        P2PConfig(
            listen=("/ip4/127.0.0.1/tcp/0",), initial_peers=tuple(initial), new_swarm=not initial
        ),
    )
    dht = DhtNode(host.host, DhtConfig(client_mode=not serve, rpc_timeout=5.0))
    await nursery.start(host.run)
    return key, host, dht


async def bench_dht(swarm_addrs: list[str], peer_ids: list[str]) -> None:
    async with trio.open_nursery() as nursery:
        key, host, dht = await client_peer(nursery, [swarm_addrs[0]])
        await host.join()
        await nursery.start(dht.run)
        keys = [f"bench/key/{i}".encode() for i in range(30)]
        for k in keys:
            await dht.put(sign_record(key.private_key, k, b"x" * 200, time.time() + 600))
        gets = []
        for k in keys:
            t0 = time.perf_counter()
            found = await dht.get(k)
            gets.append(time.perf_counter() - t0)
            assert found, k
        direct = []
        target = ID.from_base58(peer_ids[0])
        for k in keys:
            t0 = time.perf_counter()
            await dht.rpc.request(target, KadMessage(MessageType.GET_VALUE, key=k))
            direct.append(time.perf_counter() - t0)
        g, d = statistics.median(gets), statistics.median(direct)
        print(
            f"DHT get (iterative, 16 daemons): p50 {g * 1e3:.1f} ms"
            f"  p90 {pct(gets, 0.9) * 1e3:.1f} ms"
        )
        print(
            f"one GET_VALUE round trip:        p50 {d * 1e3:.1f} ms"
            f"   -> a get costs {g / d:.1f}x one RPC"
        )
        nursery.cancel_scope.cancel()


async def bench_announce(n: int = 12) -> None:
    fast = AnnounceConfig(heartbeat=2.0, ttl=8.0)
    async with trio.open_nursery() as nursery:
        peers = []
        for _ in range(n):
            initial = [peers[0][1].addrs()[0]] if peers else []
            config = P2PConfig(
                listen=("/ip4/127.0.0.1/tcp/0",),
                initial_peers=tuple(initial),
                new_swarm=not initial,
            )
            key = create_new_key_pair()
            stack = await start_stack(nursery, key, config, announce_config=fast)
            peers.append((key, stack.host, stack.dht, stack.announcer))
            await stack.announcer.watch("bench-model")
        _new_key, new_host, _, new_ann = peers[-1]
        info = ServerInfo(
            model="bench-model", blocks=BlockRange(0, 8), state="online", throughput=1.0
        )
        t0 = trio.current_time()
        new_ann.announce(info)
        arrivals = []
        for _, _, _, ann in peers:
            await ann.wait_until(lambda v: v.get(new_host.peer_id) is not None, timeout=60)
            arrivals.append(trio.current_time() - t0)
        print(
            f"announcement reached all {n} peers in {max(arrivals) * 1e3:.0f} ms "
            f"(median peer {statistics.median(arrivals) * 1e3:.0f} ms); gossip heartbeat "
            f"{fast.heartbeat:.0f} s -> {max(arrivals) / fast.heartbeat:.2f} heartbeats"
        )
        nursery.cancel_scope.cancel()


async def echo_handler(stream) -> None:
    try:
        while True:
            data = await stream.read(65536)
            if not data:
                break
            await stream.write(data)
    finally:
        await stream.close()


async def bench_rtt(rounds: int = 300) -> None:
    payload = b"\xab" * PAYLOAD
    async with trio.open_nursery() as nursery:
        _, a, _ = await client_peer(nursery, [])
        a.host.set_stream_handler(ECHO, echo_handler)
        _, b, _ = await client_peer(nursery, [a.addrs()[0]])
        await b.join()
        stream = await b.host.new_stream(a.host.get_id(), [ECHO])
        p2p = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            await stream.write(payload)
            got = 0
            while got < PAYLOAD:
                got += len(await stream.read(PAYLOAD - got))
            p2p.append(time.perf_counter() - t0)

        async def tcp_echo(s: trio.SocketStream) -> None:
            async for data in s:
                await s.send_all(data)

        listeners = await nursery.start(partial(trio.serve_tcp, tcp_echo, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        raw = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            await sock.send_all(payload)
            got = 0
            while got < PAYLOAD:
                got += len(await sock.receive_some(PAYLOAD - got))
            raw.append(time.perf_counter() - t0)
        lp, lr = statistics.median(p2p), statistics.median(raw)
        print(
            f"16 KiB round trip: libp2p (Noise+yamux) p50 {lp * 1e3:.2f} ms"
            f" p99 {pct(p2p, 0.99) * 1e3:.2f} ms; raw trio TCP p50 {lr * 1e3:.2f} ms"
            f" p99 {pct(raw, 0.99) * 1e3:.2f} ms -> {lp / lr:.1f}x"
        )
        nursery.cancel_scope.cancel()


def main() -> None:
    print("== p2p benchmarks (loopback)")
    trio.run(bench_rtt)
    trio.run(bench_announce)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        swarm = start_swarm(16, Path(tmp))
        print(f"16 daemons ready in {time.perf_counter() - t0:.1f} s")
        try:
            trio.run(bench_dht, [d.addr for d in swarm], [d.peer_id for d in swarm])
        finally:
            stop_all(swarm)


if __name__ == "__main__":
    main()
