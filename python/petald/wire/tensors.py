"""torch tensors to and from petald/v1 tensor frames. Entry points: `pack` (one frame as bytes),
`pack_chunks` (the frame's chunks, to write one by one), `unpack`, and `TensorStreamDecoder` for
frames read from a stream in pieces. CUDA tensors are copied to the host first; the frame bytes
are produced and validated in Rust."""

from __future__ import annotations

from typing import TYPE_CHECKING

from petald import _native

if TYPE_CHECKING:
    import torch


def _host_bytes(tensor: torch.Tensor) -> tuple[object, str, tuple[int, ...]]:
    """A C-contiguous host byte view of `tensor`, its dtype name and shape (no copy on CPU)."""
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    dtype = str(t.dtype).removeprefix("torch.")
    # Viewing as uint8 lets numpy export dtypes it lacks (bfloat16); 0-d needs a 1-d view first.
    raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
    return raw, dtype, tuple(t.shape)


def pack(
    tensor: torch.Tensor, codec: str = "none", *, chunk_size: int = _native.DEFAULT_CHUNK_SIZE
) -> bytes:
    """Frames `tensor` with `codec` ("none", "zstd[:L]", "fp16", "bf16", "int8", "int8-256",
    or a lossy codec + zstd such as "int8+zstd")."""
    raw, dtype, shape = _host_bytes(tensor)
    return _native.encode(raw, dtype, shape, codec, chunk_size)


def pack_chunks(
    tensor: torch.Tensor, codec: str = "none", *, chunk_size: int = _native.DEFAULT_CHUNK_SIZE
) -> list[bytes]:
    """Like `pack`, split into its chunks (each at most `chunk_size` + 32 bytes)."""
    raw, dtype, shape = _host_bytes(tensor)
    return _native.encode_chunks(raw, dtype, shape, codec, chunk_size)


def _to_tensor(decoded: _native.DecodedTensor, device: str | torch.device | None) -> torch.Tensor:
    import torch

    dtype = getattr(torch, decoded.dtype)
    data = decoded.data
    if len(data) == 0:
        out = torch.empty(decoded.shape, dtype=dtype)
    else:
        if isinstance(data, memoryview) and data.readonly:
            # torch has no read-only tensors; never hand out a writable alias of immutable bytes.
            data = bytearray(data)
        out = torch.frombuffer(data, dtype=dtype).reshape(decoded.shape)
    return out if device is None else out.to(device)


def unpack(
    frame: bytes | bytearray | memoryview,
    *,
    device: str | torch.device | None = None,
    max_tensor_bytes: int = _native.DEFAULT_MAX_TENSOR_BYTES,
    max_chunk_body: int = _native.MAX_CHUNK_SIZE,
) -> torch.Tensor:
    """Decodes one frame into a tensor (on `device` if given). Raises `FrameError`/`CodecError`
    (both `ValueError`s) for anything malformed or over the limits."""
    decoded = _native.decode(
        frame, max_tensor_bytes=max_tensor_bytes, max_chunk_body=max_chunk_body
    )
    return _to_tensor(decoded, device)


class TensorStreamDecoder:
    """Reassembles one frame from pieces read off a stream. `feed` returns how many bytes of
    the piece belonged to this frame (the rest starts the next one)."""

    def __init__(
        self,
        *,
        max_tensor_bytes: int = _native.DEFAULT_MAX_TENSOR_BYTES,
        max_chunk_body: int = _native.MAX_CHUNK_SIZE,
    ) -> None:
        self._decoder = _native.FrameDecoder(max_tensor_bytes, max_chunk_body)

    @property
    def is_complete(self) -> bool:
        return self._decoder.is_complete

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        return self._decoder.feed(data)

    def finish(self, *, device: str | torch.device | None = None) -> torch.Tensor:
        return _to_tensor(self._decoder.finish(), device)
