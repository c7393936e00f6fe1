"""`petald status`: join a swarm as a client, listen to its announcements for a moment, and
print what it serves — per model, which block ranges are served by how many servers, and each
server's state, throughput and whether it is reached through a relay. `--json` for scripts;
`--web` keeps running and serves the same data as a self-refreshing page (petald.web.health),
with this client's own round-trip time to each server (petald.web.latency).

`render_status` / `status_json` are pure functions of a `SwarmView`, tested without a network."""

from __future__ import annotations

import itertools
import json
import sys
import time
from typing import TYPE_CHECKING

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from petald.dht.node import DhtConfig
from petald.p2p.config import P2PConfig
from petald.p2p.swarm_view import ServerEntry, SwarmView
from petald.stack import start_stack
from petald.web.http import HttpAddress

if TYPE_CHECKING:
    from collections.abc import Mapping

    from petald.web.latency import Probe

# `--web` without a HOST:PORT; 8000 is `petald api`'s.
DEFAULT_WEB = "127.0.0.1:8001"
# Where the status client itself listens for libp2p unless told otherwise.
P2P_LISTEN = "/ip4/127.0.0.1/tcp/0"


def split_listen(listen: list[str] | None, *, web: bool) -> tuple[list[str], HttpAddress | None]:
    """`petald status --listen` takes both the client's libp2p multiaddrs and, with `--web`,
    the page's HOST:PORT: a multiaddr always starts with '/'. Returns (multiaddrs, the page's
    address or None without `--web`)."""
    given = listen or []
    multi = [a for a in given if a.startswith("/")]
    http = [a for a in given if not a.startswith("/")]
    if http and not web:
        raise ValueError(
            f"--listen {http[0]}: HOST:PORT is where --web serves its page; libp2p listen "
            "addresses are multiaddrs such as /ip4/127.0.0.1/tcp/0"
        )
    if len(http) > 1:
        raise ValueError(f"--listen: one HOST:PORT for the page, not {len(http)}")
    address = HttpAddress.parse(http[0] if http else DEFAULT_WEB) if web else None
    return multi or [P2P_LISTEN], address


def coverage_segments(entries: list[ServerEntry], n_blocks: int) -> list[dict]:
    """Splits [0, n_blocks) (or the announced extent) at every span boundary and counts the
    online servers over each piece: gaps show up as count 0."""
    end = max([n_blocks, *(e.info.blocks.end for e in entries)], default=0)
    cuts = sorted({0, end, *(b for e in entries for b in (e.info.blocks.start, e.info.blocks.end))})
    segments = []
    for a, b in itertools.pairwise(cuts):
        online = [
            e
            for e in entries
            if e.info.state == "online" and e.info.blocks.start <= a < e.info.blocks.end
        ]
        segments.append(
            {
                "blocks": f"{a}:{b}",
                "servers": len(online),
                "throughput": round(sum(e.info.throughput for e in online), 2),
            }
        )
    return segments


def _span(blocks: str) -> int:
    a, b = blocks.split(":")
    return int(b) - int(a)


def _latency(probe: Probe | None) -> dict | None:
    if probe is None:
        return None
    return {"rtt_ms": probe.rtt_ms, "relayed": probe.relayed, "error": probe.error}


def status_json(
    view: SwarmView, *, now: float, peers: int, probes: Mapping[str, Probe] | None = None
) -> dict:
    """Per model: coverage segments, how many blocks are served, the weakest segment (fewest
    online servers, first one on ties), and the servers; `latency` is this client's last
    probe of each server (petald.web.latency), null when not measured."""
    models = []
    for model in view.models(now=now):
        entries = view.servers(model, now=now)
        n_blocks = max((e.info.n_blocks for e in entries), default=0)
        coverage = coverage_segments(entries, n_blocks)
        weakest = min(coverage, key=lambda s: s["servers"], default=None)
        models.append(
            {
                "model": model,
                "n_blocks": n_blocks,
                "served_blocks": sum(_span(s["blocks"]) for s in coverage if s["servers"]),
                "weakest": weakest,
                "coverage": coverage,
                "servers": [
                    {
                        "peer_id": e.peer_id,
                        "name": e.info.public_name,
                        "blocks": str(e.info.blocks),
                        "state": e.info.state,
                        "throughput": e.info.throughput,
                        "cache_tokens_free": e.info.cache_tokens_free,
                        "dtype": e.info.dtype,
                        "quant": e.info.quant,
                        "relayed": e.info.relayed,
                        "version": e.info.version,
                        "latency": _latency((probes or {}).get(e.peer_id)),
                    }
                    for e in entries
                ],
            }
        )
    return {"event": "status", "peers": peers, "models": models}


def render_status(status: dict) -> str:
    lines = [f"swarm: {status['peers']} peers reachable, {len(status['models'])} models served"]
    for m in status["models"]:
        total = f" of {m['n_blocks']} blocks" if m["n_blocks"] else ""
        lines.append(f"\n{m['model']}{total}")
        lines.append(
            "  coverage: "
            + "  ".join(
                f"{s['blocks']} x{s['servers']}" + (" MISSING" if s["servers"] == 0 else "")
                for s in m["coverage"]
            )
        )
        for s in m["servers"]:
            via = "relay" if s["relayed"] else "direct"
            name = f" ({s['name']})" if s["name"] else ""
            lines.append(
                f"  {s['blocks']:>9} {s['state']:<8} {s['throughput']:>8.1f} tok/s  {via:<6}"
                f" {s['dtype']}/{s['quant']}  {s['peer_id']}{name}"
            )
    return "\n".join(lines)


def listed_servers(status: dict) -> set[str]:
    """The peer ids of every server a `status_json` result lists, all models together."""
    return {s["peer_id"] for m in status["models"] for s in m["servers"]}


async def _collect(
    config: P2PConfig, models: list[str], wait: float, expect: set[str] | None = None
) -> tuple[dict, bool]:
    """(the status, whether it is what `expect` asked for). With `expect`, returns as soon as
    the servers listed are exactly those peers (re-checked on every change of the view),
    `wait` being the most it waits; without, after listening `wait` seconds."""
    async with trio.open_nursery() as nursery:
        stack = await start_stack(
            nursery, create_new_key_pair(), config, dht_config=DhtConfig(client_mode=True)
        )
        announcer, dht = stack.announcer, stack.dht
        assert announcer is not None
        for m in models:
            await announcer.watch(m)

        def status() -> dict:
            return status_json(announcer.view, now=time.time(), peers=len(dht.table))

        met = True
        if expect is None:
            # Topic subscriptions and gossip arrive over the next moments; there is no "done"
            # signal in a swarm, so status listens for a bounded time.
            await trio.sleep(wait)
        else:
            try:
                await announcer.wait_until(
                    lambda _view: listed_servers(status()) == expect, timeout=wait
                )
            except trio.TooSlowError:
                met = False
        result = status()
        nursery.cancel_scope.cancel()
    return result, met


def run(
    config: P2PConfig,
    models: list[str],
    wait: float,
    as_json: bool,
    expect: list[str] | None = None,
) -> int:
    """Exit status 1 when `expect` (peer ids) was given and not met within `wait` seconds."""
    if not 0 <= wait <= 120:
        raise ValueError("--wait must be between 0 and 120 seconds")
    want = None if expect is None else set(expect)
    status, met = trio.run(_collect, config, models, wait, want)
    print(json.dumps(status) if as_json else render_status(status), flush=True)
    if not met:
        assert want is not None
        listed = listed_servers(status)
        missing, extra = sorted(want - listed), sorted(listed - want)
        print(
            f"petald status: after {wait:g} s the servers are not those expected "
            f"(missing {missing}, not expected {extra})",
            file=sys.stderr,
        )
        return 1
    return 0


async def _serve_web(config: P2PConfig, models: list[str], address: HttpAddress) -> None:
    """Joins, probes the listed servers' latency, serves the health page until SIGINT/SIGTERM.
    The ready line comes once the page answers."""
    import signal

    from starlette.applications import Starlette

    from petald.web.health import health_routes
    from petald.web.http import serve_asgi
    from petald.web.latency import LatencyProber

    async with trio.open_nursery() as nursery:
        stack = await start_stack(
            nursery, create_new_key_pair(), config, dht_config=DhtConfig(client_mode=True)
        )
        announcer, dht = stack.announcer, stack.dht
        assert announcer is not None
        for m in models:
            await announcer.watch(m)

        def targets() -> list[tuple[str, tuple[str, ...]]]:
            return [(e.peer_id, e.info.addrs) for e in announcer.view.servers(now=time.time())]

        prober = LatencyProber(stack.dialer, targets)
        await nursery.start(prober.run)

        def view() -> dict:
            now = time.time()
            return status_json(announcer.view, now=now, peers=len(dht.table), probes=prober.probes)

        app = Starlette(routes=health_routes(view))
        url = await nursery.start(serve_asgi, app, address)
        print(json.dumps({"event": "ready", "url": f"{url}/", "api": f"{url}/api/status"}))
        sys.stdout.flush()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()


def run_web(config: P2PConfig, models: list[str], address: HttpAddress) -> int:
    trio.run(_serve_web, config, models, address)
    print(json.dumps({"event": "stopped"}), flush=True)
    return 0
