"""The client core against real `petald serve` processes: a tiny random Llama of 5 layers, of
which blocks 0:4 are served as A = 0:2, B = 1:4 and C = 2:4 (so routes start mid-span and a
failed hop can be replaced by one or two servers). Block 4 stays local so that every reference
is a plain transformers hidden state (the last one would have the final norm applied).

Checks: RemoteSequential.forward (also sliced) equals the local layers, backward equals
autograd, an inference session step by step (and after a rollback) equals the full forward,
and a session whose server is SIGKILLed mid-session goes on with identical outputs."""

from __future__ import annotations

import itertools
import logging
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import trio
from libp2p.peer.id import ID
from transformers import LlamaForCausalLM

from petald.client import ClientConfig, RemoteSequential, SwarmClient
from petald.errors import PeerUnavailable, RoutingError
from petald.testing import DaemonProcess, Processes
from petald.testing.models import save_tiny_llama

pytestmark = pytest.mark.slow

MODEL = "tiny-llama-5"
SERVED = 4  # blocks 0:4 of 5
SPANS = {"A": (0, 2), "B": (1, 4), "C": (2, 4)}
TOL = 1e-5


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    path = tmp_path_factory.mktemp("models") / MODEL
    model = save_tiny_llama(path, layers=5, intermediate=128, vocab=128)
    return path, model


@pytest.fixture(scope="module")
def swarm(tiny_llama, tmp_path_factory) -> Iterator[dict[str, DaemonProcess]]:
    path, _ = tiny_llama
    tmp = tmp_path_factory.mktemp("client-swarm")
    with Processes() as procs:
        boot = procs.start("node", "--new-swarm", identity=tmp / "boot.key")
        servers: dict[str, DaemonProcess] = {}
        for name, (start, end) in SPANS.items():
            blocks = f"{start}:{end}"
            servers[name] = procs.spawn(
                "serve",
                str(path),
                "--blocks",
                blocks,
                "--initial-peers",
                boot.addr,
                "--cache-tokens",
                "256",
                # Announce a throughput instead of measuring it, and skip the dial-back check:
                # neither is under test here, and both cost start-up time on 2 cores.
                "--throughput",
                "100",
                "--reachability",
                "public",
                identity=tmp / f"{name}.key",
            )
        with ThreadPoolExecutor(len(servers)) as pool:  # they load in parallel
            list(pool.map(lambda d: d.wait_ready(120), servers.values()))
        yield servers


@pytest.fixture(scope="module")
def client(swarm) -> Iterator[SwarmClient]:
    boot_peer = next(iter(swarm.values())).addr
    config = ClientConfig(initial_peers=(boot_peer,), step_timeout=20, request_timeout=30)
    with SwarmClient(config=config) as c:
        t0 = time.monotonic()
        c.wait_for_blocks(MODEL, SERVED, timeout=60)
        print(f"client saw blocks 0:{SERVED} covered {time.monotonic() - t0:.2f} s after joining")
        yield c
    assert not [t for t in threading.enumerate() if t.name == "petald-client"]


def test_waiting_for_blocks_nobody_serves_names_them(client) -> None:
    with pytest.raises(RoutingError, match="no online server holds blocks 0:3") as info:
        client.wait_for_blocks("no-such-model", 3, timeout=0.5)
    assert info.value.missing == ((0, 3),)


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """Hidden states of two 10-token sequences sharing a 6-token prefix; hs[i] is the input
    of layer i."""
    _, model = tiny_llama
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (1, 10))
    alt = ids.clone()
    alt[0, 6:] = (ids[0, 6:] + 7) % 128
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
        hs_alt = model(alt, output_hidden_states=True).hidden_states
    return hs, hs_alt


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_forward_matches_local_layers_whole_and_sliced(client, tiny_llama) -> None:
    """Catches (routes): a trace that records another tensor than each hop's input (the
    backward replays it), hops that overlap or leave a gap, a hop outside its server's span."""
    _, model = tiny_llama
    seq = RemoteSequential(client, MODEL, 5, end=SERVED)
    assert len(seq) == 4 and len(seq[1:3]) == 2 and seq[-1].blocks.start == 3
    with pytest.raises(ValueError, match="step of 1"):
        seq[::2]
    ids = torch.randint(0, 128, (2, 7))
    mask = torch.tensor([[1] * 7, [0, 0] + [1] * 5])
    with torch.no_grad():
        hs = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    routes, times = set(), []
    for _ in range(4):  # routes are random: several runs take different servers
        t0 = time.perf_counter()
        out, trace = seq.forward_traced(hs[0], mask)
        times.append(time.perf_counter() - t0)
        routes.add(tuple(str(b) for b, _ in trace.hops))
        assert err(out, hs[4]) < TOL, trace.hops
        # The route: contiguous hops from block 0 to 4, each inside one server's span (none
        # holds 0:4), and each hop's input the reference hidden state of its first block.
        hops = [b for b, _ in trace.hops]
        assert len(hops) >= 2 and hops[0].start == 0 and hops[-1].end == SERVED, hops
        assert all(a.end == b.start for a, b in itertools.pairwise(hops)), hops
        assert all(any(s <= h.start < h.end <= e for s, e in SPANS.values()) for h in hops), hops
        for h, x in trace.hops:
            assert err(x, hs[h.start]) < TOL, h
        sub = seq[1:3].forward(hs[1], mask)
        assert err(sub, hs[3]) < TOL
    print(
        f"forward 0:4 and 1:3 match within {TOL}; hop splits seen for 0:4: {sorted(routes)}; "
        f"forward 0:4 (2 x 7 tokens) median {statistics.median(times) * 1000:.1f} ms"
    )
    # Position ids on the wire (e.g. a continuation that starts at position 5).
    pids = torch.arange(5, 12).unsqueeze(0)
    with torch.no_grad():
        hs = model(ids, position_ids=pids, output_hidden_states=True).hidden_states
    assert err(seq.forward(hs[0], position_ids=pids), hs[4]) < TOL


def test_backward_matches_autograd(client, tiny_llama) -> None:
    _, model = tiny_llama
    seq = RemoteSequential(client, MODEL, 5, end=SERVED)
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        x0 = model.model.embed_tokens(ids)
    x = x0.clone().requires_grad_(True)
    out = model.model(inputs_embeds=x, output_hidden_states=True).hidden_states[SERVED]
    g = torch.randn_like(out)
    out.backward(g)
    grad = seq.backward(x0, g)
    print(f"backward 0:4: max |remote - autograd| = {err(grad, x.grad):.2e}")
    assert err(grad, x.grad) < TOL


def test_inference_steps_and_rollback_match_the_full_forward(client, reference) -> None:
    hs, hs_alt = reference
    seq = RemoteSequential(client, MODEL, 5, end=SERVED)
    with seq.inference_session(max_length=16) as session:
        outs = [session.step(hs[0][:, :4])]
        times = []
        for t in range(4, 10):
            t0 = time.perf_counter()
            outs.append(session.step(hs[0][:, t : t + 1]))
            times.append(time.perf_counter() - t0)
        assert session.position == 10
        assert err(torch.cat(outs, 1), hs[4]) < TOL
        session.rollback(6)
        assert session.position == 6
        out = session.step(hs_alt[0][:, 6:9])
        assert err(out, hs_alt[4][:, 6:9]) < TOL
    with seq.inference_session(max_length=16) as session:  # explicit position ids
        pids = torch.arange(10).unsqueeze(0)
        outs = [session.step(hs[0][:, :3], position_ids=pids[:, :3])]
        outs += [session.step(hs[0][:, t : t + 1], position_ids=pids[:, t : t + 1]) for t in (3, 4)]
        assert err(torch.cat(outs, 1), hs[4][:, :5]) < TOL
        print(
            f"session route {[str(h) for h in session.route]}: steps and rollback match; "
            f"one-token step median {statistics.median(times) * 1000:.1f} ms"
        )


def test_failover_mid_session_keeps_outputs_identical(client, swarm, reference, caplog) -> None:
    hs, _ = reference
    seq = RemoteSequential(client, MODEL, 5, end=SERVED)
    caplog.set_level(logging.INFO, logger="petald.client")
    with seq.inference_session(max_length=16) as session:
        outs = [session.step(hs[0][:, :4])]
        outs += [session.step(hs[0][:, t : t + 1]) for t in (4, 5)]
        victim = session.route[-1]  # holds block 3: B or C, never A
        name = next(n for n, d in swarm.items() if d.peer_id == victim.peer_id)
        swarm[name].kill()
        outs += [session.step(hs[0][:, t : t + 1]) for t in range(6, 10)]
        assert victim.peer_id not in {h.peer_id for h in session.route}
        (failover,) = session.stats.failovers
        e = err(torch.cat(outs, 1), hs[4])
        print(
            f"killed {name} ({victim}); replaced by {[str(h) for h in failover.replacement]}, "
            f"replayed {failover.position} tokens, stall {failover.stall * 1000:.0f} ms; "
            f"max |out - reference| = {e:.2e}"
        )
        assert e < TOL
    assert any("failover" in r.message for r in caplog.records)


def test_a_peer_that_stalled_is_disconnected(client, swarm) -> None:
    """A step that got no answer in time (PeerUnavailable.stalled) bans the peer and closes its
    connections, so that a later stream dials anew instead of riding a TCP connection a
    partition may have left dead. Catches: the connection kept (the disconnect dropped)."""
    a = swarm["A"]  # holds block 0: never the failover test's victim
    peer = ID.from_base58(a.peer_id)
    network = client.stack.host.host.get_network()

    async def stall_and_wait() -> None:
        await client.stack.dialer.ensure_connected(peer)
        assert network.get_connections(peer)
        client.ban(a.peer_id, PeerUnavailable("no answer", peer=a.peer_id, stalled=True))
        with trio.fail_after(10):
            while network.get_connections(peer):
                await trio.sleep(0.05)

    client.run(stall_and_wait)
    client.bans.succeeded(a.peer_id)
