"""SwarmClient's lifecycle without a swarm: a start that cannot join fails with the one clear
error within its bound and leaves no thread behind; close is idempotent; calls after close are
refused. (Joining a real swarm is tested in tests/swarm/test_client.py.)"""

from __future__ import annotations

import socket
import threading

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from petald.client import ClientConfig, SwarmClient
from petald.errors import PeerUnavailable, SessionClosed


def client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "petald-client"]


def test_unreachable_swarm_fails_start_cleanly() -> None:
    # A bound socket that does not listen: connections are refused, and no one else can take
    # the port while the test runs.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        peer = ID.from_pubkey(create_new_key_pair().public_key)
        config = ClientConfig(initial_peers=(f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer}",))
        client = SwarmClient(config=config)
        with pytest.raises(PeerUnavailable, match="initial peers"):
            client.start()
    assert not client_threads()
    client.close()
    client.close()
    with pytest.raises(SessionClosed):
        client.servers("m")


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="initial_peers"):
        SwarmClient([])
    with pytest.raises(ValueError, match="max_attempts"):
        ClientConfig(initial_peers=("/ip4/127.0.0.1/tcp/1/p2p/x",), max_attempts=0)
