"""`Recorder`: what a simulated run measures, sampled on the virtual clock while it plays.

- lookups: every lookup any peer finishes (`DhtNode.on_lookup`): its rounds; and probes, one every
  `PROBE_EVERY` seconds from a random peer for a random key, which succeed when the result holds
  the closest live peer on the asker's side of any partition (known here, not to the peers);
- announcement reach: for each server that joins during the phase, the time from its announce
  until 99 % of the peers that were up then (and still are) hold it in their view, in heartbeats;
- view completeness: every minute, the share of (peer, server) pairs, both up for two heartbeats,
  where the peer's view holds the server;
- traffic: messages and bytes each peer sent, per peer-minute of the phase (and the busiest peer);
- memory: the process's RSS growth during the warm-up, per peer."""

from __future__ import annotations

import secrets
import statistics
from typing import TYPE_CHECKING

import trio

from petald.dht.node import kad_key
from petald.sim.swarm import SimPeer, wall_clock

if TYPE_CHECKING:
    from petald.sim.swarm import SimSwarm

PROBE_EVERY = 10.0
SAMPLE_EVERY = 3.0
REACH = 0.99
JUDGED_HEARTBEATS = 4  # a join's reach is judged if it came this long before the phase's end


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class _Join:
    def __init__(self, peer: SimPeer, since: float, pending: set[SimPeer], total: int) -> None:
        self.peer = peer
        self.since = since
        self.pending = pending
        self.total = total
        self.reached_at: float | None = None


class Recorder:
    def __init__(self, swarm: SimSwarm, *, rss_before: int) -> None:
        self.swarm = swarm
        self.rss_before = rss_before
        self.t0: float | None = None
        self.minutes = 0.0
        self.joins: list[_Join] = []
        self.probes: list[tuple[int, bool]] = []  # (rounds, found the closest)
        self.completeness: list[float] = []
        self.peer_seconds = 0.0
        self.events: dict[str, float] = {}
        self._base: dict[object, tuple[int, int]] = {}
        self._memory: dict[str, float] = {}
        self._streams = 0

    def start(self, minutes: float) -> None:
        self.t0 = trio.current_time()
        self.minutes = minutes
        live = self.swarm.live()
        self._memory = {
            "memory_per_peer_kib": round((rss_bytes() - self.rss_before) / len(live) / 1024, 1),
            "table_size_mean": round(statistics.mean(len(p.dht.table) for p in live), 1),
            "records_stored_mean": round(statistics.mean(len(p.dht.store) for p in live), 1),
            "peerstore_size_mean": round(
                statistics.mean(len(p.host.peerstore.peer_ids()) for p in live), 1
            ),
        }
        self._base = {
            p.host: (p.host.traffic.messages, p.host.traffic.bytes)
            for p in self.swarm.peers.values()
        }
        self.swarm.lookups.clear()
        self._streams = self.swarm.net.streams

    def mark(self, event: str) -> None:
        self.events[event] = trio.current_time()

    def track_join(self, peer: SimPeer) -> None:
        if peer.info is not None and self.swarm.nursery is not None:
            self.swarm.nursery.start_soon(self._follow, peer)

    async def _follow(self, peer: SimPeer) -> None:
        await peer.ready.wait()
        others = {p for p in self.swarm.live() if p.ready.is_set() and p is not peer}
        self.joins.append(_Join(peer, trio.current_time(), others, len(others)))

    async def run(self) -> None:
        last_view = last_probe = 0.0
        while True:
            await trio.sleep(SAMPLE_EVERY)
            now = trio.current_time()
            if self.t0 is None:
                continue
            self.peer_seconds += SAMPLE_EVERY * len(self.swarm.live())
            self._sample_reach(now)
            if now - last_view >= 60:
                last_view = now
                self._sample_views(now)
            if now - last_probe >= PROBE_EVERY:
                last_probe = now
                self._probe()

    def _sample_reach(self, now: float) -> None:
        wall = wall_clock()
        for j in self.joins:
            if j.reached_at is not None or not j.peer.host.alive:
                continue
            name = str(j.peer.peer_id)
            for p in list(j.pending):
                entry = p.announcer.view.get(name)
                if not p.host.alive:
                    j.pending.discard(p)
                    j.total -= 1
                elif entry is not None and entry.expires_at > wall:
                    j.pending.discard(p)
            if j.total and len(j.pending) <= (1 - REACH) * j.total:
                j.reached_at = now

    def _sample_views(self, now: float) -> None:
        settled = 2 * self.swarm.announce_config.heartbeat
        wall = wall_clock()
        live = [p for p in self.swarm.live() if p.ready.is_set() and now - p.joined_at > settled]
        servers = [p for p in live if p.info is not None]
        held = total = 0
        for p in live:
            view = p.announcer.view
            for s in servers:
                if s.host.group != p.host.group:
                    continue
                total += 1
                e = view.get(str(s.peer_id))
                held += e is not None and e.expires_at > wall
        if total:
            self.completeness.append(held / total)

    def _probe(self) -> None:
        ready = [p for p in self.swarm.live() if p.ready.is_set()]
        if not ready or ready[0].host.nursery is None:
            return
        asker = self.swarm.rng.choice(ready)
        if asker.host.nursery is not None:
            asker.host.nursery.start_soon(self._one_probe, asker, ready)

    async def _one_probe(self, asker: SimPeer, ready: list[SimPeer]) -> None:
        key = secrets.token_bytes(16)
        target = int.from_bytes(kad_key(key), "big")
        result = await asker.dht.find_peers(key)
        candidates = [
            p for p in ready if p.host.alive and p is not asker and p.host.group == asker.host.group
        ]
        if not candidates:
            return
        best = min(candidates, key=lambda p: int.from_bytes(p.dht.table.local_key, "big") ^ target)
        stats = [s for _, s in self.swarm.lookups if s.key == key]
        rounds = stats[-1].rounds if stats else 0
        self.probes.append((rounds, best.peer_id.to_bytes() in result))

    def finish(self) -> dict:
        assert self.t0 is not None
        rounds = [s.rounds for _, s in self.swarm.lookups if s.rounds > 0]
        heartbeat = self.swarm.announce_config.heartbeat
        # A server that joined in the last JUDGED_HEARTBEATS of the phase had no time to reach
        # anyone: it is counted apart, not as a failure (one churn replacement 10 s before the
        # end made a whole run's p99 infinite). Earlier joins that never reached 99 % are.
        end = self.t0 + self.minutes * 60
        judged = [j for j in self.joins if j.since <= end - JUDGED_HEARTBEATS * heartbeat]
        reach = [
            (j.reached_at - j.since) / heartbeat if j.reached_at is not None else float("inf")
            for j in judged
        ]
        sent = [
            (
                h.traffic.messages - self._base.get(h, (0, 0))[0],
                h.traffic.bytes - self._base.get(h, (0, 0))[1],
            )
            for h in self.swarm.net.hosts.values()
        ]
        peer_minutes = max(self.peer_seconds / 60, 1e-9)
        steady = [
            (p.host.traffic.bytes - self._base[p.host][1]) / self.minutes
            for p in self.swarm.live()
            if p.host in self._base
        ]
        out = {
            "peers": len(self.swarm.live()),
            "servers": len(self.swarm.servers()),
            "simulated_minutes": self.minutes,
            "lookup_rounds_median": statistics.median(rounds) if rounds else None,
            "lookups": len(rounds),
            "lookup_success": round(sum(ok for _, ok in self.probes) / len(self.probes), 4)
            if self.probes
            else None,
            "probes": len(self.probes),
            "announce_p99_heartbeats": round(max(reach), 2) if reach else None,
            "announce_p99_heartbeats_median": round(statistics.median(reach), 2) if reach else None,
            "announce_joins": len(reach),
            "announce_joins_too_late": len(self.joins) - len(judged),
            "view_completeness_min": round(min(self.completeness), 4)
            if self.completeness
            else None,
            "view_completeness_last": round(self.completeness[-1], 4)
            if self.completeness
            else None,
            "view_completeness_mean": round(statistics.mean(self.completeness), 4)
            if self.completeness
            else None,
            "rpcs": self.swarm.net.streams - self._streams,
            "lookups_per_peer_per_min": {
                kind.name.lower(): round(
                    sum(1 for _, s in self.swarm.lookups if s.kind == kind) / peer_minutes, 2
                )
                for kind in {s.kind for _, s in self.swarm.lookups}
            },
            "lookup_queried_mean": round(
                statistics.mean(s.queried for _, s in self.swarm.lookups), 1
            )
            if self.swarm.lookups
            else None,
            "messages_per_peer_per_min": round(sum(m for m, _ in sent) / peer_minutes, 1),
            "bytes_per_peer_per_min": round(sum(b for _, b in sent) / peer_minutes),
            "bytes_per_min_busiest_peer": round(max(steady)) if steady else None,
            **self._memory,
        }
        return out
