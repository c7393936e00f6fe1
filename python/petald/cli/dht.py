"""`petald dht get KEY` / `petald dht put KEY VALUE`: join a swarm as a DHT client for one
operation and print the result as JSON. Useful to inspect a swarm by hand, and the tests use it
to read and write records through real daemons."""

from __future__ import annotations

import json
import time

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from petald.dht.node import DhtConfig
from petald.dht.records import SignedRecord, sign_record
from petald.p2p.config import P2PConfig
from petald.p2p.identity import default_identity_path, load_or_create_identity
from petald.stack import start_stack


def _record_json(r: SignedRecord) -> dict:
    try:
        value: str = r.value.decode()
        encoding = "utf-8"
    except UnicodeDecodeError:
        value, encoding = r.value.hex(), "hex"
    return {
        "key": r.key.decode(errors="replace"),
        "publisher": str(ID(r.subkey)),
        "value": value,
        "encoding": encoding,
        "expires": r.expiration,
    }


async def _run(
    config: P2PConfig, op: str, key: bytes, value: bytes, ttl: float, rpc_timeout: float, k: int
) -> dict:
    if op == "put":
        key_pair, _ = load_or_create_identity(config.identity or default_identity_path())
    else:
        key_pair = create_new_key_pair()  # a reader needs no lasting identity
    async with trio.open_nursery() as nursery:
        # A DHT client: no relaying for others, no announcements; private DHT servers are
        # reached through their /p2p-circuit addresses by the stack's dialer.
        stack = await start_stack(
            nursery,
            key_pair,
            config,
            dht_config=DhtConfig(k=k, client_mode=True, rpc_timeout=rpc_timeout),
            announcements=False,
        )
        dht = stack.dht
        if op == "put":
            record = sign_record(key_pair.private_key, key, value, time.time() + ttl)
            acked = await dht.put(record)
            result = {"event": "put", "acked": acked, "record": _record_json(record)}
        else:
            records = await dht.get(key)
            result = {"event": "get", "records": [_record_json(r) for r in records]}
        nursery.cancel_scope.cancel()
    return result


def run(
    config: P2PConfig,
    op: str,
    key: str,
    value: str | None,
    ttl: float,
    rpc_timeout: float,
    *,
    k: int = 20,
) -> int:
    if not key:
        raise ValueError("the key must not be empty")
    if op == "put" and value is None:
        raise ValueError("put needs a VALUE")
    if not 0 < ttl <= 24 * 3600:
        raise ValueError("--ttl must be between 0 and 86400 seconds")
    result = trio.run(_run, config, op, key.encode(), (value or "").encode(), ttl, rpc_timeout, k)
    print(json.dumps(result), flush=True)
    return 0 if op == "get" or result["acked"] > 0 else 1
