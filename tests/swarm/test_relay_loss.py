"""A relay lost under a private server (issue 10 item 4), with real `petald` processes in network
namespaces (needs root, as CI runs; skipped with `ip`'s own error where namespaces are not
permitted):

    root ns (this test: the client)          relay namespaces              server ns
    a<S> A.1.2/24  <--veth-->  A.1.1/24  R1  A.2.1/24  <--veth-->  A.2.2/24
    b<S> A.3.2/24  <--veth-->  A.3.1/24  R2  A.4.1/24  <--veth-->  A.4.2/24  S
                                                                   lo: A.5.2/32 (listens)

Nothing forwards: the client reaches the private server S only through a circuit on R1 or R2,
and S reserves on both. While the client generates greedily, the relay its circuit runs through
is SIGKILLed; generation goes on through the other relay with the same text, and S stops
advertising the dead relay's circuit address (its next announcement, in the client's view)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from libp2p.peer.id import ID
from transformers import LlamaForCausalLM

from petald import AutoDistributedModelForCausalLM
from petald.client import ClientConfig, SwarmClient
from petald.p2p.relay import is_relayed
from petald.testing import DaemonProcess, Processes
from petald.testing.churn import AtTokens, wait_for_view
from petald.testing.models import save_tiny_llama
from petald.testing.wan import sh

pytestmark = pytest.mark.slow

MODEL = "tiny-relay-loss"
NET = "10.212"
NEW_TOKENS = 40
KILL_AT = 12  # new tokens out when the client's relay is killed
READY_TIMEOUT = 120.0


class Namespaces:
    """Two relay namespaces and the server's, each relay with one veth to the root namespace
    and one to the server's. Deleting a namespace deletes its veths (both ends)."""

    def __init__(self) -> None:
        sfx = f"{os.getpid() % 10000}{secrets.token_hex(2)}"  # veth names fit in 15 characters
        self.ns = {r: f"petald-{r}{sfx}" for r in ("r1", "r2", "s")}
        self.sfx = sfx
        self.created: list[str] = []

    def create(self) -> None:
        for name in self.ns.values():
            r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(
                    f"network namespaces not permitted: `ip netns add {name}` failed: "
                    f"{r.stderr.strip()!r} (run as root, as CI does)"
                )
            self.created.append(name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        s = self.ns["s"]
        for i, relay in ((1, "r1"), (2, "r2")):
            ns, up, down = self.ns[relay], 2 * i - 1, 2 * i  # subnets: to the root, to S
            root_end, relay_up = f"c{i}x{self.sfx}", f"u{i}x{self.sfx}"
            relay_down, server_end = f"d{i}x{self.sfx}", f"s{i}x{self.sfx}"
            sh("ip", "link", "add", root_end, "type", "veth", "peer", "name", relay_up,
               "netns", ns)  # fmt: skip
            sh("ip", "link", "add", server_end, "netns", s, "type", "veth", "peer", "name",
               relay_down, "netns", ns)  # fmt: skip
            sh("ip", "addr", "add", f"{NET}.{up}.2/24", "dev", root_end)
            sh("ip", "link", "set", root_end, "up")
            for dev, addr in ((relay_up, f"{NET}.{up}.1/24"), (relay_down, f"{NET}.{down}.1/24")):
                sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", s, "addr", "add", f"{NET}.{down}.2/24", "dev", server_end)
            sh("ip", "-n", s, "link", "set", server_end, "up")
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        sh("ip", "-n", s, "addr", "add", f"{NET}.5.2/32", "dev", "lo")

    def delete(self) -> list[str]:
        for name in self.created:
            sh("ip", "netns", "del", name, check=False)
        listed = sh("ip", "netns", "list", check=False).stdout
        return [n for n in self.created if n in listed]

    def spawn(self, procs: Processes, where: str, *args: str) -> DaemonProcess:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[where], sys.executable, "-m", "petald.cli", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        return procs.adopt(proc)


@pytest.fixture
def nets() -> Iterator[Namespaces]:
    n = Namespaces()
    try:
        n.create()
        yield n
    finally:
        left = n.delete()
        assert not left, f"namespaces left behind: {left}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    path = tmp_path_factory.mktemp("models") / MODEL
    return path, save_tiny_llama(path, layers=2, seed=3)


def test_a_private_server_keeps_serving_when_its_relay_is_lost(
    nets: Namespaces, procs: Processes, tiny, tmp_path: Path
) -> None:
    """Catches: a client that bans the only server of its blocks for its relay's death (no
    route), one that redials the dead relay's circuit only (unreachable), a failover that loses
    or repeats tokens (other text), and a server that keeps advertising the dead relay's
    circuit (the view never drops it)."""
    relays = {}
    for i, name in ((1, "r1"), (2, "r2")):
        relays[name] = nets.spawn(
            procs, name, "node", "--new-swarm", "--identity", str(tmp_path / f"{name}.key"),
            "--listen", f"/ip4/{NET}.{2 * i - 1}.1/tcp/0", f"/ip4/{NET}.{2 * i}.1/tcp/0",
        )  # fmt: skip
    for r in relays.values():
        r.wait_ready(READY_TIMEOUT)

    def addr_on(relay: DaemonProcess, subnet: int) -> str:
        return next(a for a in relay.ready["addrs"] if f"/ip4/{NET}.{subnet}.1/" in a)

    server = nets.spawn(
        procs, "s", "serve", str(tiny[0]), "--blocks", "0:2", "--throughput", "100",
        "--cache-tokens", "512", "--identity", str(tmp_path / "s.key"), "--log-level", "info",
        "--listen", f"/ip4/{NET}.5.2/tcp/0",
        "--initial-peers", addr_on(relays["r1"], 2), addr_on(relays["r2"], 4),
    )  # fmt: skip
    ready = server.wait_ready(READY_TIMEOUT)
    assert ready["reachability"] == "private", server.log()
    circuits = [a for a in ready["addrs"] if "/p2p-circuit" in a]
    via = {a.split("/p2p/")[1].split("/")[0] for a in circuits}
    assert {r.peer_id for r in relays.values()} <= via, ready

    torch.manual_seed(2)
    ids = torch.randint(1, 128, (1, 7))
    with torch.no_grad():
        want = tiny[1].generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    killed: list[str] = []

    def kill_the_clients_relay() -> None:
        conns = client.stack.host.host.get_network().get_connections(ID.from_base58(server_id))
        via = [str(c.get_transport_addresses()[0]) for c in conns if is_relayed(c)]
        assert via, f"the client reached the private server without a relay: {conns}"
        name = next(n for n, r in relays.items() if r.peer_id in via[0])
        relays[name].kill()
        killed.append(name)

    config = ClientConfig(
        initial_peers=(addr_on(relays["r1"], 1), addr_on(relays["r2"], 3)),
        step_timeout=10,
        request_timeout=10,
    )
    server_id = server.peer_id
    streamer = AtTokens({KILL_AT: kill_the_clients_relay})
    with SwarmClient(config=config) as client:
        client.wait_for_blocks(MODEL, 2, timeout=60)
        model = AutoDistributedModelForCausalLM.from_pretrained(tiny[0], client=client)
        t0 = time.monotonic()
        with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as cache:
            got = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer)
            stats = cache.session.stats
        took = time.monotonic() - t0
        dead = relays[killed[0]].peer_id

        def readvertised(view) -> bool:
            e = view.get(server_id)
            return e is not None and not any(dead in a for a in e.info.addrs)

        wait_for_view(client, MODEL, readvertised, timeout=60)
    print(
        f"{NEW_TOKENS} tokens in {took:.1f} s with relay {killed} killed at token {KILL_AT}; "
        f"failovers: {[(f.position, round(f.stall, 3)) for f in stats.failovers]}"
    )
    assert streamer.done == [KILL_AT]
    assert len(stats.failovers) == 1, stats.failovers  # the kill cut the session's circuit
    assert got.tolist() == want.tolist()
