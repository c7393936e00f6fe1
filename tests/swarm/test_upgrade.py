"""Relayed connections are replaced by direct ones when the peer turns out to be dialable:
on loopback a server that calls itself private (`--reachability private`) reserves on a relay
and advertises only its circuit address; a client dials that address (relayed), and its dialer
upgrades to a direct connection using the addresses identify reported, then closes the relayed
one."""

from __future__ import annotations

from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from petald.p2p.config import P2PConfig
from petald.p2p.dialer import Dialer
from petald.p2p.host import P2PHost
from petald.p2p.relay import RelayService, is_relayed
from petald.testing import Processes

pytestmark = pytest.mark.slow


async def test_relayed_connection_is_upgraded_to_direct(tmp_path: Path, procs: Processes) -> None:
    relay = procs.start("node", "--new-swarm", identity=tmp_path / "relay.key")
    server = procs.start(
        "node",
        "--initial-peers",
        relay.addr,
        "--reachability",
        "private",
        identity=tmp_path / "server.key",
    )
    assert server.ready["reachability"] == "private"
    circuit = next(a for a in server.ready["addrs"] if "/p2p-circuit" in a)
    key = create_new_key_pair()
    host = P2PHost(key, P2PConfig(listen=("/ip4/127.0.0.1/tcp/0",), new_swarm=True))
    relay_svc = RelayService(host.host, offer_hop=False)
    dialer = Dialer(host.host, relay_svc.transport)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        await nursery.start(relay_svc.run)
        await nursery.start(dialer.run)
        peer = ID.from_base58(server.peer_id)
        first = await dialer.ensure_connected(peer, [multiaddr.Multiaddr(circuit)])
        assert is_relayed(first)
        t0 = trio.current_time()
        direct = await dialer.wait_direct(peer, timeout=20)
        took = (trio.current_time() - t0) * 1e3
        print(f"upgraded to a direct connection {took:.0f} ms after the circuit dial")
        assert not is_relayed(direct)
        assert dialer.connection(peer) is direct
        assert all(not is_relayed(c) for c in host.host.get_network().get_connections(peer))
        nursery.cancel_scope.cancel()
