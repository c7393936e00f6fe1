"""The petald exception tree. Everything petald raises on purpose derives from `PetaldError`;
errors about bad input also derive from the closest built-in (`ValueError`) so callers that
only know the standard library still catch them. The Rust extension raises the classes
defined here (it imports them by name), so there is one tree, not two."""

from __future__ import annotations

__all__ = [
    "BadReply",
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
    """No route through the swarm could be found or kept. `missing` lists the block ranges
    (start, end) nobody usable serves, when that is the reason."""

    def __init__(self, message: str, *, missing: tuple[tuple[int, int], ...] = ()) -> None:
        super().__init__(message)
        self.missing = missing


class RoutingTableError(RoutingError, ValueError):
    """Bad arguments to the Kademlia routing table (peer id length, key length, bucket)."""


class HubUnreachable(PetaldError, ConnectionError):
    """A model was named by a Hugging Face Hub id, but the Hub cannot be reached and the model
    is not in the local cache."""


class PeerUnavailable(PetaldError):
    """A peer could not be reached or stopped answering. `peer` is its id when known;
    `stalled`: it stopped answering on an open stream (its connection may be dead without
    either side knowing, e.g. cut off by a partition)."""

    def __init__(self, message: str = "", *, peer: str = "", stalled: bool = False) -> None:
        super().__init__(message)
        self.peer = peer
        self.stalled = stalled


class SwarmKeyMismatch(PeerUnavailable):
    """The peer is on the other side of a private swarm's key: ours is missing or different
    (or it has none). Retrying cannot help."""


# Error codes a block server answers when the request itself is wrong (shapes, dtypes, limits,
# positions): asking another server would get the same answer, so clients raise them to the
# caller instead of failing over. Every other code (busy, draining, internal) is the server's.
BAD_INPUT_CODES = frozenset(
    {
        "bad_shape",
        "bad_dtype",
        "bad_mask",
        "bad_grad",
        "bad_tensors",
        "bad_positions",
        "bad_codec",
        "bad_batch",
        "bad_length",
        "bad_step",
        "bad_input",
        "bad_named",  # fine-tuning tensors (names, count, dtype, lora_scale)
        "bad_adapter",  # an active_adapter that is no adapter name
        "too_large",
        "too_long",
        "malformed",
    }
)


class RemoteError(PetaldError):
    """A peer answered with an error. `retry_after` (seconds) comes with "busy"."""

    def __init__(
        self, peer: str, code: str, message: str = "", *, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{peer}: {code}" + (f": {message}" if message else ""))
        self.peer = peer
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @property
    def is_bad_input(self) -> bool:
        """The request was wrong, not the server: another server would refuse it too."""
        return self.code in BAD_INPUT_CODES


class BadReply(WireError):
    """A peer's answer does not parse or does not fit the request (shape, dtype, step): the
    peer is broken or hostile, and clients treat it like a failed server."""

    def __init__(self, peer: str, message: str) -> None:
        super().__init__(f"{peer}: bad reply: {message}")
        self.peer = peer


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


class GGUFError(PetaldError, ValueError):
    """A GGUF checkpoint file is malformed or truncated (`petald._native.gguf_index`, or a
    tensor whose bytes lie past the end of the file)."""
