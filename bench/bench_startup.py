"""Launch to online of `petald serve`, in another peer's view, split into its parts.

A bootstrap node (`petald node`) and an observer peer (this process: the real stack, following
the model's announcements like a client or `petald status` does) are up first. Then, per run, a
server is launched with PETALD_STARTUP=1 (petald.server.startup): its daemon and compute process
stamp the points they pass with CLOCK_MONOTONIC and their own CPU time, and the observer notes
when the server's "online" announcement reaches it. Each run prints nothing; the summary gives,
per point, the median time since launch and the CPU its process had used by then, plus the CPU
of each process at the moment the observer saw it online (/proc).

    python bench/bench_startup.py [--runs 3] [--only tiny|smollm2]

Configurations: a tiny random Llama, blocks 0:2, `--throughput 100`; the real SmolLM2-135M GGUF,
blocks 0:15, `--throughput auto` (run 0 measures and caches it; it is reported apart, the
median is over the cached runs, as a restarted server would start)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from petald.p2p.config import P2PConfig
from petald.p2p.identity import load_or_create_identity
from petald.stack import start_stack
from petald.testing import start_daemon, stop_all

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float:
    """user+sys seconds of a live process (0.0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_of(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def peer_id_of(identity: Path) -> str:
    from libp2p.peer.id import ID

    key_pair, _ = load_or_create_identity(identity)
    return ID.from_pubkey(key_pair.public_key).to_base58()


async def one_run(stack, bootstrap: str, model: str, argv: list[str], tmp: Path, env: dict):
    """Launches one server, returns (its stamps, launch time, online time, cpu by role)."""
    identity = tmp / f"id-{time.monotonic_ns()}.key"
    peer = peer_id_of(identity)
    log = tmp / f"{identity.stem}.log"
    cmd = [sys.executable, "-m", "petald.cli", "serve", *argv, "--model-name", model]
    cmd += ["--listen", "/ip4/127.0.0.1/tcp/0", "--identity", str(identity)]
    cmd += ["--initial-peers", bootstrap, "--reachability", "public"]
    announcer = stack.announcer

    def online(view) -> bool:
        return any(
            e.peer_id == peer and e.info.state == "online"
            for e in view.servers(model, now=time.time())
        )

    with open(log, "wb") as out:
        t_launch = time.monotonic()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
        )
        try:
            await announcer.wait_until(online, timeout=180)
            t_online = time.monotonic()
            workers = children_of(proc.pid)
            cpu = {"daemon": cpu_of(proc.pid), "worker": sum(cpu_of(w) for w in workers)}
        except trio.TooSlowError:
            proc.kill()
            raise SystemExit(f"not online in 180 s:\n{log.read_text()[-3000:]}") from None
            # Its own later stamps (published, ready line) before it is stopped.
            with trio.move_on_after(60):
                while b'"event": "ready"' not in log.read_bytes() and proc.poll() is None:
                    await trio.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.send_signal(signal.SIGTERM)  # the second one stops at once
            await trio.to_thread.run_sync(proc.wait)
    stamps = []
    for line in log.read_text().splitlines():
        if line.startswith('{"startup"'):
            stamps.append(json.loads(line))
    return stamps, t_launch, t_online, cpu


def summarize(name: str, runs: list) -> None:
    rows: dict[str, list[tuple[float, float]]] = {}
    for stamps, t0, _, _ in runs:
        for s in stamps:
            rows.setdefault(s["startup"], []).append((s["t"] - t0, s["cpu"]))
    print(f"\n{name}: {len(runs)} runs, medians (s since launch; CPU of that process so far)")
    order = sorted(rows, key=lambda k: statistics.median(t for t, _ in rows[k]))
    prev = 0.0
    for point in order:
        t = statistics.median(x for x, _ in rows[point])
        c = statistics.median(y for _, y in rows[point])
        print(f"  {point:24s} {t:6.2f} s  (+{t - prev:5.2f})  cpu {c:5.2f} s")
        prev = t
    t_on = statistics.median(t1 - t0 for _, t0, t1, _ in runs)
    print(f"  {'online (observer)':24s} {t_on:6.2f} s  (+{t_on - prev:5.2f})")
    for role in ("daemon", "worker"):
        cpu = statistics.median(r[3][role] for r in runs)
        print(f"  CPU at online, {role:7s} {cpu:6.2f} s")
    total = [r[3]["daemon"] + r[3]["worker"] for r in runs]
    walls = ", ".join(f"{t1 - t0:.2f}" for _, t0, t1, _ in runs)
    print(f"  CPU at online, both    {statistics.median(total):6.2f} s   (walls: {walls})")


async def bench(args: argparse.Namespace, tmp: Path) -> None:
    from petald.testing.models import save_tiny_llama, smollm2_gguf

    tiny = tmp / "tiny-llama"
    save_tiny_llama(tiny, layers=4)
    configs = {
        "tiny": ("tiny Llama 0:2, --throughput 100", [str(tiny), "--blocks", "0:2"], ["100"]),
        "smollm2": (
            "SmolLM2-135M GGUF 0:15, --throughput auto (cached)",
            [str(smollm2_gguf()), "--blocks", "0:15"],
            ["auto"],
        ),
    }
    env = {**os.environ, "PETALD_STARTUP": "1", "PETALD_CACHE_DIR": str(tmp / "cache")}
    env["PYTHONUNBUFFERED"] = "1"
    node = start_daemon(
        "node", "--new-swarm", "--reachability", "public", identity=tmp / "boot.key"
    )
    try:
        bootstrap = node.addr
        config = P2PConfig(listen=("/ip4/127.0.0.1/tcp/0",), initial_peers=(bootstrap,))
        key_pair, _ = load_or_create_identity(tmp / "observer.key")
        async with trio.open_nursery() as nursery:
            stack = await start_stack(nursery, key_pair, config)
            for key, (name, argv, throughput) in configs.items():
                if args.only and key != args.only:
                    continue
                model = f"bench-{key}"
                await stack.announcer.watch(model)
                argv = [*argv, "--throughput", throughput[0]]
                runs = []
                for i in range(args.runs + (throughput[0] == "auto")):
                    r = await one_run(stack, bootstrap, model, argv, tmp, env)
                    if throughput[0] == "auto" and i == 0:
                        summarize(f"{name}: run 0 (measures the throughput)", [r])
                    else:
                        runs.append(r)
                summarize(name, runs)
            nursery.cancel_scope.cancel()
    finally:
        stop_all([node])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", choices=["tiny", "smollm2"])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trio.run(bench, args, Path(tmp))


if __name__ == "__main__":
    main()
