"""A quorum read of a key asks the peers that held it last time (one round of `quorum` requests
instead of a lookup), falls back to a lookup when they are gone, and a re-put goes to those
holders, looking them up anew every `PUT_LOOKUP_EVERY` puts. On simulated peers (real DhtNodes on
the in-memory network, virtual clock)."""

from __future__ import annotations

import trio
import trio.testing

from petald.dht.node import PUT_LOOKUP_EVERY, DhtConfig
from petald.dht.records import sign_record
from petald.sim.scenarios import span_for
from petald.sim.swarm import MODEL, SimPeer, SimSwarm, wall_clock
from petald.wire.kad_messages import MessageType

KEY = b"petald/v1/test/servers"


async def _joined(swarm: SimSwarm, n: int) -> list[SimPeer]:
    """`n` peers joined one after another, each ready before the next."""
    peers = []
    for _ in range(n):
        peer = swarm.join()
        await peer.ready.wait()
        peers.append(peer)
    return peers


async def _main() -> dict:
    out: dict = {}
    async with trio.open_nursery() as nursery:
        swarm = SimSwarm(nursery, seed=1, dht_config=DhtConfig(k=8))
        peers = await _joined(swarm, 30)
        publisher, reader = peers[3], peers[-1]
        lookups: list[tuple[MessageType, bytes]] = []  # the reader's
        put_lookups: list[tuple[MessageType, bytes]] = []  # the publisher's
        reader.dht.on_lookup = lambda st: lookups.append((st.kind, st.key))
        publisher.dht.on_lookup = lambda st: put_lookups.append((st.kind, st.key))
        record = sign_record(publisher.key_pair.private_key, KEY, b"v", wall_clock() + 300)
        out["first_put_acked"] = await publisher.dht.put(record)

        asked: list[bytes] = []
        request = reader.dht.rpc.request

        async def counting(peer, msg):  # counts, then sends for real
            if msg.key == KEY:
                asked.append(peer.to_bytes())
            return await request(peer, msg)

        reader.dht.rpc.request = counting  # type: ignore[method-assign]
        out["first"] = await reader.dht.get(KEY, quorum=3)
        out["first_lookups"] = lookups.count((MessageType.GET_VALUE, KEY))
        asked.clear()
        out["second"] = await reader.dht.get(KEY, quorum=3)
        out["second_asked"] = len(asked)
        out["second_lookups"] = lookups.count((MessageType.GET_VALUE, KEY))
        # Re-puts: the publisher read the key (holders known); puts then skip the lookup.
        await publisher.dht.get(KEY, quorum=1)
        before = put_lookups.count((MessageType.FIND_NODE, KEY))
        for _ in range(PUT_LOOKUP_EVERY + 1):
            await publisher.dht.put(record)
        out["put_lookups"] = put_lookups.count((MessageType.FIND_NODE, KEY)) - before

        # All remembered holders but two vanish: fewer than the quorum can answer, so the read
        # looks up again, and still finds the record on the two.
        by_id = {p.peer_id.to_bytes(): p for p in peers}
        holders = reader.dht._holders[KEY]
        out["holders"] = len(holders)
        for h in holders[2:]:
            swarm.leave(by_id[h])
        out["third"] = await reader.dht.get(KEY, quorum=3)
        out["third_lookups"] = lookups.count((MessageType.GET_VALUE, KEY))

        nursery.cancel_scope.cancel()
    return out


def test_reads_ask_the_holders_and_fall_back_to_a_lookup() -> None:
    """Catches: a read that looks up every time (second_lookups grows), one that asks more than
    `quorum` holders, one that returns nothing once its holders left (no fallback), and re-puts
    that look up every time or never (put_lookups)."""
    out = trio.run(_main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert out["first_put_acked"] >= 4, out
    assert [r.value for r in out["first"]] == [b"v"]
    assert out["first_lookups"] == 1 and out["holders"] == 8, out
    assert [r.value for r in out["second"]] == [b"v"]
    assert out["second_asked"] == 3 and out["second_lookups"] == 1, out
    assert [r.value for r in out["third"]] == [b"v"]
    assert out["third_lookups"] == 2, out
    assert out["put_lookups"] == 1, out


async def _evict_main() -> dict:
    async with trio.open_nursery() as nursery:
        swarm = SimSwarm(nursery, seed=2, dht_config=DhtConfig(k=8))
        peers = await _joined(swarm, 12)
        node = peers[0].dht
        target = next(p.peer_id.to_bytes() for p in peers[1:] if p.peer_id.to_bytes() in node.table)
        before = [p.peer_id for p in node._closer(target)]
        for _ in range(10):  # bounded: evicted after a few failures in a row
            node._failed(target)
            if target not in node.table:
                break
        after = [p.peer_id for p in node._closer(target)]
        nursery.cancel_scope.cancel()
    return {"target": target, "before": before, "after": after}


def test_answers_stop_naming_an_evicted_peer_at_once() -> None:
    """A holder's closer peers for a key are kept for a second (`_closer`), but not past a change
    of its table. Catches: a cache that is not dropped when a peer is evicted (the dead peer
    goes on being named for up to a second: every reader then asks it and waits out a timeout)."""
    out = trio.run(_evict_main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert out["target"] in out["before"]
    assert out["target"] not in out["after"], out


async def _newcomers_main() -> list[tuple[int, int]]:
    seen = []
    async with trio.open_nursery() as nursery:
        swarm = SimSwarm(nursery, seed=0)
        for _ in range(10):
            await swarm.join().ready.wait()
        for i in range(60):
            peer = swarm.join()
            await peer.ready.wait()  # its first read of the model's announcements is done
            seen.append((i, len(peer.announcer.view.servers(MODEL, now=wall_clock()))))
            peer.info = swarm.server_info(span_for(i))
            peer.announcer.announce(peer.info)
            await trio.sleep(5)
        nursery.cancel_scope.cancel()
    return seen


def test_a_newcomers_first_read_sees_every_server() -> None:
    """Servers join one by one, 5 s apart, 60 of them; each newcomer's first read must find every
    earlier server. Catches (checked): a far server answering a GET with its own record: three
    such answers made a quorum, newcomers saw 3 servers of 100, and placement through the DHT
    piled up (max/min 5.3 servers per block)."""
    seen = trio.run(_newcomers_main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert [n for _, n in seen] == [i for i, _ in seen], seen
