"""`DhtNode`: petald's Kademlia DHT on libp2p — the Rust routing table and lookup state machine
(petald._native) driven over `DhtRpc`, plus the local store of signed records.

Construct it before the host connects anywhere (it registers its protocol handler), then
`await nursery.start(node.run)`, then `get(key)`, `put(record)` and
`find_peers(key)`. Server mode (the default for daemons) answers requests; client mode only asks,
and never enters other peers' routing tables: a peer is added to a table only after *we* reached
it, so peers others cannot dial stay out (the paper's §2.2 table holds contacts that answered).

Values under a key are one signed record per publisher (subkey = its peer id): a GET returns all
of them, bundled as a CBOR list in the protobuf record's value; a PUT carries one."""

from __future__ import annotations

import hashlib
import logging
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import cbor2
import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID

from petald._native import ClosestPeersLookup, RoutingTable, xor_distance
from petald.dht.records import MAX_SUBKEYS_PER_KEY, RecordStore, SignedRecord
from petald.dht.rpc import DhtRpc
from petald.dht.verified import VerifiedRecords
from petald.errors import PeerUnavailable, RecordError, RemoteError
from petald.p2p.dialer import Dialer
from petald.wire.kad_messages import (
    MAX_CLOSER_PEERS,
    MAX_MESSAGE_BYTES,
    MAX_RECORD_VALUE_BYTES,
    PROTOCOL_ID,
    DhtRecord,
    KadMessage,
    MessageType,
    PeerRecord,
)

log = logging.getLogger(__name__)

# Keys whose holders a node remembers (a peer re-reads one key per watched model).
MAX_HELD_KEYS = 128
# A re-put goes to the key's remembered holders; every this many puts it looks them up anew.
PUT_LOOKUP_EVERY = 4
# How long an answer's closer peers for a key are reused (`DhtNode._closer`).
CLOSER_CACHE_SECONDS = 1.0


@dataclass(frozen=True)
class DhtConfig:
    k: int = 20  # bucket size and replication (Kademlia §2.2)
    alpha: int = 3  # lookup parallelism (§2.3)
    rpc_timeout: float = 5.0
    lookup_timeout: float = 30.0
    refresh_interval: float = 600.0  # §2.3 says an hour; petald swarms churn faster
    client_mode: bool = False


def kad_key(key: bytes) -> bytes:
    """Position of a record key (or a peer id's bytes) in the 256-bit key space."""
    return hashlib.sha256(key).digest()


@dataclass(frozen=True)
class LookupStats:
    """One finished lookup, for `DhtNode.on_lookup` (the swarm simulation's measurements).
    `rounds`: sequential request rounds from the seeds to the closest peer found (a seed that
    answered is round 1; a peer first named in a round-r answer is round r + 1); 0: none found."""

    kind: MessageType
    key: bytes
    rounds: int
    queried: int
    succeeded: int
    failed: int
    closest: tuple[bytes, ...]


class DhtNode:
    def __init__(
        self,
        host: IHost,
        config: DhtConfig | None = None,
        *,
        dialer: Dialer | None = None,
        wall_clock: Callable[[], float] = time.time,
        verified: VerifiedRecords | None = None,
    ) -> None:
        self.host = host
        self.config = config or DhtConfig()
        # Unix seconds for record expiry; the simulation passes its virtual clock.
        self.wall_clock = wall_clock
        # Records checked already (one announcement comes back from every GET answer).
        # `is None`, not `or`: an empty cache is falsy (it has a length), and a shared one passed
        # in empty was silently replaced by a private one (the simulation verified every record
        # once per peer instead of once).
        self.verified = verified if verified is not None else VerifiedRecords()
        # Called with every finished lookup's figures; None: not measured.
        self.on_lookup: Callable[[LookupStats], None] | None = None
        self.local_id = host.get_id()
        self.table = RoutingTable(
            self.local_id.to_bytes(),
            k=self.config.k,
            refresh_interval=self.config.refresh_interval,
            now=trio.current_time(),
        )
        self.store = RecordStore()
        # Records refused at the edge (bad signature, tampered, expired, ...) by reason; the
        # store counts its own refusals in `store.rejected`.
        self.rejected: Counter[str] = Counter()
        # Per key read with a quorum: the k closest peers that read found (`_remember_holders`).
        self._holders: dict[bytes, list[bytes]] = {}
        self._lacking: dict[bytes, set[bytes]] = {}  # of those, lacking records at the last read
        self._puts_without_lookup: dict[bytes, int] = {}
        self._closer_cache: dict[bytes, tuple[float, tuple[PeerRecord, ...]]] = {}
        self.rpc = DhtRpc(host, self._handle, rpc_timeout=self.config.rpc_timeout, dialer=dialer)
        if not self.config.client_mode:
            # Registered before the host connects anywhere: a peer that asks right after
            # connecting must not be told "protocol not supported".
            self.rpc.serve()

    # ---- serving ---------------------------------------------------------------------------

    def _peer_records(self, peers: Iterable[bytes]) -> tuple[PeerRecord, ...]:
        store = self.host.get_peerstore()
        out = []
        for p in peers:
            try:
                addrs = store.addrs(ID(p))
            except Exception:  # unknown or expired in the peerstore: skip, do not guess
                continue
            out.append(PeerRecord(p, tuple(a.to_bytes() for a in addrs[:16])))
        return tuple(out)

    def _closer(self, key: bytes) -> tuple[PeerRecord, ...]:
        # The k closest we know (§2.3); k is 20 (the wire bound) unless configured smaller.
        # Kept for a second per key: a holder of a model's announcements answers every peer's
        # re-read of the same key, and building the same 20 peer records each time (peerstore
        # reads, checks) was a fifth of the 1,000-peer simulation's CPU. Dropped whenever the
        # table gains or evicts a peer (`_seen_alive`, `_failed`).
        now = trio.current_time()
        cached = self._closer_cache.get(key)
        if cached is not None and now - cached[0] < CLOSER_CACHE_SECONDS:
            return cached[1]
        n = min(self.config.k, MAX_CLOSER_PEERS)
        peers = self._peer_records(self.table.closest(kad_key(key), n))
        self._closer_cache[key] = (now, peers)
        if len(self._closer_cache) > MAX_HELD_KEYS:
            del self._closer_cache[next(iter(self._closer_cache))]
        return peers

    def _among_closest(self, key: bytes) -> bool:
        """Whether we are one of the k peers closest to `key` that we know of (where
        publishers would put it)."""
        target = kad_key(key)
        closest = self.table.closest(target, self.config.k)
        if len(closest) < self.config.k:
            return True
        mine = int.from_bytes(self.table.local_key, "big") ^ int.from_bytes(target, "big")
        kth = int.from_bytes(kad_key(closest[-1]), "big") ^ int.from_bytes(target, "big")
        return mine < kth

    def _maybe_add_requester(self, peer: ID) -> None:
        """A peer that asks us something enters our table only if it serves the DHT itself
        (identify lists our protocol): client-mode and unreachable peers never register the
        handler, so they never become contacts others would be sent to."""
        if peer.to_bytes() in self.table:
            self._seen_alive(peer.to_bytes())
            return
        try:
            serves = self.host.get_peerstore().supports_protocols(peer, [PROTOCOL_ID])
        except Exception:  # not identified yet: the next request will tell
            return
        if serves:
            self._seen_alive(peer.to_bytes())

    async def _handle(self, peer: ID, msg: KadMessage) -> KadMessage | None:
        now = self.wall_clock()
        self._maybe_add_requester(peer)
        if msg.type == MessageType.PING:
            return KadMessage(MessageType.PING)
        if msg.type == MessageType.FIND_NODE:
            return KadMessage(
                MessageType.FIND_NODE, key=msg.key, closer_peers=self._closer(msg.key)
            )
        if msg.type == MessageType.GET_VALUE:
            records = self.store.get(msg.key, now)
            if records and not self._among_closest(msg.key):
                # Our own record, kept for our reads, is not served from far from the key: a
                # far server answering with it alone made a newcomer's quorum of 3 such
                # answers, and its first read saw 3 servers of 100 (issue 12's placement).
                me = self.local_id.to_bytes()
                records = [r for r in records if r.subkey != me]
            closer = self._closer(msg.key)
            # The bundle gets what the closer peers leave of one message (their addresses are
            # what peers told us: up to 16 of 512 bytes each).
            peers_size = sum(len(p.peer_id) + sum(len(a) + 3 for a in p.addrs) + 8 for p in closer)
            budget = min(MAX_RECORD_VALUE_BYTES, MAX_MESSAGE_BYTES - 1024 - peers_size)
            bundle = _bundle(records, budget)
            record = DhtRecord(msg.key, bundle) if records and budget > 0 else None
            return KadMessage(
                MessageType.GET_VALUE, key=msg.key, record=record, closer_peers=closer
            )
        if msg.type == MessageType.PUT_VALUE and msg.record is not None:
            try:
                record = self.verified.parse(msg.record.value, now=now)
            except RecordError as e:
                self.rejected[e.reason] += 1
                return None
            if record.key != msg.key:
                return None
            self.store.put(record, now)
            return msg  # the spec's acknowledgement echoes the request
        return None  # provider records are not used by petald

    # ---- asking ----------------------------------------------------------------------------

    def _learn(self, peers: Iterable[PeerRecord]) -> list[bytes]:
        """Adds the addresses peers told us about to the peerstore; returns their ids."""
        store = self.host.get_peerstore()
        ids = []
        for p in peers:
            if p.peer_id == self.local_id.to_bytes():
                continue
            addrs = []
            for a in p.addrs:
                try:
                    addrs.append(multiaddr.Multiaddr(a))
                except Exception:  # a peer's garbage address is ignored, not fatal
                    continue
            try:
                pid = ID(p.peer_id)
            except Exception:
                continue
            if addrs:
                store.add_addrs(pid, addrs, 0)
            ids.append(p.peer_id)
        return ids

    def _failed(self, peer: bytes) -> None:
        if self.table.on_failure(peer, trio.current_time())[0] == "evicted":
            self._closer_cache.clear()  # answers must not name the evicted peer

    def _seen_alive(self, peer: bytes) -> None:
        outcome, to_ping = self.table.update(peer, trio.current_time())
        if outcome == "inserted":
            self._closer_cache.clear()  # the newcomer may be among the closest to a key
        if outcome == "pending" and to_ping is not None:
            # §2.2: a full bucket keeps its oldest contact if it still answers. We leave the
            # ping to the next refresh; the newcomer waits in the replacement cache.
            log.debug("bucket full; %s waits as a replacement", ID(peer))

    async def _lookup(
        self, request: KadMessage, *, quorum: int | None = None
    ) -> tuple[list[bytes], list[tuple[bytes, KadMessage]]]:
        """Iterative lookup (§2.3) for `request.key`, sending `request` to each peer the state
        machine picks. Returns the closest peers that answered and every answer with the peer
        that gave it; with `quorum`, stops as soon as that many answers carried the full set of
        records (`_agreeing`; libp2p's GetValue quorum counts any answer with a record)."""
        now = trio.current_time()
        target = kad_key(request.key)
        seeds = self.table.closest(target, self.config.k)
        lookup = ClosestPeersLookup(
            target,
            seeds,
            local_peer=self.local_id.to_bytes(),
            alpha=self.config.alpha,
            num_results=self.config.k,
            peer_timeout=self.config.rpc_timeout,
            now=now,
        )
        answers: list[tuple[bytes, KadMessage]] = []
        progress = trio.Event()
        depth = dict.fromkeys(seeds, 1)  # request round in which each peer can first be asked

        async def ask(peer: bytes) -> None:
            nonlocal progress
            try:
                answer = await self.rpc.request(ID(peer), request)
            except (PeerUnavailable, RemoteError) as e:
                log.debug("lookup: %s", e)
                lookup.on_failure(peer, trio.current_time())
                self._failed(peer)
            else:
                answers.append((peer, answer))
                closer = self._learn(answer.closer_peers)
                for c in closer:
                    depth.setdefault(c, depth.get(peer, 1) + 1)
                lookup.on_success(peer, closer, trio.current_time())
                self._seen_alive(peer)
            progress.set()

        with trio.move_on_after(self.config.lookup_timeout):
            async with trio.open_nursery() as nursery:
                # Bounded: each step either queries a new peer (finite candidates) or waits
                # for an answer or a peer timeout.
                while quorum is None or _agreeing(answers) < quorum:
                    step, peer = lookup.next(trio.current_time())
                    if step == "finished":
                        break
                    if step == "query" and peer is not None:
                        nursery.start_soon(ask, peer)
                        continue
                    progress = trio.Event()
                    with trio.move_on_after(self.config.rpc_timeout):
                        await progress.wait()
                nursery.cancel_scope.cancel()
        self.table.mark_refreshed(_bucket_of(self.table, target), trio.current_time())
        result = lookup.result()
        if self.on_lookup is not None:
            rounds = depth.get(result[0], 1) if result else 0
            self.on_lookup(
                LookupStats(
                    request.type,
                    request.key,
                    rounds,
                    lookup.num_queried,
                    lookup.num_succeeded,
                    lookup.num_failed,
                    tuple(result),
                )
            )
        return result, answers

    async def find_peers(self, key: bytes) -> list[bytes]:
        """The k peers closest to `key` that answered."""
        closest, _ = await self._lookup(KadMessage(MessageType.FIND_NODE, key=key))
        return closest

    async def get(self, key: bytes, *, quorum: int | None = None) -> list[SignedRecord]:
        """Every valid, unexpired record under `key` found on the k closest peers and locally,
        newest per publisher. Forged, tampered or expired records are dropped and counted.
        `quorum`: stop after that many peers answered with records (None: ask all k); a key read
        with a quorum before is first asked of `quorum` peers that held it (`_ask_holders`)."""
        request = KadMessage(MessageType.GET_VALUE, key=key)
        answers: list[tuple[bytes, KadMessage]] = []
        if quorum is not None:
            answers = await self._ask_holders(request, quorum)
        if quorum is None or _agreeing(answers) < quorum:
            _, found_by_lookup = await self._lookup(request, quorum=quorum)
            answers += found_by_lookup
        if quorum is not None:
            self._remember_holders(key, answers)
        now = self.wall_clock()
        found: dict[bytes, SignedRecord] = {r.subkey: r for r in self.store.get(key, now)}
        seen: set[bytes] = set()  # the holders' answers repeat each other's records
        for _, a in answers:
            if a.record is None or a.record.key != key:
                continue
            for r in _unbundle(a.record.value, now, self.rejected, self.verified, seen):
                if r.key == key and (
                    r.subkey not in found or r.expiration > found[r.subkey].expiration
                ):
                    found[r.subkey] = r
        return [found[s] for s in sorted(found)]

    async def _ask_holders(
        self, request: KadMessage, quorum: int
    ) -> list[tuple[bytes, KadMessage]]:
        """One parallel round to `quorum` peers drawn at random from those that held the key at
        the last read. A heartbeat's re-read of a model's announcements was a full lookup (about
        7 requests, the same closest few peers hit by every reader); this is `quorum` requests
        spread over the k holders. Holders that fail or no longer hold the key are forgotten;
        the caller falls back to a lookup when fewer than `quorum` answered with records."""
        lacking = self._lacking.get(request.key, set())
        holders = [p for p in self._holders.get(request.key, []) if p not in lacking]
        if len(holders) < quorum:
            return []
        answers: list[tuple[bytes, KadMessage]] = []

        async def one(peer: bytes) -> None:
            try:
                answers.append((peer, await self.rpc.request(ID(peer), request)))
            except (PeerUnavailable, RemoteError) as e:
                log.debug("get from a holder: %s", e)
                self._failed(peer)
                self._forget_holder(request.key, peer)

        async with trio.open_nursery() as nursery:
            for peer in random.sample(holders, quorum):
                nursery.start_soon(one, peer)
        return answers

    def _remember_holders(self, key: bytes, answers: list[tuple[bytes, KadMessage]]) -> None:
        """The k peers closest to `key` among those that answered and those named as closest
        to it: where publishers put (`put`), and, less the peers that lacked records at this
        read (`_lacking`), where `_ask_holders` reads. A peer that lacks them stays a put
        target: dropping it left a peer that came close to the key partial until the
        publisher's next lookup, and a newcomer's first read that reached only such peers saw
        3 servers out of 100 (issue 12's placement through the DHT). Bounded in keys."""
        known = self._holders.pop(key, [])
        full = _full_size(answers)
        lacking = {peer for peer, a in answers if a.record is None or len(a.record.value) < full}
        answered = {peer for peer, _ in answers}
        named = {
            p.peer_id
            for _, a in answers
            if a.record is not None
            for p in a.closer_peers
            if p.peer_id != self.local_id.to_bytes()
        }
        target = int.from_bytes(kad_key(key), "big")
        holders = sorted(
            answered | set(known) | named,
            key=lambda p: int.from_bytes(kad_key(p), "big") ^ target,
        )[: self.config.k]
        self._holders[key] = holders
        still = self._lacking.pop(key, set()) - answered
        self._lacking[key] = (lacking | still) & set(holders)
        while len(self._holders) > MAX_HELD_KEYS:
            oldest = next(iter(self._holders))
            del self._holders[oldest]
            self._lacking.pop(oldest, None)

    def _forget_holder(self, key: bytes, peer: bytes) -> None:
        """`peer` failed a request for `key`: neither asked nor put to until it is named again."""
        holders = self._holders.get(key)
        if holders is not None and peer in holders:
            holders.remove(peer)

    async def put(self, record: SignedRecord) -> int:
        """Stores `record` locally and on the k peers closest to its key; returns how many
        peers acknowledged."""
        self.store.put(record, self.wall_clock())
        holders = self._holders.get(record.key, [])
        reuse = self._puts_without_lookup.get(record.key, PUT_LOOKUP_EVERY)
        if len(holders) >= self.config.k // 2 and reuse < PUT_LOOKUP_EVERY:
            # A heartbeat's re-put of an announcement went through a full lookup (~20 requests)
            # to find the same k peers as last time: every server's lookups were most of the
            # swarm's DHT requests (issue 12's simulation). The holders read at the last
            # quorum read are those peers; a lookup every few puts finds newcomers near the key.
            closest = list(holders)
            self._puts_without_lookup[record.key] = reuse + 1
        else:
            closest = await self.find_peers(record.key)
            self._puts_without_lookup[record.key] = 0
            if record.key in self._holders:  # the next re-puts go where this one went
                self._holders[record.key] = list(closest)
        request = KadMessage(
            MessageType.PUT_VALUE, key=record.key, record=DhtRecord(record.key, record.to_bytes())
        )
        stored: set[bytes] = set()

        async def one(peer: bytes) -> None:
            try:
                await self.rpc.request(ID(peer), request)
                stored.add(peer)
            except (PeerUnavailable, RemoteError) as e:
                log.debug("put: %s", e)
                self._forget_holder(record.key, peer)

        async with trio.open_nursery() as nursery:
            for p in closest:
                nursery.start_soon(one, p)
        acked = len(stored)
        if record.key in self._lacking:
            self._lacking[record.key] -= stored
        if acked < len(closest) // 2:
            self._puts_without_lookup[record.key] = PUT_LOOKUP_EVERY  # look up next time
        while len(self._puts_without_lookup) > MAX_HELD_KEYS:
            del self._puts_without_lookup[next(iter(self._puts_without_lookup))]
        return acked

    # ---- lifetime --------------------------------------------------------------------------

    async def bootstrap(self, peers: Iterable[ID]) -> None:
        """Adds the peers we are connected to, then looks ourselves up (§2.3: a joining node
        learns its neighbourhood and announces itself to it)."""
        for p in peers:
            self._seen_alive(p.to_bytes())
        await self.find_peers(self.local_id.to_bytes())

    async def _refresh_forever(self) -> None:
        while True:
            await trio.sleep(self.config.refresh_interval / 4)
            self.store.expire(self.wall_clock())
            for bucket in self.table.buckets_to_refresh(trio.current_time())[:8]:
                key = await trio.to_thread.run_sync(_key_in_bucket, self.table.local_key, bucket)
                if key is not None:
                    await self._lookup(KadMessage(MessageType.FIND_NODE, key=key))
                self.table.mark_refreshed(bucket, trio.current_time())

    async def run(
        self, *, task_status: trio.TaskStatus[DhtNode] = trio.TASK_STATUS_IGNORED
    ) -> None:
        connected = [p for p in self.host.get_connected_peers() if p != self.local_id]
        await self.bootstrap(connected)
        task_status.started(self)
        await self._refresh_forever()


# Refreshing bucket b needs a message key whose SHA-256 lands in b, found by trying random keys:
# about 2^(256-b) tries, so only the far buckets are refreshed this way (2^16 tries at most).
# Nearer buckets hold ~0 peers unless the swarm has > 2^16 of them; the self-lookup covers them.
MAX_REFRESH_TRIES = 1 << 16


def _key_in_bucket(local_key: bytes, bucket: int) -> bytes | None:
    local = int.from_bytes(local_key, "big")
    for _ in range(min(MAX_REFRESH_TRIES, 1 << max(256 - bucket, 0))):
        key = secrets.token_bytes(32)
        if (int.from_bytes(kad_key(key), "big") ^ local).bit_length() - 1 == bucket:
            return key
    return None


def _bucket_of(table: RoutingTable, target: bytes) -> int:
    d = int.from_bytes(xor_distance(table.local_key, target), "big")
    return max(d.bit_length() - 1, 0)


def _agreeing(answers: list[tuple[bytes, KadMessage]]) -> int:
    """How many answers carry records and as many as the fullest answer (within a tenth, by
    size: a publisher's re-signed record keeps its size). A peer that came close to the key
    since the publishers last looked their holders up has a few of the records only: a quorum
    counting it stopped a newcomer's first read at 3 servers out of 100 (issue 12's placement
    through the DHT), so such answers are merged but do not count."""
    full = _full_size(answers)
    return sum(a.record is not None and len(a.record.value) >= full for _, a in answers)


def _full_size(answers: list[tuple[bytes, KadMessage]]) -> float:
    """The bundle size an answer must reach to carry the full set: 90 % of the largest."""
    return 0.9 * max((len(a.record.value) for _, a in answers if a.record is not None), default=0)


def _bundle(records: list[SignedRecord], budget: int = MAX_RECORD_VALUE_BYTES) -> bytes:
    """CBOR list of encoded records cut to what one protobuf record may hold: newest first when
    all fit, else a random sample. With more publishers than fit (~140 announcements), "newest
    first" gave every answer the same ones and hid the others from every reader (issue 12's
    simulation: views held 41 % of 105 servers); samples differ per answer and per heartbeat,
    so a reader merging a few answers over a few heartbeats sees them all."""
    encoded = [r.to_bytes() for r in sorted(records, key=lambda r: -r.expiration)]
    if 1 + sum(len(b) + 5 for b in encoded) > budget:
        random.shuffle(encoded)
    out: list[bytes] = []
    size = 1
    for b in encoded:
        if size + len(b) + 5 > budget:
            break
        out.append(b)
        size += len(b) + 5
    return cbor2.dumps(out)


def _unbundle(
    data: bytes,
    now: float,
    rejected: Counter[str],
    verified: VerifiedRecords,
    seen: set[bytes],
) -> list[SignedRecord]:
    """The records of one GET answer's bundle, skipping items whose bytes are in `seen` (taken
    from an earlier answer of the same read) and adding the others."""
    try:
        items = cbor2.loads(data)
    except Exception:
        return []
    if not isinstance(items, list):
        return []
    out = []
    for item in items[:MAX_SUBKEYS_PER_KEY]:
        if not isinstance(item, bytes) or item in seen:
            continue
        seen.add(item)
        try:
            out.append(verified.parse(item, now=now))
        except RecordError as e:
            rejected[e.reason] += 1
    return out
