"""`python -m petald.testing.info_probe SERVER --initial-peers BOOT --identity FILE [--swarm-key
FILE] [--listen ADDR]`: joins a swarm as a client peer, asks SERVER (a full multiaddr) for its
`info` and prints one JSON line: {"ok": true, "model": ...} or {"ok": false, "code", "message"}
for a refusal (a RemoteError). For tests that need a client in another network namespace (run
it under `ip netns exec`); any other failure exits 1 with its traceback."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from petald.client.rpc import call_info
from petald.dht.node import DhtConfig
from petald.errors import RemoteError
from petald.p2p.config import P2PConfig
from petald.p2p.identity import load_or_create_identity
from petald.stack import start_stack

TIMEOUT = 20.0  # seconds to connect and for the answer


async def probe(args: argparse.Namespace) -> dict:
    key_pair, _ = load_or_create_identity(args.identity)
    config = P2PConfig(
        listen=(args.listen,), initial_peers=(args.initial_peers,), swarm_key=args.swarm_key
    )
    server = info_from_p2p_addr(Multiaddr(args.server))
    async with trio.open_nursery() as nursery:
        stack = await start_stack(
            nursery, key_pair, config, dht_config=DhtConfig(client_mode=True), announcements=False
        )
        await stack.host.connect(server, timeout=TIMEOUT)

        async def opener(peer: str, protocol: str) -> object:
            return await stack.host.host.new_stream(ID.from_base58(peer), [protocol])

        try:
            info = await call_info(opener, server.peer_id.to_base58(), timeout=TIMEOUT)
            result = {"ok": True, "model": info["model"]}
        except RemoteError as e:
            result = {"ok": False, "code": e.code, "message": e.message}
        nursery.cancel_scope.cancel()
    return result


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m petald.testing.info_probe")
    p.add_argument("server", help="the server's full multiaddr (…/p2p/<peer id>)")
    p.add_argument("--initial-peers", required=True, metavar="MULTIADDR")
    p.add_argument("--identity", type=Path, required=True)
    p.add_argument("--swarm-key", type=Path)
    p.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    print(json.dumps(trio.run(probe, p.parse_args())), flush=True)


if __name__ == "__main__":
    main()
