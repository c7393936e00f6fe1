"""`python -m petald.sim [SCENARIO] [--peers N] [--minutes M] ...` (`just sim`, bench/sim.py):
plays one scenario of the swarm simulation and prints its measurements, the last line one JSON
object. Progress goes to stderr."""

from __future__ import annotations

import argparse
import json
import sys
import time

from petald.sim.placement import place_full_view, place_via_dht
from petald.sim.scenarios import DEFAULT, SCENARIOS, run_scenario, scaled

SWEEP = (100, 250, 500, 1000)


def _parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:12} {sc.description}" for name, sc in SCENARIOS.items())
    listing += (
        "\n  placement    300 servers choose spans of an 80-block model one after another with "
        "the\n               real --num-blocks placement (full view; --via-dht: through the DHT)"
        "\n  sweep        10 simulated minutes at 100, 250, 500 and 1,000 peers (10 % servers, or"
        "\n               --servers N at every size): traffic per peer, max/min printed"
    )
    p = argparse.ArgumentParser(
        prog="just sim",
        description="Simulate a petald swarm: the real DHT node, announcer, swarm view and "
        "placement code of many peers on an in-memory network and a virtual clock "
        "(announcements travel by the DHT path only: gossip is not simulated).",
        epilog="scenarios:\n" + listing,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    names = [*SCENARIOS, "placement", "sweep"]
    p.add_argument("scenario", nargs="?", default=DEFAULT, choices=names, metavar="SCENARIO")
    p.add_argument("--peers", type=int, help="peers (default: the scenario's, 1,000)")
    p.add_argument("--servers", type=int, help="of which servers (default: a tenth)")
    p.add_argument("--minutes", type=float, help="simulated minutes measured (after a warm-up)")
    p.add_argument("--warmup", type=float, help="simulated minutes over which peers join")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-blocks", type=int, default=8, help="placement: blocks per server")
    p.add_argument("--via-dht", action="store_true", help="placement: read views from the DHT")
    return p


def _positive(p: argparse.ArgumentParser, name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        p.error(f"--{name} must be positive")


def main(argv: list[str] | None = None) -> dict:
    p = _parser()
    args = p.parse_args(argv)
    for name in ("peers", "servers", "minutes", "warmup", "num_blocks"):
        _positive(p, name.replace("_", "-"), getattr(args, name))
    started = time.monotonic()
    if args.scenario == "placement":
        servers = args.servers or 300
        if args.via_dht:
            result = place_via_dht(servers, 80, args.num_blocks, seed=args.seed)
        else:
            result = place_full_view(servers, 80, args.num_blocks, seed=args.seed)
        result["scenario"] = "placement-dht" if args.via_dht else "placement"
    elif args.scenario == "sweep":
        rows = []
        for peers in SWEEP:
            servers = min(args.servers, peers) if args.servers else peers // 10
            sc = scaled(
                SCENARIOS[DEFAULT], peers=peers, servers=servers, minutes=args.minutes or 10
            )
            row = run_scenario(scaled(sc, warmup_minutes=args.warmup or 2, seed=args.seed))
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
        per_peer = [r["bytes_per_peer_per_min"] for r in rows]
        result = {
            "scenario": "sweep",
            "peers": list(SWEEP),
            "servers": [r["servers"] for r in rows],
            "bytes_per_peer_per_min": per_peer,
            "messages_per_peer_per_min": [r["messages_per_peer_per_min"] for r in rows],
            "max_over_min": round(max(per_peer) / max(min(per_peer), 1), 2),
        }
    else:
        sc = SCENARIOS[args.scenario]
        changes: dict[str, object] = {"seed": args.seed}
        if args.peers:
            changes["peers"] = args.peers
            changes["servers"] = args.peers // 10
        if args.servers:
            changes["servers"] = min(args.servers, changes.get("peers", sc.peers))  # type: ignore[call-overload]
        if args.minutes:
            changes["minutes"] = args.minutes
        if args.warmup:
            changes["warmup_minutes"] = args.warmup
        result = run_scenario(scaled(sc, **changes))
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
