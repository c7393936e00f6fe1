"""The real-process counterpart of the simulation: `start_swarm` starts N `petald node` daemons and
a few `petald serve` processes of a tiny model on loopback (owned by a `Processes`, so every one
is stopped whatever fails), and `wait_converged` waits until every daemon's own swarm view holds
every server, read from each daemon's `--metrics` endpoint (`petald_swarm_servers`).
`bench/bench_daemons.py` measures with it; tests/swarm/test_many_daemons.py asserts with it."""

from __future__ import annotations

import os
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from petald.testing import DaemonProcess, Processes

POLL = 0.25  # seconds between two scrapes of a daemon that has not converged yet


@dataclass
class Swarm:
    nodes: list[DaemonProcess]  # nodes[0] started the swarm
    servers: list[DaemonProcess]

    @property
    def daemons(self) -> list[DaemonProcess]:
        return [*self.nodes, *self.servers]


def metric(daemon: DaemonProcess, name: str) -> float | None:
    """One sample without labels from the daemon's /metrics (None: not exported)."""
    with urllib.request.urlopen(daemon.ready["metrics"], timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def start_swarm(
    procs: Processes,
    tmp: Path,
    *,
    nodes: int,
    model_dir: Path,
    spans: list[str],
    ready_timeout: float = 120.0,
) -> Swarm:
    """A bootstrap node, `nodes - 1` more joining through it, then one server per span (each
    `petald serve model_dir --blocks SPAN`), all started in parallel after the bootstrap."""
    metrics = ("--metrics", "127.0.0.1:0")
    first = procs.start("node", "--new-swarm", *metrics, identity=tmp / "node0.key")
    rest = [
        procs.spawn("node", "--initial-peers", first.addr, *metrics, identity=tmp / f"node{i}.key")
        for i in range(1, nodes)
    ]
    servers = [
        procs.spawn(
            "serve",
            str(model_dir),
            "--blocks",
            span,
            "--initial-peers",
            first.addr,
            *metrics,
            identity=tmp / f"server{i}.key",
        )
        for i, span in enumerate(spans)
    ]
    for d in [*rest, *servers]:
        d.wait_ready(ready_timeout)
    return Swarm([first, *rest], servers)


def wait_converged(swarm: Swarm, *, timeout: float) -> float:
    """Seconds until every daemon's view holds every server (a server counts itself). Raises
    `TimeoutError` naming the daemons that had not converged. Bounded in time and in scrapes."""
    start = time.monotonic()
    want = len(swarm.servers)
    pending = list(swarm.daemons)
    for _ in range(int(timeout / POLL) + 1):
        pending = [d for d in pending if (metric(d, "petald_swarm_servers") or 0) < want]
        if not pending:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            break
        time.sleep(POLL)  # no event to wait on across processes: a bounded scrape loop
    seen = {
        d.peer_id[-6:]: (metric(d, "petald_swarm_servers"), metric(d, "petald_connected_peers"))
        for d in pending
    }
    raise TimeoutError(
        f"after {timeout:.0f} s {len(pending)} of {len(swarm.daemons)} daemons saw fewer than "
        f"{want} servers ({{daemon: (servers seen, connected peers)}}): {seen}"
    )


def rss_mib(daemon: DaemonProcess) -> float:
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(daemon: DaemonProcess) -> float:
    """User + system CPU the daemon has used (from /proc, in clock ticks)."""
    fields = Path(f"/proc/{daemon.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
