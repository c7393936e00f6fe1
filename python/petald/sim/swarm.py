"""`SimSwarm`: many peers, each the real petald `DhtNode` and `Announcer` (gossip off: the DHT path
only) over a `SimHost`, joining, leaving without notice and splitting on the simulated network.

A peer runs what a daemon's stack runs after `P2PHost.join()`: the DHT bootstrap (a lookup of
itself) and refresh loop, the announcer's heartbeat (re-reading the model's announcements from the
DHT; a server also re-publishes its own), all inside one cancel scope that `leave` cancels.
Record expiries use the virtual clock (`wall_clock`), so an hour of expiries happens in the
simulated hour. Ed25519 checks are shared by all peers (`VerifiedRecords`): identical bytes give
the identical verdict, and doing them a thousand times over would only measure the CPU of the
machine running the simulation, not the swarm."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from petald.dht.announce import AnnounceConfig, Announcer
from petald.dht.node import DhtConfig, DhtNode, LookupStats
from petald.dht.verified import VerifiedRecords
from petald.p2p.swarm_view import SwarmView
from petald.sim.net import SimHost, SimNetwork
from petald.types import BlockRange, ServerInfo

EPOCH = 1.8e9  # unix seconds at virtual time 0 (any fixed date: records carry absolute expiries)
MODEL = "sim/model-80"
INITIAL_PEERS = 3  # each joining peer connects to this many live peers first


def wall_clock() -> float:
    return EPOCH + trio.current_time()


@dataclass(eq=False)  # by identity: peers go in sets
class SimPeer:
    key_pair: KeyPair
    host: SimHost
    dht: DhtNode
    announcer: Announcer
    info: ServerInfo | None
    joined_at: float = 0.0
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    ready: trio.Event = field(default_factory=trio.Event)

    @property
    def peer_id(self) -> ID:
        return self.host.peer_id


class SimSwarm:
    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        seed: int = 0,
        dht_config: DhtConfig | None = None,
        announce_config: AnnounceConfig | None = None,
        rtt: tuple[float, float] = (0.020, 0.100),
    ) -> None:
        self.nursery = nursery
        self.rng = random.Random(seed)
        self.net = SimNetwork(rtt=rtt, seed=seed)
        self.dht_config = dht_config or DhtConfig()
        self.announce_config = announce_config or AnnounceConfig()
        self.verified = VerifiedRecords(capacity=1 << 20)
        self.peers: dict[ID, SimPeer] = {}
        self.lookups: list[tuple[float, LookupStats]] = []

    def live(self) -> list[SimPeer]:
        return [p for p in self.peers.values() if p.host.alive]

    def servers(self) -> list[SimPeer]:
        return [p for p in self.live() if p.info is not None]

    def _record_lookup(self, stats: LookupStats) -> None:
        self.lookups.append((trio.current_time(), stats))

    def join(self, info: ServerInfo | None = None) -> SimPeer:
        """Starts a new peer (a new identity) that joins through a few live peers; `info`: the
        span it announces (None: a plain `petald node`, which follows the model too)."""
        key_pair = create_new_key_pair(self.rng.randbytes(32))
        peer_id = ID.from_pubkey(key_pair.public_key)
        host = self.net.add(peer_id)
        dht = DhtNode(host, self.dht_config, wall_clock=wall_clock, verified=self.verified)  # type: ignore[arg-type]
        dht.on_lookup = self._record_lookup
        view = SwarmView()
        announcer = Announcer(
            host,  # type: ignore[arg-type]
            dht,
            key_pair,
            view,
            self.announce_config,
            gossip=False,
            wall_clock=wall_clock,
        )
        peer = SimPeer(key_pair, host, dht, announcer, info, joined_at=trio.current_time())
        others = [p for p in self.live() if p.ready.is_set()]
        initial = self.rng.sample(others, min(INITIAL_PEERS, len(others)))
        self.peers[peer_id] = peer
        self.nursery.start_soon(self._run, peer, [p.peer_id for p in initial])
        return peer

    async def _run(self, peer: SimPeer, initial: list[ID]) -> None:
        with peer.scope:
            async with trio.open_nursery() as nursery:
                peer.host.nursery = nursery
                await nursery.start(peer.announcer.run)
                for p in initial:
                    with trio.move_on_after(5):
                        await peer.host.connect(p)
                await nursery.start(peer.dht.run)
                await peer.announcer.watch(MODEL)
                if peer.info is not None:
                    peer.announcer.announce(peer.info)
                peer.ready.set()

    def leave(self, peer: SimPeer) -> None:
        """Without notice: the peer's tasks stop and nobody is told."""
        self.net.leave(peer.peer_id)
        peer.scope.cancel()

    def server_info(self, blocks: BlockRange, n_blocks: int = 80) -> ServerInfo:
        return ServerInfo(
            MODEL,
            blocks,
            n_blocks=n_blocks,
            state="online",
            throughput=100.0,
            addrs=("/ip4/10.0.0.1/tcp/4001",),
        )
