"""The OpenMP settings of petald's own processes (`petald serve`, `node`, `chat`, `demo`, and the
compute process of a server): `with_openmp_defaults(env)`. libgomp reads them once, when it
loads (with torch), so they go into a process's environment before that: `petald.cli.main` sets
them for its own process (and so for the children it starts), `petald.server.executor` for the
compute process. A program that imports petald as a library keeps its own threading; only the
client's loop thread is changed (petald.client.runtime.serial_torch_in_this_thread).

Why not libgomp's defaults: an idle OpenMP thread spins for ~300000 iterations (a few ms) before
it sleeps, and in a local swarm (two servers and a client on the same cores, taking turns on
every token) the spinning threads of the process that just finished steal the cores from the
next one (two servers of SmolLM2 and a client on 2 cores: a one-token step through both took
448 ms p50 with libgomp's defaults, 68 ms with PASSIVE). Why not OMP_WAIT_POLICY=PASSIVE
(petald's earlier choice): every parallel region then wakes sleeping threads with a futex,
hundreds of regions per token, which halved small-batch decode. A short spin
(GOMP_SPINCOUNT=10000, ~0.1 ms) bridges the gaps between the regions of one step and still puts
idle threads to sleep before the next process of the pipeline needs the cores.
OMP_WAIT_POLICY=ACTIVE with it keeps a 1000-iteration spin (instead of 100) should a process ever
run more OpenMP threads than CPUs (libgomp/env.c, gomp_throttled_spin_count_var).
Figures: shared/notes/cpu-threading.md and bench/bench_threads.py."""

from __future__ import annotations

from collections.abc import Mapping

OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "10000"}


def with_openmp_defaults(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with petald's OpenMP settings, unless it sets either variable itself: then the
    user's choice is kept whole (a wait policy alone would mean something else with our spin)."""
    if any(key in env for key in OPENMP_DEFAULTS):
        return dict(env)
    return {**env, **OPENMP_DEFAULTS}
