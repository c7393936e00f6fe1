"""Rebalancing in a real swarm: `petald serve --num-blocks 2 --rebalance-period 1` (M) alone in
the swarm of a tiny 4-block Llama takes blocks 0:2; once N serves 0:2 too (`--blocks 0:2`),
blocks 2:4 have no server and M moves there: it announces draining, lets its open session
finish, loads 2:4 and announces it online; clients then route 0:4 through N and M.

The check period of 1 s (600 by default) makes M act within seconds; every wait is for an
event (a state in the client's view, a ready line), bounded."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from petald.client import ClientConfig, RemoteSequential, SwarmClient
from petald.testing import DaemonProcess, Processes
from petald.testing.hold import compute_pid, held_compute_env, resume, wait_stopped
from petald.testing.models import save_tiny_llama
from petald.testing.views import wait_for_entry

pytestmark = pytest.mark.slow

MODEL = "tiny-rebalance"
BLOCKS = 4
TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    path = tmp_path_factory.mktemp("models") / MODEL
    return path, save_tiny_llama(path, layers=BLOCKS, seed=3)


def last_block_output(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The output of the last decoder layer (hidden_states[-1] has the final norm applied)."""
    seen: list[torch.Tensor] = []
    hook = model.model.layers[-1].register_forward_hook(
        lambda mod, args, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            model(ids)
    finally:
        hook.remove()
    return seen[0]


def wait_state(client: SwarmClient, peer: str, state: str, blocks: tuple[int, int]) -> None:
    wait_for_entry(client, MODEL, peer, state, blocks, timeout=120)


@pytest.fixture(scope="module")
def swarm(tiny, tmp_path_factory) -> Iterator[tuple[Processes, Path, DaemonProcess]]:
    tmp = tmp_path_factory.mktemp("rebalance")
    with Processes() as procs:
        boot = procs.start("node", "--new-swarm", identity=tmp / "boot.key")
        yield procs, tmp, boot


def spawn(swarm, tiny, name: str, *args: str, env: dict | None = None) -> DaemonProcess:
    procs, tmp, boot = swarm
    return procs.spawn(
        "serve", str(tiny[0]), *args, "--initial-peers", boot.addr,
        "--throughput", "100", "--reachability", "public",
        identity=tmp / f"{name}.key", env=env,
    )  # fmt: skip


def test_a_server_moves_to_the_blocks_nobody_serves(swarm, tiny) -> None:
    """M took 0:2 alone; N comes for 0:2 as well. M announces draining (0:2) while a session
    through it is open, serves that session's next step, and only once it is closed moves:
    it comes online at 2:4, and a session through 0:4 then goes N -> M with the local model's
    outputs.

    Catches: a server that never moves (should_move / the rebalance loop), or one that moves
    without draining (no draining state, or the open session cut off)."""
    _, model = tiny
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    want = last_block_output(model, ids)
    t0 = time.monotonic()
    # N starts now but holds its compute process (petald.testing.hold): it joins the swarm
    # while M starts, announcing 0:2 as joining, which M's choice does not count.
    n = spawn(swarm, tiny, "N", "--blocks", "0:2", env=held_compute_env(swarm[1] / "hold"))
    m = spawn(swarm, tiny, "M", "--num-blocks", "2", "--rebalance-period", "1")
    m.wait_ready(120)
    t_m = time.monotonic()
    boot = swarm[2]
    with SwarmClient(config=ClientConfig(initial_peers=(boot.addr,), step_timeout=20)) as client:
        wait_state(client, m.peer_id, "online", (0, 2))
        head = RemoteSequential(client, MODEL, BLOCKS, end=2)
        with head.inference_session(max_length=8) as session:
            out = [session.step(hs[0][:, :4])]
            worker = compute_pid(n)
            wait_stopped(worker)
            resume(worker)
            n.wait_ready(120)
            t_n = time.monotonic()
            wait_state(client, m.peer_id, "draining", (0, 2))
            t_drain = time.monotonic()
            out.append(session.step(hs[0][:, 4:5]))  # the open session is still served
            assert [h.peer_id for h in session.route] == [m.peer_id]
            assert not session.stats.failovers
        assert (torch.cat(out, 1) - hs[2][:, :5]).abs().max() < TOL
        wait_state(client, m.peer_id, "online", (2, 4))
        t_moved = time.monotonic()
        print(
            f"M online at 0:2 after {t_m - t0:.1f} s; N online {t_n - t_m:.1f} s later; M "
            f"draining {t_drain - t_n:.1f} s after that; online at 2:4 {t_moved - t_drain:.1f} s "
            "after draining began"
        )
        seq = RemoteSequential(client, MODEL, BLOCKS)
        with seq.inference_session(max_length=8) as session:
            steps = [session.step(hs[0][:, :6]), session.step(hs[0][:, 6:8])]
            route = [(h.peer_id, h.blocks.start, h.blocks.end) for h in session.route]
        assert route == [(n.peer_id, 0, 2), (m.peer_id, 2, 4)]
        assert (torch.cat(steps, 1) - want).abs().max() < TOL
        assert (seq.forward(hs[0]) - want).abs().max() < TOL
