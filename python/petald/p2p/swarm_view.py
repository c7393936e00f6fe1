"""`SwarmView`: what this peer knows of the servers in the swarm, merged from gossip and the DHT.

Both sources deliver the same signed announcements; the view keeps, per server, the one with the
newest publication time and forgets a server when its announcement expires (the publisher signs
an expiry a few heartbeats ahead, so a server that dies silently disappears on its own). Pure
state, time passed in: the gossip and DHT services feed it, routing and `petald status` read it."""

from __future__ import annotations

from dataclasses import dataclass

from petald.types import BlockRange, ServerInfo, ServerState


@dataclass(frozen=True)
class ServerEntry:
    peer_id: str
    info: ServerInfo
    published_at: float  # the publisher's clock, unix seconds (orders its own announcements)
    expires_at: float  # unix seconds, signed by the publisher
    source: str  # "gossip" or "dht": where the newest copy came from


class SwarmView:
    """Servers by peer id. Not thread-safe: lives on the trio loop."""

    def __init__(self) -> None:
        self._servers: dict[str, ServerEntry] = {}

    def update(self, entry: ServerEntry, *, now: float) -> bool:
        """Takes `entry` if it is newer than what we have and not expired. True if it changed
        the view (a caller may re-announce or log)."""
        if entry.expires_at <= now:
            return False
        old = self._servers.get(entry.peer_id)
        if old is not None and old.published_at >= entry.published_at:
            return False
        self._servers[entry.peer_id] = entry
        return True

    def remove(self, peer_id: str) -> bool:
        return self._servers.pop(peer_id, None) is not None

    def expire(self, now: float) -> list[str]:
        gone = [p for p, e in self._servers.items() if e.expires_at <= now]
        for p in gone:
            del self._servers[p]
        return gone

    def __len__(self) -> int:
        return len(self._servers)

    def get(self, peer_id: str) -> ServerEntry | None:
        return self._servers.get(peer_id)

    def servers(self, model: str | None = None, *, now: float) -> list[ServerEntry]:
        """Live servers (of `model`, if given), by peer id."""
        return sorted(
            (
                e
                for e in self._servers.values()
                if e.expires_at > now and (model is None or e.info.model == model)
            ),
            key=lambda e: e.peer_id,
        )

    def models(self, *, now: float) -> list[str]:
        return sorted({e.info.model for e in self.servers(now=now)})

    def servers_for_block(
        self,
        model: str,
        block: int,
        *,
        now: float,
        states: tuple[ServerState, ...] = ("online",),
    ) -> list[ServerEntry]:
        """Who serves block `block` of `model`, in one of `states`."""
        return [
            e
            for e in self.servers(model, now=now)
            if block in e.info.blocks and e.info.state in states
        ]

    def coverage(self, model: str, n_blocks: int, *, now: float) -> list[float]:
        """Announced throughput per block of `model` (0.0: nobody online serves it)."""
        cover = [0.0] * n_blocks
        for e in self.servers(model, now=now):
            if e.info.state != "online":
                continue
            for b in range(e.info.blocks.start, min(e.info.blocks.end, n_blocks)):
                # A server with no measurement yet still counts: it serves the block.
                cover[b] += max(e.info.throughput, 1e-9)
        return cover

    def least_served(self, model: str, n_blocks: int, span: int, *, now: float) -> BlockRange:
        """The `span` consecutive blocks whose weakest block has the least throughput (ties:
        the lowest total, then the first) — where a new server helps most."""
        if not 1 <= span <= n_blocks:
            raise ValueError(f"cannot place {span} blocks in a model of {n_blocks}")
        cover = self.coverage(model, n_blocks, now=now)
        best = min(
            range(n_blocks - span + 1),
            key=lambda s: (min(cover[s : s + span]), sum(cover[s : s + span]), s),
        )
        return BlockRange(best, best + span)
