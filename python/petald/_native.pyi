"""Stubs for `petald._native`, the Rust extension (crates/petald-py over crates/petald-core).

Byte arguments accept any C-contiguous buffer-protocol object (bytes, bytearray, memoryview,
numpy arrays of any dtype) and are read without copying. Errors are the classes of
`petald.errors`: `FrameError` and `CodecError` (both `ValueError`) for frames and codecs,
`RoutingTableError` (a `ValueError`) for Kademlia arguments."""

from collections.abc import Sequence
from typing import Any, Final, Literal, Self, final

from typing_extensions import Buffer

__all__ = [
    "CHUNK_HEADER_LEN",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_TENSOR_BYTES",
    "FRAME_VERSION",
    "KEY_LEN",
    "MAX_CHUNK_SIZE",
    "MAX_PEER_ID_LEN",
    "MIN_CHUNK_SIZE",
    "ClosestPeersLookup",
    "DecodedTensor",
    "FrameDecoder",
    "RoutingTable",
    "canonical_codec",
    "decode",
    "dtype_names",
    "encode",
    "encode_chunks",
    "peer_key",
    "xor_distance",
]

FRAME_VERSION: Final[int]
"""Version byte of the petald tensor frame this build writes and reads."""
DEFAULT_CHUNK_SIZE: Final[int]
"""Default chunk body size in bytes (4 MiB)."""
MIN_CHUNK_SIZE: Final[int]
MAX_CHUNK_SIZE: Final[int]
DEFAULT_MAX_TENSOR_BYTES: Final[int]
"""Default cap on a decoded tensor's size (1 GiB)."""
CHUNK_HEADER_LEN: Final[int]
KEY_LEN: Final[int]
"""Kademlia keys are 32 bytes (SHA-256 of the peer id)."""
MAX_PEER_ID_LEN: Final[int]

def encode(
    data: Buffer,
    dtype: str,
    shape: Sequence[int],
    codec: str = "none",
    chunk_size: int = ...,
) -> bytes:
    """Frame the raw little-endian bytes of a tensor of `dtype` and `shape` with `codec`.

    `codec` is "none", "zstd[:LEVEL]", "fp16", "bf16", "int8" (blocks of 64), "int8-256", or a
    lossy codec joined to zstd with "+" ("int8+zstd:3"). The GIL is released while encoding."""

def encode_chunks(
    data: Buffer,
    dtype: str,
    shape: Sequence[int],
    codec: str = "none",
    chunk_size: int = ...,
) -> list[bytes]:
    """Like `encode`, but return the frame's chunks separately (to write one by one)."""

def decode(
    frame: Buffer,
    max_tensor_bytes: int = ...,
    max_chunk_body: int = ...,
) -> DecodedTensor:
    """Validate and decode exactly one frame. Nothing is allocated from lengths in the frame
    before they are checked against the limits and the bytes present."""

def canonical_codec(spec: str) -> str:
    """Validate a codec spec and return its canonical spelling ("zstd" -> "zstd:3")."""

def dtype_names() -> list[str]:
    """The dtypes a frame can carry, spelled as torch spells them."""

def gguf_index(
    data: Buffer,
) -> tuple[int, dict[str, Any], list[tuple[str, int, tuple[int, ...], int]], int]:
    """Parses the header of a GGUF file (versions 2 and 3) held in `data` (e.g. an mmap of the
    file): (version, metadata, tensors as (name, ggml type code, dims innermost first, absolute
    byte offset), start of the data section). Raises GGUFError on a malformed header."""

GGUF_DEQUANT_TYPES: Final[tuple[int, int, int]]
"""ggml type codes `gguf_dequantize` takes: Q4_0, Q4_1, Q8_0."""

def gguf_dequantize(ggml_type: int, data: Buffer) -> bytearray:
    """f32 weights (native byte order) of `data`, whole blocks of `ggml_type`, computed as the
    `gguf` package's numpy code does, bit for bit. Raises GGUFError on another type or a
    partial block."""

@final
class DecodedTensor:
    """A decoded tensor: `data` is a memoryview into the frame when no decoding was needed
    (one chunk, codec "none"), else a new bytearray."""

    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def codec(self) -> str: ...
    @property
    def data(self) -> memoryview | bytearray: ...

@final
class FrameDecoder:
    """Incremental decoder for one frame arriving in pieces of any size. Memory grows with
    the bytes received, never with sizes a peer declares. After an error it stays failed."""

    def __new__(cls, max_tensor_bytes: int = ..., max_chunk_body: int = ...) -> Self: ...
    def feed(self, data: Buffer) -> int:
        """Consume bytes of this frame; return how many (it stops at the frame's end)."""

    @property
    def is_complete(self) -> bool: ...
    def finish(self) -> DecodedTensor:
        """Decode the completed frame; raises `FrameError` if it is incomplete."""

def peer_key(peer: bytes) -> bytes:
    """SHA-256 of a binary peer id: its 32-byte Kademlia key."""

def xor_distance(a: bytes, b: bytes) -> bytes:
    """XOR of two 32-byte keys, big-endian."""

@final
class RoutingTable:
    """Kademlia k-buckets (LRS order, replacement cache, stale eviction) with fast closest-peer
    queries. Sans-IO: the caller passes `now` (monotonic seconds) and performs the pings."""

    def __new__(
        cls,
        local_peer: bytes,
        *,
        k: int = 20,
        replacement_cache_size: int | None = None,
        stale_after_failures: int = 5,
        refresh_interval: float = 3600.0,
        now: float = 0.0,
    ) -> Self: ...
    @property
    def local_key(self) -> bytes: ...
    @property
    def k(self) -> int: ...
    def update(
        self, peer: bytes, now: float
    ) -> tuple[Literal["inserted", "refreshed", "ignored", "pending"], bytes | None]:
        """Record that `peer` was seen alive; ("pending", lrs_peer) asks the caller to ping
        the least-recently-seen entry of a full bucket."""

    def on_failure(
        self, peer: bytes, now: float
    ) -> tuple[Literal["evicted", "kept", "unknown"], bytes | None, int]:
        """Record that `peer` did not answer: (outcome, promoted replacement, failures)."""

    def remove(self, peer: bytes) -> bool: ...
    def __contains__(self, peer: bytes, /) -> bool: ...
    def __len__(self) -> int: ...
    def closest(self, target: bytes, n: int) -> list[bytes]:
        """The `n` peers nearest to the 32-byte key `target`, nearest first."""

    def bucket_entries(self, index: int) -> list[bytes]:
        """Bucket `index`'s peers, least recently seen first."""

    def replacements(self, index: int) -> list[bytes]:
        """Bucket `index`'s replacement cache, most recently seen first."""

    def bucket_sizes(self) -> list[tuple[int, int]]:
        """(index, entry count) of each non-empty bucket."""

    def buckets_to_refresh(self, now: float) -> list[int]:
        """Buckets with no lookup in their range for `refresh_interval` seconds."""

    def mark_refreshed(self, index: int, now: float) -> None: ...
    def random_key_in_bucket(self, index: int, seed: bytes) -> bytes:
        """A key in bucket `index`'s range, derived from 32 random bytes `seed`."""

@final
class ClosestPeersLookup:
    """One iterative FIND_NODE lookup (Kademlia §2.3) as a state machine: call `next(now)`
    and send the queries it asks for; report answers with `on_success`/`on_failure`."""

    def __new__(
        cls,
        target: bytes,
        seeds: Sequence[bytes],
        *,
        local_peer: bytes | None = None,
        alpha: int = 3,
        num_results: int = 20,
        peer_timeout: float = 10.0,
        max_closer_per_response: int = 20,
        now: float = 0.0,
    ) -> Self: ...
    def next(self, now: float) -> tuple[Literal["query", "waiting", "finished"], bytes | None]: ...
    def on_success(self, peer: bytes, closer_peers: Sequence[bytes], now: float) -> bool: ...
    def on_failure(self, peer: bytes, now: float) -> bool: ...
    @property
    def is_finished(self) -> bool: ...
    def finish(self) -> None: ...
    def result(self) -> list[bytes]:
        """Up to `num_results` peers that answered, nearest to the target first."""

    @property
    def num_queried(self) -> int: ...
    @property
    def num_succeeded(self) -> int: ...
    @property
    def num_failed(self) -> int: ...
