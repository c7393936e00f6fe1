"""`petald demo`: the whole system in one command, on this machine. Starts a local swarm (a
bootstrap node and two `petald serve` processes, each hosting half of the demo model's blocks,
SmolLM2-135M-Instruct), loads the client's share of the model, asks one question with greedy
decoding while the answer streams through both servers, prints the timings and stops everything
it started. `just demo` runs it after `just setup`.

This module stays light to import (argparse wiring); the work happens in `run`."""

from __future__ import annotations

import argparse
import sys
import time

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
        if chat.swarm is not None:
            print(f"client:   local parts of the model and tokenizer ready {t.load:.1f} s later")
        else:
            print(f"client:   joined the swarm and loaded in {t.load:.1f} s")
        n = len(chat.swarm.pids) if chat.swarm is not None else 0
        print(f"question: {args.question}")
        print("answer:   ", end="", flush=True)
        streamer = TextStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
        chat.ask(args.question, streamer=streamer)
        print(
            f"timing:   first token {t.first_token:.1f} s after the question ({t.prompt_tokens} "
            f"prompt tokens), then {t.tokens_per_second:.1f} tokens/s; {t.new_tokens} tokens "
            f"in {t.generate:.1f} s"
        )
        sys.stdout.flush()
        t0 = time.monotonic()
    if n:
        print(f"stopped:  the local swarm's {n} processes, in {time.monotonic() - t0:.1f} s")
    return 0
