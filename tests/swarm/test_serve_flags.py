"""Flags of `petald serve` and `petald node` seen from outside, on one swarm of one bootstrap node
and three servers of the same 3-block model:

- numbers over the wire from `--dtype bfloat16`, `--dtype float16` and `--quant nf4` against the
  float32 transformers reference of the same blocks, each within a tolerance stated below and,
  where precision is lost on purpose, further from the reference than float32 rounding could be:
  a server that ignored --dtype or --quant would pass no lower bound;
- `--throughput auto` reuses a cached value, `eval` measures again and stores it, and a cache file
  that is not JSON is measured over and rewritten (each server has its own cache directory);
- `--public-name` and `--announce` in another peer's view of the announcements, `--no-relay` in
  its view of the protocols a peer offers (identify).

The model's weights are drawn with std 0.1 (transformers' default is 0.02): at 0.02 a block
changes the residual stream by about 2 % of its size, as little as bfloat16 rounding does over
three blocks, so a dropped block would hide in the tolerance. At 0.1 the last block alone moves
the output by ~40 % (measured: relative norm 0.41), far outside every tolerance here."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr
from transformers import LlamaConfig, LlamaForCausalLM

from petald import __version__
from petald.dht.node import DhtConfig
from petald.p2p.config import P2PConfig
from petald.server.handlers import FORWARD_PROTOCOL, INFO_PROTOCOL
from petald.stack import start_stack
from petald.testing import DaemonProcess, Processes
from petald.testing.models import tiny_config_kwargs
from petald.testing.rpc import rpc_call

pytestmark = pytest.mark.slow

MODEL = "flags-llama"
BLOCKS = 3
HIDDEN = 64
SENTINEL = 4242.5  # tokens/s: a cached value no measurement gives
PUBLIC_NAME = "wire-bf16"
# Where the nf4 server says it is reachable (an operator's port forward): on loopback, and
# nothing listens there, so a peer that dials it is refused at once.
ANNOUNCED = "/ip4/127.0.0.3/tcp/9"
HOP = "/libp2p/circuit/relay/0.2.0/hop"  # circuit relay v2's HOP protocol, offered by relays
SERVERS = {  # name: extra `petald serve` flags
    "bfloat16": ("--dtype", "bfloat16", "--throughput", "auto", "--public-name", PUBLIC_NAME),
    "float16": ("--dtype", "float16", "--throughput", "eval"),
    "nf4": ("--quant", "nf4", "--reachability", "public", "--announce", ANNOUNCED),  # auto
}


@dataclass
class Swarm:
    boot: DaemonProcess  # `petald node --no-relay`
    servers: dict[str, DaemonProcess]
    caches: dict[str, Path]  # each server's PETALD_CACHE_DIR
    seeded: dict[str, bytes]  # what each cache file held before its server started


def cache_key(dtype: str, quant: str) -> str:
    """The throughput cache's key of a span of this model (petald.server.throughput.cache_key),
    written out here so the test does not trust the code under test for it."""
    torch_version = torch.__version__
    return f"{MODEL}|{BLOCKS} blocks|cpu|{dtype}|{quant}|torch {torch_version}|petald {__version__}"


def listen_addr(daemon: DaemonProcess) -> str:
    """The TCP address `daemon` really listens on (its ready line lists what it announces),
    read from /proc: its listening sockets' inodes among /proc/net/tcp's LISTEN entries."""
    fds = Path(f"/proc/{daemon.proc.pid}/fd")
    inodes = set()
    for fd in fds.iterdir():
        link = os.readlink(fd)
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and inode in inodes:  # 0A: LISTEN
            host, port = local.split(":")
            ip = ".".join(str(b) for b in bytes.fromhex(host)[::-1])
            return f"/ip4/{ip}/tcp/{int(port, 16)}/p2p/{daemon.peer_id}"
    raise AssertionError(f"{daemon.name} listens on no TCP socket")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    torch.manual_seed(0)
    config = LlamaConfig(**tiny_config_kwargs(layers=BLOCKS, hidden=HIDDEN), initializer_range=0.1)
    llama = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("models") / MODEL
    llama.save_pretrained(path)
    return path, llama


@pytest.fixture(scope="module")
def swarm(
    model: tuple[Path, LlamaForCausalLM], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Swarm]:
    """A `petald node --no-relay` and one server of blocks 0:3 per entry of SERVERS, started
    together. Caches: bfloat16's holds SENTINEL under its key (to be reused), float16's too
    plus another model's entry (eval measures anyway, and keeps the other), nf4's is garbage."""
    tmp = tmp_path_factory.mktemp("flags")
    seeds = {
        "bfloat16": json.dumps({cache_key("bfloat16", "none"): SENTINEL}).encode(),
        "float16": json.dumps({cache_key("float16", "none"): SENTINEL, "other": 7.0}).encode(),
        "nf4": b"\x00{not json",
    }
    caches = {}
    for name, data in seeds.items():
        caches[name] = tmp / f"cache-{name}"
        caches[name].mkdir()
        (caches[name] / "throughput.json").write_bytes(data)
    with Processes() as owned:
        boot = owned.start("node", "--new-swarm", "--no-relay", identity=tmp / "boot.key")
        span = (str(model[0]), "--blocks", f"0:{BLOCKS}", "--initial-peers", boot.addr)
        started = {
            name: owned.spawn(
                "serve",
                *span,
                *flags,
                identity=tmp / f"{name}.key",
                env={"PETALD_CACHE_DIR": str(caches[name])},
            )
            for name, flags in SERVERS.items()
        }
        for server in started.values():
            server.wait_ready(180)
        yield Swarm(boot, started, caches, seeds)


def cached(swarm: Swarm, name: str) -> bytes:
    return (swarm.caches[name] / "throughput.json").read_bytes()


def reference(llama: LlamaForCausalLM, x: torch.Tensor) -> torch.Tensor:
    """Blocks 0:3 of the float32 model on hidden states `x`, positions 0..seq-1, causal: what
    a server of that span must return (the model's hidden_states[3] would add the final norm)."""
    inner = llama.model
    positions = torch.arange(x.shape[1])[None]
    with torch.no_grad():
        rotary = inner.rotary_emb(x, positions)
        h = x
        for layer in inner.layers:
            out = layer(h, position_embeddings=rotary, position_ids=positions, attention_mask=None)
            h = out[0] if isinstance(out, tuple) else out
    return h


def dialable(server: DaemonProcess) -> DaemonProcess:
    """`server`, or for one that announces another address, a copy whose `addr` is where it
    listens (what a peer behind the operator's port forward would reach)."""
    if ANNOUNCED not in server.addr:
        return server
    return DaemonProcess(server.proc, {**server.ready, "addrs": [listen_addr(server)]})


async def info_of(server: DaemonProcess) -> dict:
    header, _ = await rpc_call(dialable(server), INFO_PROTOCOL, {})
    return header


async def forward(server: DaemonProcess, x: torch.Tensor) -> tuple[dict, torch.Tensor]:
    info = await info_of(server)
    answer, (out,) = await rpc_call(dialable(server), FORWARD_PROTOCOL, {}, [x])
    assert answer["ok"], answer
    return info, out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
async def test_half_precision_span_matches_float32_within_its_epsilon(
    dtype: str, swarm: Swarm, model: tuple[Path, LlamaForCausalLM]
) -> None:
    """Tolerance: every element within BLOCKS * eps(dtype) * max|ref| of the float32 reference
    (eps = 2^-7 for bfloat16, 2^-10 for float16): each block rounds its input, weights and
    output to the dtype, and its relative error adds to the blocks' before it. Measured on this
    model: 1.1 eps (bfloat16) and 0.95 eps (float16) of max|ref| over 3 blocks, so the bound has
    a margin of ~3x. Lower bound: more than eps/20 of max|ref| away somewhere (float32 gets
    ~3e-7), and every value of the answer is a number of that dtype: the span really ran in it.

    Catches: a dropped block (0.6 of max|ref| off); rotary not applied (positions ignored); the
    span loaded or run in float32 whatever --dtype says (lower bound, values); the span run in
    the other half-precision type (values: float16 has 3 more mantissa bits, bfloat16 a wider
    exponent)."""
    torch.manual_seed(1)
    x = torch.randn(2, 12, HIDDEN)
    ref = reference(model[1], x)
    info, out = await forward(swarm.servers[dtype], x)
    assert info["dtype"] == dtype and info["quant"] == "none", info
    half = getattr(torch, dtype)
    assert out.shape == ref.shape
    # The answer comes in the request's dtype (float32), holding the span's half-precision values.
    assert torch.equal(out, out.to(half).float()), "not values of the span's dtype"
    eps = torch.finfo(half).eps
    scale = ref.abs().max().item()
    err = (out.float() - ref).abs().max().item()
    print(f"{dtype}: max error {err:.2e} = {err / (eps * scale):.2f} eps x max|ref| ({scale:.2f})")
    assert err <= BLOCKS * eps * scale, (err, eps, scale)
    assert err > eps / 20 * scale, (err, eps, scale)


async def test_nf4_span_is_quantized_and_within_nf4_error(
    swarm: Swarm, model: tuple[Path, LlamaForCausalLM]
) -> None:
    """The server's info says nf4, and its output's relative error (norm of the difference over
    the reference's norm) is at most 0.1 * sqrt(2 * BLOCKS) = 0.245: NF4 rounds each weight to one
    of 16 levels of its block of 64's absmax, ~10 % relative RMS error per weight matrix, and
    each block has two chained matrix products (attention, MLP) whose errors add in quadrature.
    Measured: 0.135. And at least 0.03: far from float32 (~2e-7) and from int8 (0.013 on the
    same blocks), so the weights really hold 4 bits.

    Catches: --quant nf4 ignored or int8 used instead (lower bound); a dropped block (0.40);
    a wrong NF4 scale or dequantization (error past 0.245)."""
    torch.manual_seed(2)
    x = torch.randn(2, 12, HIDDEN)
    ref = reference(model[1], x)
    info, out = await forward(swarm.servers["nf4"], x)
    assert info["quant"] == "nf4", info
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    print(f"nf4: relative error {rel:.3f}")
    assert 0.03 <= rel <= 0.1 * (2 * BLOCKS) ** 0.5, rel


async def test_throughput_auto_reuses_the_cached_value(swarm: Swarm) -> None:
    """`--throughput auto` with SENTINEL cached under the span's key: the server announces
    SENTINEL (no measurement gives exactly that) and leaves the file as it was, bytes and all.

    Catches: auto that always measures (it announces a measured value and rewrites the file); a
    cache key that misses the model, span length, device, dtype or versions."""
    info = await info_of(swarm.servers["bfloat16"])
    assert info["throughput"] == SENTINEL, info
    assert cached(swarm, "bfloat16") == swarm.seeded["bfloat16"]


async def test_throughput_eval_measures_again_and_caches_it(swarm: Swarm) -> None:
    """`--throughput eval` with SENTINEL cached under the span's key: it measures anyway,
    announces the measurement and stores it in place of SENTINEL, keeping the file's other
    entries.

    Catches: eval that reuses the cache (SENTINEL announced), or does not store what it
    measured, or drops the other entries."""
    info = await info_of(swarm.servers["float16"])
    assert info["throughput"] > 0 and info["throughput"] != SENTINEL, info
    table = json.loads(cached(swarm, "float16"))
    assert table == {cache_key("float16", "none"): info["throughput"], "other": 7.0}, table


async def test_throughput_auto_measures_over_a_garbage_cache_file(swarm: Swarm) -> None:
    """`--throughput auto` with a cache file that is not JSON: the server starts, measures,
    announces the measurement, and the file now holds it under the span's key.

    Catches: a garbage cache that stops the server (the fixture fails) or that is read as a
    value; a measurement that is not stored over it."""
    info = await info_of(swarm.servers["nf4"])
    assert info["throughput"] > 0 and info["throughput"] != SENTINEL, info
    assert json.loads(cached(swarm, "nf4")) == {cache_key("float32", "nf4"): info["throughput"]}


async def test_public_name_and_announced_address_reach_another_peer(swarm: Swarm) -> None:
    """A peer joined through the bootstrap node follows the model's announcements until all
    three servers are in its view: the bfloat16 server's entry carries its --public-name (the
    others none), and the nf4 server's announced addresses are its --announce address only,
    not the loopback address it listens on (which the others announce).

    Catches: --public-name or --announce not reaching the announcement (empty name; the
    listen address announced); the name shown on other servers."""
    config = P2PConfig(listen=("/ip4/127.0.0.1/tcp/0",), initial_peers=(swarm.boot.addr,))
    ids = {name: s.peer_id for name, s in swarm.servers.items()}
    async with trio.open_nursery() as nursery:
        stack = await start_stack(
            nursery, create_new_key_pair(), config, dht_config=DhtConfig(client_mode=True)
        )
        announcer = stack.announcer
        assert announcer is not None
        await announcer.watch(MODEL)

        def all_online(view) -> bool:
            entries = [view.get(p) for p in ids.values()]
            return all(e is not None and e.info.state == "online" for e in entries)

        await announcer.wait_until(all_online, timeout=60)
        infos = {name: announcer.view.get(p).info for name, p in ids.items()}  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()
    names = {name: info.public_name for name, info in infos.items()}
    assert names == {"bfloat16": PUBLIC_NAME, "float16": "", "nf4": ""}, names
    assert list(infos["nf4"].addrs) == [f"{ANNOUNCED}/p2p/{ids['nf4']}"], infos["nf4"].addrs
    for name in ("bfloat16", "float16"):
        assert infos[name].addrs and all(
            a.startswith("/ip4/127.0.0.1/tcp/") for a in infos[name].addrs
        ), infos[name].addrs


async def test_no_relay_node_does_not_offer_the_hop_protocol(swarm: Swarm) -> None:
    """A peer connected to the `--no-relay` bootstrap node and to a (public) server: identify
    tells it the server offers circuit relay's HOP protocol and the bootstrap node does not.

    Catches: --no-relay not reaching the relay service (HOP offered by both)."""
    server = swarm.servers["bfloat16"]
    # Only a private peer stops offering HOP by itself (the bootstrap node's reachability is
    # "unknown": nobody to ask when it started).
    assert server.ready["reachability"] == "public", server.ready
    config = P2PConfig(listen=("/ip4/127.0.0.1/tcp/0",), initial_peers=(swarm.boot.addr,))
    async with trio.open_nursery() as nursery:
        stack = await start_stack(
            nursery, create_new_key_pair(), config, dht_config=DhtConfig(client_mode=True),
            announcements=False,
        )  # fmt: skip
        host = stack.host.host
        await stack.host.connect(info_from_p2p_addr(Multiaddr(server.addr)), timeout=30)
        store = host.get_peerstore()
        peers = [ID.from_base58(d.peer_id) for d in (swarm.boot, server)]

        def identified() -> bool:
            try:
                return all(store.get_protocols(p) for p in peers)
            except Exception:  # not in the peerstore yet
                return False

        with trio.fail_after(30):
            while not identified():
                await trio.sleep(0.05)
        offers = [bool(store.supports_protocols(p, [HOP])) for p in peers]
        nursery.cancel_scope.cancel()
    assert offers == [False, True], offers
