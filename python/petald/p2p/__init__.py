"""The libp2p layer: the host (TCP, Noise, yamux, identify, ping), the persistent identity,
and (next) gossip announcements and circuit relay. Entry point: `P2PHost`."""

from petald.p2p.config import P2PConfig
from petald.p2p.host import P2PHost
from petald.p2p.identity import default_identity_path, load_or_create_identity

__all__ = ["P2PConfig", "P2PHost", "default_identity_path", "load_or_create_identity"]
