"""`build_stack` / `start_stack`: the one place that assembles a peer's network stack, in the
order py-libp2p needs: protocol handlers and gossipsub before any connection (a peer that
connects earlier is told "protocol not supported" and never meshed), then joining, then the DHT
bootstrap.

Daemons, `petald status`/`dht`, test peers and benchmarks all start their stack through it, so
that order is written once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio
from libp2p.crypto.keys import KeyPair

from petald.dht.announce import AnnounceConfig, Announcer
from petald.dht.node import DhtConfig, DhtNode
from petald.p2p.config import P2PConfig
from petald.p2p.dialer import Dialer
from petald.p2p.host import P2PHost
from petald.p2p.relay import RelayService
from petald.p2p.swarm_view import SwarmView

# Addresses a server's announcement lists (ours, circuit ones first).
MAX_ANNOUNCED_ADDRS = 8


@dataclass
class Stack:
    key_pair: KeyPair
    host: P2PHost
    relay: RelayService
    dialer: Dialer
    dht: DhtNode
    announcer: Announcer | None

    async def start(
        self, nursery: trio.Nursery, *, before_join: Sequence[Callable[..., Awaitable[None]]] = ()
    ) -> Stack:
        """Starts every service in `nursery`, joins the initial peers, bootstraps the DHT.
        `before_join` holds extra services (`run(task_status=...)`) that must be running
        before the first connection."""
        await nursery.start(self.host.run)
        await nursery.start(self.relay.run)
        await nursery.start(self.dialer.run)
        for service in before_join:
            await nursery.start(service)
        if self.announcer is not None:
            await nursery.start(self.announcer.run)
        await self.host.join()
        await nursery.start(self.dht.run)
        return self


def build_stack(
    key_pair: KeyPair,
    config: P2PConfig,
    *,
    dht_config: DhtConfig | None = None,
    announce_config: AnnounceConfig | None = None,
    announcements: bool = True,
    offer_hop: bool = False,
) -> Stack:
    """Constructs (without starting) a peer's stack; register extra protocol handlers on
    `stack.host.host` before `await stack.start(nursery)`."""
    host = P2PHost(key_pair, config)
    announcer: Announcer | None = None

    def addrs_changed(circuit_addrs: list[str]) -> None:
        host.set_circuit_addrs(circuit_addrs)
        if announcer is not None:  # a server's announcement carries its addresses
            announcer.readdress(tuple(host.addrs()[:MAX_ANNOUNCED_ADDRS]))

    relay = RelayService(host.host, offer_hop=offer_hop, on_addrs_changed=addrs_changed)
    dialer = Dialer(host.host, relay.transport)
    dht = DhtNode(host.host, dht_config, dialer=dialer)
    if announcements:
        announcer = Announcer(host.host, dht, key_pair, SwarmView(), announce_config)
    return Stack(key_pair, host, relay, dialer, dht, announcer)


async def start_stack(
    nursery: trio.Nursery, key_pair: KeyPair, config: P2PConfig, **kw: object
) -> Stack:
    """`build_stack(...)` then `start(nursery)`: for peers that add no protocols of their own."""
    return await build_stack(key_pair, config, **kw).start(nursery)  # type: ignore[arg-type]
