"""`petald status`: join a swarm as a client, listen to its announcements for a moment, and
print what it serves — per model, which block ranges are served by how many servers, and each
server's state, throughput and whether it is reached through a relay. `--json` for scripts.

`render_status` / `status_json` are pure functions of a `SwarmView`, tested without a network."""

from __future__ import annotations

import itertools
import json
import sys
import time

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from petald.dht.node import DhtConfig
from petald.p2p.config import P2PConfig
from petald.p2p.swarm_view import ServerEntry, SwarmView
from petald.stack import start_stack


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


def status_json(view: SwarmView, *, now: float, peers: int) -> dict:
    models = []
    for model in view.models(now=now):
        entries = view.servers(model, now=now)
        n_blocks = max((e.info.n_blocks for e in entries), default=0)
        models.append(
            {
                "model": model,
                "n_blocks": n_blocks,
                "coverage": coverage_segments(entries, n_blocks),
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
