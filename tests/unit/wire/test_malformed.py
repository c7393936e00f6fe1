"""Hostile and broken frames: every one is a typed error (a ValueError), never a crash or a
hang, and memory stays bounded whatever sizes a frame claims.

`chunk()` forges chunks with *valid* checksums, so the tests reach the validation behind the
checksum instead of stopping at it."""

import resource
import struct

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from petald.errors import CodecError, FrameError
from petald.wire import TensorStreamDecoder, pack_array, unpack_array

F32, U8 = 1, 9


def chunk(body: bytes, index: int = 0, count: int = 1, version: int = 1) -> bytes:
    head = b"PDTF" + bytes([version, 0, 0, 0]) + struct.pack("<IIII", index, count, len(body), 0)
    seed = xxhash.xxh3_64_intdigest(head)
    return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(body, seed=seed)) + body


def tensor_header(
    dtype: int, shape: list[int], payload_len: int, lossy: int = 0, zstd: int = 0
) -> bytes:
    n = len(shape)
    return struct.pack(f"<BBBBIQ{n}Q", dtype, lossy, zstd, n, 0, payload_len, *shape)


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_forged_chunk_matches_the_real_encoder() -> None:
    x = np.arange(10, dtype=np.uint8)
    assert chunk(tensor_header(U8, [10], 10) + x.tobytes()) == pack_array(x)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"", "truncated"),
        (b"PDTF", "truncated"),
        (b"XXXX" + bytes(28), "not a petald tensor frame"),
        (chunk(tensor_header(U8, [4], 4) + bytes(4), version=9), "unsupported frame version 9"),
        (chunk(tensor_header(77, [4], 4) + bytes(4)), "unknown dtype code 77"),
        (chunk(tensor_header(F32, [1] * 9, 4)), "9 dimensions"),
        (chunk(tensor_header(F32, [2**63, 4], 0)), "overflows"),
        (chunk(tensor_header(F32, [2**20, 2**20], 2**42)), "exceeds the limit"),
        (chunk(tensor_header(F32, [4], 15) + bytes(15)), "payload length"),
        (chunk(tensor_header(F32, [4], 16) + bytes(8)), "payload length"),
        (chunk(tensor_header(F32, [4], 16, lossy=9) + bytes(16)), "unknown codec code 9"),
        (chunk(tensor_header(U8, [4], 4, lossy=1) + bytes(4)), "cannot encode uint8"),
        (chunk(bytes(3)), "whole tensor header"),
        (chunk(tensor_header(U8, [4], 4) + bytes(4), index=1, count=2), "expected index 0"),
        (chunk(tensor_header(U8, [4], 4) + bytes(4), index=2, count=2), "out of range"),
        (chunk(tensor_header(U8, [400], 20, zstd=1) + bytes(20)), "zstd"),
    ],
)
def test_malformed_frames_raise_typed_errors(frame: bytes, message: str) -> None:
    with pytest.raises((FrameError, CodecError), match=message):
        unpack_array(frame)
    dec = TensorStreamDecoder()
    with pytest.raises((FrameError, CodecError)):
        dec.feed(frame)
        dec.finish()


def test_trailing_bytes_are_an_error_for_a_whole_frame_not_for_a_stream() -> None:
    frame = pack_array(np.arange(4, dtype=np.uint8))
    with pytest.raises(FrameError, match="1 bytes after the end"):
        unpack_array(frame + b"\0")
    dec = TensorStreamDecoder()
    assert dec.feed(frame + b"\0") == len(frame)  # the extra byte starts the next frame


def test_corrupted_and_reordered_chunks() -> None:
    x = np.arange(3000, dtype=np.uint8)
    frame = bytearray(pack_array(x, chunk_size=1024))
    bad = bytearray(frame)
    bad[100] ^= 0x10
    with pytest.raises(FrameError, match="checksum"):
        unpack_array(bad)
    c = 32 + 1024
    swapped = frame[:c] + frame[2 * c :] + frame[c : 2 * c]
    with pytest.raises(FrameError, match="expected index 1, got 2"):
        unpack_array(swapped)
    for cut in (1, 33, c, len(frame) - 1):
        with pytest.raises(FrameError):
            unpack_array(frame[:cut])


def test_chunk_count_changing_mid_frame() -> None:
    body = tensor_header(U8, [2000], 2000) + bytes(2000)
    frame = chunk(body[:1024], 0, 2) + chunk(body[1024:], 1, 3)
    with pytest.raises(FrameError, match="count changed"):
        unpack_array(frame)


def test_stream_decoder_fails_once_and_stays_failed() -> None:
    dec = TensorStreamDecoder()
    with pytest.raises(FrameError, match="not a petald"):
        dec.feed(b"GARBAGE!" * 8)
    with pytest.raises(FrameError, match="already failed"):
        dec.feed(b"more")


def test_incomplete_stream_is_an_error_not_a_hang() -> None:
    frame = pack_array(np.zeros(100, dtype=np.float32))
    dec = TensorStreamDecoder()
    dec.feed(frame[:-1])
    assert not dec.is_complete
    with pytest.raises(FrameError, match="ended before"):
        dec.finish()


def test_hostile_sizes_do_not_allocate() -> None:
    """Frames that claim gigabytes but carry a few bytes are refused without allocating."""
    before = max_rss_mib()
    limit = 1 << 30
    claims = [
        # 1 GiB declared payload (within the limit), only a few bytes present, many chunks claimed.
        chunk(tensor_header(U8, [limit], limit), 0, 2**32 - 1) + chunk(bytes(64), 1, 2**32 - 1),
        chunk(tensor_header(F32, [2**28], 2**30), 0, 2**20),
        # 2^40 elements.
        chunk(tensor_header(F32, [2**20, 2**20], 2**42)),
    ]
    for _ in range(20):
        for frame in claims:
            with pytest.raises(FrameError):
                unpack_array(frame)
            dec = TensorStreamDecoder()
            with pytest.raises(FrameError):
                dec.feed(frame)
                dec.finish()
    grown = max_rss_mib() - before
    print(f"peak RSS grew by {grown:.1f} MiB over 120 hostile frames claiming up to 16 TiB")
    assert grown < 64


def test_receiver_limits_are_enforced() -> None:
    frame = pack_array(np.zeros(1000, dtype=np.float32), chunk_size=1024)
    with pytest.raises(FrameError, match="exceeds the limit of 100 bytes"):
        unpack_array(frame, max_tensor_bytes=100)
    with pytest.raises(FrameError, match="exceeds the limit of 512"):
        unpack_array(frame, max_chunk_body=512)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_are_errors(data: bytes) -> None:
    with pytest.raises((FrameError, CodecError)):
        unpack_array(data)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_mutations_of_valid_frames_are_caught(data: st.DataObject) -> None:
    x = np.arange(700, dtype=np.float32)
    codec = data.draw(st.sampled_from(["none", "zstd", "int8", "fp16+zstd"]))
    frame = bytearray(pack_array(x, codec, chunk_size=1024))
    pos = data.draw(st.integers(0, len(frame) - 1))
    frame[pos] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises((FrameError, CodecError)):
        unpack_array(frame)
