"""petald.p2p.limits on two real py-libp2p hosts in one process: the per-peer inbound stream
cap (streams past it are reset at once, another peer is still served, a freed slot is reused)
and the guard around every handler (a handler that raises costs its stream, not the host)."""

from __future__ import annotations

import multiaddr
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr

from petald.p2p.config import P2PConfig
from petald.p2p.host import P2PHost
from petald.p2p.limits import MAX_INBOUND_STREAMS_PER_PEER

HOLD, BOOM = "/test/hold/1.0.0", "/test/boom/1.0.0"


def _host() -> P2PHost:
    config = P2PConfig(listen=("/ip4/127.0.0.1/tcp/0",), new_swarm=True)
    return P2PHost(create_new_key_pair(), config)


async def _open(client: P2PHost, server: P2PHost, protocol: str):
    peer = info_from_p2p_addr(multiaddr.Multiaddr(server.addrs()[0]))
    await client.connect(peer, timeout=5)
    return await client.host.new_stream(peer.peer_id, [protocol])


async def _open_and_ended(client: P2PHost, server: P2PHost, protocol: str) -> bool:
    """Opens a stream and writes a byte: whether the server ended it at once (a reset can
    reach us during protocol negotiation already)."""
    try:
        stream = await _open(client, server, protocol)
        await stream.write(b"x")
    except Exception:
        return True
    return await _ended(stream)


async def _ended(stream) -> bool:
    """Whether the other side reset or closed `stream` (within 5 s)."""
    with trio.move_on_after(5):
        try:
            await stream.read(1)
        except Exception:
            return True
        return True
    return False


async def test_streams_past_the_per_peer_cap_are_reset_and_others_still_served() -> None:
    """Catches: no cap (the extra stream stays open: not ended in 5 s), a cap counted for all
    peers together (the second peer's stream is reset), a slot never given back (the stream
    opened after one ends is reset), and a guard that lets a handler's exception through."""
    assert MAX_INBOUND_STREAMS_PER_PEER >= 32  # an honest client's sessions, forwards, DHT
    server, attacker, honest = _host(), _host(), _host()
    server.stream_limits.per_peer = 3
    release = trio.Event()
    entered = []

    async def hold(stream) -> None:
        entered.append(stream)
        await release.wait()
        await stream.close()

    async def boom(stream) -> None:
        raise ValueError("a bug a peer can trigger")

    server.host.set_stream_handler(HOLD, hold)
    server.host.set_stream_handler(BOOM, boom)
    async with trio.open_nursery() as nursery:
        for h in (server, attacker, honest):
            await nursery.start(h.run)
        held = [await _open(attacker, server, HOLD) for _ in range(3)]
        for s in held:
            await s.write(b"x")  # the handler runs once the stream's first data arrives
        with trio.fail_after(10):
            while len(entered) < 3:
                await trio.sleep(0.01)
        assert await _open_and_ended(attacker, server, HOLD)
        assert server.stream_limits.refused[HOLD] == 1
        other = await _open(honest, server, HOLD)
        await other.write(b"x")
        with trio.fail_after(10):
            while len(entered) < 4:
                await trio.sleep(0.01)
        assert await _open_and_ended(honest, server, BOOM)
        assert server.stream_limits.failed[BOOM] == 1
        release.set()
        for s in held:
            assert await _ended(s)
        with trio.fail_after(10):
            while server.stream_limits.open.get(attacker.host.get_id(), 0):
                await trio.sleep(0.01)
        assert await _open_and_ended(attacker, server, HOLD)  # served: the handler closes it
        assert server.stream_limits.refused[HOLD] == 1
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("protocol", ["/meshsub/1.1.0"])
def test_pubsub_streams_are_reset_when_its_handler_returns(protocol: str) -> None:
    from petald.p2p.limits import RESET_WHEN_HANDLER_RETURNS

    assert protocol.startswith(RESET_WHEN_HANDLER_RETURNS)
