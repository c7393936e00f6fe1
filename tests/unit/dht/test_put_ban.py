"""petald.dht.rpc + petald.p2p.bans on real py-libp2p hosts: a peer flooding PUT_VALUE is
throttled, then banned by the whole host (disconnected, its new connection closed at once),
while another peer's puts are still served."""

from __future__ import annotations

import multiaddr
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr

from petald.dht.flood import PeerThrottle, ThrottleConfig
from petald.dht.rpc import DhtRpc
from petald.errors import PeerUnavailable, RemoteError
from petald.p2p.config import P2PConfig
from petald.p2p.host import P2PHost
from petald.wire.kad_messages import DhtRecord, KadMessage, MessageType

# Small numbers so the flood is short: 4 puts at once, none after, banned on the 3rd refusal.
FLOOD = ThrottleConfig(rate=0.0, burst=4, strikes_to_ban=3, ban_seconds=600.0)


def _host() -> P2PHost:
    config = P2PConfig(listen=("/ip4/127.0.0.1/tcp/0",), new_swarm=True)
    return P2PHost(create_new_key_pair(), config)


def _put(i: int) -> KadMessage:
    return KadMessage(MessageType.PUT_VALUE, b"k", DhtRecord(b"k", b"v%d" % i))


async def _accept(peer, request: KadMessage) -> KadMessage:
    return request  # the spec's answer to a stored PUT_VALUE: the request echoed


async def test_a_put_flood_is_throttled_then_banned_host_wide() -> None:
    """Catches: no ban after the throttle's strikes (the flooder's connection stays up and its
    later put goes through its new connection's refusal), a ban that does not close the
    connections (still connected), a ban that does not refuse a reconnect (the put after the
    ban is answered), and a ban of everyone (the honest peer's put fails)."""
    server, flooder, honest = _host(), _host(), _host()
    rpc = DhtRpc(server.host, _accept, rpc_timeout=5)
    rpc.puts = PeerThrottle(FLOOD)
    rpc.serve()
    clients = [DhtRpc(h.host, _accept, rpc_timeout=5) for h in (flooder, honest)]
    async with trio.open_nursery() as nursery:
        for h in (server, flooder, honest):
            await nursery.start(h.run)
        peer = info_from_p2p_addr(multiaddr.Multiaddr(server.addrs()[0]))
        for h in (flooder, honest):
            await h.connect(peer, timeout=5)
        answered = refused = 0
        for i in range(FLOOD.burst + FLOOD.strikes_to_ban):
            try:
                await clients[0].request(peer.peer_id, _put(i))
                answered += 1
            except (PeerUnavailable, RemoteError):  # the server reset the stream
                refused += 1
        assert (answered, refused) == (FLOOD.burst, FLOOD.strikes_to_ban)
        assert rpc.counters["banned"] == 1 and rpc.counters["throttled"] == FLOOD.strikes_to_ban
        assert rpc.bans.banned(flooder.host.get_id(), trio.current_time())
        with trio.fail_after(5):  # the ban closed its connections
            while flooder.host.get_network().get_connections(peer.peer_id):
                await trio.sleep(0.01)
        # It dials again: the connection is closed as soon as it is up, nothing is served.
        answered_after_ban = False
        try:
            await flooder.connect(peer, timeout=5)
            await clients[0].request(peer.peer_id, _put(99))
            answered_after_ban = True
        except Exception:  # refused: at the dial, at the stream's opening or with a reset
            pass
        assert not answered_after_ban
        assert rpc.bans.refused >= 1
        with trio.fail_after(5):  # and that connection is gone too
            while flooder.host.get_network().get_connections(peer.peer_id):
                await trio.sleep(0.01)
        answer = await clients[1].request(peer.peer_id, _put(100))
        assert answer.record is not None and answer.record.value == b"v100"
        nursery.cancel_scope.cancel()
