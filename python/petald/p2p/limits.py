"""`StreamLimits`: what one peer may hold open on our host, whatever the protocol, and the last
line of defence around every stream handler. Installed once on the py-libp2p host (by
`P2PHost`), it wraps every handler registered then and later: petald's block RPCs, the DHT,
gossipsub, relay, dial-back, identify and ping alike.

Why here and not in py-libp2p's resource manager: in 0.8.1 it limits streams host-wide and for
outbound streams only (`Swarm.new_stream`); an inbound stream is never counted, so a peer that
opens streams and never finishes them holds a task, a yamux buffer and a handler's state each,
up to that handler's own deadline (the inference open and `info` waited minutes). Connections
per peer are bounded there already (`ConnectionConfig.max_connections_per_peer`, and its
lifecycle's `max_established_per_peer` of 8).

Entry point: `StreamLimits(host).install()`; `refused` and `failed` count by protocol.
`guard_pubsub(pubsub)` keeps a hostile gossip message from ending py-libp2p's pubsub."""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

log = logging.getLogger(__name__)

# Inbound streams one peer may have open at once, over all protocols. An honest client holds a
# few inference sessions (at most 16 per server, petald.server.memory), forwards (8 in flight),
# DHT requests (16), a gossip stream and identify: 64 leaves room; a slow-loris peer is capped
# at 64 streams however long each one's deadline.
MAX_INBOUND_STREAMS_PER_PEER = 64

# py-libp2p's pubsub returns from its handler at the end of a peer's stream (or on garbage)
# without closing it; nothing reads or writes it again, so it is reset rather than held open
# until the connection closes (a peer could open thousands).
RESET_WHEN_HANDLER_RETURNS = ("/meshsub/", "/floodsub/")

StreamHandler = Callable[[INetStream], Awaitable[None]]


class StreamLimits:
    def __init__(self, host: IHost, *, per_peer: int = MAX_INBOUND_STREAMS_PER_PEER) -> None:
        self.host = host
        self.per_peer = per_peer
        self.open: Counter[ID] = Counter()  # inbound streams in a handler, per peer
        self.refused: Counter[str] = Counter()  # streams reset at once: the peer was at its cap
        self.failed: Counter[str] = Counter()  # handlers that raised (the stream was reset)

    def install(self) -> StreamLimits:
        """Guards the handlers registered so far and every one registered later."""
        register = self.host.set_stream_handler

        def set_stream_handler(protocol: Any, handler: StreamHandler) -> None:
            register(protocol, self.guard(str(protocol), handler))

        for protocol, handler in list(self.host.get_mux().handlers.items()):
            if handler is not None:
                register(protocol, self.guard(str(protocol), handler))
        self.host.set_stream_handler = set_stream_handler  # type: ignore[method-assign]
        return self

    def guard(self, protocol: str, handler: StreamHandler) -> StreamHandler:
        async def guarded(stream: INetStream) -> None:
            peer = stream.muxed_conn.peer_id
            if self.open[peer] >= self.per_peer:
                self.refused[protocol] += 1
                log.debug("%s: %s has %d streams open; reset", protocol, peer, self.open[peer])
                await _reset_quietly(stream)
                return
            self.open[peer] += 1
            try:
                await handler(stream)
                if protocol.startswith(RESET_WHEN_HANDLER_RETURNS):
                    await _reset_quietly(stream)
            except Exception as e:  # a peer's stream must never take the daemon down
                self.failed[protocol] += 1
                log.debug("%s stream from %s failed: %r", protocol, peer, e)
                await _reset_quietly(stream)
            finally:
                self.open[peer] -= 1
                if not self.open[peer]:
                    del self.open[peer]

        return guarded


def guard_pubsub(pubsub: Any) -> None:
    """py-libp2p 0.8.1's pubsub validates each received message in a service task
    (`Pubsub.push_msg`); a message whose `key` field is not a public key makes its signature
    check raise instead of reject, the exception ends the pubsub service, and with it the
    host stopped accepting connections (found by petald.testing.fuzz: one gossip RPC took a
    daemon off the network). A message that raises is dropped here instead."""
    push_msg = pubsub.push_msg

    async def guarded(forwarder: ID, msg: Any) -> None:
        try:
            await push_msg(forwarder, msg)
        except Exception as e:
            log.debug("gossip message from %s dropped: %r", forwarder, e)

    pubsub.push_msg = guarded


async def _reset_quietly(stream: INetStream) -> None:
    with contextlib.suppress(Exception):  # already closed or reset by the other side
        await stream.reset()
