"""Prometheus metrics of one daemon (`petald serve|node --metrics HOST:PORT`): `Metrics` owns a
registry of its own (never prometheus_client's global one, so two daemons in one test process,
or a test and a daemon, never share a counter) and serves it at `/metrics` in the daemon's own
trio loop (petald.web.http; a Starlette route calling the exposition function).

What feeds it, all from edges this module or petald.server.metering owns:
- requests by kind and result, their latency, open sessions: `petald.server.metering`
  (the block RPC handlers are registered through a host wrapper that reads each reply header);
- bytes in/out: every raw connection of the host, counted below the swarm-key protector and
  Noise (wire bytes; a relayed connection's bytes also count inside the connection to its relay);
- peers, DHT records, relay reservations, KV-cache tokens, server state: read at scrape time
  from the objects that own them (`watch_stack`, `watch_blocks`), so nothing on the hot path.

Entry points: `Metrics(HttpAddress.parse(...))`, `metrics.watch_stack(stack)` before the stack
starts, `url = await nursery.start(metrics.serve)`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from petald.web.http import HttpAddress, serve_asgi

if TYPE_CHECKING:
    from petald.stack import Stack

log = logging.getLogger(__name__)

# Seconds: an inference step on a tiny model takes a millisecond, a long prefill on a CPU
# server half a minute.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
KINDS = ("info", "forward", "backward", "inference_open", "inference_step", "push")


class _Readings(Collector):
    """Gauges read at scrape time: (name, help, label names, callback giving {labels: value})."""

    def __init__(self) -> None:
        self.gauges: list[tuple[str, str, tuple[str, ...], Callable[[], dict[tuple, float]]]] = []

    def add(
        self,
        name: str,
        doc: str,
        read: Callable[[], dict[tuple, float]],
        labels: tuple[str, ...] = (),
    ) -> None:
        self.gauges.append((name, doc, labels, read))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, doc, labels, read in self.gauges:
            family = GaugeMetricFamily(name, doc, labels=list(labels))
            try:
                values = read()
            except Exception as e:  # a component mid-teardown: skip it, keep the scrape
                log.debug("metric %s unavailable: %s", name, e)
                continue
            for key, value in values.items():
                family.add_metric([str(k) for k in key], float(value))
            yield family


class Metrics:
    """The metrics of one daemon process, served at `address` (`serve`)."""

    def __init__(self, address: HttpAddress) -> None:
        self.address = address
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "petald_requests",
            "Block RPC requests answered, by kind and result (ok or the error code sent back)",
            ["kind", "result"],
            registry=r,
        )
        self.latency = Histogram(
            "petald_request_duration_seconds",
            "Seconds from a request's first byte to its answer (inference_step: per step)",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sessions = Gauge(
            "petald_inference_sessions_open", "Inference sessions open on this server", registry=r
        )
        self.bytes_in = Counter(
            "petald_network_received_bytes", "Bytes read from all connections", registry=r
        )
        self.bytes_out = Counter(
            "petald_network_sent_bytes", "Bytes written to all connections", registry=r
        )
        self.readings = _Readings()
        r.register(self.readings)

    # ---- sources read at scrape time ------------------------------------------------------

    def watch_stack(self, stack: Stack) -> None:
        """Peers, DHT records, relay reservations and wire bytes of `stack`'s host. Call before
        the stack starts, so that the byte counters see every connection."""
        host = stack.host.host
        count_bytes(host, self)
        self.readings.add(
            "petald_connected_peers",
            "Peers with an open connection",
            lambda: {(): len(host.get_connected_peers())},
        )
        self.readings.add(
            "petald_dht_records",
            "Signed DHT records stored on this node",
            lambda: {(): len(stack.dht.store)},
        )
        if stack.announcer is not None:
            view = stack.announcer.view
            self.readings.add(
                "petald_swarm_servers",
                "Servers (any model, any state) this peer's swarm view holds",
                lambda: {(): len(view.servers(now=time.time()))},
            )
        self.readings.add(
            "petald_relay_reservations",
            "Relay slots: held by us on relays (ours), held for private peers (for_others)",
            lambda: {
                ("ours",): len(stack.relay.reservations),
                ("for_others",): stack.relay.reservations_for_others(),
            },
            labels=("role",),
        )

    def watch_blocks(self, read: Callable[[], tuple[str, int, int]]) -> None:
        """`read()` gives a block server's (state, KV-cache tokens in use, its budget)."""
        self.readings.add(
            "petald_kv_cache_tokens_used",
            "KV-cache tokens reserved by open sessions",
            lambda: {(): read()[1]},
        )
        self.readings.add(
            "petald_kv_cache_tokens_budget", "KV-cache token budget", lambda: {(): read()[2]}
        )
        self.readings.add(
            "petald_server_state",
            "1 for the state the block server announces (joining, online, draining)",
            lambda: {(s,): float(read()[0] == s) for s in ("joining", "online", "draining")},
            labels=("state",),
        )

    # ---- HTTP -----------------------------------------------------------------------------

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serves `/metrics` until cancelled; `started(url of /metrics)`."""
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import PlainTextResponse, Response
        from starlette.routing import Route

        async def metrics(_: Request) -> Response:
            return Response(self.exposition(), media_type=CONTENT_TYPE_LATEST)

        async def index(_: Request) -> Response:
            return PlainTextResponse("petald metrics: see /metrics\n")

        app = Starlette(routes=[Route("/metrics", metrics), Route("/", index)])
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve_asgi, app, self.address)
            log.info("metrics at %s/metrics", url)
            task_status.started(f"{url}/metrics")


class _CountingConn:
    """A raw connection that adds what passes through it to `metrics`' byte counters."""

    def __init__(self, conn: Any, metrics: Metrics) -> None:
        self._conn = conn
        self._in, self._out = metrics.bytes_in, metrics.bytes_out

    def __getattr__(self, name: str) -> Any:  # is_initiator, addresses, close, ...
        return getattr(self.__dict__["_conn"], name)

    async def write(self, data: bytes) -> None:
        await self._conn.write(data)
        self._out.inc(len(data))

    async def read(self, n: int | None = None) -> bytes:
        data: bytes = await self._conn.read(n)
        self._in.inc(len(data))
        return data

    async def close(self) -> None:
        await self._conn.close()


def count_bytes(host: Any, metrics: Metrics) -> None:
    """Wraps every raw connection `host` upgrades (dialled, accepted, relayed), outside the
    swarm-key protector (petald.p2p.pnet, installed on the same two upgrade calls)."""
    swarm = host.get_network()
    upgrade_out, upgrade_in = swarm.upgrade_outbound_raw_conn, swarm.upgrade_inbound_raw_conn

    async def outbound(raw_conn: Any, *args: Any, **kw: Any) -> Any:
        return await upgrade_out(_CountingConn(raw_conn, metrics), *args, **kw)

    async def inbound(raw_conn: Any, *args: Any, **kw: Any) -> Any:
        return await upgrade_in(_CountingConn(raw_conn, metrics), *args, **kw)

    swarm.upgrade_outbound_raw_conn = outbound
    swarm.upgrade_inbound_raw_conn = inbound
