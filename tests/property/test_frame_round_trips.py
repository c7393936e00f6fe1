"""Property tests of the frame format: lossless codecs are the identity, lossy ones stay within
their documented bounds (petald_core::codec), and chunked frames fed to the stream decoder in
arbitrary pieces reassemble to the same tensor."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from petald import _native
from petald.wire import TensorStreamDecoder, pack, pack_array, unpack_array

# Every dtype a frame carries that numpy has (numpy lacks bfloat16; tests/unit covers it via torch).
LOSSLESS_DTYPES = [d for d in _native.dtype_names() if d != "bfloat16"]
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9)


@settings(max_examples=150, deadline=None)
@given(st.data(), st.sampled_from(["none", "zstd", "zstd:-3", "zstd:9"]))
def test_lossless_codecs_are_identity(data: st.DataObject, codec: str) -> None:
    dtype = data.draw(st.sampled_from(LOSSLESS_DTYPES))
    x = data.draw(hnp.arrays(dtype, shapes))
    y = unpack_array(pack_array(x, codec, chunk_size=data.draw(st.integers(256, 2048))))
    assert y.dtype == x.dtype and y.shape == x.shape
    assert x.tobytes() == y.tobytes()  # bitwise, so NaN payloads and -0.0 survive too


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
float_arrays = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=300), elements=finite
)


@settings(max_examples=150, deadline=None)
@given(float_arrays, st.sampled_from([64, 256]), st.booleans())
def test_int8_error_is_at_most_half_a_step_of_its_block(
    x: np.ndarray, block: int, zstd: bool
) -> None:
    codec = ("int8" if block == 64 else "int8-256") + ("+zstd" if zstd else "")
    y = unpack_array(pack_array(x, codec))
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    pad = (-flat_x.size) % block
    xs = np.pad(flat_x, (0, pad)).reshape(-1, block)
    ys = np.pad(flat_y, (0, pad)).reshape(-1, block)
    bound = np.abs(xs).max(axis=1, keepdims=True) / 254 * (1 + 1e-4) + 1.5e-45
    assert np.all(np.abs(xs - ys) <= bound)


@settings(max_examples=150, deadline=None)
@given(float_arrays)
def test_half_precision_codecs_relative_bounds(x: np.ndarray) -> None:
    f16 = unpack_array(pack_array(x, "fp16"))
    assert np.all(np.abs(x - f16) <= np.abs(x) * 2.0**-11 + 2.0**-25)
    import torch

    bf16 = pack(torch.from_numpy(x.copy()), "bf16")
    back = unpack_array(bf16)
    assert np.all(np.abs(x - back) <= np.abs(x) * 2.0**-8 + 2.0**-134)


@settings(max_examples=100, deadline=None)
@given(
    st.binary(min_size=0, max_size=50_000),
    st.integers(256, 4096),
    st.lists(st.integers(1, 5000), min_size=1, max_size=30),
)
def test_chunked_stream_reassembles_in_order(
    payload: bytes, chunk_size: int, cuts: list[int]
) -> None:
    x = np.frombuffer(payload, dtype=np.uint8)
    frame = pack_array(x, "zstd:1", chunk_size=chunk_size) + b"NEXT FRAME"
    dec = TensorStreamDecoder()
    pos, i = 0, 0
    while not dec.is_complete and i < 10_000:  # bounded: each step consumes >= 1 byte
        piece = frame[pos : pos + cuts[i % len(cuts)]]
        pos += dec.feed(piece)
        i += 1
    assert frame[pos:] == b"NEXT FRAME"
    assert dec.finish().numpy().tobytes() == payload
