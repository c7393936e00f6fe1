"""SwarmView: newest announcement wins, expiry, block queries and least-served placement."""

import pytest

from petald.p2p.swarm_view import ServerEntry, SwarmView
from petald.types import BlockRange, ServerInfo


def entry(
    peer: str, start: int, end: int, *, t: float = 0.0, ttl: float = 60.0, **kw: object
) -> ServerEntry:
    info = ServerInfo(model="m", blocks=BlockRange(start, end), **{"state": "online", **kw})  # type: ignore[arg-type]
    return ServerEntry(peer, info, published_at=t, expires_at=t + ttl, source="gossip")


def test_newest_wins_and_stale_is_ignored() -> None:
    v = SwarmView()
    assert v.update(entry("a", 0, 4, t=10), now=10)
    assert not v.update(entry("a", 0, 8, t=5), now=10)  # older copy, e.g. from the DHT
    assert v.get("a").info.blocks == BlockRange(0, 4)
    assert v.update(entry("a", 0, 8, t=11), now=11)
    assert v.get("a").info.blocks == BlockRange(0, 8)


def test_expired_entries_vanish() -> None:
    v = SwarmView()
    v.update(entry("a", 0, 4, t=0, ttl=30), now=0)
    v.update(entry("b", 4, 8, t=0, ttl=90), now=0)
    assert [e.peer_id for e in v.servers(now=40)] == ["b"]
    assert v.expire(now=40) == ["a"]
    assert not v.update(entry("c", 0, 1, t=0, ttl=10), now=20)  # already expired on arrival


def test_block_queries_and_states() -> None:
    v = SwarmView()
    v.update(entry("a", 0, 4, throughput=10.0), now=0)
    v.update(entry("b", 2, 6, throughput=5.0), now=0)
    v.update(entry("c", 0, 6, state="joining"), now=0)
    assert [e.peer_id for e in v.servers_for_block("m", 3, now=1)] == ["a", "b"]
    assert [e.peer_id for e in v.servers_for_block("m", 3, now=1, states=("joining",))] == ["c"]
    assert v.coverage("m", 8, now=1) == [10.0, 10.0, 15.0, 15.0, 5.0, 5.0, 0.0, 0.0]
    assert v.least_served("m", 8, 2, now=1) == BlockRange(6, 8)
    assert v.least_served("m", 8, 8, now=1) == BlockRange(0, 8)
    assert v.models(now=1) == ["m"]
    with pytest.raises(ValueError):
        v.least_served("m", 8, 9, now=1)
