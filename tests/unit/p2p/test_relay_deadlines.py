"""petald.p2p.relay.SafeRelayProtocol on two real py-libp2p hosts: a HOP stream whose request
never completes is ended within the request deadline (upstream held it 30 s and then never
closed it), and an honest RESERVE on its own stream is still answered and closed."""

from __future__ import annotations

import multiaddr
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID

from petald.p2p import relay as relay_module
from petald.p2p.config import P2PConfig
from petald.p2p.host import P2PHost
from petald.p2p.relay import RelayService, reserve

DEADLINE = 0.5


def _host() -> P2PHost:
    return P2PHost(
        create_new_key_pair(), P2PConfig(listen=("/ip4/127.0.0.1/tcp/0",), new_swarm=True)
    )


async def _ended_within(stream, seconds: float) -> bool:
    """Whether the relay closed or reset `stream` within `seconds`."""
    with trio.move_on_after(seconds):
        try:
            while await stream.read(1024):
                pass
        except Exception:
            pass
        return True
    return False


async def test_an_incomplete_hop_request_is_ended_within_the_deadline(monkeypatch) -> None:
    """Catches: the request read without our deadline (upstream's 30 s: not ended within 5 s
    of a 0.5 s deadline), and a refused request whose stream is left open (the half-closed
    stream is never ended: upstream writes a status and returns without closing)."""
    monkeypatch.setattr(relay_module, "HOP_REQUEST_TIMEOUT", DEADLINE)
    server, attacker = _host(), _host()
    relay = RelayService(server.host, offer_hop=True)
    async with trio.open_nursery() as nursery:
        for service in (server.run, relay.run, attacker.run):
            await nursery.start(service)
        peer = info_from_p2p_addr(multiaddr.Multiaddr(server.addrs()[0]))
        await attacker.connect(peer, timeout=5)
        # A length prefix of 10, then 3 bytes: still open (slow loris), and half-closed.
        held = await attacker.host.new_stream(peer.peer_id, [HOP_PROTOCOL_ID])
        await held.write(b"\x0a\x08\x00\x12")
        closed = await attacker.host.new_stream(peer.peer_id, [HOP_PROTOCOL_ID])
        await closed.write(b"\x0a\x08\x00\x12")
        await closed.close()
        t0 = trio.current_time()
        assert await _ended_within(held, 5.0)
        assert trio.current_time() - t0 >= DEADLINE * 0.9  # not refused before the deadline
        assert await _ended_within(closed, 5.0)
        # An honest RESERVE is still answered, on a stream the relay then closes.
        r = await reserve(attacker.host, peer.peer_id)
        assert r.relay == peer.peer_id and r.expire > 0
        nursery.cancel_scope.cancel()
