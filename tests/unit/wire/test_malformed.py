"""Hostile and broken frames: every one is a typed error (a ValueError), never a crash or a
hang, and memory stays bounded whatever sizes a frame claims.

`chunk()` forges chunks with *valid* checksums, so the tests reach the validation behind the
checksum instead of stopping at it."""

import struct
from pathlib import Path

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


# Run in a process of its own by test_hostile_sizes_do_not_allocate: prints how much the peak
# of the process's address space (VmPeak) grew while decoding the hostile frames given on stdin.
_HOSTILE_CHILD = """
import pickle, sys
import numpy as np
from petald.errors import FrameError
from petald.wire import TensorStreamDecoder, pack_array, unpack_array

def vm_peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmPeak:"):
            return int(line.split()[1])

claims = pickle.load(sys.stdin.buffer)
valid = pack_array(np.zeros(256, dtype=np.float32))
for frame in (valid, valid[:-1], valid[:40]):  # warm up both paths, answers and errors
    for decode in (unpack_array, lambda f: TensorStreamDecoder().feed(f)):
        try:
            decode(frame)
        except FrameError:
            pass
before = vm_peak_kib()
refused = 0
for _ in range(20):
    for frame in claims:
        try:
            unpack_array(frame)
        except FrameError:
            refused += 1
        dec = TensorStreamDecoder()
        try:
            dec.feed(frame)
            dec.finish()
        except FrameError:
            refused += 1
print(refused, vm_peak_kib() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_hostile_sizes_do_not_allocate() -> None:
    """Frames that claim gigabytes but carry a few bytes are refused without allocating. Measured
    in a fresh process as the growth of VmPeak, the peak of its address space: it counts memory
    reserved whether or not it is ever touched, where RSS (and ru_maxrss, a lifetime peak that
    earlier tests already raised) misses a `Vec::with_capacity(claimed)` that nothing writes to.
    Catches: a decoder that reserves the claimed payload (1 GiB here) when the tensor header
    arrives, in the stream decoder or in the whole-frame one."""
    import pickle
    import subprocess
    import sys

    limit = 1 << 30
    claims = [
        # 1 GiB declared payload (within the limit), only a few bytes present, many chunks claimed.
        chunk(tensor_header(U8, [limit], limit), 0, 2**32 - 1) + chunk(bytes(64), 1, 2**32 - 1),
        chunk(tensor_header(F32, [2**28], 2**30), 0, 2**20),
        # 2^40 elements.
        chunk(tensor_header(F32, [2**20, 2**20], 2**42)),
    ]
    child = subprocess.run(
        [sys.executable, "-c", _HOSTILE_CHILD],
        input=pickle.dumps(claims),
        capture_output=True,
        timeout=120,
        check=True,
    )
    refused, grown_kib = map(int, child.stdout.split())
    print(f"VmPeak grew by {grown_kib} KiB over 120 hostile frames claiming up to 16 TiB")
    assert refused == 20 * len(claims) * 2
    assert grown_kib < 16 * 1024


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
