"""Route planning: which servers a request goes through. Pure code, no I/O, time passed in:
`RoutePlanner.plan_inference` (the chain with the least expected latency, for token-by-token
sessions) and `RoutePlanner.plan_forward` (a randomised chain that spreads training and
one-shot forwards over replicas), both over the live `ServerEntry`s of one model, and
`PeerBans`, the exponential-backoff ban list a client keeps for peers that failed it.

A route is a list of `Hop(peer_id, blocks)` covering the wanted blocks exactly and contiguously;
a hop may start and end anywhere inside its server's span (servers accept any sub-range)."""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from petald.errors import RoutingError
from petald.p2p.swarm_view import ServerEntry
from petald.types import BlockRange


@dataclass(frozen=True)
class Hop:
    peer_id: str
    blocks: BlockRange

    def __str__(self) -> str:
        return f"{self.blocks}@{self.peer_id[-8:]}"


@dataclass(frozen=True)
class RoutingPolicy:
    """What the planner assumes where it has no measurement, and whom it may use."""

    default_rtt: float = 0.05  # seconds per hop for a peer never measured
    default_throughput: float = 100.0  # tokens/s through a span whose server measured nothing
    # Seconds added to a hop whose server lacks the cache tokens a session needs: it will most
    # likely answer "busy", but it stays usable when nothing else serves those blocks.
    cache_penalty: float = 30.0
    # Relative noise on inference hop costs so that equal replicas share sessions.
    jitter: float = 0.05
    allow: frozenset[str] | None = None  # peer ids; None: everyone
    deny: frozenset[str] = frozenset()


def _span_time(entry: ServerEntry, blocks: int, policy: RoutingPolicy) -> float:
    """Seconds per token through `blocks` blocks of this server: the announced throughput is
    for its whole span, so a part of the span takes that fraction of the time."""
    tput = entry.info.throughput if entry.info.throughput > 0 else policy.default_throughput
    return blocks / (tput * len(entry.info.blocks))


class RoutePlanner:
    def __init__(self, policy: RoutingPolicy | None = None, rng: random.Random | None = None):
        self.policy = policy or RoutingPolicy()
        self.rng = rng or random.Random()

    def eligible(
        self, entries: Iterable[ServerEntry], model: str, banned: Collection[str] = ()
    ) -> list[ServerEntry]:
        p = self.policy
        return [
            e
            for e in entries
            if e.info.model == model
            and e.info.state == "online"
            and e.peer_id not in banned
            and e.peer_id not in p.deny
            and (p.allow is None or e.peer_id in p.allow)
        ]

    def _check_coverage(
        self, servers: list[ServerEntry], model: str, blocks: BlockRange, why: str
    ) -> None:
        missing = missing_blocks(servers, blocks)
        if missing:
            text = ", ".join(f"{a}:{b}" for a, b in missing)
            raise RoutingError(
                f"no route through {model} blocks {blocks}: blocks {text} have no online server"
                f"{why}",
                missing=tuple(missing),
            )

    def plan_inference(
        self,
        entries: Iterable[ServerEntry],
        model: str,
        blocks: BlockRange,
        *,
        rtts: Mapping[str, float] | None = None,
        banned: Collection[str] = (),
        cache_tokens: int = 0,
    ) -> list[Hop]:
        """The route with the least expected seconds per step: shortest path over the block
        boundaries start..end, a hop costing its peer's RTT plus its blocks' compute time
        (plus `cache_penalty` if the server lacks `cache_tokens` free)."""
        servers = self.eligible(entries, model, banned)
        self._check_coverage(servers, model, blocks, _why(banned, self.policy))
        rtts = rtts or {}
        p = self.policy
        noise = {e.peer_id: 1.0 + p.jitter * self.rng.random() for e in servers}
        inf = float("inf")
        # best[b]: (cost, hops, previous boundary, peer) of the cheapest route start -> b.
        # Boundaries only increase along a route, so one pass in order is a shortest-path
        # search over this DAG.
        best: dict[int, tuple[float, int, int, str]] = {blocks.start: (0.0, 0, -1, "")}
        for a in range(blocks.start, blocks.end):
            if a not in best:
                continue
            cost_a, hops_a = best[a][0], best[a][1]
            for e in servers:
                span = e.info.blocks
                if not span.start <= a < span.end:
                    continue
                hop_fixed = rtts.get(e.peer_id, p.default_rtt)
                if e.info.cache_tokens_free < cache_tokens:
                    hop_fixed += p.cache_penalty
                for b in range(a + 1, min(span.end, blocks.end) + 1):
                    cost = cost_a + (hop_fixed + _span_time(e, b - a, p)) * noise[e.peer_id]
                    old = best.get(b, (inf, 0, 0, ""))
                    if (cost, hops_a + 1, e.peer_id) < (old[0], old[1], old[3]):
                        best[b] = (cost, hops_a + 1, a, e.peer_id)
        route: list[Hop] = []
        b = blocks.end
        while b != blocks.start:  # coverage was checked: every boundary has a predecessor
            _, _, a, peer = best[b]
            route.append(Hop(peer, BlockRange(a, b)))
            b = a
        return route[::-1]

    def plan_forward(
        self,
        entries: Iterable[ServerEntry],
        model: str,
        blocks: BlockRange,
        *,
        banned: Collection[str] = (),
    ) -> list[Hop]:
        """A random route: from each boundary, one of the servers holding the next block, drawn
        with probability proportional to throughput x blocks it covers from there (load spreads
        by capacity; longer hops save round trips). Goes as far as that server reaches."""
        servers = self.eligible(entries, model, banned)
        self._check_coverage(servers, model, blocks, _why(banned, self.policy))
        route: list[Hop] = []
        a = blocks.start
        while a < blocks.end:  # each hop advances at least one block: bounded by len(blocks)
            here = [e for e in servers if a in e.info.blocks]
            ends = [min(e.info.blocks.end, blocks.end) for e in here]
            weights = [
                (e.info.throughput or self.policy.default_throughput) * (end - a)
                for e, end in zip(here, ends, strict=True)
            ]
            i = self.rng.choices(range(len(here)), weights=weights)[0]
            route.append(Hop(here[i].peer_id, BlockRange(a, ends[i])))
            a = ends[i]
        return route


def _why(banned: Collection[str], policy: RoutingPolicy) -> str:
    parts = []
    if banned:
        parts.append(f"{len(banned)} peers banned after failures")
    if policy.deny:
        parts.append(f"{len(policy.deny)} denied")
    if policy.allow is not None:
        parts.append(f"only {len(policy.allow)} allowed")
    return f" ({', '.join(parts)})" if parts else ""


def missing_blocks(servers: Iterable[ServerEntry], blocks: BlockRange) -> list[tuple[int, int]]:
    """The maximal runs of `blocks` that none of `servers` holds, as (start, end) pairs."""
    covered = [False] * len(blocks)
    for e in servers:
        for b in range(max(e.info.blocks.start, blocks.start), min(e.info.blocks.end, blocks.end)):
            covered[b - blocks.start] = True
    runs: list[tuple[int, int]] = []
    for i, ok in enumerate(covered):
        b = blocks.start + i
        if ok:
            continue
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return runs


@dataclass
class PeerBans:
    """Peers that failed us, each banned for `base` seconds doubling per consecutive failure
    (up to `cap`); a success forgets the strikes. Time is passed in (monotonic seconds)."""

    base: float = 5.0
    cap: float = 300.0
    _until: dict[str, float] = field(default_factory=dict)
    _strikes: dict[str, int] = field(default_factory=dict)
    # peer -> end of a ban the client must not cut short: `hard` or `at_least` (see `firm`)
    _firm: dict[str, float] = field(default_factory=dict)

    def ban(self, peer: str, now: float, *, at_least: float = 0.0, hard: float = 0.0) -> float:
        """Bans `peer`; returns for how many seconds. `at_least` (e.g. a busy server's retry
        time, the peer's own word) is bounded by `cap`; `hard` is not (the client's own
        verdict, e.g. wrong outputs: petald.client.verify). A ban never shortens an earlier
        one that lasts longer."""
        strikes = self._strikes.get(peer, 0) + 1
        self._strikes[peer] = strikes
        seconds = max(min(self.cap, max(at_least, self.base * 2 ** (strikes - 1))), hard)
        self._until[peer] = max(self._until.get(peer, now), now + seconds)
        if hard > 0 or at_least > 0:
            self._firm[peer] = self._until[peer]
        return self._until[peer] - now

    def succeeded(self, peer: str) -> None:
        self._strikes.pop(peer, None)

    def banned(self, now: float) -> set[str]:
        # Expired bans are dropped here, so the table stays as small as the set of bad peers.
        for p in [p for p, t in self._until.items() if t <= now]:
            del self._until[p]
        return set(self._until)

    def firm(self, now: float) -> set[str]:
        """The peers banned by the client's own verdict (`hard`: wrong outputs) or at their
        own word (`at_least`: busy, retry after), not merely for failing."""
        for p in [p for p, t in self._firm.items() if t <= now]:
            del self._firm[p]
        return set(self._firm)
