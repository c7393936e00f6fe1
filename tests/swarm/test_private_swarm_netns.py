"""The private-swarm boundary across network namespaces (issue 10 item 4; the loopback variant is
test_private_swarm.py). petald.testing.wan builds three member namespaces that reach each other
only through a router namespace (delay 0):

    m0  petald node --swarm-key                  (the swarm's bootstrap)
    m1  petald serve --swarm-key --allow-peers   (a 1-block tiny Llama; the list names one peer)
    m2  outsiders: `petald status` without the key and with another key, and an `info` client
        with the key, once listed and once not (petald.testing.info_probe)

Each side's words are checked: the dialer's one-line error names the address it dialed, and the
accepting daemon logs the refusal with the address the connection came from (the router's).
Needs root, as CI runs; elsewhere it skips with `ip`'s own error as the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from libp2p.peer.id import ID

from petald.p2p.identity import load_or_create_identity
from petald.testing import DaemonProcess, Processes
from petald.testing.models import save_tiny_llama
from petald.testing.wan import Wan

pytestmark = pytest.mark.slow

MODEL = "netns-llama"
MISMATCH = "is in a private swarm: your swarm key is missing or different"
BOOT, SERVER, OUTSIDE = 0, 1, 2


@dataclass
class Swarm:
    wan: Wan
    tmp: Path
    key: Path
    other_key: Path
    boot: DaemonProcess
    server: DaemonProcess
    listed: Path  # the identity file of the peer on the server's allow list

    def addr(self, i: int, daemon: DaemonProcess) -> str:
        return f"{self.wan.announce(i)}/p2p/{daemon.peer_id}"

    def outside(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`python ARGS` in the outsiders' namespace."""
        return subprocess.run(
            self.wan.cmd(OUTSIDE, [sys.executable, *args]),
            capture_output=True,
            text=True,
            timeout=90,
            stdin=subprocess.DEVNULL,
        )


def petald_in(procs: Processes, wan: Wan, i: int, tmp: Path, *args: str) -> DaemonProcess:
    """`petald ARGS` in member i's namespace, listening at its fixed port and announcing its
    router address, owned by `procs` (`ip netns exec` execs it: SIGTERM reaches the daemon)."""
    cmd = [sys.executable, "-m", "petald.cli", *args, "--listen", wan.listen(i)]
    cmd += ["--announce", wan.announce(i), "--identity", str(tmp / f"m{i}.key")]
    proc = subprocess.Popen(
        wan.cmd(i, cmd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PETALD_NO_CONFIG": "1"},
    )
    return procs.adopt(proc)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    tmp = tmp_path_factory.mktemp("private-netns")
    wan = Wan(members=3, delay=0.0)
    try:
        try:
            wan.create()
        except RuntimeError as e:
            if "ip netns add" in str(e) and "failed" in str(e):
                pytest.skip(f"network namespaces not permitted (uid {os.geteuid()}): {e}")
            raise
        key, other = tmp / "swarm.key", tmp / "other.key"
        for path in (key, other):
            made = subprocess.run(
                [sys.executable, "-m", "petald.cli", "swarm-key", "new", str(path)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert made.returncode == 0, made.stderr
        save_tiny_llama(tmp / MODEL, layers=1)
        listed = tmp / "listed.key"
        pair, _ = load_or_create_identity(listed)
        allow = tmp / "allowed.txt"
        allow.write_text(f"{ID.from_pubkey(pair.public_key).to_base58()}\n")
        flags = ("--swarm-key", str(key), "--reachability", "public", "--no-relay")
        with Processes() as procs:
            boot = petald_in(procs, wan, BOOT, tmp, "node", "--new-swarm", *flags)
            boot.wait_ready(60)
            server = petald_in(
                procs, wan, SERVER, tmp, "serve", str(tmp / MODEL), "--blocks", "0:1",
                "--initial-peers", f"{wan.announce(BOOT)}/p2p/{boot.peer_id}",
                "--throughput", "100", "--allow-peers", str(allow), *flags,
            )  # fmt: skip
            server.wait_ready(120)
            yield Swarm(wan, tmp, key, other, boot, server, listed)
    finally:
        wan.delete()


@pytest.mark.parametrize("which", ["none", "other"])
def test_a_peer_without_the_key_cannot_connect(swarm: Swarm, which: str) -> None:
    """Catches: a node that lets a keyless (or other-keyed) peer in across a routed path (the
    status would join and exit 0), a dialer that reports it as a generic failure, and a node
    that refuses silently or logs the wrong reason."""
    args = ["-m", "petald.cli", "status", "--initial-peers", swarm.addr(BOOT, swarm.boot)]
    args += ["--wait", "1", "--listen", f"/ip4/{swarm.wan.own(OUTSIDE)}/tcp/0"]
    if which == "other":
        args += ["--swarm-key", str(swarm.other_key)]
    out = swarm.outside(*args)
    assert out.returncode == 1, out.stdout + out.stderr
    dialed = swarm.wan.announce(BOOT)
    assert out.stderr.strip().splitlines() == [f"petald: the peer at {dialed} {MISMATCH}"]
    reason = "the peer has no swarm key" if which == "none" else "the peer has another swarm key"
    line = swarm.boot.read_line_containing(f"({reason})", timeout=10)
    # The connection came through the router: the node names the router's address.
    assert f"refused a connection from {swarm.wan.public(BOOT)}:" in line, line


def test_a_peer_not_on_the_allow_list_gets_a_clear_refusal(swarm: Swarm) -> None:
    """Catches: an allow list not enforced for a peer in another namespace (the stranger gets
    the info), one that refuses the listed peer too, a refusal without the not_allowed code or
    a message that says what to do, and a server that refuses silently."""
    common = ["-m", "petald.testing.info_probe", swarm.addr(SERVER, swarm.server)]
    common += ["--initial-peers", swarm.addr(BOOT, swarm.boot), "--swarm-key", str(swarm.key)]
    common += ["--listen", f"/ip4/{swarm.wan.own(OUTSIDE)}/tcp/0"]
    listed = swarm.outside(*common, "--identity", str(swarm.listed))
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert listed.stdout.strip().splitlines()[-1] == f'{{"ok": true, "model": "{MODEL}"}}'
    stranger_key = swarm.tmp / "stranger.key"
    pair, _ = load_or_create_identity(stranger_key)
    stranger = ID.from_pubkey(pair.public_key).to_base58()
    out = swarm.outside(*common, "--identity", str(stranger_key))
    assert out.returncode == 0, out.stdout + out.stderr
    refused = json.loads(out.stdout.strip().splitlines()[-1])
    assert refused["ok"] is False and refused["code"] == "not_allowed", refused
    assert stranger in refused["message"] and "--allow-peers" in refused["message"], refused
    line = swarm.server.read_line_containing(f"from {stranger}: not on the allow", timeout=10)
    assert "refused /petald/info/1.0.0" in line
