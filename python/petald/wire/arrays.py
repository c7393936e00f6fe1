"""numpy arrays to and from petald/v1 tensor frames. The frame bytes are produced and checked by
the Rust extension; this module only maps numpy dtypes and shapes. `unpack_array` returns a view
of the frame (no copy) when the payload needed no decoding."""

from __future__ import annotations

import numpy as np

from petald import _native

# numpy has no bfloat16; bf16 frames are unpacked with `petald.wire.unpack` (torch).
_NUMPY_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in (
        "float32",
        "float16",
        "float64",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
    )
}


def pack_array(
    array: np.ndarray, codec: str = "none", *, chunk_size: int = _native.DEFAULT_CHUNK_SIZE
) -> bytes:
    """Frames `array` (any shape, made C-contiguous if it is not) with `codec`."""
    name = array.dtype.name
    if name not in _NUMPY_DTYPES:
        raise TypeError(f"cannot frame numpy dtype {name}; supported: {sorted(_NUMPY_DTYPES)}")
    if not array.flags.c_contiguous:
        array = array.copy(order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    return _native.encode(array, name, array.shape, codec, chunk_size)


def unpack_array(frame: bytes | bytearray | memoryview, **limits: int) -> np.ndarray:
    """Decodes one frame into a numpy array (read-only if it views an immutable `frame`)."""
    decoded = _native.decode(frame, **limits)
    dtype = _NUMPY_DTYPES.get(decoded.dtype)
    if dtype is None:
        raise TypeError(f"numpy cannot hold {decoded.dtype}; use petald.wire.unpack for torch")
    return np.frombuffer(decoded.data, dtype=dtype).reshape(decoded.shape)
