"""`petald chat [MODEL]`: an interactive chat in the terminal with a model whose blocks run on a
swarm. Owns the command's flags and the read-answer loop: the user's line goes into the history,
the answer is streamed token by token as it arrives, `/reset` forgets the history, `/exit` or
Ctrl-D (or Ctrl-C at the prompt) leaves; Ctrl-C while an answer streams stops that answer. With
no --initial-peers it starts a local swarm of MODEL (default: the demo model, SmolLM2-135M-
Instruct) and stops it on the way out (`petald.cli.conversation` does the rest).

This module stays light to import (argparse wiring); torch and transformers load in `run`."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from petald.errors import PetaldError

PROMPT = ">>> "
HELP = "/reset forgets the conversation, /exit (or Ctrl-D) quits"


def add_swarm_key_arg(p: argparse.ArgumentParser) -> None:
    """--swarm-key, the same for every command that joins a swarm (petald.p2p.pnet)."""
    p.add_argument(
        "--swarm-key",
        type=Path,
        metavar="FILE",
        help="join a private swarm: only peers with this pre-shared key file (libp2p pnet; "
        "create one with `petald swarm-key new FILE`) can connect to us, or we to them",
    )


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The flags `petald chat` and `petald demo` share: which model, which swarm."""
    p.add_argument(
        "model",
        metavar="MODEL",
        nargs="?",
        help="model directory, .gguf file or Hub id (default: the demo model, "
        "SmolLM2-135M-Instruct, which `just setup` installs)",
    )
    p.add_argument(
        "--initial-peers",
        nargs="+",
        metavar="MULTIADDR",
        default=[],
        help="join this swarm (full addresses ending in /p2p/<peer id>); without it, start a "
        "local swarm of MODEL and stop it on exit",
    )
    add_swarm_key_arg(p)
    p.add_argument("--model-name", help="the model's name on the swarm (default: from MODEL)")
    p.add_argument(
        "--servers",
        type=int,
        default=2,
        help="local swarm only: servers to start, each hosting an equal share (default: 2)",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=60.0,
        help="seconds to wait for the swarm to serve every block (default: 60)",
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="per answer (default: 256)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--system", help="system prompt (default: the chat template's)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=0.2, help="(default: 0.2; 0: greedy)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default: 0.9)")
    p.add_argument("--top-k", type=int, default=50, help="(default: 50; 0: off)")
    p.add_argument("--seed", type=int, help="seed the sampler, for repeatable answers")
    p.add_argument(
        "--prompt-lookup",
        type=int,
        default=0,
        metavar="N",
        help="speculative decoding: draft N tokens per step from the conversation itself and "
        "verify them in one trip through the swarm (same answers; faster when the answer "
        "repeats text, e.g. code edits or quotes; default: 0, off)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=4096,
        help="tokens the conversation may reach in the servers' KV caches (default: 4096)",
    )
    add_trust_arguments(p)


def add_trust_arguments(p: argparse.ArgumentParser) -> None:
    """Verified computation and weight hashes (petald.client.verify, petald.client.trust)."""
    p.add_argument(
        "--verify",
        type=float,
        default=0.0,
        metavar="F",
        help="re-run this fraction of steps on a second server holding the same blocks and ban "
        "a server caught computing wrong outputs (e.g. 0.1; default: 0, off: a check costs "
        "another server's compute and shows it your activations too)",
    )
    p.add_argument(
        "--weights-policy",
        choices=["off", "majority", "trusted"],
        help="refuse servers whose announced weight hashes differ from most servers' of the "
        "same blocks (majority) or from --trusted-weights (trusted; the default with it, else "
        "off)",
    )
    p.add_argument(
        "--trusted-weights",
        type=Path,
        metavar="FILE",
        help="the hashes `petald weights-hash MODEL -o FILE` wrote: use only servers that "
        "announce them",
    )


def conversation_config(args: argparse.Namespace, *, sampling=None):  # -> ConversationConfig
    from petald.cli.conversation import ConversationConfig, Sampling

    if sampling is None:
        sampling = Sampling(
            greedy=args.greedy,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            prompt_lookup=getattr(args, "prompt_lookup", 0),
        )
    if args.servers < 1:
        raise ValueError("--servers must be at least 1")
    verify = getattr(args, "verify", 0.0)
    if not 0.0 <= verify <= 1.0:
        raise ValueError(f"--verify {verify}: give a fraction of steps in [0, 1], e.g. 0.1")
    trusted = getattr(args, "trusted_weights", None)
    if trusted is not None:
        from petald.client.trust import TrustedWeights

        TrustedWeights.load(trusted)  # a missing or malformed file fails before anything starts
    return ConversationConfig(
        model=args.model,
        initial_peers=tuple(args.initial_peers),
        swarm_key=args.swarm_key,
        model_name=args.model_name,
        servers=args.servers,
        system=getattr(args, "system", None),
        max_length=getattr(args, "max_length", 4096),
        wait=args.wait,
        sampling=sampling,
        verify_fraction=verify,
        weights_policy=getattr(args, "weights_policy", None),
        trusted_weights=trusted,
    )


def run(args: argparse.Namespace) -> int:
    from petald.cli.conversation import open_conversation

    config = conversation_config(args)  # bad flags fail before anything starts
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    with open_conversation(config) as chat:
        where = f"{len(chat.swarm.spans)} local servers" if chat.swarm else "the swarm"
        print(f"petald chat: {chat.model.transformer_blocks.model} on {where}. {HELP}.", flush=True)
        return _loop(chat)


def _loop(chat) -> int:
    from transformers import TextStreamer

    while True:
        try:
            line = input(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            chat.reset()
            print("(conversation reset)")
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}: {HELP}")
            continue
        streamer = TextStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
        try:
            chat.ask(line, streamer=streamer)
        except KeyboardInterrupt:
            print("\n(answer interrupted; it is not kept in the conversation)", flush=True)
            chat.restart_session()
        except ValueError as e:  # the conversation outgrew the session: the message says what to do
            print(f"petald: {e}", file=sys.stderr)
        except PetaldError as e:  # e.g. servers gone and no replacement: the user may retry
            print(f"\npetald: {e}", file=sys.stderr)
            chat.restart_session()
        sys.stdout.flush()
