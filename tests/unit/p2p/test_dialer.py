"""petald.p2p.dialer.Dialer.open_stream on two real py-libp2p hosts in one process: a stream
whose negotiation fails because its connection closed under it (what a pruned duplicate
connection gave a client in CI: "fail to write to multiselect communicator", the server then
banned) goes out again on a new connection; a failure on a live connection is the peer's and is
raised. The failure is injected at py-libp2p's `new_stream` (the one moment that cannot be
timed from outside): the injected call really closes the connection first."""

from __future__ import annotations

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.tools.constants import MAX_READ_LEN

from petald.errors import PeerUnavailable
from petald.p2p.config import P2PConfig
from petald.p2p.dialer import Dialer
from petald.p2p.host import P2PHost

ECHO = "/test/echo/1.0.0"


def _host() -> P2PHost:
    config = P2PConfig(listen=("/ip4/127.0.0.1/tcp/0",), new_swarm=True)
    return P2PHost(create_new_key_pair(), config)


async def _echo(stream) -> None:
    await stream.write(await stream.read(MAX_READ_LEN))
    await stream.close()


def _fail_first_stream(host, *, close_connection: bool) -> list[int]:
    """Makes the next ECHO `new_stream` fail as py-libp2p's does, after closing the connection
    when asked; returns a list that counts the ECHO calls (identify opens streams too)."""
    real, calls = host.new_stream, []

    async def new_stream(peer, protocols):
        if ECHO not in protocols:
            return await real(peer, protocols)
        calls.append(1)
        if len(calls) == 1:
            if close_connection:
                for conn in list(host.get_network().get_connections(peer)):
                    await conn.close()
            raise RuntimeError("handshake write failed: fail to write to multiselect communicator")
        return await real(peer, protocols)

    host.new_stream = new_stream
    return calls


@pytest.mark.parametrize("closed", [True, False])
async def test_a_stream_on_a_connection_that_closed_goes_out_on_a_new_one(closed: bool) -> None:
    """Catches: a healthy peer given up (PeerUnavailable, then banned) because the connection
    the stream took was closing; and the other way, a peer that fails streams on a live
    connection being asked twice (its failure hidden by a retry)."""
    server, client = _host(), _host()
    server.host.set_stream_handler(ECHO, _echo)
    async with trio.open_nursery() as nursery:
        for h in (server, client):
            await nursery.start(h.run)
        dialer = Dialer(client.host, None)
        peer = server.host.get_id()
        await dialer.ensure_connected(peer, [server.host.get_addrs()[0]])
        calls = _fail_first_stream(client.host, close_connection=closed)
        with trio.fail_after(20):
            if closed:
                stream = await dialer.open_stream(
                    peer.to_base58(), [str(a) for a in server.host.get_addrs()], ECHO, timeout=10
                )
                await stream.write(b"hello")
                assert await stream.read(MAX_READ_LEN) == b"hello"
                assert dialer.connection(peer) is not None
            else:
                with pytest.raises(PeerUnavailable, match="multiselect"):
                    await dialer.open_stream(peer.to_base58(), [], ECHO, timeout=10)
        assert len(calls) == (2 if closed else 1)
        nursery.cancel_scope.cancel()


async def test_a_closed_connection_the_swarm_still_lists_is_replaced() -> None:
    """py-libp2p lists a connection that has closed until its cleanup runs, and `host.connect`
    returns at once when it sees one. Catches: the dialer then finding no open connection and
    giving the peer up ("unreachable (no relay transport)", and a healthy server banned) instead
    of dialing a new one."""
    server, client = _host(), _host()
    server.host.set_stream_handler(ECHO, _echo)
    async with trio.open_nursery() as nursery:
        for h in (server, client):
            await nursery.start(h.run)
        dialer = Dialer(client.host, None)
        peer = server.host.get_id()
        addrs = [server.host.get_addrs()[0]]
        old = await dialer.ensure_connected(peer, addrs)
        await old.close()
        network = client.host.get_network()
        network.connections.setdefault(peer, []).insert(0, old)  # its cleanup has not run yet
        with trio.fail_after(20):
            conn = await dialer.ensure_connected(peer, addrs)
            assert conn is not old and not conn.is_closed
            stream = await dialer.open_stream(peer.to_base58(), [], ECHO, timeout=10)
            await stream.write(b"hello")
            assert await stream.read(MAX_READ_LEN) == b"hello"
        nursery.cancel_scope.cancel()
