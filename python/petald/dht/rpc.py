"""The DHT's RPC layer over libp2p streams (`/petald/kad/1.0.0`): one request and one response
per stream, each a varint-framed kad-dht protobuf (petald.wire.kad_messages).

Untrusted input is bounded here, at the edge: message size (in kad_messages), a deadline on every
read and write, and a cap on concurrent inbound requests per peer. A request that breaks a rule
gets its stream reset; the peer's other requests, and every other peer, are unaffected."""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from petald.dht.flood import PUT_THROTTLE, PeerThrottle
from petald.errors import MessageError, PeerUnavailable, RemoteError
from petald.p2p.bans import bans_of
from petald.p2p.dialer import Dialer
from petald.wire.kad_messages import (
    PROTOCOL_ID,
    KadMessage,
    MessageType,
    encode_message,
    read_message,
)

log = logging.getLogger(__name__)

# A peer with this many requests in flight is sending faster than we answer; further streams
# are reset instead of queued, so one peer cannot take every handler slot.
MAX_INFLIGHT_PER_PEER = 16
# Seconds a request may take to arrive, and an answer to leave; slow-loris peers are cut off.
INBOUND_TIMEOUT = 10.0

Handler = Callable[[ID, KadMessage], Awaitable[KadMessage | None]]


class DhtRpc:
    """Sends requests and serves them with `handler` (which returns the response or None to
    refuse). `counters` records what was refused and why, for `petald status`."""

    def __init__(
        self, host: IHost, handler: Handler, *, rpc_timeout: float, dialer: Dialer | None = None
    ) -> None:
        self.host = host
        # Connects (direct, else through a relay) before each request; None: direct only.
        self.dialer = dialer
        self.handler = handler
        self.rpc_timeout = rpc_timeout
        self.counters: Counter[str] = Counter()
        self._inflight: Counter[ID] = Counter()
        # PUT_VALUE floods: throttled per peer, then banned for a while (petald.dht.flood):
        # disconnected and refused by the whole host (petald.p2p.bans), not only here. The
        # handler strikes it too for each record it refuses.
        self.puts = PeerThrottle(PUT_THROTTLE)
        self.bans = bans_of(host)

    def serve(self) -> None:
        """Registers the protocol handler (server mode only: clients do not answer)."""
        self.host.set_stream_handler(TProtocol(PROTOCOL_ID), self._on_stream)

    async def _on_stream(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        if self._inflight[peer] >= MAX_INFLIGHT_PER_PEER:
            self.counters["busy"] += 1
            await stream.reset()
            return
        self._inflight[peer] += 1
        try:
            with trio.move_on_after(INBOUND_TIMEOUT) as scope:
                request = await read_message(stream)
                if request.type == MessageType.PUT_VALUE and not self.puts.allow(
                    peer, trio.current_time()
                ):
                    self.counters["throttled"] += 1
                    await stream.reset()
                    await self._ban_if_banned(peer)
                    return
                response = await self.handler(peer, request)
                if response is None:
                    self.counters["refused"] += 1
                    await stream.reset()
                    if request.type == MessageType.PUT_VALUE:
                        self.puts.strike(peer, trio.current_time())
                        await self._ban_if_banned(peer)
                    return
                await stream.write(encode_message(response))
                await stream.close()
            if scope.cancelled_caught:
                self.counters["timeout"] += 1
                await stream.reset()
        except MessageError as e:
            self.counters["malformed"] += 1
            log.debug("malformed DHT request from %s: %s", peer, e)
            await _reset_quietly(stream)
        except Exception as e:  # a broken stream from a peer must never take the daemon down
            self.counters["stream_error"] += 1
            log.debug("DHT stream from %s failed: %s", peer, e)
            await _reset_quietly(stream)
        finally:
            self._inflight[peer] -= 1
            if not self._inflight[peer]:
                del self._inflight[peer]

    async def _ban_if_banned(self, peer: ID) -> None:
        """Once the throttle bans `peer`, so does the host: its connections close."""
        now = trio.current_time()
        if self.puts.banned(peer, now) and not self.bans.banned(peer, now):
            self.counters["banned"] += 1
            await self.bans.ban(peer, now + self.puts.config.ban_seconds)

    async def request(self, peer: ID, message: KadMessage) -> KadMessage:
        """Sends `message` to `peer` and returns its answer. Raises `PeerUnavailable` when the
        peer cannot be reached or does not answer in time, `RemoteError` when it refuses or
        answers garbage. Cancel-safe (the stream is reset)."""
        stream: INetStream | None = None
        try:
            with trio.fail_after(self.rpc_timeout):
                if self.dialer is not None:
                    await self.dialer.ensure_connected(peer)
                stream = await self.host.new_stream(peer, [TProtocol(PROTOCOL_ID)])
                await stream.write(encode_message(message))
                response = await read_message(stream)
                await stream.close()
                return response
        except MessageError as e:
            raise RemoteError(str(peer), "malformed", str(e)) from None
        except trio.TooSlowError:
            raise PeerUnavailable(f"{peer}: no DHT answer within {self.rpc_timeout} s") from None
        except (trio.Cancelled, PeerUnavailable):
            raise
        except Exception as e:  # dial and stream errors come in many py-libp2p types
            raise PeerUnavailable(f"{peer}: {type(e).__name__}: {e}") from None
        finally:
            if stream is not None:
                with trio.CancelScope(shield=True):
                    await _reset_quietly(stream)


async def _reset_quietly(stream: INetStream) -> None:
    with contextlib.suppress(Exception):  # already closed or reset by the other side
        await stream.reset()
