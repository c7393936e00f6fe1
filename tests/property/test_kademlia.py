"""XOR-metric laws (Kademlia §2.1) and the routing table's closest() against a brute-force sort,
on random tables built through the Python API."""

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from petald.dht import ClosestPeersLookup, RoutingTable, peer_key, xor_distance

keys = st.binary(min_size=32, max_size=32)
peer_ids = st.binary(min_size=1, max_size=64)


@given(keys, keys, keys)
def test_xor_metric_laws(x: bytes, y: bytes, z: bytes) -> None:
    assert xor_distance(x, x) == 0
    assert xor_distance(x, y) == xor_distance(y, x)
    assert (xor_distance(x, y) == 0) == (x == y)
    assert xor_distance(x, z) <= xor_distance(x, y) + xor_distance(y, z)
    # Unidirectionality: for a given x and distance there is exactly one y.
    assert xor_distance(x, y) ^ xor_distance(y, z) == xor_distance(x, z)


@given(peer_ids)
def test_peer_key_is_sha256(peer: bytes) -> None:
    assert peer_key(peer) == hashlib.sha256(peer).digest()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(peer_ids, min_size=0, max_size=300, unique=True),
    st.lists(keys, min_size=1, max_size=5),
    st.integers(0, 40),
    st.sampled_from([2, 20, 10_000]),
    st.data(),
)
def test_closest_agrees_with_brute_force(
    peers: list[bytes], targets: list[bytes], n: int, k: int, data: st.DataObject
) -> None:
    local = b"local-peer"
    table = RoutingTable(local, k=k, now=0.0)
    for p in peers:
        table.update(p, 1.0)
    removed = data.draw(st.lists(st.sampled_from(peers), max_size=20)) if peers else []
    for p in removed:
        table.remove(p)
    members = [p for p in peers if p in table and p != local]
    assert len(members) == len(table)
    for t in targets:
        want = sorted(members, key=lambda p: xor_distance(peer_key(p), t))[:n]
        assert table.closest(t, n) == want


def test_lookup_finds_the_true_closest_in_a_simulated_swarm() -> None:
    peers = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(300)]
    # Each peer answers with the true 20 closest it knows among all peers.
    full = RoutingTable(b"oracle", k=10_000)
    for p in peers:
        full.update(p, 0.0)
    target = peer_key(b"some block")
    lookup = ClosestPeersLookup(target, peers[:3], local_peer=None)
    for step_no in range(10_000):
        step, peer = lookup.next(float(step_no))
        if step == "finished":
            break
        assert step == "query" and peer is not None
        lookup.on_success(peer, full.closest(target, 20), float(step_no))
    assert lookup.is_finished
    assert lookup.result() == full.closest(target, 20)
