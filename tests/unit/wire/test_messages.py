"""Block RPC messages (CBOR header + tensor frames): round trip, and malformed input refused
with typed errors before anything large is allocated."""

import cbor2
import pytest
import torch

from petald.errors import FrameError, MessageError
from petald.wire.messages import MAX_TENSORS, _varint, read_message, write_message


class Pipe:
    """An in-memory stream that hands out data in small pieces, like a socket might."""

    def __init__(self, data: bytes = b"", piece: int = 7) -> None:
        self.data, self.piece = bytearray(data), piece

    async def write(self, data: bytes) -> None:
        self.data += data

    async def read(self, n: int | None = None) -> bytes:
        k = min(self.piece, n or self.piece, len(self.data))
        out, self.data = bytes(self.data[:k]), self.data[k:]
        return out


async def test_round_trip_with_tensors_and_codecs() -> None:
    pipe = Pipe()
    x, m = torch.randn(2, 5, 16), torch.ones(2, 5)
    await write_message(pipe, {"start": 3, "end": 7}, [x, m], codec="fp16")
    header, tensors = await read_message(pipe)
    assert header == {"start": 3, "end": 7, "tensors": 2}
    assert torch.allclose(tensors[0], x, rtol=2**-10, atol=1e-6) and torch.equal(tensors[1], m)


async def test_back_to_back_messages_stay_whole() -> None:
    """Two messages sent at once and delivered in one piece (a socket does that): each read
    takes exactly its message. Catches: a reader that reads ahead (it once asked for 64 KiB
    and dropped the rest, losing the step messages of the compute process's "steps" request,
    which then waited forever)."""
    pipe = Pipe(piece=1 << 20)
    x = torch.randn(1, 3, 8)
    await write_message(pipe, {"op": "steps", "count": 1})
    await write_message(pipe, {"op": "step", "sid": 1}, [x])
    await write_message(pipe, {"close": True})
    assert (await read_message(pipe))[0] == {"op": "steps", "count": 1, "tensors": 0}
    header, (y,) = await read_message(pipe)
    assert header == {"op": "step", "sid": 1, "tensors": 1} and torch.equal(y, x)
    assert (await read_message(pipe))[0] == {"close": True, "tensors": 0}
    assert not pipe.data


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "ended"),
        (_varint(10**9), "over the limit"),
        (b"\xff" * 12, "over the limit|malformed"),
        (_varint(3) + b"\x82\x01\x02", "map"),
        (_varint(2) + b"\xff\xff", "not CBOR"),
        (_varint(len(h := cbor2.dumps({"tensors": MAX_TENSORS + 1}))) + h, "0 to"),
        (_varint(len(h := cbor2.dumps({"tensors": -1}))) + h, "0 to"),
        (_varint(len(h := cbor2.dumps({1: 2}))) + h, "string keys"),
        (_varint(len(h := cbor2.dumps({"tensors": 1}))) + h + _varint(2**40), "over the limit"),
        (_varint(len(h := cbor2.dumps({"tensors": 1}))) + h + _varint(100) + b"x" * 10, "ended"),
    ],
)
async def test_malformed_messages(raw: bytes, match: str) -> None:
    with pytest.raises(MessageError, match=match):
        await read_message(Pipe(raw))


async def test_garbage_frame_is_a_frame_error() -> None:
    h = cbor2.dumps({"tensors": 1})
    with pytest.raises(FrameError):
        await read_message(Pipe(_varint(len(h)) + h + _varint(40) + b"PDTF" + b"\0" * 36))


async def test_tensor_size_limit_applies() -> None:
    pipe = Pipe()
    await write_message(pipe, {}, [torch.zeros(1000)])
    with pytest.raises(FrameError, match="exceeds the limit"):
        await read_message(pipe, max_tensor_bytes=1000)
