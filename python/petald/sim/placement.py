"""The placement scenario: servers without `--blocks` join one after another and each takes the
span `petald serve --num-blocks N` would take (the real `choose_span` over the real
`SwarmView.coverage`), then announces it. Two views of the swarm:

- `full`: each newcomer's view holds every earlier server (what gossip gives when it delivers);
- `dht`: each newcomer is a simulated peer that reads the model's announcements through the real
  DHT path (`Announcer.refresh_from_dht`, as `ServerService._coverage` does) before choosing.

Reported: servers and announced throughput per block, min and max over the model's blocks."""

from __future__ import annotations

import random
import statistics

import trio
import trio.testing

from petald.p2p.swarm_view import ServerEntry, SwarmView
from petald.server.placement import choose_span
from petald.sim.swarm import MODEL, SimSwarm, wall_clock
from petald.types import BlockRange, ServerInfo


def _summary(spans: list[tuple[BlockRange, float]], n_blocks: int) -> dict:
    count = [0] * n_blocks
    throughput = [0.0] * n_blocks
    for span, tp in spans:
        for b in range(span.start, span.end):
            count[b] += 1
            throughput[b] += tp
    return {
        "servers": len(spans),
        "servers_per_block_min": min(count),
        "servers_per_block_max": max(count),
        "servers_per_block_mean": round(statistics.mean(count), 1),
        "throughput_per_block_min": round(min(throughput)),
        "throughput_per_block_max": round(max(throughput)),
        "max_over_min": round(max(count) / min(count), 2) if min(count) else None,
    }


def _info(span: BlockRange, n_blocks: int, throughput: float) -> ServerInfo:
    return ServerInfo(MODEL, span, n_blocks=n_blocks, state="online", throughput=throughput)


def place_full_view(
    servers: int = 300, n_blocks: int = 80, num_blocks: int = 8, *, seed: int = 0
) -> dict:
    """Each newcomer sees every earlier server; throughputs vary 4x (50-200 tokens/s)."""
    rng = random.Random(seed)
    view = SwarmView()
    spans = []
    now = 1.0
    for i in range(servers):
        tp = rng.uniform(50, 200)
        span = choose_span(view.coverage(MODEL, n_blocks, now=now), num_blocks)
        entry = ServerEntry(f"server{i}", _info(span, n_blocks, tp), 0.0, now + 3600, "gossip")
        view.update(entry, now=now)
        spans.append((span, tp))
    return _summary(spans, n_blocks)


async def _place_dht(servers: int, n_blocks: int, num_blocks: int, gap: float, seed: int) -> dict:
    rng = random.Random(seed)
    spans = []
    async with trio.open_nursery() as nursery:
        swarm = SimSwarm(nursery, seed=seed)
        for _ in range(10):  # a few `petald node`s to join through
            await swarm.join().ready.wait()
        for _ in range(servers):
            tp = rng.uniform(50, 200)
            peer = swarm.join()
            await peer.ready.wait()  # joined, and read the model's announcements from the DHT
            coverage = peer.announcer.view.coverage(MODEL, n_blocks, now=wall_clock())
            span = choose_span(coverage, num_blocks)
            peer.info = _info(span, n_blocks, tp)
            peer.announcer.announce(peer.info)
            spans.append((span, tp))
            await trio.sleep(gap)
        seen = [len(p.announcer.view.servers(MODEL, now=wall_clock())) for p in swarm.live()]
        nursery.cancel_scope.cancel()
    return {**_summary(spans, n_blocks), "view_servers_min": min(seen)}


def place_via_dht(
    servers: int = 300, n_blocks: int = 80, num_blocks: int = 8, *, gap: float = 5.0, seed: int = 0
) -> dict:
    """Each newcomer is a simulated peer that reads the DHT before choosing; `gap` seconds
    between two joins (the previous server's put is done well within it)."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(_place_dht, servers, n_blocks, num_blocks, gap, seed, clock=clock)
