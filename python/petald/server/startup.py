"""Start-up stamps of `petald serve`, for bench/bench_startup.py: off unless the environment has
PETALD_STARTUP=1 (read once, at import). On, each process (the daemon and its compute process)
writes one JSON line to stderr per point it passes on the way to online:

    {"startup": "worker.loaded", "pid": 123, "t": <CLOCK_MONOTONIC s>, "cpu": <user+sys s>}

CLOCK_MONOTONIC is one clock for every process of a host, so a bench compares the stamps of both
processes with its own launch time; "cpu" is this process's own CPU time so far."""

from __future__ import annotations

import json
import os
import sys
import time

ENABLED = os.environ.get("PETALD_STARTUP", "") not in ("", "0")


def stamp(point: str) -> None:
    if ENABLED:
        t = os.times()
        line = {"startup": point, "pid": os.getpid(), "t": time.monotonic(), "cpu": t[0] + t[1]}
        print(json.dumps(line), file=sys.stderr, flush=True)
