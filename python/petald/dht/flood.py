"""`PeerThrottle`: flood control per peer — a token bucket for the rate, strikes for what it
sent beyond the rate or invalid, and a ban for a while once the strikes add up within one
`strike_window` (an honest peer's rare refusals, days apart, never add up to a ban). Sans-IO
(`now` is passed in) and bounded in the peers it tracks. Its callers turn its ban into the
host's (petald.p2p.bans: disconnected, its connections refused until the ban ends).

Used by the DHT's RPC layer for PUT_VALUE (`PUT_THROTTLE`: an honest server puts its
announcement to the k closest peers once per heartbeat, so a peer putting many records a
second is filling our store) and by the announcement gossip's validator for invalid
announcements (`GOSSIP_THROTTLE`: honest peers validate before forwarding, so a forwarder of
many invalid ones is hostile or broken). Entry point: `allow(peer, now)` / `strike(peer, now)`."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True)
class ThrottleConfig:
    rate: float  # sustained events per second
    burst: float  # events allowed at once
    strikes_to_ban: int  # events refused or invalid before the ban, within strike_window
    ban_seconds: float
    strike_window: float = 60.0  # seconds; strikes older than this are forgotten


# DHT puts: a server republishes one announcement per heartbeat (30 s) per model; 1 per second
# sustained and 32 at once is far above that, and bounds a flood to 3,600 records an hour per
# peer (the store holds 4,096 keys, petald.dht.records).
PUT_THROTTLE = ThrottleConfig(rate=1.0, burst=32, strikes_to_ban=64, ban_seconds=600.0)
# Gossip: invalid announcements one forwarder may relay within a minute; a few come from clocks
# that disagree (an expiry already past), sixteen do not. It must stay below what gossipsub's own
# peer score lets through before it drops a peer's messages unvalidated (measured: 32 invalid
# ones in a burst), or a flooder is throttled but never banned.
GOSSIP_THROTTLE = ThrottleConfig(rate=1.0, burst=32, strikes_to_ban=16, ban_seconds=600.0)
# Peers tracked at once: past this the idlest entry is forgotten (a Sybil's many ids each get a
# fresh bucket; the per-peer bound is the point, the store's own bounds cap the total).
MAX_TRACKED_PEERS = 4096


@dataclass
class _Peer:
    tokens: float
    updated: float
    strikes: int = 0
    banned_until: float = 0.0
    window_start: float = 0.0  # when the strikes being counted began


class PeerThrottle:
    def __init__(self, config: ThrottleConfig, *, max_peers: int = MAX_TRACKED_PEERS) -> None:
        self.config = config
        self.max_peers = max_peers
        self._peers: dict[Hashable, _Peer] = {}
        self.bans = 0  # how many bans were handed out (for status and tests)

    def banned(self, peer: Hashable, now: float) -> bool:
        p = self._peers.get(peer)
        return p is not None and now < p.banned_until

    def allow(self, peer: Hashable, now: float) -> bool:
        """Whether `peer` may do one more event now; a refusal is a strike."""
        p = self._get(peer, now)
        if now < p.banned_until:
            return False
        p.tokens = min(self.config.burst, p.tokens + (now - p.updated) * self.config.rate)
        p.updated = now
        if p.tokens >= 1:
            p.tokens -= 1
            return True
        self._strike(p, now)
        return False

    def strike(self, peer: Hashable, now: float) -> bool:
        """Counts something invalid from `peer`; returns whether it is banned now."""
        p = self._get(peer, now)
        self._strike(p, now)
        return now < p.banned_until

    def _strike(self, p: _Peer, now: float) -> None:
        if now - p.window_start > self.config.strike_window:
            p.strikes, p.window_start = 0, now
        p.strikes += 1
        if p.strikes >= self.config.strikes_to_ban and now >= p.banned_until:
            p.banned_until = now + self.config.ban_seconds
            p.strikes = 0  # after the ban, a clean slate
            self.bans += 1

    def _get(self, peer: Hashable, now: float) -> _Peer:
        p = self._peers.get(peer)
        if p is None:
            if len(self._peers) >= self.max_peers:
                # Forget the peer seen least recently, a banned one only if all are banned.
                idle = min(
                    self._peers.items(),
                    key=lambda q: (now < q[1].banned_until, q[1].updated),
                )
                del self._peers[idle[0]]
            p = self._peers[peer] = _Peer(tokens=self.config.burst, updated=now)
        return p
