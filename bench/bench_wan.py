"""WAN bench: greedy generation through a 3-server route whose every link has a one-way delay
(default 25 ms), with servers passing activations on (petald.server.push) against the client
relaying every hop, measured in the same run, same servers, same prompt, alternating.

Topology (petald.testing.wan, needs root): the boot node, three servers (thirds of the model)
and the client each in a network namespace of their own, reaching each other only through a
router that delays every byte by `--delay` in each direction (a userspace proxy: this kernel
has no `tc netem`). Client-driven, a token costs 2 legs per hop (6); passing on, one per hop
and one back (4): the limit of the ratio is 1.5x, less the compute's share.

Run (root): `.venv/bin/python bench/bench_wan.py [--model smollm2|tiny] [--delay 0.025]`
(about 2 minutes on 2 cores). `tiny` is a SmolLM2-shaped random model of 6 blocks (compute
is small next to the delay); `smollm2` the real SmolLM2-135M-Instruct (GGUF)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve()
NEW_TOKENS = 24
ROUNDS = 3


MODES = {  # name: (servers pass activations on, generate() kwargs)
    "relay": (False, {}),
    "pass": (True, {}),
}


def client_main(args: argparse.Namespace) -> None:
    """In the client's namespace: alternating rounds of every mode; prints one JSON line."""
    import torch

    from petald import AutoDistributedModelForCausalLM
    from petald.client import ClientConfig, SwarmClient

    modes = dict(MODES)
    if args.speculate:
        modes["pass+lookup"] = (True, {"prompt_lookup_num_tokens": args.speculate})
    results: dict[str, list[float]] = {m: [] for m in modes}
    tokens: dict[str, list[list[int]]] = {m: [] for m in modes}
    steps = dict.fromkeys(modes, 0)
    passed_on = dict.fromkeys(modes, 0)
    clients, models = {}, {}
    try:
        for passing, _ in modes.values():
            if passing in clients:
                continue
            config = ClientConfig(
                initial_peers=(args.peer,),
                listen=(args.listen,),
                step_timeout=60,
                pass_activations=passing,
            )
            clients[passing] = SwarmClient(config=config).start()
            models[passing] = AutoDistributedModelForCausalLM.from_pretrained(
                args.source, client=clients[passing], wait_timeout=120
            )
        ids = prompt_ids(args.source, torch)
        route: list[str] = []
        for r in range(ROUNDS + 1):  # the first round warms up (probes, connections)
            for mode, (passing, kw) in modes.items():
                model = models[passing]
                with model.inference_session(max_length=ids.shape[1] + 2 * NEW_TOKENS) as cache:
                    model.generate(ids, max_new_tokens=1, do_sample=False)  # prefill
                    before = cache.session.stats.steps
                    t0 = time.perf_counter()
                    out = model.generate(
                        ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                        do_sample=False, **kw,
                    )  # fmt: skip
                    dt = time.perf_counter() - t0
                    stats = cache.session.stats
                    route = [str(h) for h in cache.session.route]
                if r:
                    results[mode].append((NEW_TOKENS - 1) / dt)
                    tokens[mode].append(out[0, ids.shape[1] :].tolist())
                    passed_on[mode] += stats.passed_on
                    steps[mode] += stats.steps - before
        print(json.dumps({"tps": results, "tokens": tokens, "passed_on": passed_on,
                          "steps": steps, "route": route}), flush=True)  # fmt: skip
    finally:
        for c in clients.values():
            c.close()


def prompt_ids(source: str, torch):  # -> (1, n) token ids
    """SmolLM2: a chat-templated request to repeat a paragraph (what prompt lookup drafts
    well); the random model: a random prompt repeated three times."""
    if source.endswith(".gguf"):
        from transformers import AutoTokenizer

        path = Path(source)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        messages = [{"role": "user", "content": f"Repeat this text exactly:\n\n{PARAGRAPH}"}]
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    torch.manual_seed(0)
    return torch.randint(1, 400, (1, 8)).repeat(1, 3)


PARAGRAPH = (
    "The river starts high in the mountains, where snow melts in spring and feeds small "
    "streams that join in the valley. From there it runs past farms and villages, turns "
    "west at the old mill, and reaches the sea after three hundred kilometres."
)


def prepare_model(kind: str, tmp: Path) -> tuple[str, int]:
    """(source path, blocks)."""
    if kind == "smollm2":
        from petald.testing.models import smollm2_gguf

        return str(smollm2_gguf()), 30
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(  # SmolLM2-135M's shape, 6 blocks
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
        num_hidden_layers=6, vocab_size=49152, tie_word_embeddings=True,
    )  # fmt: skip
    path = tmp / "smol-shaped-6"
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path), 6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--delay", type=float, default=0.025, help="one-way seconds per link")
    p.add_argument("--rate", default="100mbit", help="each peer's uplink (tbf)")
    p.add_argument("--servers", type=int, default=3, help="servers, each a share of the blocks")
    p.add_argument(
        "--speculate", type=int, default=0, metavar="N",
        help="also run passing on + prompt lookup with N draft tokens per step",
    )  # fmt: skip
    args = p.parse_args()
    servers = args.servers

    from petald.testing import DaemonProcess, stop_all
    from petald.testing.wan import Wan

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        source, n_blocks = prepare_model(args.model, tmp)
        wan = Wan(members=servers + 2, delay=args.delay, rate=args.rate)  # boot, servers, client
        daemons: list[DaemonProcess] = []
        try:
            wan.create()

            def spawn(i: int, *cli: str) -> DaemonProcess:
                cmd = [sys.executable, "-m", "petald.cli", *cli, "--listen", wan.listen(i)]
                cmd += ["--announce", wan.announce(i), "--identity", str(tmp / f"{i}.key")]
                proc = subprocess.Popen(
                    wan.cmd(i, cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )  # fmt: skip
                daemons.append(DaemonProcess(proc))
                return daemons[-1]

            boot = spawn(0, "node", "--new-swarm")
            boot.wait_ready(60)
            peer = f"{wan.announce(0)}/p2p/{boot.peer_id}"
            t0 = time.perf_counter()
            third = n_blocks // servers
            for k in range(servers):
                end = n_blocks if k == servers - 1 else (k + 1) * third
                spawn(k + 1, "serve", source, "--blocks",
                      f"{k * third}:{end}", "--initial-peers", peer, "--throughput", "100",
                      "--reachability", "public", "--cache-tokens", "2048")  # fmt: skip
            with ThreadPoolExecutor(servers) as pool:
                list(pool.map(lambda d: d.wait_ready(300), daemons[1:]))
            print(
                f"{args.model}: {servers} servers ready in {time.perf_counter() - t0:.0f} s; "
                f"one-way delay {1e3 * args.delay:.0f} ms per link, uplinks {args.rate}",
                flush=True,
            )
            client = subprocess.run(
                wan.cmd(servers + 1, [sys.executable, str(BENCH), "client", "--peer", peer,
                        "--listen", wan.listen(servers + 1), "--source", source,
                        "--speculate", str(args.speculate)]),
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            lines = [x for x in client.stdout.splitlines() if x.startswith("{")]
            if client.returncode or not lines:
                raise RuntimeError(f"the client failed:\n{client.stdout}\n{client.stderr[-4000:]}")
            report(json.loads(lines[-1]), args.delay, servers)
        finally:
            stop_all(daemons)
            wan.delete()


def report(r: dict, delay: float, servers: int) -> None:
    tps = {m: statistics.median(v) for m, v in r["tps"].items()}
    first = r["tokens"]["relay"][0]
    same = all(t == first for runs in r["tokens"].values() for t in runs)
    rounds = len(r["tps"]["relay"])
    legs = {"relay": 2 * servers, "pass": servers + 1, "pass+lookup": servers + 1}
    print(f"route: {' -> '.join(r['route'])}; {NEW_TOKENS} new tokens, greedy")
    for mode, value in tps.items():
        per_step = (NEW_TOKENS - 1) * rounds / max(r["steps"][mode], 1)
        print(
            f"{mode:12s} {value:6.2f} tokens/s ({1e3 / value:4.0f} ms/token; a step's "
            f"{legs[mode]} legs: {legs[mode] * 1e3 * delay:.0f} ms; {per_step:.2f} tokens/step; "
            f"hops passed on: {r['passed_on'][mode]})"
        )
    print(
        f"servers passing on / client relaying: {tps['pass'] / tps['relay']:.2f}x "
        f"(median of {rounds} rounds; target >= 1.4x with 3 servers, limit "
        f"{2 * servers / (servers + 1):.2f}x)"
    )
    if "pass+lookup" in tps:
        print(
            f"passing on + prompt lookup / client relaying: "
            f"{tps['pass+lookup'] / tps['relay']:.2f}x (target >= 4x)"
        )
    print(f"identical tokens in every mode and round: {same}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        cp = argparse.ArgumentParser()
        for flag in ("--peer", "--listen", "--source"):
            cp.add_argument(flag, required=True)
        cp.add_argument("--speculate", type=int, default=0)
        client_main(cp.parse_args(sys.argv[2:]))
    else:
        main()
