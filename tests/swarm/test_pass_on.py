"""Servers passing activations on (petald.server.push) against real `petald serve` processes:
a tiny random Llama of 6 blocks served as A = 0:2, B = 2:4, B2 = 2:4 and C = 4:6, so every
route has three hops and its middle one has a replacement.

Checks: greedy generation with servers passing activations on gives the local model's tokens
and the client relays no hop's input after the first (counted per hop in the session's
stats), the same as with the client relaying every hop; and a kill -9 of the middle server
mid-generation leaves the text identical (the failover and its stall printed), with passing on
resumed over the new route."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import trio
from transformers import LlamaForCausalLM

from petald import AutoDistributedModelForCausalLM
from petald.client import ClientConfig, SwarmClient
from petald.testing import DaemonProcess, Processes
from petald.testing.models import save_tiny_llama
from petald.testing.rpc import RawSession, rpc_peer
from petald.wire.messages import read_message, write_message
from petald.wire.protocols import INFERENCE_PROTOCOL, PUSH_PROTOCOL

pytestmark = pytest.mark.slow

MODEL = "tiny-llama-6"
SPANS = {"A": "0:2", "B": "2:4", "B2": "2:4", "C": "4:6"}
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    path = tmp_path_factory.mktemp("models") / MODEL
    return path, save_tiny_llama(path, layers=6, seed=5)


@pytest.fixture(scope="module")
def swarm(tiny, tmp_path_factory) -> Iterator[dict[str, DaemonProcess]]:
    tmp = tmp_path_factory.mktemp("pass-on-swarm")
    with Processes() as procs:
        boot = procs.start("node", "--new-swarm", identity=tmp / "boot.key")
        servers: dict[str, DaemonProcess] = {}
        for name, blocks in SPANS.items():
            args = [str(tiny[0]), "--blocks", blocks, "--initial-peers", boot.addr]
            # A fixed throughput and no dial-back check: neither is under test here.
            args += ["--throughput", "100", "--reachability", "public", "--cache-tokens", "256"]
            servers[name] = procs.spawn("serve", *args, identity=tmp / f"{name}.key")
        with ThreadPoolExecutor(len(servers)) as pool:  # they load in parallel
            list(pool.map(lambda d: d.wait_ready(120), servers.values()))
        servers["boot"] = boot
        yield servers


def _model(tiny, swarm, *, pass_activations: bool) -> Iterator:
    config = ClientConfig(
        initial_peers=(swarm["boot"].addr,),
        step_timeout=20,
        request_timeout=30,
        pass_activations=pass_activations,
    )
    with SwarmClient(config=config) as client:
        client.wait_for_blocks(MODEL, 6, timeout=60)
        yield AutoDistributedModelForCausalLM.from_pretrained(tiny[0], client=client)


@pytest.fixture
def passing(tiny, swarm) -> Iterator:
    yield from _model(tiny, swarm, pass_activations=True)


@pytest.fixture
def relaying(tiny, swarm) -> Iterator:
    yield from _model(tiny, swarm, pass_activations=False)


def _prompt() -> torch.Tensor:
    torch.manual_seed(9)
    return torch.randint(1, 128, (1, 7))


def _generate(model, ids: torch.Tensor):
    """Greedy tokens, and the session's stats and route (read before it closes)."""
    with model.inference_session(max_length=32) as cache:
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        return out, cache.session.stats, cache.session.route


def test_passing_on_gives_the_local_tokens_without_client_relays(tiny, passing, relaying):
    """Catches: a server that pushes nothing or pushes into the wrong session (the steps
    stall, then fail over: passed_on stays 0), a pushed hidden state applied at the wrong
    position or step (other tokens), and a client that still relays (passed_on counts the
    hops whose input came by push)."""
    ids = _prompt()
    want = tiny[1].generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    got, stats, route = _generate(passing, ids)
    assert got.tolist() == want.tolist()
    assert len(route) == 3
    assert stats.steps == NEW_TOKENS  # one prefill, then one step per token but the last
    assert stats.passed_on == 2 * stats.steps  # hops 2 and 3 of every step
    assert not stats.failovers
    relayed, stats, _ = _generate(relaying, ids)
    assert relayed.tolist() == want.tolist()
    assert stats.passed_on == 0


class _KillAfter:
    """A generate() streamer that SIGKILLs the route's middle server once `n` new tokens are
    out: the failure lands mid-generation at a known token, whatever the timing."""

    def __init__(self, n: int, kill) -> None:
        self.n, self.kill, self.seen = n, kill, -1  # the first put() is the prompt

    def put(self, value: torch.Tensor) -> None:
        self.seen += 1
        if self.seen == self.n:
            self.kill()

    def end(self) -> None:
        pass


def test_kill_of_the_middle_server_mid_generation_keeps_the_text(tiny, swarm, passing):
    """Catches: a failover that loses or repeats the hidden states a dead server had been
    pushed (other tokens), a client that waits on a push that never comes (the step times
    out twice: no success), and passing on not resumed over the new route."""
    ids = _prompt()
    want = tiny[1].generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    victims: list[str] = []

    def kill_middle() -> None:
        middle = cache.session.route[1]
        name = next(n for n, d in swarm.items() if d.peer_id == middle.peer_id)
        victims.append(name)
        swarm[name].kill()

    with passing.inference_session(max_length=32) as cache:
        got = passing.generate(
            ids, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=_KillAfter(5, kill_middle)
        )
        stats = cache.session.stats
    assert got.tolist() == want.tolist()
    (failover,) = stats.failovers
    print(
        f"killed {victims[0]} (middle, blocks {failover.blocks}) after 5 tokens; replaced by "
        f"{[str(h) for h in failover.replacement]}, replayed {failover.position} tokens, "
        f"stall {failover.stall * 1000:.0f} ms"
    )
    assert victims[0] in ("B", "B2")
    assert failover.position >= ids.shape[1] + 4
    # Steps after the failover's were passed on again through the replacement.
    after = stats.steps - (failover.position - ids.shape[1] + 2)
    assert after > 0 and stats.passed_on >= 2 * after


def test_config_is_a_plain_switch() -> None:
    config = ClientConfig(initial_peers=("/ip4/127.0.0.1/tcp/1",))
    assert config.pass_activations is True
    assert dataclasses.replace(config, pass_activations=False).pass_activations is False


async def test_pushes_and_pass_on_fields_are_checked(tiny, swarm) -> None:
    """A raw peer acts as the upstream server of a session on A (blocks 0:2): its push runs the
    waiting step. Catches: pushes taken from a peer the client did not name (the step would run
    on the stranger's hidden state), a push with a bad token or garbage taking the daemon down,
    a pushed hidden state of the wrong shape computed instead of refused, malformed "next" and
    "upstream" fields accepted, and a waiting step that hangs instead of taking the hidden
    state from its client."""
    server = swarm["A"]  # never killed (hs[2] would be after the final norm)
    with torch.no_grad():
        hs = tiny[1](torch.randint(1, 128, (1, 6)), output_hidden_states=True).hidden_states

    async with rpc_peer(server) as (open_stream, me):
        s = RawSession(await open_stream(INFERENCE_PROTOCOL))
        opened, _ = await s.send({"batch": 1, "max_length": 16, "start": 0, "end": 2})
        token = opened["session"]
        assert isinstance(token, bytes) and len(token) == 16
        bad = [
            ({"step": 1, "position": 0, "next": {"peer": 5}}, "bad_next"),
            ({"step": 1, "position": 0, "next": {"peer": "x", "session": b"1"}}, "bad_next"),
            ({"step": 1, "position": 0, "upstream": 7}, "bad_step"),
            ({"step": "1", "position": 0}, "bad_step"),
        ]
        for header, code in bad:
            reply, _ = await s.send(header, [hs[0][:, :2]])
            assert reply.get("error") == code, (header, reply)
        # Garbage and a wrong token on the push protocol: the stream ends, the daemon serves on.
        for first in ({"session": b"0" * 16}, {"session": "not bytes"}):
            stranger = await open_stream(PUSH_PROTOCOL)
            await write_message(stranger, first)
            with trio.fail_after(30), contextlib.suppress(Exception):
                assert not await stranger.read(65536)  # reset or closed: nothing is answered
        push = await open_stream(PUSH_PROTOCOL)
        await write_message(push, {"session": token})
        # Named upstream: someone else. Our push must not run the step; the client (us again)
        # then sends the hidden state itself, which supersedes the wait.
        await write_message(s.stream, {"step": 1, "position": 0, "upstream": "QmSomeoneElse"})
        await write_message(push, {"step": 1, "position": 0}, [hs[0][:, :2] + 1])
        reply, (out,) = await s.send({"step": 1, "position": 0}, [hs[0][:, :2]])
        assert reply["position"] == 2 and (out - hs[2][:, :2]).abs().max() < 1e-4
        # Named upstream: us. A push of the wrong shape is refused, a good one computed.
        await write_message(s.stream, {"step": 2, "position": 2, "upstream": me})
        await write_message(push, {"step": 2, "position": 2}, [torch.randn(1, 1, 65)])
        with trio.fail_after(30):
            reply, _ = await read_message(s.stream)
        assert reply.get("error") == "bad_shape", reply
        await write_message(s.stream, {"step": 3, "position": 2, "upstream": me})
        await write_message(push, {"step": 3, "position": 2}, [hs[0][:, 2:4]])
        with trio.fail_after(30):
            reply, (out,) = await read_message(s.stream)
        assert reply["step"] == 3 and reply["position"] == 4
        assert (out - hs[2][:, 2:4]).abs().max() < 1e-4
        await write_message(s.stream, {"close": True})  # a session left open delays the drain
        await push.reset()
