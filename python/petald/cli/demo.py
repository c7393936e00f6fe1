"""`petald demo`: the whole system in one command, on this machine. Starts a local swarm (a
bootstrap node and two `petald serve` processes, each hosting half of the demo model's blocks,
SmolLM2-135M-Instruct), loads the client's share of the model, asks one question with greedy
decoding while the answer streams through both servers, prints the timings and stops everything
it started. `just demo` runs it after `just setup`.

This module stays light to import (argparse wiring); the work happens in `run`."""

from __future__ import annotations

import argparse
import sys

from petald.cli.chat import add_model_arguments

QUESTION = "What is the capital of France?"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--question", default=QUESTION, help=f"(default: {QUESTION!r})")


def run(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from petald.cli.chat import conversation_config
    from petald.cli.conversation import Sampling, open_conversation

    sampling = Sampling(greedy=True, max_new_tokens=args.max_new_tokens)
    config = conversation_config(args, sampling=sampling)
    with open_conversation(config) as chat:
        t = chat.timings
        blocks = chat.model.transformer_blocks
        if chat.swarm is not None:
            spans = ", ".join(f"{s} on server {i}" for i, s in enumerate(chat.swarm.spans))
            print(f"swarm:    {blocks.n_blocks} blocks of {blocks.model} ({spans})")
            print(f"          online in {t.swarm:.1f} s (loading dominates)")
        print(f"client:   embeddings and LM head loaded in {t.load:.1f} s")
        print(f"question: {args.question}")
        print("answer:   ", end="", flush=True)
        streamer = TextStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
        chat.ask(args.question, streamer=streamer)
        rate = t.new_tokens / t.generate if t.generate > 0 else 0.0
        print(f"generated {t.new_tokens} tokens in {t.generate:.1f} s ({rate:.1f} tokens/s)")
        sys.stdout.flush()
    if config.initial_peers == ():
        print("stopped the local swarm")
    return 0
