"""Frames from torch tensors and numpy arrays: dtypes, shapes, zero-copy decode, streaming."""

import numpy as np
import pytest
import torch

from petald import _native
from petald.errors import CodecError, FrameError, WireError
from petald.wire import (
    TensorStreamDecoder,
    pack,
    pack_array,
    pack_chunks,
    unpack,
    unpack_array,
)

TORCH_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3, 4), (1, 7, 1, 5)])
def test_torch_round_trip_every_dtype(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = (torch.randn(shape) * 50).to(dtype)
    for codec in ("none", "zstd:1"):
        out = unpack(pack(t, codec))
        assert out.dtype == dtype
        assert out.shape == t.shape
        assert torch.equal(out, t)


def test_non_contiguous_and_views_are_framed_by_value() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    view = base.t()[1:3]  # non-contiguous
    assert torch.equal(unpack(pack(view)), view)


def test_lossy_codecs_on_torch_half_types() -> None:
    x = torch.randn(4, 300, dtype=torch.bfloat16)
    y = unpack(pack(x, "int8+zstd"))
    assert y.dtype == torch.bfloat16
    bound = x.float().abs().amax() / 254 * 1.0001 + y.float().abs() * 2**-8
    assert torch.all((x.float() - y.float()).abs() <= bound)


def test_single_chunk_decode_views_the_frame() -> None:
    x = np.arange(1024, dtype=np.float32).reshape(32, 32)
    frame = bytearray(pack_array(x))
    y = unpack_array(frame)
    assert np.array_equal(x, y)
    assert np.shares_memory(y, np.frombuffer(frame, dtype=np.uint8))
    # An immutable frame gives a read-only array, never a writable alias of bytes.
    z = unpack_array(bytes(frame))
    assert not z.flags.writeable
    t = unpack(bytes(frame))
    t += 1  # a copy: must not raise, must not touch the frame
    assert np.array_equal(unpack_array(bytes(frame)), x)


def test_chunks_concatenate_to_the_frame_and_stream_back() -> None:
    x = torch.randn(64, 1000)
    chunks = pack_chunks(x, "fp16", chunk_size=4096)
    assert len(chunks) == -(-(x.numel() * 2 + 16 + 16) // 4096)
    assert b"".join(chunks) == pack(x, "fp16", chunk_size=4096)
    dec = TensorStreamDecoder()
    for c in chunks:
        assert not dec.is_complete
        assert dec.feed(c) == len(c)
    assert dec.is_complete
    assert torch.allclose(dec.finish(), x, rtol=2**-11, atol=2**-24)


def test_numpy_dtype_without_frame_support_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="complex64"):
        pack_array(np.zeros(3, dtype=np.complex64))
    with pytest.raises(TypeError, match="bfloat16"):
        unpack_array(pack(torch.zeros(2, dtype=torch.bfloat16)))


def test_bad_codec_and_dtype_arguments() -> None:
    with pytest.raises(CodecError, match="unknown codec"):
        pack(torch.zeros(3), "gzip")
    with pytest.raises(CodecError, match="cannot encode int64"):
        pack(torch.zeros(3, dtype=torch.int64), "fp16")
    with pytest.raises(ValueError, match="unknown dtype"):
        _native.encode(b"\0" * 8, "complex64", (1,))
    with pytest.raises(FrameError, match="needs 12 bytes"):
        _native.encode(b"\0" * 8, "float32", (3,))
    with pytest.raises(FrameError, match="chunk size"):
        pack(torch.zeros(3), chunk_size=10)
    # The exception tree: wire errors are also ValueErrors.
    assert issubclass(FrameError, WireError) and issubclass(FrameError, ValueError)
    assert issubclass(CodecError, WireError) and issubclass(CodecError, ValueError)


def test_non_finite_values_and_int8_refuse_clearly() -> None:
    with pytest.raises(CodecError, match="inf or NaN"):
        pack(torch.tensor([1.0, float("nan")]), "int8")
    # fp16 keeps IEEE semantics, like tensor.half().
    x = torch.tensor([1.0, 1e6, float("nan"), -float("inf")])
    assert torch.equal(unpack(pack(x, "fp16")).isnan(), x.half().float().isnan())


def test_canonical_codec_names() -> None:
    assert _native.canonical_codec("ZSTD") == "zstd:3"
    assert _native.canonical_codec("int8-64+zstd:1") == "int8+zstd:1"
    assert "bfloat16" in _native.dtype_names()
