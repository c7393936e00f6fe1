"""The libp2p layer: the host (TCP, Noise, yamux, identify, ping), the persistent identity,
reachability checks (`dialback`), circuit relay v2 (`relay`), the connection policy every
component dials through (`dialer`) and the echo diagnostic (`echo`). Entry point: `P2PHost`."""

from petald.p2p.config import P2PConfig
from petald.p2p.host import P2PHost
from petald.p2p.identity import default_identity_path, load_or_create_identity

__all__ = ["P2PConfig", "P2PHost", "default_identity_path", "load_or_create_identity"]
