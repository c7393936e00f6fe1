"""Request/response messages of petald's block RPCs on a libp2p stream: a CBOR header (a map,
varint length-prefixed, at most `MAX_HEADER_BYTES`) followed by as many tensor frames as the
header's "tensors" count says, each varint length-prefixed and decoded by the Rust framer with
the receiver's limits. No pickle, no Python objects: only CBOR maps and petald/v1 frames.

Entry points: `write_message(stream, header, tensors, codec=...)`, `read_message(stream, ...)`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import cbor2

from petald import _native
from petald.errors import MessageError
from petald.wire.frames import Frame
from petald.wire.tensors import pack, unpack

if TYPE_CHECKING:
    import torch

# A header carries a handful of numbers and names; 64 KiB is generous and bounds the read.
MAX_HEADER_BYTES = 64 * 1024
# Tensors per message: hidden states, a mask, position ids, gradients, and for fine-tuning deep
# prompts and A/B pairs of up to 8 LoRA targets (and their gradients) — never hundreds.
MAX_TENSORS = 24
# A varint longer than this encodes more than 2^63: refuse before reading further.
MAX_VARINT_BYTES = 9


class Stream(Protocol):
    async def read(self, n: int | None = None) -> bytes: ...
    async def write(self, data: bytes) -> None: ...


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _Reader:
    """Exact reads over a stream that returns pieces of any size. It never asks for more than
    the message still needs: whatever follows the message (the next message, already sent by a
    peer that does not wait for an answer: the compute process's "steps" requests, pipelined
    inference steps) stays in the stream for the next `read_message`."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            piece = await self.stream.read(n - len(self.buf))
            if not piece:
                raise MessageError(f"stream ended {n - len(self.buf)} bytes before the message did")
            self.buf += piece
        out, self.buf = bytes(self.buf[:n]), self.buf[n:]
        return out

    async def varint(self, limit: int, what: str) -> int:
        value = 0
        for i in range(MAX_VARINT_BYTES):
            (byte,) = await self.exactly(1)
            value |= (byte & 0x7F) << (7 * i)
            if value > limit:
                raise MessageError(f"{what} of {value}+ bytes is over the limit of {limit}")
            if not byte & 0x80:
                return value
        raise MessageError(f"{what}: malformed length prefix")


async def write_message(
    stream: Stream,
    header: dict[str, Any],
    tensors: Sequence[torch.Tensor | Frame] = (),
    *,
    codec: str = "none",
) -> None:
    """Writes one message; tensors are framed with `codec`, a `Frame` goes as it is."""
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"at most {MAX_TENSORS} tensors per message")
    head = cbor2.dumps({**header, "tensors": len(tensors)}, canonical=True)
    if len(head) > MAX_HEADER_BYTES:
        raise ValueError("message header too large")
    parts = [_varint(len(head)), head]
    for t in tensors:
        frame = t.data if isinstance(t, Frame) else pack(t, codec)
        parts += [_varint(len(frame)), frame]
    await stream.write(b"".join(parts))


async def read_message(
    stream: Stream,
    *,
    max_tensor_bytes: int = _native.DEFAULT_MAX_TENSOR_BYTES,
    stamps: list[int] | None = None,
    frames: bool = False,
) -> tuple[dict[str, Any], list[Any]]:
    """Reads one message; raises `MessageError` (or `FrameError`/`CodecError`) for anything
    malformed or over the limits, before allocating for it. `stamps` (petald.wire.trace) gets
    the time at which the header was in. The tensors come as torch tensors, or with `frames`
    as validated `Frame`s (no torch: the daemon of `petald serve` passes them on)."""
    reader = _Reader(stream)
    size = await reader.varint(MAX_HEADER_BYTES, "header")
    try:
        header = cbor2.loads(await reader.exactly(size))
    except MessageError:
        raise
    except Exception as e:  # cbor2 raises many types on garbage
        raise MessageError(f"message header is not CBOR: {e}") from None
    if not isinstance(header, dict) or not all(isinstance(k, str) for k in header):
        raise MessageError("message header must be a CBOR map with string keys")
    if stamps is not None:
        stamps.append(time.monotonic_ns())
    count = header.get("tensors", 0)
    if type(count) is not int or not 0 <= count <= MAX_TENSORS:
        raise MessageError(f"a message carries 0 to {MAX_TENSORS} tensors")
    # A frame's bytes: the decoded size plus chunk headers and the codec's worst case.
    frame_limit = max_tensor_bytes + max_tensor_bytes // 64 + 4096
    tensors = []
    for _ in range(count):
        n = await reader.varint(frame_limit, "tensor frame")
        data = await reader.exactly(n)
        if frames:
            tensors.append(Frame.check(data, max_tensor_bytes=max_tensor_bytes))
        else:
            tensors.append(unpack(data, max_tensor_bytes=max_tensor_bytes))
    return header, tensors
