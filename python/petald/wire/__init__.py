"""Message codecs: tensors to and from petald/v1 frames (Rust), headers in CBOR (later)."""

from petald.wire.arrays import pack_array, unpack_array
from petald.wire.tensors import TensorStreamDecoder, pack, pack_chunks, unpack

__all__ = ["TensorStreamDecoder", "pack", "pack_array", "pack_chunks", "unpack", "unpack_array"]
