"""Kademlia routing state: the k-bucket table and the closest-peers lookup, both in Rust.

Peers are named by their binary libp2p peer id (`PeerID.to_bytes()`); their Kademlia key is the
SHA-256 of those bytes (`peer_key`). Time is passed in as monotonic seconds (`trio.current_time()`
in the daemon), never read from a clock inside, so the logic is deterministic under test."""

from __future__ import annotations

from petald._native import ClosestPeersLookup, RoutingTable, peer_key
from petald._native import xor_distance as _xor_distance

__all__ = ["ClosestPeersLookup", "RoutingTable", "peer_key", "xor_distance"]


def xor_distance(a: bytes, b: bytes) -> int:
    """The XOR distance of two 32-byte keys as an int (Kademlia §2.1)."""
    return int.from_bytes(_xor_distance(a, b), "big")
