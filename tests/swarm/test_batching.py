"""Continuous batching against a real `petald serve` process of a tiny random Llama (all 4
blocks): four inference sessions from two client peers, with prompts of different lengths,
decode greedily at the same time (the client part: the local model's embeddings, final norm and
head). Each session's tokens equal the local model's greedy generate() of its prompt alone, and
the server's `info` shows that steps of different sessions really shared forwards."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import trio
from transformers import LlamaForCausalLM

from petald.testing import DaemonProcess, Processes
from petald.testing.models import save_tiny_llama
from petald.testing.rpc import RawSession, exchange, rpc_client
from petald.wire.protocols import INFERENCE_PROTOCOL, INFO_PROTOCOL

pytestmark = pytest.mark.slow

PROMPTS = (3, 9, 5, 12)  # tokens
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[LlamaForCausalLM, DaemonProcess]]:
    tmp = tmp_path_factory.mktemp("batching")
    model = save_tiny_llama(tmp / "tiny-llama", seed=3)
    with Processes() as procs:
        boot = procs.start("node", "--new-swarm", identity=tmp / "boot.key")
        args = [str(tmp / "tiny-llama"), "--blocks", "0:4", "--initial-peers", boot.addr]
        args += ["--throughput", "100", "--reachability", "public", "--cache-tokens", "512"]
        args += ["--drain-timeout", "2"]  # stopping it is no part of the test
        server = procs.spawn("serve", *args, identity=tmp / "server.key")
        server.wait_ready(120)
        yield model, server


def _prompt(n: int) -> torch.Tensor:
    return torch.randint(1, 128, (1, n), generator=torch.Generator().manual_seed(n))


async def _generate(model, session: RawSession, ids: torch.Tensor, prefilled) -> list:
    """Greedy decoding with the blocks on the server; `await prefilled()` after the prefill
    (the sessions start decoding together, so that their steps meet)."""
    max_length = ids.shape[1] + NEW_TOKENS
    opened, _ = await session.send({"batch": 1, "max_length": max_length, "start": 0, "end": 4})
    assert opened.get("ok"), opened
    tokens, position = ids[0].tolist(), 0
    for step in range(NEW_TOKENS):
        new = torch.tensor([tokens[position:]])
        with torch.no_grad():
            hidden = model.model.embed_tokens(new)
        reply, (out,) = await session.send({"step": step, "position": position}, [hidden])
        assert reply.get("ok"), reply
        position = reply["position"]
        with torch.no_grad():
            logits = model.lm_head(model.model.norm(out[:, -1:]))
        tokens.append(int(logits.argmax(-1)))
        if step == 0:
            await prefilled()
    return tokens


async def test_concurrent_sessions_are_batched_and_keep_their_tokens(served) -> None:
    """Catches: batching silently off (no forward of several sessions in `served`), a
    session's rows mixed with another's or padded wrong (other tokens), and a batched cache
    split back at the wrong length (later tokens differ)."""
    model, server = served
    want = {n: model.generate(_prompt(n), max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()
            for n in PROMPTS}  # fmt: skip
    got: dict[int, list] = {}
    with trio.fail_after(90):
        async with rpc_client(server) as open_a, rpc_client(server) as open_b:
            ready, start = [0], trio.Event()

            async def prefilled() -> None:
                ready[0] += 1
                if ready[0] == len(PROMPTS):
                    start.set()
                await start.wait()

            async def client(n: int, open_stream) -> None:
                session = RawSession(await open_stream(INFERENCE_PROTOCOL))
                got[n] = await _generate(model, session, _prompt(n), prefilled)
                await session.stream.close()

            async with trio.open_nursery() as nursery:
                for i, n in enumerate(PROMPTS):
                    nursery.start_soon(client, n, (open_a, open_b)[i % 2])
            info, _ = await exchange(await open_a(INFO_PROTOCOL), {})
    assert got == want
    forwards = {int(k): v for k, v in info["served"]["inference"].items()}
    assert max(forwards) >= 2, forwards  # some forward ran steps of several sessions
    steps = len(PROMPTS) * NEW_TOKENS
    assert sum(size * count for size, count in forwards.items()) == steps
