"""`petald node` as a real process on loopback: identity, ready line, joining, clean stop, and
clear errors for bad flags."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from petald.testing import Processes, start_daemon

pytestmark = pytest.mark.slow


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "petald.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_identity_is_created_private_and_reused(tmp_path: Path) -> None:
    key = tmp_path / "state" / "identity.key"
    with start_daemon("node", "--new-swarm", identity=key) as a:
        first = a.peer_id
        assert a.addr.startswith("/ip4/127.0.0.1/tcp/") and a.addr.endswith(f"/p2p/{first}")
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    with start_daemon("node", "--new-swarm", identity=key) as b:
        assert b.peer_id == first


def test_second_daemon_joins_and_both_stop_cleanly(tmp_path: Path, procs: Processes) -> None:
    a = procs.start("node", "--new-swarm", identity=tmp_path / "a.key")
    b = procs.start("node", "--initial-peers", a.addr, identity=tmp_path / "b.key")
    assert a.peer_id != b.peer_id
    for d in (b, a):
        d.proc.send_signal(signal.SIGTERM)
        stopped = d.read_event("stopped", timeout=20)
        assert stopped == {"event": "stopped"}
        assert d.proc.wait(timeout=20) == 0, d.log()
        assert "Traceback" not in d.log()


def test_sigint_stops_like_sigterm(tmp_path: Path, procs: Processes) -> None:
    a = procs.start("node", "--new-swarm", identity=tmp_path / "a.key")
    assert a.stop(sig=signal.SIGINT) == 0, a.log()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["node"], "no swarm to join"),
        (["node", "--new-swarm", "--listen", "garbage"], "is not a multiaddr"),
        (["node", "--new-swarm", "--listen", "/ip4/127.0.0.1/udp/0"], "not TCP"),
        (["node", "--initial-peers", "/ip4/127.0.0.1/tcp/1"], "no peer id"),
        (
            [
                "node",
                "--new-swarm",
                "--initial-peers",
                "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDgKqnygTw3cJrSFiHd9szjhwNcEQE9x8B2zJvZcEhCyL",
            ],
            "drop",
        ),
    ],
)
def test_bad_flags_are_clear_errors(args: list[str], message: str, tmp_path: Path) -> None:
    r = run_cli(*args, "--identity", str(tmp_path / "k"))
    assert r.returncode == 2, r
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_unreachable_initial_peer_fails_with_a_message(tmp_path: Path) -> None:
    with start_daemon("node", "--new-swarm", identity=tmp_path / "a.key") as a:
        peer_id = a.peer_id
    # The peer is gone: its port refuses connections.
    r = run_cli(
        "node", "--initial-peers", a.addr, "--identity", str(tmp_path / "b.key"), timeout=90
    )
    assert r.returncode == 1, r
    assert "none of the initial peers answered" in r.stderr
    assert peer_id  # the address really was a full one
    assert "Traceback" not in r.stderr


def test_world_readable_identity_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "k"
    with start_daemon("node", "--new-swarm", identity=key):
        pass
    os.chmod(key, 0o644)
    r = run_cli("node", "--new-swarm", "--identity", str(key))
    assert r.returncode == 2
    assert "chmod 600" in r.stderr


def test_ready_line_is_one_json_object(tmp_path: Path) -> None:
    with start_daemon("node", "--new-swarm", identity=tmp_path / "k") as a:
        line = next(x for x in a.output if x.startswith("{"))
        assert json.loads(line)["peer_id"] == a.peer_id
