"""petald.notify against a socket playing systemd's side: datagrams on a path or an abstract
address, the environment read once and removed, a vanished socket survived, the watchdog pinging
from the trio loop (and not while the loop is blocked), children's STATUS lines relayed and
nothing else of theirs."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from petald.notify import Notifier


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    yield sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting now, without blocking."""
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_messages_are_datagrams_and_the_environment_is_consumed(systemd: socket.socket) -> None:
    """Catches: the variables left for children to inherit, a watchdog taken that $WATCHDOG_PID
    gives to another process, lines sent as separate datagrams."""
    env = {"NOTIFY_SOCKET": systemd.getsockname(), "WATCHDOG_USEC": "200000"}
    n = Notifier.from_environ(env)
    assert env == {} and n.watchdog_interval == pytest.approx(0.1)
    n.status("joining")
    n.status("3/5", part="load")
    n.ready()
    n.stopping("draining")
    assert received(systemd) == [
        "STATUS=joining",
        "STATUS=joining; 3/5",
        "READY=1\nSTATUS=joining",
        "STOPPING=1\nSTATUS=draining",
    ]
    other = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_environ(other).watchdog_interval is None
    assert not Notifier.from_environ({}).send("READY=1")  # unset: a no-op


def test_abstract_namespace_and_a_vanished_socket() -> None:
    """Catches: '@' taken as a file name; an error raised into the daemon; a socket given up for
    good after one failure (the watchdog would stop: systemd restarts a healthy daemon)."""
    name = f"petald-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        n = Notifier(f"@{name}")
        assert n.send("READY=1")
        assert sock.recv(100) == b"READY=1"
    assert not n.send("WATCHDOG=1")  # gone: False, no exception
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())  # back (systemd re-executed): notified again
        sock.settimeout(5)
        assert n.send("WATCHDOG=1") and sock.recv(100) == b"WATCHDOG=1"


async def test_watchdog_pings_from_the_loop_and_relay_passes_status_only(
    systemd: socket.socket,
) -> None:
    """Catches: pings from a thread (they would go on while the loop hangs), READY from a child
    passed on."""
    n = Notifier(systemd.getsockname(), watchdog_usec=40_000)  # a ping every 20 ms
    n.relay_children()
    child = Notifier.from_environ({"NOTIFY_SOCKET": os.environ["NOTIFY_SOCKET"]})
    seen: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(n.run)
            child.send("READY=1")
            child.status("loading blocks 0:4: 1/4")
            with trio.fail_after(5):
                while not any("loading" in m for m in seen):
                    await trio.sleep(0.01)
                    seen += received(systemd)
            time.sleep(0.3)  # the loop hangs (no checkpoint since the last read): 15 periods
            during = received(systemd)
            with trio.fail_after(5):
                while "WATCHDOG=1" not in seen[-1:]:
                    await trio.sleep(0.01)
                    seen += received(systemd)
            nursery.cancel_scope.cancel()
    finally:
        n.close()
    assert during == []
    assert "STATUS=loading blocks 0:4: 1/4" in seen and "READY=1" not in seen
    assert seen.count("WATCHDOG=1") >= 2  # before the hang and after it
    assert "NOTIFY_SOCKET" not in os.environ
