"""Routing and server behaviour that only a real swarm shows: one module-scoped swarm of
`petald serve` processes over a tiny random Llama of 5 layers, blocks 0:4 served (block 4 stays
local, so every reference is a plain transformers hidden state), each server announcing a given
throughput so that routes are predictable:

    A  0:2  throughput 100   adapter "french"
    B  2:4  throughput 1     --cache-tokens 32, --drain-timeout DRAIN (the preferred 2:4 hop)
    C  2:4  throughput 0.1   adapter "french" (the slow replica)
    J  2:4  throughput 1e12  held *joining*: its compute process stops itself as it starts
                             (petald.testing.hold), until the joining test lets it load

A session's hop costs its round trip plus blocks / throughput seconds per token (the planner's
estimate), so these throughputs make J < B < C by a second or more, far above round-trip
differences on a loaded machine; forwards draw hops in proportion to throughput.

Tests run in file order and the later ones use up the swarm: J comes online, then dies
mid-request; B drains and exits; C is stopped by a second SIGTERM. Every comparison is with the
local transformers model, within TOL (fp32 on both sides)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import trio
from libp2p.peer.id import ID
from transformers import LlamaForCausalLM

from petald.client import ClientConfig, RemoteSequential, SwarmClient, Tuning
from petald.client.routing import RoutingPolicy
from petald.errors import RoutingError
from petald.models import RemoteLoRA
from petald.p2p.identity import load_or_create_identity
from petald.server.memory import SESSION_IDLE_TIMEOUT
from petald.testing import DaemonProcess, Processes
from petald.testing.hold import compute_pid, held_compute_env, pause, resume, wait_stopped
from petald.testing.models import save_tiny_llama
from petald.testing.rpc import RawSession, exchange, rpc_client
from petald.testing.views import wait_for_entry
from petald.wire.messages import write_message
from petald.wire.protocols import FORWARD_PROTOCOL, INFERENCE_PROTOCOL, INFO_PROTOCOL

pytestmark = pytest.mark.slow

MODEL = "tiny-route"
LAYERS, SERVED = 5, 4
TOL = 1e-5
DRAIN = 4.0  # B's --drain-timeout, seconds
B_CACHE = 32  # B's --cache-tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    path = tmp_path_factory.mktemp("models") / MODEL
    return path, save_tiny_llama(path, layers=LAYERS, seed=11)


@pytest.fixture(scope="module")
def french(tiny, tmp_path_factory) -> tuple[Path, RemoteLoRA]:
    """A q_proj LoRA with nonzero B (a fresh one would change nothing), saved as peft does."""
    torch.manual_seed(5)
    lora = RemoteLoRA(tiny[1].config, ["self_attn.q_proj"], rank=4, alpha=8.0)
    with torch.no_grad():
        for b in lora.B.values():
            b.normal_(std=0.2)
    return lora.save_peft(tmp_path_factory.mktemp("adapters") / "french"), lora


@pytest.fixture(scope="module")
def swarm(tiny, french, tmp_path_factory) -> Iterator[dict[str, DaemonProcess]]:
    tmp = tmp_path_factory.mktemp("routing-swarm")
    with Processes() as procs:
        boot = procs.start("node", "--new-swarm", identity=tmp / "boot.key")
        # Throughput announced, not measured, and no dial-back check: start-up time on 2 cores.
        common = ["--initial-peers", boot.addr, "--reachability", "public"]
        adapter = ["--adapters", str(french[0])]
        args = {
            "A": ["0:2", "--throughput", "100", "--cache-tokens", "1024", *adapter],
            "B": ["2:4", "--throughput", "1", "--cache-tokens", str(B_CACHE)],
            "C": ["2:4", "--throughput", "0.1", "--cache-tokens", "1024", *adapter],
            "J": ["2:4", "--throughput", "1e12", "--cache-tokens", "1024"],
        }
        args["B"] += ["--drain-timeout", str(DRAIN)]
        # J prints its ready line only once online: its id comes from the identity made here.
        key, _ = load_or_create_identity(tmp / "J.key")
        servers = {
            name: procs.spawn(
                "serve",
                str(tiny[0]),
                "--blocks",
                *a,
                *common,
                identity=tmp / f"{name}.key",
                env=held_compute_env(tmp / "hold") if name == "J" else None,
            )
            for name, a in args.items()
        }
        with ThreadPoolExecutor(3) as pool:  # they load in parallel; J stays joining
            list(pool.map(lambda d: d.wait_ready(120), [servers[n] for n in "ABC"]))
        servers["J"].ready = {"peer_id": ID.from_pubkey(key.public_key).to_base58()}
        yield {"boot": boot, **servers}


def new_client(swarm, policy: RoutingPolicy | None = None) -> SwarmClient:
    config = ClientConfig(
        initial_peers=(swarm["boot"].addr,),
        step_timeout=20,
        request_timeout=30,
        policy=policy or RoutingPolicy(),
    )
    return SwarmClient(config=config)


@contextmanager
def joined(swarm, policy: RoutingPolicy | None = None) -> Iterator[SwarmClient]:
    """A client that knows A, B and C online and J joining: covering the blocks is not
    enough, as a route planned before the client learns of B would never try B."""
    with new_client(swarm, policy) as c:
        for name in "ABC":
            wait_view(c, swarm[name].peer_id, "online")
        wait_view(c, swarm["J"].peer_id, "joining")
        yield c


@pytest.fixture(scope="module")
def client(swarm) -> Iterator[SwarmClient]:
    with joined(swarm) as c:
        yield c
    assert not [t for t in threading.enumerate() if t.name == "petald-client"]


IDS = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(tiny) -> tuple[torch.Tensor, ...]:
    """Hidden states of the 10 tokens IDS; hs[i] is the input of layer i."""
    with torch.no_grad():
        return tiny[1](IDS, output_hidden_states=True).hidden_states


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def seq_of(client: SwarmClient) -> RemoteSequential:
    return RemoteSequential(client, MODEL, LAYERS, end=SERVED)


def peers(swarm, *names: str) -> set[str]:
    return {swarm[n].peer_id for n in names}


def banned(client: SwarmClient) -> set[str]:
    async def get() -> set[str]:
        return client.banned()

    return client.run(get)


def wait_view(client: SwarmClient, peer: str, state: str, timeout: float = 60) -> None:
    wait_for_entry(client, MODEL, peer, state, timeout=timeout)


def steps(session, hs: torch.Tensor, ts: range) -> list[torch.Tensor]:
    return [session.step(hs[:, t : t + 1]) for t in ts]


async def queued(open_stream, n: int, timeout: float = 30) -> None:
    """Until the server's `info` says `n` requests wait for its compute process. There is no
    event for it: each round is one `info` round trip (bounded by `timeout`)."""
    with trio.fail_after(timeout):
        while True:
            info, _ = await exchange(await open_stream(INFO_PROTOCOL), {})
            assert info["queued"] <= n, info["queued"]
            if info["queued"] == n:
                return


# ---- priorities inside a server ------------------------------------------------------------


async def test_an_inference_step_overtakes_queued_training_work(swarm) -> None:
    """A's compute process is held (SIGSTOP) while one forward is inside it and two more
    forwards, then an inference step, queue in A's daemon (its `info` counts them). Released,
    A answers the held forward, then the step, then the two forwards that came before it
    (the step's small answer may overtake the held forward's, never the other two).

    Catches: the executor serving in arrival order (PriorityLock ignoring the priority), or
    inference steps queued at TRAINING priority."""
    a = swarm["A"]
    order: list[str] = []
    # Long sequences: each forward computes ~10x longer than its 1 MiB answer takes to send, so
    # answers arrive in the order the compute process served them (or a small step's first).
    big = torch.randn(1, 4096, 64)
    async with rpc_client(a) as open_stream:
        session = RawSession(await open_stream(INFERENCE_PROTOCOL))
        opened, _ = await session.send({"batch": 1, "max_length": 8})
        assert opened.get("ok"), opened
        worker = compute_pid(a)

        async def forward(name: str) -> None:
            header, out = await exchange(await open_stream(FORWARD_PROTOCOL), {}, [big])
            assert header.get("ok") and out[0].shape == big.shape, header
            order.append(name)

        async def step() -> None:
            header, _ = await session.send({"step": 1, "position": 0}, [torch.randn(1, 1, 64)])
            assert header.get("position") == 1, header
            order.append("step")

        pause(worker)
        try:
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(forward, f"forward {i}")
                    if i:  # one forward is inside the held process, the others wait
                        await queued(open_stream, i)
                nursery.start_soon(step)
                await queued(open_stream, 3)
                resume(worker)
        finally:
            resume(worker)
        await write_message(session.stream, {"close": True})
    print(f"completion order: {order}")
    # The held forward may finish before or after the step; the two that queued before the
    # step finish after it.
    assert len(order) == 4 and order.index("step") <= 1, order


# ---- adapters ------------------------------------------------------------------------------


def with_lora(model: LlamaForCausalLM, lora: RemoteLoRA, ids: torch.Tensor) -> torch.Tensor:
    """The input of layer SERVED in the local model with the LoRA's deltas on its targets."""
    handles = []
    for i, layer in enumerate(model.model.layers[:SERVED]):
        for target, (a, b) in lora.weights().items():

            def delta(mod, args, out, a=a[i], b=b[i]):
                return out + lora.scale * (args[0] @ a.T) @ b.T

            handles.append(layer.get_submodule(target).register_forward_hook(delta))
    try:
        with torch.no_grad():
            return model(ids, output_hidden_states=True).hidden_states[SERVED]
    finally:
        for handle in handles:
            handle.remove()


def test_adapter_requests_route_only_through_servers_that_hold_it(
    client, swarm, tiny, french, reference
) -> None:
    """active_adapter="french" is announced by A (0:2) and C (2:4) only; B (2:4) is ten times
    faster than C, so a plain session takes B. Forwards and a session that name the adapter
    go through A and C and give the adapter's outputs (the local model with the LoRA hooked
    in); B never sees them (it would refuse the unknown adapter: bad_input, raised).

    Catches: the client routing adapter requests by throughput alone (SwarmClient.live_servers
    ignoring the adapter), or a server ignoring active_adapter (plain outputs)."""
    hs = reference
    want = with_lora(tiny[1], french[1], IDS)
    assert err(want, hs[4]) > 1e-3  # the adapter changes the outputs
    seq = seq_of(client)
    tuning = Tuning.build(0, active_adapter="french")
    for _ in range(3):  # forward routes are drawn at random (by throughput)
        assert err(seq.forward(hs[0], tuning=tuning), want) < TOL
    with seq.inference_session(max_length=16) as plain:
        plain.step(hs[0][:, :2])
        assert {h.peer_id for h in plain.route} == peers(swarm, "A", "B")
    with seq.inference_session(max_length=16, tuning=tuning) as session:
        outs = [session.step(hs[0][:, :4]), *steps(session, hs[0], range(4, 10))]
        assert {h.peer_id for h in session.route} == peers(swarm, "A", "C")
    assert err(torch.cat(outs, 1), want) < TOL
    assert not banned(client) & peers(swarm, "B")


# ---- busy ----------------------------------------------------------------------------------


@pytest.fixture
async def b_full(swarm) -> AsyncIterator[None]:
    """B's whole cache budget held by a raw session of another peer (B's announcement still
    says it is free: announcements are made at state changes). The tests using it are async so
    that this session's peer keeps running; their client code runs in a thread."""
    async with rpc_client(swarm["B"]) as open_stream:
        session = RawSession(await open_stream(INFERENCE_PROTOCOL))
        header, _ = await session.send({"batch": 1, "max_length": B_CACHE})
        assert header.get("ok"), header
        yield
        await write_message(session.stream, {"close": True})  # else B drains it on SIGTERM


def ban_messages(caplog, peer: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("banned") and peer in r.getMessage()
    ]


async def test_a_busy_server_is_left_for_another(swarm, reference, b_full, caplog) -> None:
    """B (the fastest 2:4 server) has no cache tokens left: it answers the session's open with
    "busy"; the client bans it and opens on C instead, and the steps give the local outputs.

    Catches: "busy" taken for the caller's fault (raised instead of failing over), or the
    client going back to the busy server (RoutingError after its attempts)."""
    hs = reference
    caplog.set_level(logging.INFO, logger="petald.client")

    def run() -> tuple[list[torch.Tensor], list[str], set[str]]:
        with joined(swarm) as c:
            with seq_of(c).inference_session(max_length=16) as session:
                outs = [session.step(hs[0][:, :4]), *steps(session, hs[0], range(4, 10))]
                route = [h.peer_id for h in session.route]
            return outs, route, banned(c)

    outs, route, bans = await trio.to_thread.run_sync(run)
    assert route == [swarm["A"].peer_id, swarm["C"].peer_id]
    assert swarm["B"].peer_id in bans
    assert any("busy" in m for m in ban_messages(caplog, swarm["B"].peer_id)), caplog.text
    assert err(torch.cat(outs, 1), hs[4]) < TOL


def open_without_c(swarm, reference) -> float:
    """Seconds until opening a session fails on a client that may not use C."""
    deny = RoutingPolicy(deny=frozenset(peers(swarm, "C")))
    with joined(swarm, deny) as c:
        t0 = time.monotonic()
        # The error says why: the server that refused was busy, and for how long.
        busy = pytest.raises(RoutingError, match=r"busy.*retry after")
        with busy, seq_of(c).inference_session(max_length=16) as s:
            s.step(reference[0][:, :1])
        took = time.monotonic() - t0
        assert swarm["B"].peer_id in banned(c)
    return took


async def test_a_busy_server_alone_fails_the_session_at_once(swarm, reference, b_full, caplog):
    """With C denied, B is the only 2:4 server and it is busy: opening the session fails at
    once with a RoutingError (no hang, no raw server error), and B is banned after saying
    "busy".

    Catches: a client that loops on a busy server or hangs waiting for it."""
    caplog.set_level(logging.INFO, logger="petald.client")
    took = await trio.to_thread.run_sync(open_without_c, swarm, reference)
    print(f"a session on a busy server alone failed after {took:.2f} s")
    assert any("busy" in m for m in ban_messages(caplog, swarm["B"].peer_id)), caplog.text
    assert took < 20


async def test_a_busy_server_is_not_asked_again_before_its_retry_after(
    swarm, reference, b_full, caplog
) -> None:
    """B answers busy with retry_after (SESSION_IDLE_TIMEOUT, 300 s); the client does not ask
    it again before then. Catches: a ban of PeerBans' first 5 s (retry_after ignored)."""
    caplog.set_level(logging.INFO, logger="petald.client")
    await trio.to_thread.run_sync(open_without_c, swarm, reference)
    bans = [r for r in caplog.records if r.getMessage().startswith("banned")]
    seconds = [float(r.args[1]) for r in bans if r.args[0] == swarm["B"].peer_id]
    assert seconds and min(seconds) >= SESSION_IDLE_TIMEOUT, seconds


# ---- joining servers -----------------------------------------------------------------------


def test_a_joining_server_is_not_routed_through_until_online(client, swarm, reference) -> None:
    """J announces 2:4 at 10^11 times B's throughput but is still joining (its compute process
    held before loading): forwards and sessions never go through it (nor try it and ban it).
    Let go, J comes online and the next session takes it: the setup would have seen a route
    through J.

    Catches: the planner taking joining servers as eligible (RoutePlanner.eligible)."""
    hs = reference
    j = swarm["J"]
    wait_view(client, j.peer_id, "joining")
    seq = seq_of(client)
    for _ in range(3):
        assert err(seq.forward(hs[0]), hs[4]) < TOL
    with seq.inference_session(max_length=16) as session:
        outs = [session.step(hs[0][:, :4]), *steps(session, hs[0], range(4, 10))]
        route = [h.peer_id for h in session.route]
    assert err(torch.cat(outs, 1), hs[4]) < TOL
    assert route == [swarm["A"].peer_id, swarm["B"].peer_id]
    assert j.peer_id not in banned(client)
    assert client.view.get(j.peer_id).info.state == "joining"  # throughout the above

    worker = compute_pid(j)
    wait_stopped(worker)  # it stopped itself as it started
    resume(worker)
    wait_view(client, j.peer_id, "online", timeout=120)
    with seq.inference_session(max_length=16) as session:
        out = session.step(hs[0][:, :4])
        route = [h.peer_id for h in session.route]
    assert route == [swarm["A"].peer_id, j.peer_id], (banned(client), client.rtts)
    assert err(out, hs[4][:, :4]) < TOL


# ---- a stateless forward whose server dies mid-request -------------------------------------


async def test_a_forward_whose_server_dies_mid_request_fails_over(client, swarm, reference):
    """A forward 0:4 goes A -> J (the fastest 2:4). J's compute process is held while J's
    daemon has the request queued, then killed: J's daemon exits, the client's stream breaks
    mid-request, and the client computes blocks 2:4 on another server. The output equals the
    uninterrupted forward's and the local model's.

    Catches: a forward that raises on a server failure instead of planning again from the
    failed hop (RemoteSequential._forward_range), or that restarts from a wrong input."""
    hs = reference
    j = swarm["J"]
    # J is online already (the joining test waited for it); its ready line has its address.
    await trio.to_thread.run_sync(j.wait_ready, 60)
    seq = seq_of(client)
    before = await trio.to_thread.run_sync(seq.forward, hs[0])
    async with rpc_client(j) as open_stream:
        worker = compute_pid(j)
        pause(worker)

        async def blocker() -> None:  # another peer's forward, inside the held process
            stream = await open_stream(FORWARD_PROTOCOL)
            with pytest.raises(Exception):  # noqa: B017 - J dies under it, however it breaks
                await exchange(stream, {}, [torch.randn(1, 3, 64)])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocker)
            result: list[torch.Tensor] = []

            async def forward() -> None:
                result.append(await trio.to_thread.run_sync(seq.forward, hs[0]))

            nursery.start_soon(forward)
            await queued(open_stream, 1)  # the client's 2:4 request waits in J
            os.kill(worker, signal.SIGKILL)
    code = await trio.to_thread.run_sync(lambda: j.proc.wait(30))
    assert code != 0
    (after,) = result
    assert j.peer_id in await trio.to_thread.run_sync(banned, client)
    print(f"J exited with {code}; max |failed-over - uninterrupted| = {err(after, before):.1e}")
    assert err(after, before) < TOL and err(after, hs[4]) < TOL


# ---- draining ------------------------------------------------------------------------------


def test_drain_timeout_ends_an_open_session_then_it_fails_over(client, swarm, reference) -> None:
    """A session goes A -> B. SIGTERM to B: it drains (announces draining, keeps the open
    session: a step still goes through B), and exits when --drain-timeout (DRAIN s) runs out,
    not before, although the session stays open; the next step fails over to C with the same
    outputs.

    Catches: a drain that ignores its timeout (B never exits), or that does not wait for the
    open session (B exits before DRAIN s)."""
    hs = reference
    b = swarm["B"]
    seq = seq_of(client)
    with seq.inference_session(max_length=16) as session:
        outs = [session.step(hs[0][:, :4])]
        assert session.route[-1].peer_id == b.peer_id
        b.proc.send_signal(signal.SIGTERM)
        b.read_event("draining", timeout=30)
        t0 = time.monotonic()
        outs += steps(session, hs[0], range(4, 6))
        assert session.route[-1].peer_id == b.peer_id and not session.stats.failovers
        code = b.proc.wait(DRAIN + 30)
        drained = time.monotonic() - t0
        outs += steps(session, hs[0], range(6, 10))
        (failover,) = session.stats.failovers
    print(f"B exited ({code}) {drained:.2f} s after draining began (--drain-timeout {DRAIN})")
    assert code == 0
    assert drained >= DRAIN
    assert failover.peer_id == b.peer_id
    assert [h.peer_id for h in failover.replacement] == [swarm["C"].peer_id]
    assert err(torch.cat(outs, 1), hs[4]) < TOL


def test_a_second_sigterm_stops_at_once(client, swarm, reference) -> None:
    """A session goes A -> C (C is the last 2:4 server). SIGTERM to C: it drains, waiting for
    the session up to its default --drain-timeout of 60 s; a second SIGTERM stops it at once
    (well within that), and the session's next step fails with a RoutingError naming the blocks
    no server holds any more.

    Catches: a second signal that is ignored while draining (C would exit after 60 s)."""
    hs = reference
    c = swarm["C"]
    seq = seq_of(client)
    with seq.inference_session(max_length=16) as session:
        session.step(hs[0][:, :4])
        assert session.route[-1].peer_id == c.peer_id
        c.proc.send_signal(signal.SIGTERM)
        c.read_event("draining", timeout=30)
        t0 = time.monotonic()
        c.proc.send_signal(signal.SIGTERM)
        code = c.proc.wait(30)
        took = time.monotonic() - t0
        with pytest.raises(RoutingError, match="2:4"):
            session.step(hs[0][:, 4:5])
    print(f"C exited ({code}) {took:.2f} s after the second SIGTERM")
    assert code == 0 and took < 20
