"""The cost of verified computation (petald.client.verify): decode tokens/s of greedy generate()
through a loopback swarm with `verify_fraction` 0.1 against 0, in the same run, as a ratio.

The swarm: two servers holding every block of a tiny random Llama (8 blocks, hidden 256), so a
session goes through one of them and its checks through the other (the witness keeps its own
session, brought up to date from the client's history at each check). Each setting runs ROUNDS
times (alternating, so load drifts hit both alike); the median is reported. A check costs the
witness's catch-up (the tokens since its last check, one prefill) plus a round trip, so the
ratio depends on the fraction, the model's size and the network; on 2 shared cores the figures
are noisy (other processes take the CPU at random): compare ratios of one run, not runs.

Run: `.venv/bin/python bench/bench_verify.py` (about a minute, most of it start-up)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from petald import AutoDistributedModelForCausalLM
from petald.client import ClientConfig, SwarmClient
from petald.testing import spawn_daemon, start_daemon, stop_all
from petald.testing.models import save_tiny_llama

NEW_TOKENS = 64
ROUNDS = 3
FRACTION = 0.1
LAYERS = 8


def decode_rate(model, ids: torch.Tensor) -> tuple[torch.Tensor, float, object]:
    """(tokens, decode tokens/s after the prefill, the session's stats) of one generate()."""
    with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS + 1) as cache:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=1, do_sample=False)  # the prefill
            t0 = time.perf_counter()
            out = model.generate(
                ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
            )
        seconds = time.perf_counter() - t0
        return out, (NEW_TOKENS - 1) / seconds, cache.stats


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        path = tmp / "tiny-bench-verify"
        save_tiny_llama(path, layers=LAYERS, hidden=256, intermediate=512, heads=8, kv_heads=4)
        daemons = [start_daemon("node", "--new-swarm", identity=tmp / "boot.key")]
        try:
            boot = daemons[0].addr
            for name in ("A", "B"):
                args = ["--blocks", f"0:{LAYERS}", "--initial-peers", boot]
                args += ["--throughput", "100", "--reachability", "public"]
                daemons.append(spawn_daemon("serve", str(path), *args, identity=tmp / name))
            for d in daemons[1:]:
                d.wait_ready(300)
            torch.manual_seed(0)
            ids = torch.randint(1, 128, (1, 16))
            rates: dict[float, list[float]] = {0.0: [], FRACTION: []}
            outs: dict[float, torch.Tensor] = {}
            checks = 0
            for r in range(ROUNDS):
                for fraction in (0.0, FRACTION):
                    config = ClientConfig(
                        initial_peers=(boot,), verify_fraction=fraction, verify_seed=r
                    )
                    with SwarmClient(config=config) as client:
                        model = AutoDistributedModelForCausalLM.from_pretrained(path, client=client)
                        out, rate, stats = decode_rate(model, ids)
                    rates[fraction].append(rate)
                    outs[fraction] = out
                    checks += stats.verify_checks if fraction else 0
            assert torch.equal(outs[0.0], outs[FRACTION]), "checked text differs"
        finally:
            stop_all(reversed(daemons))
    base, checked = statistics.median(rates[0.0]), statistics.median(rates[FRACTION])
    print(
        f"decode through 1 server, {LAYERS} blocks: {base:.1f} tokens/s unchecked, "
        f"{checked:.1f} tokens/s with verify_fraction {FRACTION} ({checks} hop checks in "
        f"{ROUNDS} runs); ratio {checked / base:.2f} (1.0: free); noisy under load"
    )


if __name__ == "__main__":
    main()
