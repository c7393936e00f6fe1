"""`petald ping MULTIADDR`: a diagnostic client. It connects the way every petald component does
(`Dialer`: direct, or through the relay named in a `/p2p-circuit` address), runs round trips over
`/petald/echo/1.0.0` and prints one JSON line: connect time, RTTs, bytes, integrity and whether
the connection is relayed. Exit status 0 only when every byte came back intact."""

from __future__ import annotations

import json
import time
from pathlib import Path

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr

from petald.errors import PeerUnavailable, PetaldError
from petald.p2p.config import P2PConfig, parse_multiaddr
from petald.p2p.dialer import Dialer
from petald.p2p.echo import echo_round_trips
from petald.p2p.host import P2PHost
from petald.p2p.relay import RelayService, is_relayed


async def _measure(host: P2PHost, dialer: Dialer, target: str, count: int, size: int) -> dict:
    addr = parse_multiaddr(target, what="ping target")
    try:
        info = info_from_p2p_addr(addr)
    except Exception as e:
        raise ValueError(
            f"{target!r} has no peer id; give a full address ending in /p2p/<id>"
        ) from e
    t0 = time.perf_counter()
    conn = await dialer.ensure_connected(info.peer_id, [addr])
    connect_ms = (time.perf_counter() - t0) * 1e3
    result = await echo_round_trips(host.host, info.peer_id, count=count, payload_bytes=size)
    return {
        "event": "ping",
        "peer_id": str(info.peer_id),
        "target": target,
        "connect_ms": round(connect_ms, 2),
        "relayed_connection": is_relayed(conn),
        **result,
    }


async def _run(
    target: str, count: int, size: int, timeout: float, swarm_key: Path | None = None
) -> dict:
    # A one-shot client: throw-away identity, joins no swarm, listens on loopback only.
    config = P2PConfig(listen=("/ip4/127.0.0.1/tcp/0",), new_swarm=True, swarm_key=swarm_key)
    host = P2PHost(create_new_key_pair(), config)
    relay = RelayService(host.host, offer_hop=False)
    outcome: dict | BaseException = PeerUnavailable("ping did not run")
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        await nursery.start(relay.run)
        try:
            with trio.fail_after(timeout):
                outcome = await _measure(
                    host, Dialer(host.host, relay.transport), target, count, size
                )
        except trio.TooSlowError:
            outcome = PeerUnavailable(f"{target}: no answer within {timeout} s")
        except (PetaldError, ValueError) as e:
            outcome = e
        except Exception as e:  # stream errors come in many py-libp2p types
            outcome = PeerUnavailable(f"{target}: {type(e).__name__}: {e}")
        nursery.cancel_scope.cancel()
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def run(
    target: str, count: int, payload_bytes: int, timeout: float, swarm_key: Path | None = None
) -> int:
    if timeout <= 0:
        raise ValueError("--timeout must be positive")
    result = trio.run(_run, target, count, payload_bytes, timeout, swarm_key)
    print(json.dumps(result), flush=True)
    return 0 if result["intact"] else 1
