"""The seams the swarm simulation uses in the real code: `VerifiedRecords` (a record checked once
is not checked again, but still expires and forged bytes still fail) and `DhtNode.on_lookup`."""

from __future__ import annotations

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from petald.dht.node import DhtNode
from petald.dht.records import sign_record
from petald.dht.verified import VerifiedRecords
from petald.errors import RecordError
from petald.sim.net import SimNetwork

NOW = 1.8e9


def key_of(i: int):
    return create_new_key_pair(i.to_bytes(2, "big") * 16)


def test_verified_records_check_once_expire_and_refuse_forgeries() -> None:
    """Catches: a cache that serves an expired record (no expiry check on a hit), one keyed
    loosely enough that tampered bytes pass, or one that verifies every time (no hits)."""
    key_pair = create_new_key_pair(b"\x01" * 32)
    record = sign_record(key_pair.private_key, b"k", b"payload-A", NOW + 10)
    data = record.to_bytes()
    cache = VerifiedRecords(capacity=2)
    assert cache.parse(data, now=NOW) == record
    assert cache.parse(data, now=NOW + 1) == record
    assert (cache.misses, cache.hits) == (1, 1)
    tampered = data.replace(b"payload-A", b"payload-B")
    with pytest.raises(RecordError) as forged:
        cache.parse(tampered, now=NOW)
    assert forged.value.reason == "bad_signature"
    with pytest.raises(RecordError) as late:
        cache.parse(data, now=NOW + 10)
    assert late.value.reason == "expired"
    for i in range(3):  # bounded: the oldest entries go first
        cache.parse(
            sign_record(key_pair.private_key, b"k%d" % i, b"v", NOW + 10).to_bytes(), now=NOW
        )
    assert len(cache) == 2


def test_full_get_answers_sample_different_publishers() -> None:
    """300 publishers' 1 KB records under one key do not fit one answer (~190 do): two answers carry
    different samples, and all of them when few enough fit.

    Catches: answers cut to the newest records (every reader then sees the same ~40 servers of
    a large swarm and never the others: issue 12's simulation, views 47 % complete)."""
    import cbor2

    from petald.dht.node import _bundle

    records = [
        sign_record(key_of(i).private_key, b"k", b"x" * 1000, NOW + i) for i in range(1, 301)
    ]
    first, second = (set(cbor2.loads(_bundle(records))) for _ in range(2))
    assert 100 <= len(first) < 300
    assert first != second
    small = _bundle(records, 10_000)  # what is left beside fat closer peers
    assert len(small) <= 10_000 and len(cbor2.loads(small)) >= 5
    assert len(cbor2.loads(_bundle(records[:5]))) == 5


def test_dht_nodes_share_the_cache_they_are_given() -> None:
    """The simulation gives every node one cache, empty at first. Catches: `verified or
    VerifiedRecords()` (an empty cache has length 0, so it is falsy and each node silently made
    its own: 1,000 peers verified every record 1,000 times and the default scenario did not
    finish in 10 minutes)."""

    async def main() -> None:
        shared = VerifiedRecords()
        net = SimNetwork()
        key_pair = create_new_key_pair(b"\x02" * 32)
        hosts = [
            net.add(ID.from_pubkey(create_new_key_pair(bytes([i]) * 32).public_key)) for i in (3, 4)
        ]
        nodes = [DhtNode(h, verified=shared) for h in hosts]  # type: ignore[arg-type]
        assert all(n.verified is shared for n in nodes)
        data = sign_record(key_pair.private_key, b"k", b"v", NOW + 10).to_bytes()
        nodes[0].verified.parse(data, now=NOW)
        nodes[1].verified.parse(data, now=NOW)
        assert (shared.misses, shared.hits) == (1, 1)

    trio.run(main)
