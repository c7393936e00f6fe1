"""petald: run and fine-tune large language models over a peer-to-peer swarm.

Public API only; importing petald does not import torch (the tensor helpers do, lazily, and
the distributed models are imported on first use: `petald.AutoDistributedModelForCausalLM`)."""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

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

# Loaded on first access (they import torch and transformers).
_LAZY = {
    "AutoDistributedModelForCausalLM",
    "AutoDistributedModelForSequenceClassification",
    "DistributedModelForCausalLM",
    "DistributedModelForSequenceClassification",
    "RemoteCache",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import petald.models

        return getattr(petald.models, name)
    raise AttributeError(f"module 'petald' has no attribute {name!r}")


__all__ = [
    "AutoDistributedModelForCausalLM",
    "AutoDistributedModelForSequenceClassification",
    "ClosestPeersLookup",
    "CodecError",
    "DistributedModelForCausalLM",
    "DistributedModelForSequenceClassification",
    "FrameError",
    "PeerUnavailable",
    "PetaldError",
    "RemoteCache",
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
