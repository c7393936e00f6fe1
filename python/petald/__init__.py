"""petald: run and fine-tune large language models over a peer-to-peer swarm.

Public API only; importing petald does not import torch (the tensor helpers do, lazily)."""

from importlib.metadata import PackageNotFoundError, version

from petald.dht import ClosestPeersLookup, RoutingTable, peer_key, xor_distance
from petald.errors import (
    CodecError,
    FrameError,
    PeerUnavailable,
    PetaldError,
    RemoteError,
    RoutingError,
    RoutingTableError,
    SessionClosed,
    WireError,
)
from petald.wire import pack, pack_array, pack_chunks, unpack, unpack_array

try:
    __version__ = version("petald")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = [
    "ClosestPeersLookup",
    "CodecError",
    "FrameError",
    "PeerUnavailable",
    "PetaldError",
    "RemoteError",
    "RoutingError",
    "RoutingTable",
    "RoutingTableError",
    "SessionClosed",
    "WireError",
    "__version__",
    "pack",
    "pack_array",
    "pack_chunks",
    "peer_key",
    "unpack",
    "unpack_array",
    "xor_distance",
]
