"""Many real daemons on loopback (issue 12): `python bench/bench_daemons.py [--nodes 50]
[--servers 3]` starts N `petald node` processes and a few `petald serve` processes of a tiny
Llama (spans tiling it), then measures:

- time to converge: from the last daemon's ready line until every daemon's own swarm view holds
  every server (each daemon's `--metrics` petald_swarm_servers);
- RSS per daemon (nodes and servers apart) and idle CPU per daemon over `--idle` seconds;
- a client's time from start to a full route: `petald status --expect-servers ...` through one
  node, from launch until it has seen every server (the servers cover every block).

The baselines, measured in the same run: one lone `petald node` (a swarm of one), its RSS and
idle CPU; `petald status --wait 0` through it (process start and join, no route to wait for).
Figures on a shared, loaded machine are noisy; the load average is printed."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from petald.sim.daemons import cpu_seconds, rss_mib, start_swarm, wait_converged
from petald.testing import Processes
from petald.testing.models import save_tiny_llama


def _idle_cpu(daemons: list, seconds: float) -> list[float]:
    """Percent of one core each daemon used over `seconds` of rest."""
    before = [cpu_seconds(d) for d in daemons]
    time.sleep(seconds)  # measuring a rate over a fixed window, not synchronising
    return [100 * (cpu_seconds(d) - b) / seconds for d, b in zip(daemons, before, strict=True)]


def _client_route_seconds(via: str, servers: list[str], tmp: Path) -> float:
    """From launching `petald status` until it exits having seen exactly `servers` (none: it
    only joins, then listens 0 s: the process start and join, the baseline)."""
    cmd = [sys.executable, "-m", "petald.cli", "status", "--initial-peers", via]
    cmd += ["--identity", str(tmp / "client.key")]
    cmd += ["--expect-servers", *servers, "--wait", "120"] if servers else ["--wait", "0"]
    start = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    return time.monotonic() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=50, help="`petald node` processes (default 50)")
    p.add_argument("--servers", type=int, default=3, help="`petald serve` processes (default 3)")
    p.add_argument("--idle", type=float, default=20.0, help="seconds of rest for the CPU figure")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed to converge")
    p.add_argument(
        "--ready-timeout", type=float, default=900.0, help="seconds each daemon may take to start"
    )
    args = p.parse_args()
    if args.nodes < 2 or args.servers < 1:
        p.error("--nodes must be at least 2 and --servers at least 1")
    layers = 2 * args.servers
    spans = [f"{2 * i}:{2 * i + 2}" for i in range(args.servers)]
    with tempfile.TemporaryDirectory() as tmp_dir, Processes() as procs:
        tmp = Path(tmp_dir)
        save_tiny_llama(tmp / "tiny", layers=layers)
        metrics = ("--metrics", "127.0.0.1:0")
        lone = procs.start("node", "--new-swarm", *metrics, identity=tmp / "lone.key")
        started = time.monotonic()
        swarm = start_swarm(
            procs,
            tmp,
            nodes=args.nodes,
            model_dir=tmp / "tiny",
            spans=spans,
            ready_timeout=args.ready_timeout,
        )
        ready = time.monotonic() - started
        converge = wait_converged(swarm, timeout=args.timeout)
        route = _client_route_seconds(swarm.nodes[-1].addr, [s.peer_id for s in swarm.servers], tmp)
        route_baseline = _client_route_seconds(lone.addr, [], tmp)
        cpu = _idle_cpu([lone, *swarm.daemons], args.idle)
        node_rss = [rss_mib(d) for d in swarm.nodes]
        result = {
            "nodes": args.nodes,
            "servers": args.servers,
            "load_average": round(os.getloadavg()[0], 1),
            "seconds_to_all_ready": round(ready, 1),
            "seconds_to_converge": round(converge, 1),
            "client_seconds_to_full_route": round(route, 1),
            "baseline_client_seconds_to_join": round(route_baseline, 1),
            "node_rss_mib_mean": round(sum(node_rss) / len(node_rss), 1),
            "node_rss_mib_max": round(max(node_rss), 1),
            "server_rss_mib_mean": round(
                sum(rss_mib(d) for d in swarm.servers) / len(swarm.servers), 1
            ),
            "node_idle_cpu_percent_mean": round(sum(cpu[1 : args.nodes + 1]) / args.nodes, 2),
            "server_idle_cpu_percent_mean": round(sum(cpu[args.nodes + 1 :]) / args.servers, 2),
            "baseline_lone_node_rss_mib": round(rss_mib(lone), 1),
            "baseline_lone_node_idle_cpu_percent": round(cpu[0], 2),
        }
        result["node_rss_vs_lone_node"] = round(
            result["node_rss_mib_mean"] / result["baseline_lone_node_rss_mib"], 2
        )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
