"""The simulated network: `SimNetwork` carries bytes between `SimHost`s in one process, on trio's
virtual clock, with the methods of a py-libp2p host that petald's DHT node and announcer call
(`get_id`, `get_peerstore`, `get_connected_peers`, `set_stream_handler`, `new_stream`) and streams
with `read`/`write`/`close`/`reset`/`muxed_conn.peer_id`. The peerstore is py-libp2p's own
`PeerStore` (a data structure; its limits are part of what is measured).

What is modelled, and how:
- latency: each pair of peers has a fixed round-trip time drawn uniformly from `rtt` (20-100 ms
  by default); a byte written arrives half an RTT later. A new connection costs `CONNECT_RTTS`
  round trips (TCP, Noise, yamux), each new stream one more (multistream-select);
- identify: on a connection both sides learn each other's protocols, as py-libp2p's identify does;
- a peer that left, or sits on the other side of a partition, never answers: a dial or a request
  to it hangs until the caller's own timeout (no RST: the machine is gone, not the process);
- no bandwidth limit, no loss besides those; encryption and yamux framing are not simulated.

Every write is counted per peer (`Traffic`): messages and bytes sent."""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStore

CONNECT_RTTS = 2.0  # TCP handshake + Noise XX (yamux and identify ride on them)

StreamHandler = Callable[["SimStream"], Awaitable[None]]


class SimStreamError(Exception):
    """A simulated stream was reset, or the protocol is not supported by the remote peer."""


@dataclass
class Traffic:
    messages: int = 0
    bytes: int = 0


class _Pipe:
    """One direction of a stream: chunks with their arrival time, then an end of file."""

    def __init__(self) -> None:
        self.chunks: collections.deque[tuple[float, bytes]] = collections.deque()
        self.eof_at: float | None = None
        self.reset = False
        self.lot = trio.lowlevel.ParkingLot()

    def wake(self) -> None:
        self.lot.unpark_all()


@dataclass
class _Conn:
    peer_id: ID


class SimStream:
    """One end of a simulated stream (the `INetStream` methods the DHT RPC uses)."""

    def __init__(
        self, net: SimNetwork, local: SimHost, remote: SimHost, inbox: _Pipe, outbox: _Pipe
    ):
        self._net = net
        self._local = local
        self._remote = remote
        self._in = inbox
        self._out = outbox
        self.muxed_conn = _Conn(remote.peer_id)

    async def read(self, n: int = -1) -> bytes:
        while True:
            if self._in.reset:
                raise SimStreamError("stream reset")
            now = trio.current_time()
            if self._in.chunks:
                at, data = self._in.chunks[0]
                if at > now:
                    await trio.sleep_until(at)
                    continue
                if n < 0 or n >= len(data):
                    self._in.chunks.popleft()
                    return data
                self._in.chunks[0] = (at, data[n:])
                return data[:n]
            if self._in.eof_at is not None:
                if self._in.eof_at > now:
                    await trio.sleep_until(self._in.eof_at)
                    continue
                return b""
            await self._in.lot.park()

    async def write(self, data: bytes) -> None:
        if self._out.reset:
            raise SimStreamError("stream reset")
        if self._out.eof_at is not None:
            raise SimStreamError("stream closed for writing")
        self._net.count(self._local, len(data))
        if self._net.reachable(self._local, self._remote):  # else lost on the way
            at = trio.current_time() + self._net.rtt(self._local, self._remote) / 2
            self._out.chunks.append((at, bytes(data)))
            self._out.wake()

    async def close(self) -> None:
        if self._out.eof_at is None and not self._out.reset:
            self._out.eof_at = trio.current_time() + self._net.rtt(self._local, self._remote) / 2
            self._out.wake()

    async def reset(self) -> None:
        for pipe in (self._in, self._out):
            pipe.reset = True
            pipe.wake()


class SimHost:
    """A peer's host on the simulated network. `nursery` (set by the peer's run) holds the
    tasks that serve its inbound streams, so they end when the peer leaves."""

    def __init__(self, net: SimNetwork, peer_id: ID, index: int) -> None:
        self.net = net
        self.peer_id = peer_id
        self.index = index
        self.addr = multiaddr.Multiaddr(
            f"/ip4/10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}/tcp/4001"
        )
        self.peerstore = PeerStore()
        self.handlers: dict[str, StreamHandler] = {}
        self.connected: set[ID] = set()
        self.alive = True
        self.group = 0  # partition side
        self.nursery: trio.Nursery | None = None
        self.traffic = Traffic()

    # ---- the IHost methods petald's DHT node calls -----------------------------------------

    def get_id(self) -> ID:
        return self.peer_id

    def get_peerstore(self) -> PeerStore:
        return self.peerstore

    def get_addrs(self) -> list[multiaddr.Multiaddr]:
        return [self.addr]

    def get_connected_peers(self) -> list[ID]:
        return [p for p in self.connected if self.net.is_up(p)]

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self.handlers[str(protocol)] = handler

    async def connect(self, peer_id: ID) -> None:
        """Dials `peer_id` (hangs if it cannot be reached, like a dial to a vanished machine:
        callers bound it)."""
        remote = self.net.hosts.get(peer_id)
        if remote is None:
            await trio.sleep_forever()
        assert remote is not None
        if peer_id in self.connected and self.net.reachable(self, remote):
            return
        await trio.sleep(self.net.rtt(self, remote) * CONNECT_RTTS)
        if not self.net.reachable(self, remote):
            await trio.sleep_forever()
        self.connected.add(peer_id)
        remote.connected.add(self.peer_id)
        # identify, both ways
        self.peerstore.add_addrs(peer_id, [remote.addr], 0)
        self.peerstore.add_protocols(peer_id, list(remote.handlers))
        remote.peerstore.add_addrs(self.peer_id, [self.addr], 0)
        remote.peerstore.add_protocols(self.peer_id, list(self.handlers))

    async def new_stream(self, peer_id: ID, protocols: Sequence[str]) -> SimStream:
        await self.connect(peer_id)
        remote = self.net.hosts[peer_id]
        await trio.sleep(self.net.rtt(self, remote))  # multistream-select
        if not self.net.reachable(self, remote) or remote.nursery is None:
            await trio.sleep_forever()
        for protocol in protocols:
            handler = remote.handlers.get(str(protocol))
            if handler is not None:
                break
        else:
            raise SimStreamError(f"{peer_id} does not support {list(protocols)}")
        there, back = _Pipe(), _Pipe()
        mine = SimStream(self.net, self, remote, back, there)
        theirs = SimStream(self.net, remote, self, there, back)
        self.net.count_stream(self)
        remote.nursery.start_soon(handler, theirs)
        return mine


class SimNetwork:
    """All hosts, their liveness, partitions and round-trip times, and the traffic counters."""

    def __init__(self, *, rtt: tuple[float, float] = (0.020, 0.100), seed: int = 0) -> None:
        self.hosts: dict[ID, SimHost] = {}
        self.rtt_range = rtt
        self.seed = seed
        self.streams = 0

    def add(self, peer_id: ID) -> SimHost:
        host = SimHost(self, peer_id, len(self.hosts))
        self.hosts[peer_id] = host
        return host

    def rtt(self, a: SimHost, b: SimHost) -> float:
        lo, hi = sorted((a.index, b.index))
        frac = ((lo * 2654435761 + hi * 40503 + self.seed * 97) % 1000) / 1000
        return self.rtt_range[0] + frac * (self.rtt_range[1] - self.rtt_range[0])

    def is_up(self, peer_id: ID) -> bool:
        host = self.hosts.get(peer_id)
        return host is not None and host.alive

    def reachable(self, a: SimHost, b: SimHost) -> bool:
        return a.alive and b.alive and a.group == b.group

    def count(self, sender: SimHost, n: int) -> None:
        sender.traffic.messages += 1
        sender.traffic.bytes += n

    def count_stream(self, opener: SimHost) -> None:
        self.streams += 1

    def leave(self, peer_id: ID) -> None:
        """The peer vanishes without a word: its connections go silent."""
        host = self.hosts[peer_id]
        host.alive = False
        host.connected.clear()

    def split(self, groups: dict[ID, int]) -> None:
        for peer_id, host in self.hosts.items():
            host.group = groups.get(peer_id, 0)

    def heal(self) -> None:
        for host in self.hosts.values():
            host.group = 0
