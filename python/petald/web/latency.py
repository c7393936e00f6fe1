"""`LatencyProber`: this client's own view of how far each server is — one echo round trip
(`/petald/echo/1.0.0`, which every daemon answers) per listed server, every `period` seconds,
bounded in time, count and concurrency. `petald status --web` shows the result beside each
server; the servers' announcements cannot tell it (they say nothing about *our* path to them).

Only the echo of one small frame is timed, not the dial or the stream negotiation: the figure
is the network round trip plus both loops' scheduling, comparable across servers and rounds.
Entry point: `await nursery.start(LatencyProber(dialer, targets).run)`; read `probes`."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from petald.p2p.dialer import Dialer
from petald.p2p.echo import PROTOCOL_ID as ECHO_PROTOCOL
from petald.p2p.echo import read_exact
from petald.p2p.relay import is_relayed

# Servers probed per round (the first ones listed): a status page, not a crawler.
MAX_PROBED = 64
# Probes in flight at once.
PARALLEL = 8
# Seconds to reach a server (a first dial included), then for the round trip itself.
OPEN_TIMEOUT = 5.0
ECHO_TIMEOUT = 2.0
PAYLOAD_BYTES = 32


@dataclass(frozen=True)
class Probe:
    rtt_ms: float | None  # None: the last probe failed (see error)
    relayed: bool | None  # our connection to it goes through a relay
    error: str | None
    at: float  # unix seconds of the probe


Targets = Callable[[], Sequence[tuple[str, Sequence[str]]]]


class LatencyProber:
    """`targets()` gives (peer id, announced addresses) of the servers to probe."""

    def __init__(self, dialer: Dialer, targets: Targets, *, period: float = 5.0) -> None:
        if not period > 0:
            raise ValueError("the probe period must be positive")
        self.dialer = dialer
        self.targets = targets
        self.period = period
        self.probes: dict[str, Probe] = {}
        self.rounds = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self.probe_all()
            await trio.sleep(self.period)

    async def probe_all(self) -> None:
        """One round: every target (at most MAX_PROBED), PARALLEL at a time."""
        targets = list(self.targets())[:MAX_PROBED]
        listed = {peer for peer, _ in targets}
        for gone in set(self.probes) - listed:
            del self.probes[gone]
        limiter = trio.CapacityLimiter(PARALLEL)
        async with trio.open_nursery() as nursery:
            for peer, addrs in targets:
                nursery.start_soon(self._probe, peer, addrs, limiter)
        self.rounds += 1

    async def _probe(self, peer: str, addrs: Sequence[str], limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            try:
                self.probes[peer] = await self._round_trip(peer, addrs)
            except Exception as e:  # unreachable, refused, too slow: shown, never raised
                text = "timed out" if isinstance(e, trio.TooSlowError) else str(e)
                self.probes[peer] = Probe(None, None, text[:200], time.time())

    async def _round_trip(self, peer: str, addrs: Sequence[str]) -> Probe:
        stream = await self.dialer.open_stream(peer, addrs, ECHO_PROTOCOL, timeout=OPEN_TIMEOUT)
        try:
            relayed = is_relayed(stream.muxed_conn)
            payload = os.urandom(PAYLOAD_BYTES)
            with trio.fail_after(ECHO_TIMEOUT):
                t0 = time.perf_counter()
                await stream.write(len(payload).to_bytes(4, "big") + payload)
                size = int.from_bytes(await read_exact(stream, 4), "big")
                back = await read_exact(stream, min(size, PAYLOAD_BYTES))
                rtt = (time.perf_counter() - t0) * 1e3
                if back != payload:
                    raise ValueError("the echo came back altered")
                await stream.write((0).to_bytes(4, "big"))
            await stream.close()
        except BaseException:
            with contextlib.suppress(Exception):
                await stream.reset()
            raise
        return Probe(round(rtt, 3), relayed, None, time.time())
