"""`petald core-demo`: frames a hidden-state tensor with every codec and shows size, error and
speed; then builds a routing table of simulated peers and runs a closest-peers lookup through
them. Everything runs in-process; nothing touches the network."""

from __future__ import annotations

import hashlib
import time

import numpy as np

from petald import _native
from petald.dht import ClosestPeersLookup, RoutingTable, peer_key, xor_distance
from petald.wire import pack_array, unpack_array

CODECS = ("none", "zstd", "fp16", "bf16", "int8", "int8-256", "int8+zstd")


def _show_codecs(rng: np.random.Generator) -> None:
    # (batch, seq, hidden) activations of a 2048-wide model, heavy-tailed like real ones.
    x = rng.standard_t(df=4, size=(1, 512, 2048)).astype(np.float32)
    print(f"tensor frames: float32 activations {x.shape}, {x.nbytes / 2**20:.1f} MiB")
    print(
        f"  {'codec':<10} {'frame MiB':>9} {'ratio':>6} {'max abs err':>12} {'encode+decode':>14}"
    )
    for codec in CODECS:
        unpack_array(pack_array(x, codec))  # warm up: first-touch page faults are not the codec
        t0 = time.perf_counter()
        frame = pack_array(x, codec)
        y = unpack_array(frame)
        dt = time.perf_counter() - t0
        err = float(np.max(np.abs(x - y)))
        print(
            f"  {codec:<10} {len(frame) / 2**20:>9.2f} {x.nbytes / len(frame):>6.2f}"
            f" {err:>12.2e} {dt * 1e3:>11.1f} ms"
        )


def _peer(i: int) -> bytes:
    # Binary libp2p-style peer ids (identity multihash prefix + 32 bytes); any bytes work.
    return b"\x00\x24\x08\x01\x12\x20" + hashlib.sha256(i.to_bytes(8, "big")).digest()


def _show_lookup(rng: np.random.Generator) -> None:
    n = 1000
    peers = [_peer(i) for i in range(n)]
    tables = {}
    for p in peers:  # every simulated peer has met every other, in random order; k-buckets keep
        t = RoutingTable(p, k=20)  # at most 20 per distance range, so each knows ~15% of them
        for j in rng.permutation(n):
            t.update(peers[j], 0.0)
        tables[p] = t
    me = peers[0]
    target = peer_key(b"block 12 of model X")
    lookup = ClosestPeersLookup(target, tables[me].closest(target, 20), local_peer=me)
    rounds = 0
    while rounds < 10_000:
        rounds += 1
        step, peer = lookup.next(float(rounds))
        if step == "finished":
            break
        if step == "query" and peer is not None:
            lookup.on_success(peer, tables[peer].closest(target, 20), float(rounds))
    found = lookup.result()
    truth = sorted(peers[1:], key=lambda p: xor_distance(peer_key(p), target))[:20]
    known = sum(len(t) for t in tables.values()) / n
    print(f"\nKademlia: {n} simulated peers, each with a k=20 table of ~{known:.0f} peers")
    print(
        f"  lookup queried {lookup.num_queried} peers and found {len(set(found) & set(truth))}"
        f"/20 of the true 20 closest to the target"
    )
    table = RoutingTable(me, k=1_000_000)
    for p in peers:
        table.update(p, 0.0)
    t0 = time.perf_counter()
    for i in range(1000):
        table.closest(hashlib.sha256(i.to_bytes(4, "big")).digest(), 20)
    dt = (time.perf_counter() - t0) / 1000
    print(f"  closest(key, 20) on a {len(table)}-entry table: {dt * 1e6:.1f} µs")


def run(*, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    print(f"petald core demo (frame format v{_native.FRAME_VERSION})\n")
    _show_codecs(rng)
    _show_lookup(rng)
    return 0
