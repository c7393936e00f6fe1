"""The petald exception tree. Everything petald raises on purpose derives from `PetaldError`;
errors about bad input also derive from the closest built-in (`ValueError`) so callers that
only know the standard library still catch them. The Rust extension raises the classes
defined here (it imports them by name), so there is one tree, not two."""

from __future__ import annotations

__all__ = [
    "CodecError",
    "FrameError",
    "HubUnreachable",
    "MessageError",
    "PeerUnavailable",
    "PetaldError",
    "RecordError",
    "RemoteError",
    "RoutingError",
    "RoutingTableError",
    "SessionClosed",
    "WireError",
]


class PetaldError(Exception):
    """Base class of every error petald raises on purpose."""


class WireError(PetaldError):
    """Bytes from a peer that do not parse or do not validate."""


class FrameError(WireError, ValueError):
    """A tensor frame is malformed: bad magic or version, checksum, sizes, chunk order."""


class CodecError(WireError, ValueError):
    """A codec name is unknown, does not fit the tensor's dtype, or its payload is corrupt."""


class RoutingError(PetaldError):
    """No route through the swarm could be found or kept."""


class RoutingTableError(RoutingError, ValueError):
    """Bad arguments to the Kademlia routing table (peer id length, key length, bucket)."""


class HubUnreachable(PetaldError, ConnectionError):
    """A model was named by a Hugging Face Hub id, but the Hub cannot be reached and the model
    is not in the local cache."""


class PeerUnavailable(PetaldError):
    """A peer could not be reached or stopped answering."""


class RemoteError(PetaldError):
    """A peer answered with an error."""

    def __init__(self, peer: str, code: str, message: str = "") -> None:
        super().__init__(f"{peer}: {code}" + (f": {message}" if message else ""))
        self.peer = peer
        self.code = code
        self.message = message


class SessionClosed(PetaldError):
    """The session was closed (by us, the peer or a timeout) and takes no more steps."""


class MessageError(WireError, ValueError):
    """A DHT message from a peer is malformed: bad length prefix, protobuf, enum or limits."""


class RecordError(WireError, ValueError):
    """A signed DHT record is malformed, forged, tampered with, expired or too large.
    `reason` is a `petald.dht.records.RejectReason` value, for the daemon's counters."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason
