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
SERVERS = 3


def client_main(args: argparse.Namespace) -> None:
    """In the client's namespace: alternating rounds of both modes; prints one JSON line."""
    import torch

    from petald import AutoDistributedModelForCausalLM
    from petald.client import ClientConfig, SwarmClient

    results: dict[str, list[float]] = {"relay": [], "pass": []}
    tokens: dict[str, list[list[int]]] = {"relay": [], "pass": []}
    passed_on = {"relay": 0, "pass": 0}
    clients = {}
    models = {}
    try:
        for mode in results:
            config = ClientConfig(
                initial_peers=(args.peer,),
                listen=(args.listen,),
                step_timeout=60,
                pass_activations=mode == "pass",
            )
            clients[mode] = SwarmClient(config=config).start()
            models[mode] = AutoDistributedModelForCausalLM.from_pretrained(
                args.source, client=clients[mode], wait_timeout=120
            )
        torch.manual_seed(0)
        ids = torch.randint(1, 400, (1, 16))
        for r in range(ROUNDS + 1):  # the first round warms up (probes, connections)
            for mode, model in models.items():
                with model.inference_session(max_length=64) as cache:
                    model.generate(ids, max_new_tokens=1, do_sample=False)  # prefill
                    t0 = time.perf_counter()
                    out = model.generate(
                        ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                        do_sample=False,
                    )  # fmt: skip
                    dt = time.perf_counter() - t0
                    stats = cache.session.stats
                    route = [str(h) for h in cache.session.route]
                if r:
                    results[mode].append((NEW_TOKENS - 1) / dt)
                    tokens[mode].append(out[0].tolist())
                    passed_on[mode] += stats.passed_on
        print(json.dumps({"tps": results, "tokens": tokens, "passed_on": passed_on,
                          "route": route}), flush=True)  # fmt: skip
    finally:
        for c in clients.values():
            c.close()


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
    args = p.parse_args()

    from petald.testing import DaemonProcess, stop_all
    from petald.testing.wan import Wan

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        source, n_blocks = prepare_model(args.model, tmp)
        wan = Wan(members=SERVERS + 2, delay=args.delay, rate=args.rate)  # boot, servers, client
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
            third = n_blocks // SERVERS
            for k in range(SERVERS):
                end = n_blocks if k == SERVERS - 1 else (k + 1) * third
                spawn(k + 1, "serve", source, "--blocks",
                      f"{k * third}:{end}", "--initial-peers", peer, "--throughput", "100",
                      "--reachability", "public", "--cache-tokens", "2048")  # fmt: skip
            with ThreadPoolExecutor(SERVERS) as pool:
                list(pool.map(lambda d: d.wait_ready(300), daemons[1:]))
            print(
                f"{args.model}: {SERVERS} servers ready in {time.perf_counter() - t0:.0f} s; "
                f"one-way delay {1e3 * args.delay:.0f} ms per link, uplinks {args.rate}",
                flush=True,
            )
            client = subprocess.run(
                wan.cmd(SERVERS + 1, [sys.executable, str(BENCH), "client", "--peer", peer,
                        "--listen", wan.listen(SERVERS + 1), "--source", source]),
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            lines = [x for x in client.stdout.splitlines() if x.startswith("{")]
            if client.returncode or not lines:
                raise RuntimeError(f"the client failed:\n{client.stdout}\n{client.stderr[-4000:]}")
            report(json.loads(lines[-1]), args.delay)
        finally:
            stop_all(daemons)
            wan.delete()


def report(r: dict, delay: float) -> None:
    relay, passing = (statistics.median(r["tps"][m]) for m in ("relay", "pass"))
    same = all(t == r["tokens"]["relay"][0] for m in r["tokens"] for t in r["tokens"][m])
    rounds = len(r["tps"]["pass"])
    print(f"route: {' -> '.join(r['route'])}")
    print(
        f"client relays every hop: {relay:.2f} tokens/s ({1e3 / relay:.0f} ms/token; "
        f"{6 * 1e3 * delay:.0f} ms of it the 6 legs' delay)"
    )
    print(
        f"servers pass activations on: {passing:.2f} tokens/s ({1e3 / passing:.0f} ms/token; "
        f"{4 * 1e3 * delay:.0f} ms of it the 4 legs' delay); hops passed on: "
        f"{r['passed_on']['pass']} (relay mode: {r['passed_on']['relay']})"
    )
    print(
        f"ratio (median of {rounds} rounds each): {passing / relay:.2f}x "
        f"(target >= 1.4x; limit 1.5x); identical tokens: {same}"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        cp = argparse.ArgumentParser()
        for flag in ("--peer", "--listen", "--source"):
            cp.add_argument(flag, required=True)
        client_main(cp.parse_args(sys.argv[2:]))
    else:
        main()
