"""Twelve real daemons on loopback (ten `petald node`s and two `petald serve`s of a tiny Llama,
each half of it) converge: every daemon's own swarm view holds both servers, read from its
`--metrics` endpoint. The small version of bench/bench_daemons.py (issue 12)."""

from __future__ import annotations

from pathlib import Path

from petald.sim.daemons import start_swarm, wait_converged
from petald.testing import Processes
from petald.testing.models import save_tiny_llama

NODES = 10
SPANS = ["0:2", "2:4"]
CONVERGE_TIMEOUT = 60.0  # announcements: gossip at once, DHT re-reads every 30 s heartbeat


def test_twelve_daemons_converge_on_every_server(tmp_path: Path) -> None:
    """Every node and server ends up with both servers in its own view (a server counts itself
    and must learn the other one).

    Catches: a node that does not follow models it has not been told about (checked: the
    announcer's model discovery not watching fails here); announcements that reach only the
    peers a server is connected to; a view that drops live servers before they republish."""
    save_tiny_llama(tmp_path / "tiny", layers=4)
    with Processes() as procs:
        swarm = start_swarm(procs, tmp_path, nodes=NODES, model_dir=tmp_path / "tiny", spans=SPANS)
        assert len(swarm.daemons) == 12
        wait_converged(swarm, timeout=CONVERGE_TIMEOUT)
