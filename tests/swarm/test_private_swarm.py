"""A private swarm seen from outside: a `petald node --swarm-key` and two `petald serve
--swarm-key --allow-peers` of a tiny 2-block model (block 0, block 1), real processes on
127.0.0.1.

- a `petald status` without the key, and one with another key, cannot join: each exits 1 with
  the one-line error, and the node logs the refused connection with the reason;
- a client with the key whose peer id is on the server's allow list gets its info and forwards
  computed; one with the key but not on the list gets `not_allowed`, raised by petald.client's
  RPC functions as a RemoteError with a message that says what to do; the server logs it;
- the listed client generates the local model's greedy tokens through both servers, the first
  pushing its output to the second (a server is no listed client: pushes between announced
  servers must pass).

Loopback rather than network namespaces: the swarm key is checked on the bytes of every
connection, before Noise, whatever route the connection took; a namespace would add a veth pair
and routes, not a path on which the check could behave differently (the peers' addresses only
enter the accepting side's log, asserted here with 127.0.0.1)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr
from transformers import LlamaForCausalLM

from petald import AutoDistributedModelForCausalLM
from petald.client import ClientConfig, SwarmClient
from petald.client.rpc import call_forward, call_info
from petald.dht.node import DhtConfig
from petald.errors import RemoteError
from petald.p2p.config import P2PConfig
from petald.stack import start_stack
from petald.testing import DaemonProcess, Processes
from petald.testing.models import save_tiny_llama
from petald.types import BlockRange

pytestmark = pytest.mark.slow

MODEL = "private-llama"
BLOCKS = 2
HIDDEN = 64
NEW_TOKENS = 4
MISMATCH = "is in a private swarm: your swarm key is missing or different"


@dataclass
class Private:
    key: Path
    other_key: Path
    boot: DaemonProcess
    server: DaemonProcess  # block 0
    second: DaemonProcess  # block 1
    allowed: KeyPair
    model_path: Path
    model: LlamaForCausalLM


def petald(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "petald.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Private]:
    tmp = tmp_path_factory.mktemp("private")
    key, other = tmp / "swarm.key", tmp / "other.key"
    for path in (key, other):
        made = petald("swarm-key", "new", str(path))
        assert made.returncode == 0, made.stderr
    model = save_tiny_llama(tmp / MODEL, layers=BLOCKS, hidden=HIDDEN)
    allowed = create_new_key_pair()
    allow_file = tmp / "allowed.txt"
    allow_file.write_text(f"# the one client\n{ID.from_pubkey(allowed.public_key).to_base58()}\n")
    with Processes() as owned:
        flags = ("--swarm-key", str(key), "--reachability", "public", "--no-relay")
        boot = owned.start("node", "--new-swarm", *flags, identity=tmp / "boot.key")
        servers = [
            owned.spawn(
                "serve",
                str(tmp / MODEL),
                "--blocks",
                f"{i}:{i + 1}",
                "--initial-peers",
                boot.addr,
                "--throughput",
                "100",
                "--allow-peers",
                str(allow_file),
                *flags,
                identity=tmp / f"server{i}.key",
            )
            for i in range(BLOCKS)
        ]
        with ThreadPoolExecutor(BLOCKS) as pool:  # they load in parallel
            list(pool.map(lambda d: d.wait_ready(120), servers))
        yield Private(key, other, boot, *servers, allowed, tmp / MODEL, model)


def test_peer_without_key_cannot_connect(private: Private) -> None:
    """Catches: a node that accepts a keyless peer (status would join and exit 0), a dialer
    that reports a mismatch as a generic "none of the initial peers answered", and a node that
    refuses silently."""
    out = petald("status", "--initial-peers", private.boot.addr, "--wait", "1")
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines == [f"petald: the peer at {private.boot.addr.split('/p2p/')[0]} {MISMATCH}"]
    line = private.boot.read_line_containing("(the peer has no swarm key)", timeout=10)
    assert "refused a connection from 127.0.0.1:" in line


def test_wrong_key_cannot_connect(private: Private) -> None:
    """Catches: a protector that ignores the key's value (any key would pass), and a wrong key
    logged like a missing one."""
    args = ("--initial-peers", private.boot.addr, "--wait", "1", "--swarm-key", private.other_key)
    out = petald("status", *map(str, args))
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [
        f"petald: the peer at {private.boot.addr.split('/p2p/')[0]} {MISMATCH}"
    ]
    line = private.boot.read_line_containing("(the peer has another swarm key)", timeout=10)
    assert "refused a connection from 127.0.0.1:" in line


async def _as_client(private: Private, key_pair: KeyPair) -> tuple[dict | Exception, ...]:
    """Joins with the swarm key as `key_pair`; (info, forward output) from the server, or the
    errors raised instead."""
    config = P2PConfig(
        listen=("/ip4/127.0.0.1/tcp/0",),
        initial_peers=(private.boot.addr,),
        swarm_key=private.key,
    )
    results: list = []
    async with trio.open_nursery() as nursery:
        stack = await start_stack(
            nursery, key_pair, config, dht_config=DhtConfig(client_mode=True), announcements=False
        )
        server = private.server.peer_id
        await stack.host.connect(info_from_p2p_addr(Multiaddr(private.server.addr)), timeout=10)

        async def opener(peer: str, protocol: str) -> object:
            return await stack.host.host.new_stream(ID.from_base58(peer), [protocol])

        hidden = torch.randn(1, 3, HIDDEN, generator=torch.Generator().manual_seed(0))
        for call in (
            lambda: call_info(opener, server, timeout=20),
            lambda: call_forward(opener, server, BlockRange(0, 1), hidden, timeout=20),
        ):
            try:
                results.append(await call())
            except RemoteError as e:
                results.append(e)
        nursery.cancel_scope.cancel()
    return (*results, hidden)


async def test_allow_peers(private: Private) -> None:
    """Catches: an allow list that is not enforced (the unlisted client would get answers), one
    that refuses everyone (the listed client would not), a refusal without the not_allowed code
    or without a message that says what to do, and a server that refuses silently."""
    info, out, hidden = await _as_client(private, private.allowed)
    assert isinstance(info, dict) and info["model"] == MODEL, info
    assert isinstance(out, torch.Tensor) and out.shape == hidden.shape
    assert torch.isfinite(out).all() and not torch.allclose(out, hidden)

    stranger = create_new_key_pair()
    stranger_id = ID.from_pubkey(stranger.public_key).to_base58()
    info, out, _ = await _as_client(private, stranger)
    for refused in (info, out):
        assert isinstance(refused, RemoteError), refused
        assert refused.code == "not_allowed"
        assert stranger_id in refused.message and "--allow-peers" in refused.message
    line = private.server.read_line_containing(f"from {stranger_id}: not on the allow", timeout=10)
    assert "refused /petald/info/1.0.0" in line


def test_listed_client_generates_through_servers_that_push(private: Private) -> None:
    """Catches: pushes between servers refused by the allow list (the step would wait for a
    push that never comes, then fail), a ClientConfig.swarm_key not passed to the client's host
    (it could not join), and wrong tokens."""
    config = ClientConfig(
        initial_peers=(private.boot.addr,),
        swarm_key=private.key,
        step_timeout=10,
        max_attempts=1,
    )
    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    want = private.model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    with SwarmClient(config=config, key_pair=private.allowed) as client:
        client.wait_for_blocks(MODEL, BLOCKS, timeout=30)
        model = AutoDistributedModelForCausalLM.from_pretrained(private.model_path, client=client)
        with model.inference_session(max_length=16) as cache:
            got = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            stats = cache.session.stats
    assert got.tolist() == want.tolist()
    assert stats.passed_on == stats.steps > 0  # block 1's input came by push every step
    assert not stats.failovers
