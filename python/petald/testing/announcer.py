"""`python -m petald.testing.announcer MODEL START:END --initial-peers ADDR...`: a process that
joins a swarm and announces a `ServerInfo` for MODEL's blocks START:END with the real
`Announcer` (gossip + DHT), without serving anything. Tests use it to exercise announcements
across real daemons, late joiners and silent deaths (kill -9) before `petald serve` exists.
Prints a JSON ready line; runs until killed."""

from __future__ import annotations

import argparse
import json

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from petald.dht.announce import AnnounceConfig
from petald.p2p.config import P2PConfig
from petald.stack import start_stack
from petald.types import BlockRange, ServerInfo


async def main(args: argparse.Namespace) -> None:
    config = P2PConfig(listen=("/ip4/127.0.0.1/tcp/0",), initial_peers=tuple(args.initial_peers))
    announce = AnnounceConfig(heartbeat=args.heartbeat, ttl=args.ttl)
    async with trio.open_nursery() as nursery:
        stack = await start_stack(nursery, create_new_key_pair(), config, announce_config=announce)
        host, announcer = stack.host, stack.announcer
        assert announcer is not None
        blocks = BlockRange.parse(args.blocks)
        info = ServerInfo(
            model=args.model,
            blocks=blocks,
            n_blocks=args.n_blocks,
            state="online",
            throughput=args.throughput,
        )
        announcer.announce(info)
        with trio.fail_after(60):
            await announcer.published.wait()
        print(
            json.dumps({"event": "ready", "peer_id": host.peer_id, "addrs": host.addrs()}),
            flush=True,
        )
        await trio.sleep_forever()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("blocks")
    p.add_argument("--initial-peers", nargs="+", required=True)
    p.add_argument("--n-blocks", type=int, default=0)
    p.add_argument("--throughput", type=float, default=10.0)
    p.add_argument("--heartbeat", type=float, default=1.0)
    p.add_argument("--ttl", type=float, default=6.0)
    trio.run(main, p.parse_args())
