"""`TrioByteStream`: a trio stream (the socket pair between the daemon and its compute process)
seen through the `read`/`write` interface of a libp2p stream, so that both processes speak
petald.wire.messages to each other exactly as peers do on the network."""

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
