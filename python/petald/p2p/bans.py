"""`PeerBans`: peers a host refuses for a while, once throttling did not stop their flood
(petald.dht.flood hands out the bans). `ban(peer, until)` closes the peer's connections now;
until the ban ends, every connection it opens or we open to it is closed as soon as it is
established (a py-libp2p network notifee: its Noise handshake proved who it is), and
`banned(peer, now)` lets a handler refuse it outright. Bounded in the peers it holds.

Entry point: `bans_of(host)`, one registry per host, installed on first use (the DHT and the
gossip validator share it without the stack wiring one through)."""

from __future__ import annotations

import contextlib
import logging
import weakref

import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.peer.id import ID
from multiaddr import Multiaddr

log = logging.getLogger(__name__)

# Bans held at once; past this the one ending first is dropped (a Sybil's many ids each need
# their own flood to be banned, and each is refused by its throttle meanwhile).
MAX_BANS = 4096

_registries: weakref.WeakKeyDictionary[IHost, PeerBans] = weakref.WeakKeyDictionary()


def bans_of(host: IHost) -> PeerBans:
    """The ban registry of `host`, created and installed on its network the first time."""
    bans = _registries.get(host)
    if bans is None:
        bans = _registries[host] = PeerBans(host)
        # The swarm simulation's hosts (petald.sim) have no network to watch: `banned` only.
        if hasattr(host, "get_network"):
            host.get_network().register_notifee(_Refuse(bans))
    return bans


class PeerBans:
    def __init__(self, host: IHost, *, max_bans: int = MAX_BANS) -> None:
        self.host = host
        self.max_bans = max_bans
        self._until: dict[ID, float] = {}  # peer -> trio time its ban ends
        self.refused = 0  # connections closed because their peer was banned

    def banned(self, peer: ID, now: float) -> bool:
        until = self._until.get(peer)
        if until is not None and now >= until:
            del self._until[peer]
            return False
        return until is not None

    def __len__(self) -> int:
        return len(self._until)

    async def ban(self, peer: ID, until: float) -> None:
        """Refuses `peer` until trio time `until`, and closes its connections now."""
        if peer not in self._until and len(self._until) >= self.max_bans:
            del self._until[min(self._until, key=self._until.__getitem__)]
        self._until[peer] = max(until, self._until.get(peer, until))
        log.warning("banned %s for %.0f s (flooding)", peer, until - trio.current_time())
        with contextlib.suppress(Exception):  # already gone
            await self.host.disconnect(peer)


class _Refuse(INotifee):
    """Closes a banned peer's connection as soon as the swarm has it."""

    def __init__(self, bans: PeerBans) -> None:
        self.bans = bans

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        if self.bans.banned(conn.muxed_conn.peer_id, trio.current_time()):
            self.bans.refused += 1
            with contextlib.suppress(Exception):
                await conn.close()

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass
