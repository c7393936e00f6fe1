"""Hostile peers against one live `petald serve` (issue 10 item 3): a real py-libp2p peer sends
malformed and adversarial messages over every protocol the daemon speaks (kad, gossip,
dial-back, relay HOP/STOP, info, forward, backward, inference, push, echo, identify-push;
petald.testing.fuzz) while an honest client generates greedily on the same daemon: ~2,200
messages here, 12,000+ in `just fuzz` (PETALD_FUZZ_SCALE=6).

Checks: the daemon stays up and answers `info`; every adversarial exchange ends (an answer, a
close or a reset) within a bound; the honest tokens equal the local model's in every round;
the daemon's resident memory grows by less than a stated bound (start and end printed) and it
never loads torch (its compute process does)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.pubsub.pb import rpc_pb2
from transformers import LlamaForCausalLM

from petald import AutoDistributedModelForCausalLM, _native
from petald.client import ClientConfig, SwarmClient
from petald.dht.announce import topic_for
from petald.dht.flood import GOSSIP_THROTTLE
from petald.dht.node import DhtConfig
from petald.p2p.config import P2PConfig
from petald.stack import start_stack
from petald.testing import DaemonProcess, Processes
from petald.testing.fuzz import (
    Attacker,
    draw_corpus,
    loads_torch,
    mutants,
    rss_bytes,
    run_campaign,
    run_exchange,
    scale,
)
from petald.testing.fuzz_messages import Exchange, framed
from petald.testing.models import save_tiny_llama
from petald.testing.rpc import rpc_call
from petald.wire.protocols import INFO_PROTOCOL

pytestmark = pytest.mark.slow

MODEL = "tiny-llama-fuzz"
HIDDEN = 64
# Hypothesis-drawn exchanges, 6 of each protocol, and the mutants of each (petald.testing.fuzz):
# 2,219 messages here; `just fuzz` multiplies SEEDS by PETALD_FUZZ_SCALE (6: 12,690).
SEEDS, COPIES = 72, 12
# Messages sent per unit of scale, at least (a stream refused at negotiation is not counted):
# `just fuzz`'s scale of 6 must send 10,000+ (issue 10).
MESSAGES_PER_SCALE = 1_700
# An exchange ends (answer, close or reset) within this; the slowest server-side deadline a
# hostile stream can reach here is dial-back's 17 s (relay HOP's is 10 s, the DHT's 10 s).
BOUND = 30.0
# Resident memory the daemon may gain: a fixed allowance for its caches and Python's arenas
# reaching their high-water marks (measured: +3 MiB over 13,783 messages), plus 1 KiB per
# message. A per-message leak of 12 KiB fails CI's run, of 3 KiB `just fuzz`'s; the torch
# import a hostile frame once caused (+540 MiB) fails both.
RSS_FIXED = 24 << 20
RSS_PER_MESSAGE = 1 << 10
NEW_TOKENS = 6
MAX_HONEST_ROUNDS = 200


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    path = tmp_path_factory.mktemp("models") / MODEL
    return path, save_tiny_llama(path, layers=2, hidden=HIDDEN, seed=3)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory) -> Iterator[DaemonProcess]:
    tmp = tmp_path_factory.mktemp("fuzz")
    with Processes() as procs:
        yield procs.start(
            "serve",
            str(tiny[0]),
            "--blocks",
            "0:2",
            "--new-swarm",
            # A fixed throughput and no dial-back check: neither is under test here.
            "--throughput",
            "100",
            "--reachability",
            "public",
            "--cache-tokens",
            "4096",
            identity=tmp / "server.key",
            ready_timeout=120,
        )


def honest_rounds(model, ids, stop: threading.Event, rounds: list, errors: list) -> None:
    """Greedy generation in fresh sessions until `stop` (bounded in count)."""
    try:
        while not stop.is_set() and len(rounds) < MAX_HONEST_ROUNDS:
            with model.inference_session(max_length=32):
                out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            rounds.append(out.tolist())
    except BaseException as e:  # reported by the test, not lost in the thread
        errors.append(e)


async def attack(server: DaemonProcess, corpus) -> tuple:
    config = P2PConfig(listen=("/ip4/127.0.0.1/tcp/0",), initial_peers=(server.addr,))
    async with trio.open_nursery() as nursery:
        stack = await start_stack(
            nursery,
            create_new_key_pair(),
            config,
            dht_config=DhtConfig(client_mode=True),
            announcements=False,
        )
        attacker = Attacker(stack.host.host, server.addr)
        t0 = time.monotonic()
        report = await run_campaign(attacker.open_stream, corpus, workers=8, bound=BOUND)
        seconds = time.monotonic() - t0
        nursery.cancel_scope.cancel()
    info: dict = {}
    try:
        with trio.fail_after(30):  # still answering, a new peer too
            info, _ = await rpc_call(server, INFO_PROTOCOL, {})
    except Exception as e:  # asserted after the campaign's figures are printed
        info = {"error": repr(e)}
    return report, seconds, info, attacker.reconnects


async def gossip_then_info(
    server: DaemonProcess, message: bytes, settle: float = 0.0
) -> tuple[str, dict]:
    """Sends one gossip exchange, waits `settle` s (the daemon acts on some messages in a
    periodic task), then asks `info` from a new peer: (how the exchange ended, the answer)."""
    async with trio.open_nursery() as nursery:
        config = P2PConfig(listen=("/ip4/127.0.0.1/tcp/0",), initial_peers=(server.addr,))
        stack = await start_stack(
            nursery,
            create_new_key_pair(),
            config,
            announcements=False,
            dht_config=DhtConfig(client_mode=True),
        )
        attacker = Attacker(stack.host.host, server.addr)
        outcome = await run_exchange(attacker.open_stream, Exchange("gossip", (message,)), bound=10)
        await trio.sleep(settle)  # not synchronisation: the periodic task's period, elapsed
        nursery.cancel_scope.cancel()
    info: dict = {}
    try:
        with trio.fail_after(30):
            info, _ = await rpc_call(server, INFO_PROTOCOL, {})
    except Exception as e:
        info = {"error": repr(e)}
    return outcome.ended, info


def test_gossip_message_with_a_garbage_key_leaves_the_daemon_reachable(server) -> None:
    """Found by the fuzzer: py-libp2p's pubsub raised on a published message whose `key` is
    not a public key, which ended its service and the host stopped accepting connections.

    Catches: petald.p2p.limits.guard_pubsub removed (a new peer's info times out)."""
    rpc = rpc_pb2.RPC()
    rpc.publish.add(
        data=b"r",
        topicIDs=[topic_for(MODEL)],
        seqno=b"7^\xff\xc61\x10\xda\xe7",
        signature=b"3e\xa4\xf2\x9f2\\&\x98",
        key=b"\xae\x85\xea",
        from_id=b"",
    )
    ended, info = trio.run(gossip_then_info, server, framed(rpc.SerializeToString()))
    assert ended == "closed"
    assert info["state"] == "online"


def test_gossip_subscription_to_a_topic_that_is_not_utf8_leaves_the_daemon_up(server) -> None:
    """Found by the fuzzer: a subscription whose topic is not UTF-8 reached the daemon's model
    discovery as bytes, and `topic.startswith(str)` raised out of it: the daemon exited (1).

    Catches: the isinstance check in Announcer._discover_models removed (the daemon exits
    within its 1 s discovery period; info fails)."""
    sub = b"\x08\x01\x12\x03\xff\xfe\xfd"  # SubOpts(subscribe=True, topicid=b"\xff\xfe\xfd")
    rpc = b"\x0a" + bytes([len(sub)]) + sub
    ended, info = trio.run(gossip_then_info, server, framed(rpc), 2.5)
    assert ended == "closed"
    assert info.get("state") == "online", info
    assert server.proc.poll() is None


def test_a_peer_flooding_invalid_announcements_is_banned(server) -> None:
    """A peer publishing (validly signed gossip) announcements that are not valid: struck for
    each, banned after GOSSIP_THROTTLE's strikes, disconnected and its redial closed; a new
    peer is still answered.

    Catches: the validator's strike or the ban dropped (still connected after the flood), a
    ban that does not refuse a redial (connected again)."""
    topic = topic_for(MODEL)

    async def flood() -> tuple[bool, bool, dict]:
        async with trio.open_nursery() as nursery:
            config = P2PConfig(listen=("/ip4/127.0.0.1/tcp/0",), initial_peers=(server.addr,))
            stack = await start_stack(
                nursery, create_new_key_pair(), config, dht_config=DhtConfig(client_mode=True)
            )
            host, pubsub = stack.host.host, stack.announcer.pubsub
            # An attacker does not hold itself to gossipsub's 10 messages a second per topic
            # (upstream applies it to our own publishes too).
            stack.announcer.gossipsub.spam_protection_enabled = False
            target = Attacker(host, server.addr).target
            with trio.fail_after(30):  # its subscription reached us: our publishes go to it
                while target.peer_id not in pubsub.peer_topics.get(topic, ()):
                    await trio.sleep(0.05)
            for i in range(GOSSIP_THROTTLE.strikes_to_ban + 8):
                with contextlib.suppress(Exception):  # once disconnected, publishing fails
                    await pubsub.publish(topic, b"not an announcement %d" % i)
            with trio.move_on_after(20):
                while host.get_network().get_connections(target.peer_id):
                    await trio.sleep(0.05)
            banned = not host.get_network().get_connections(target.peer_id)
            with contextlib.suppress(Exception):
                await host.connect(target)
            with trio.move_on_after(5):  # a redial is closed as soon as it is up
                while host.get_network().get_connections(target.peer_id):
                    await trio.sleep(0.05)
            refused = not host.get_network().get_connections(target.peer_id)
            nursery.cancel_scope.cancel()
        with trio.fail_after(30):
            info, _ = await rpc_call(server, INFO_PROTOCOL, {})
        return banned, refused, info

    banned, refused, info = trio.run(flood)
    assert banned and refused
    assert info.get("state") == "online", info


def test_tensor_frames_where_none_are_expected_leave_torch_out_of_the_daemon(server) -> None:
    """Found by the fuzzer: an `info` request, an inference opening or a push opening whose
    header announced a tensor, followed by an empty frame (it passes max_tensor_bytes=0), was
    decoded into a torch tensor: the daemon imported torch, 110 -> 650 MiB resident.

    Catches: `frames=True` dropped from any of those three reads (torch mapped)."""
    empty = framed(_native.encode(b"", "float32", [0, HIDDEN], "none", _native.DEFAULT_CHUNK_SIZE))
    opening = framed(cbor2.dumps({"tensors": 1, "session": b"x" * 16, "batch": 1})) + empty

    async def send_all() -> list[str]:
        async with trio.open_nursery() as nursery:
            config = P2PConfig(listen=("/ip4/127.0.0.1/tcp/0",), initial_peers=(server.addr,))
            stack = await start_stack(
                nursery,
                create_new_key_pair(),
                config,
                announcements=False,
                dht_config=DhtConfig(client_mode=True),
            )
            attacker = Attacker(stack.host.host, server.addr)
            ended = [
                (
                    await run_exchange(attacker.open_stream, Exchange(kind, (opening,)), bound=10)
                ).ended
                for kind in ("info", "inference", "push")
            ]
            nursery.cancel_scope.cancel()
        return ended

    ended = trio.run(send_all)
    assert "hang" not in ended, ended
    assert server.proc.poll() is None
    assert not loads_torch(server.proc.pid)


def test_hostile_peer_cannot_crash_hang_or_bloat_the_daemon(tiny, server) -> None:
    """Catches: a handler that lets a peer's exception escape (the daemon dies: no info
    answer, process gone), a read without a deadline (an exchange past BOUND; relay HOP held
    30 s before SafeRelayProtocol's own handler), a bad step that corrupts another session's
    cache (the honest tokens differ), state kept per bad message (the RSS bound), and a frame
    turned into a torch tensor in the daemon (torch mapped; +540 MiB)."""
    keys = [create_new_key_pair() for _ in range(3)]
    t0 = time.monotonic()
    corpus = mutants(
        draw_corpus(SEEDS * scale(), hidden=HIDDEN, model=MODEL, keys=keys), COPIES, seed=1
    )
    drawn = time.monotonic() - t0
    torch.manual_seed(4)
    ids = torch.randint(1, 128, (1, 5))
    want = tiny[1].generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()
    config = ClientConfig(initial_peers=(server.addr,), step_timeout=30, request_timeout=30)
    with SwarmClient(config=config) as client:
        client.wait_for_blocks(MODEL, 2, timeout=60)
        model = AutoDistributedModelForCausalLM.from_pretrained(tiny[0], client=client)
        rss0 = rss_bytes(server.proc.pid)
        stop, rounds, errors = threading.Event(), [], []
        honest = threading.Thread(target=honest_rounds, args=(model, ids, stop, rounds, errors))
        honest.start()
        try:
            report, seconds, info, reconnects = trio.run(attack, server, corpus)
        finally:
            stop.set()
            honest.join(60)
        alive = server.proc.poll() is None
        rss1 = rss_bytes(server.proc.pid) if alive else 0
    print(f"\ncorpus: {len(corpus)} exchanges drawn and mutated in {drawn:.1f} s")
    print(report.summary())
    slowest = report.slowest()
    print(
        f"sent in {seconds:.1f} s; slowest exchange {slowest.seconds:.2f} s "
        f"({slowest.exchange.kind}, {slowest.ended})"
    )
    sent = sum(report.messages().values())
    bound = RSS_FIXED + RSS_PER_MESSAGE * sent
    print(f"daemon RSS {rss0 / 2**20:.1f} MiB -> {rss1 / 2**20:.1f} MiB (bound +{bound >> 20} MiB)")
    print(f"honest rounds during the campaign: {len(rounds)}; the attacker redialled {reconnects}x")
    if not alive:
        server.stop()  # reaps it and reads the rest of its output (its traceback)
    assert alive, f"exited with status {server.proc.returncode}: {server.log()}"
    assert info.get("model") == MODEL and info.get("state") == "online", info
    assert not report.hangs(), [(o.exchange.kind, o.exchange.messages) for o in report.hangs()[:3]]
    assert not errors, errors
    assert rounds and all(r == want for r in rounds)
    assert sent >= MESSAGES_PER_SCALE * scale()
    assert not loads_torch(server.proc.pid)
    assert rss1 - rss0 < bound
