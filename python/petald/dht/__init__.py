"""The Kademlia DHT. The routing table and the iterative lookup are sans-IO state machines in
Rust (`petald._native`); this package drives them over the network (the daemon issue)."""

from petald.dht.routing import ClosestPeersLookup, RoutingTable, peer_key, xor_distance

__all__ = ["ClosestPeersLookup", "RoutingTable", "peer_key", "xor_distance"]
