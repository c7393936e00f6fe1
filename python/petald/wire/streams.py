"""`TrioByteStream`: a trio stream seen through the `read`/`write` interface of a libp2p stream,
so that petald.wire.messages runs over it unchanged: the socket pair between `petald serve`'s
daemon and its compute process, and in-memory streams in tests."""

from __future__ import annotations

import trio


class TrioByteStream:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def read(self, n: int | None = None) -> bytes:
        return await self.stream.receive_some(n or 65536)

    async def write(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        await self.stream.aclose()

    # libp2p's names for ending a stream; a trio stream has one way.
    close = aclose
    reset = aclose
