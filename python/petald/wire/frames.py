"""`Frame`: one petald/v1 tensor frame checked by the Rust framer and kept as its bytes, with the
dtype and shape it decodes to. The daemon of `petald serve` validates requests on these and
passes the frames to its compute process as they came (and the compute process's answers back
to the client as they come): it never builds a tensor, so it never imports torch.

Entry points: `read_message(stream, frames=True)` (petald.wire.messages) returns them;
`write_message` writes a `Frame` as is, whatever codec it is asked for."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from petald import _native

if TYPE_CHECKING:
    import numpy as np

FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
INT_DTYPES = frozenset({"int8", "int16", "int32", "int64", "uint8"})


@dataclass(frozen=True, slots=True)
class Frame:
    data: bytes  # the whole frame, as on the wire
    dtype: str  # petald/v1 dtype name ("float32", "int64", ...)
    shape: tuple[int, ...]

    @classmethod
    def check(
        cls,
        data: bytes,
        *,
        max_tensor_bytes: int = _native.DEFAULT_MAX_TENSOR_BYTES,
        max_chunk_body: int = _native.MAX_CHUNK_SIZE,
    ) -> Frame:
        """Validates `data` as exactly one frame within the limits (raises `FrameError` or
        `CodecError`, both `ValueError`s, as `unpack` does)."""
        decoded = _native.decode(
            data, max_tensor_bytes=max_tensor_bytes, max_chunk_body=max_chunk_body
        )
        return cls(data, decoded.dtype, tuple(decoded.shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    def numel(self) -> int:
        return math.prod(self.shape)

    def values(self) -> np.ndarray:
        """The decoded values of an integer frame, as a flat numpy array (e.g. to check the
        range of position ids)."""
        import numpy as np

        if self.dtype not in INT_DTYPES:
            raise ValueError(f"values() is for integer frames, not {self.dtype}")
        decoded = _native.decode(self.data)
        return np.frombuffer(decoded.data, dtype=np.dtype(self.dtype))
