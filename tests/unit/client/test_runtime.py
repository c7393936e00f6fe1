"""SwarmClient's lifecycle without a swarm: a start that cannot join fails with the one clear
error within its bound and leaves no thread behind; close is idempotent; calls after close are
refused; the loop thread's torch runs serially. (Joining a real swarm is tested in
tests/swarm/test_client.py.)"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from petald.client import ClientConfig, SwarmClient
from petald.client.runtime import serial_torch_in_this_thread
from petald.errors import PeerUnavailable, SessionClosed

T = TypeVar("T")


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


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def in_thread(fn: Callable[[], T]) -> T:
    out: list[T] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_loop_thread_torch_makes_no_thread_team() -> None:
    # The client's loop thread runs torch ops (history concatenation, decoding) big enough to go
    # parallel; a thread team of its own there made libgomp throttle the spin-wait of the
    # user's model in the same process (it decoded at 18 instead of 32 tokens/s).
    main_threads = torch.get_num_threads()
    big = torch.randn(1, 200, 576)  # > 32768 elements: a parallel op where threads > 1

    def loop_thread() -> tuple[bool, int, int]:
        done = serial_torch_in_this_thread()
        before = os_threads()
        torch.cat([big, big], 1).mul_(2)
        return done, torch.get_num_threads(), os_threads() - before

    done, threads, new_os_threads = in_thread(loop_thread)
    if not done:
        pytest.skip("this torch build's OpenMP runtime does not export omp_set_num_threads")
    assert (threads, new_os_threads) == (1, 0)
    # Only that thread changed: this one, and a thread started afterwards, keep the default.
    assert torch.get_num_threads() == main_threads
    assert in_thread(torch.get_num_threads) == main_threads


async def test_a_busy_server_is_banned_for_its_retry_after() -> None:
    """Catches: retry_after ignored (the first ban is PeerBans' 5 s), a hostile retry_after
    (infinite, NaN, huge) taken as is instead of the bans' cap."""
    from petald.errors import RemoteError

    client = SwarmClient(config=ClientConfig(initial_peers=("/ip4/127.0.0.1/tcp/1",)))
    now = trio.current_time()
    client.ban("busy", RemoteError("busy", "busy", "full", retry_after=120.0))
    client.ban("plain", RemoteError("plain", "internal", "oops"))
    for name, value in (("inf", float("inf")), ("nan", float("nan")), ("huge", 1e12)):
        client.ban(name, RemoteError(name, "busy", "full", retry_after=value))
    until = {p: t - now for p, t in client.bans._until.items()}
    assert 120 <= until["busy"] < 121 and 5 <= until["plain"] < 6
    assert until["huge"] <= client.bans.cap + 1
    assert until["inf"] < 6 and until["nan"] < 6  # not numbers: ignored
