"""Optional timestamps of each inference step's way through the swarm, for the breakdown bench
(bench/bench_breakdown.py): off unless the client's process has PETALD_TRACE=1 in its
environment (read once, at import). A tracing client asks for them with `"trace": true` in a
step's header; the server's daemon and compute process then stamp the points they pass and send
the stamps back in the reply header, and the client keeps one record per hop in `RECORDS`.

Stamps are `time.monotonic_ns()`: CLOCK_MONOTONIC, one clock for every process of a host, so
they compare across the client, daemon and compute process of a loopback swarm (not across
machines). Off, a server's cost is one dict lookup per step; a client's, one flag test."""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any

ENABLED = os.environ.get("PETALD_TRACE", "") not in ("", "0")
# The last hops and steps traced (bounded: a long session must not grow memory).
RECORDS: deque[dict[str, Any]] = deque(maxlen=100_000)
now = time.monotonic_ns


def server_stamps(reply: dict[str, Any]) -> dict[str, list[int]]:
    """The daemon's ("d") and compute process's ("w") stamps of a traced reply, or {}."""
    trace = reply.get("trace")
    if not isinstance(trace, dict):
        return {}
    return {
        k: v for k, v in trace.items() if isinstance(v, list) and all(type(x) is int for x in v)
    }
