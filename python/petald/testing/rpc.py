"""Raw block RPCs for tests and benchmarks: a client-mode peer joined through a daemon process,
and one-shot calls or inference streams on it that speak petald.wire.messages directly (to send
exactly the bytes a test wants, bad ones included; petald.client is the real client)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from petald.dht.node import DhtConfig
from petald.p2p.config import P2PConfig
from petald.stack import start_stack
from petald.testing.processes import DaemonProcess
from petald.wire.messages import read_message, write_message

OpenStream = Callable[[str], Awaitable[Any]]


@asynccontextmanager
async def rpc_client(server: DaemonProcess) -> AsyncIterator[OpenStream]:
    """A DHT-client peer joined through `server`; yields `open(protocol)` -> a new stream to it."""
    async with rpc_peer(server) as (open_stream, _):
        yield open_stream


@asynccontextmanager
async def rpc_peer(server: DaemonProcess) -> AsyncIterator[tuple[OpenStream, str]]:
    """`rpc_client`, also yielding the peer's own id: (open, peer id)."""
    config = P2PConfig(listen=("/ip4/127.0.0.1/tcp/0",), initial_peers=(server.addr,))
    async with trio.open_nursery() as nursery:
        stack = await start_stack(
            nursery,
            create_new_key_pair(),
            config,
            dht_config=DhtConfig(client_mode=True),
            announcements=False,
        )

        async def open_stream(protocol: str) -> Any:
            return await stack.host.host.new_stream(ID.from_base58(server.peer_id), [protocol])

        yield open_stream, stack.host.host.get_id().to_base58()
        nursery.cancel_scope.cancel()


async def exchange(stream: Any, header: dict, tensors=(), *, timeout: float = 60) -> tuple:
    """Writes one message and reads the answer (bounded)."""
    await write_message(stream, header, list(tensors))
    with trio.fail_after(timeout):
        return await read_message(stream)


async def rpc_call(server: DaemonProcess, protocol: str, header: dict, tensors=()) -> tuple:
    """One request on a fresh client peer and stream: (header, tensors) of the answer."""
    async with rpc_client(server) as open_stream:
        stream = await open_stream(protocol)
        answer = await exchange(stream, header, tensors)
        await stream.reset()
    return answer


class RawSession:
    """The client side of /petald/inference/1.0.0 on one stream."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    async def send(self, header: dict, tensors=()) -> tuple:
        return await exchange(self.stream, header, tensors)
