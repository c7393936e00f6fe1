"""Server announcements: each server's signed `ServerInfo`, spread by gossipsub (one topic per
model) and stored in the DHT under the model's key, merged into the `SwarmView` every peer
keeps. (Per-block keys were put too, 21 DHT requests per block every other heartbeat, and never
read: issue 12's simulation found them to be most of a server's DHT traffic.)

Why both: py-libp2p's gossipsub drops messages under bursts (shared/notes/py-libp2p.md: 10-53%
delivered at 20+ msg/s), and a peer that joins late missed every earlier message. Gossip makes
changes fast; heartbeats repair drops; the DHT answers late joiners. An announcement carries a
signed expiry a few heartbeats ahead, so a server that dies silently drops out of every view.

Entry point: construct `Announcer(...)` and `await nursery.start(it.run)` before the host
connects anywhere (a peer that connects before gossipsub runs is never meshed); then
`announce(info)` (a server) and `watch(model)` (anyone interested in a model)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import trio
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from petald.dht.flood import GOSSIP_THROTTLE, PeerThrottle
from petald.dht.node import DhtNode
from petald.dht.records import SignedRecord, sign_record
from petald.errors import RecordError
from petald.p2p.bans import bans_of
from petald.p2p.limits import guard_pubsub
from petald.p2p.swarm_view import ServerEntry, SwarmView
from petald.types import AnnouncementError, ServerInfo

log = logging.getLogger(__name__)

TOPIC_PREFIX = "petald/v1/servers/"
# A peer follows at most this many models' topics: each costs a subscription and a DHT refresh.
MAX_WATCHED_MODELS = 64
# A heartbeat's re-read of a model's announcements stops after this many DHT peers answered with
# records instead of asking all k = 20: every server puts its record to the same k closest peers,
# so each holds nearly the whole set, and 20 copies of up to 16 KiB each was most of every peer's
# DHT traffic (issue 12's simulation). Three tolerate a holder or two that missed a put.
READ_QUORUM = 3
# Parsed announcements (and publisher names) kept per peer: a few heartbeats of a large swarm.
PARSED_CAPACITY = 4096
_K = TypeVar("_K")
_V = TypeVar("_V")


def _keep(cache: dict[_K, _V], key: _K, value: _V) -> _V:
    """Stores `value` in a cache bounded by PARSED_CAPACITY (oldest out); returns it."""
    cache[key] = value
    if len(cache) > PARSED_CAPACITY:
        del cache[next(iter(cache))]
    return value


def topic_for(model: str) -> str:
    return TOPIC_PREFIX + model


def model_key(model: str) -> bytes:
    return f"petald/v1/{model}/servers".encode()


@dataclass(frozen=True)
class AnnounceConfig:
    heartbeat: float = 30.0  # seconds between re-announcements (and DHT re-reads)
    ttl: float = 95.0  # signed expiry: three heartbeats and a margin
    gossip_heartbeat: int = 1  # gossipsub mesh maintenance (py-libp2p's default is 120 s)

    def __post_init__(self) -> None:
        # The model record must be re-put (every heartbeat) well before it expires; a retry
        # after a failed put comes a second later.
        if not 0 < self.heartbeat < self.ttl / 2:
            raise ValueError("announcement heartbeat must be positive and below half the ttl")


class Announcer:
    def __init__(
        self,
        host: IHost,
        dht: DhtNode,
        key_pair: KeyPair,
        view: SwarmView,
        config: AnnounceConfig | None = None,
        *,
        gossip: bool = True,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.dht = dht
        self.key_pair = key_pair
        self.view = view
        self.config = config or AnnounceConfig()
        # Unix seconds for signed expiries; the simulation passes its virtual clock.
        self.wall_clock = wall_clock
        # gossip=False (the swarm simulation): announcements travel by the DHT path only, as
        # if gossip dropped every message; py-libp2p's pubsub needs a real host.
        self.gossipsub: GossipSub | None = None
        self.pubsub: Pubsub | None = None
        if gossip:
            self.gossipsub = GossipSub(
                protocols=[PROTOCOL_ID_V11],
                degree=6,
                degree_low=4,
                degree_high=12,
                heartbeat_interval=self.config.gossip_heartbeat,
            )
            self.pubsub = Pubsub(host, self.gossipsub)
            guard_pubsub(self.pubsub)  # a hostile message must not end it (petald.p2p.limits)
        self.rejected: Counter[str] = Counter()
        # Forwarders of invalid announcements: struck, then banned by the host for a while
        # (petald.dht.flood, petald.p2p.bans).
        self.invalid = PeerThrottle(GOSSIP_THROTTLE)
        self.bans = bans_of(host)
        self._info: ServerInfo | None = None
        self._changed = trio.Event()
        self._watched: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self._view_changed = trio.Event()
        # Set once our announcement has been published by gossip and stored in the DHT: from
        # then on a late joiner finds it, whatever gossip dropped.
        self.published = trio.Event()
        self._last_published: ServerInfo | None = None
        self._retry_soon = False
        self._publish_done = trio.Event()
        # A server re-signs the same announcement every heartbeat with a later expiry: every
        # re-read brings every server's record anew, but its value and publisher repeat.
        # Parsing them again was most of a peer's CPU in the 1,000-peer simulation.
        self._parsed: dict[bytes, ServerInfo] = {}  # announcement value -> parsed
        self._names: dict[bytes, str] = {}  # subkey -> peer id as text

    def _notify(self) -> None:
        self._view_changed.set()
        self._view_changed = trio.Event()

    async def wait_until(self, predicate: Callable[[SwarmView], bool], *, timeout: float) -> None:
        """Waits until `predicate(view)` holds, re-checking on every change of the view and
        every rejected announcement (`rejected`).
        Raises `trio.TooSlowError` after `timeout` seconds."""
        with trio.fail_after(timeout):
            while not predicate(self.view):
                await self._view_changed.wait()

    # ---- receiving -------------------------------------------------------------------------

    def accept(self, data: bytes, model: str, source: str) -> bool:
        """Validates one announcement (signature, expiry, key, content) and merges it into the
        view if it is newer. Returns whether it was valid; anything invalid is dropped and
        counted, never raised."""
        now = self.wall_clock()
        try:
            record = self.dht.verified.parse(data, now=now)
        except RecordError as e:
            self._reject(e.reason)
            return False
        return self._merge(record, model, source, now)

    def _merge(self, record: SignedRecord, model: str, source: str, now: float) -> bool:
        """`accept` for a record whose signature has been checked."""
        try:
            if record.key != model_key(model):
                raise AnnouncementError("announcement for another model's key")
            info = self._parsed.get(record.value)
            if info is None:
                info = _keep(self._parsed, record.value, ServerInfo.from_cbor(record.value))
            if info.model != model:
                raise AnnouncementError("announcement names another model")
        except RecordError as e:
            self._reject(e.reason)
            return False
        except AnnouncementError:
            self._reject("bad_announcement")
            return False
        # The signed expiry orders one publisher's announcements: a later one expires later.
        name = self._names.get(record.subkey)
        if name is None:
            name = _keep(self._names, record.subkey, str(ID(record.subkey)))
        entry = ServerEntry(name, info, record.expiration, record.expiration, source)
        if self.view.update(entry, now=now):
            self._notify()
        return True

    def _reject(self, reason: str) -> None:
        # Counted, and waiters woken (`wait_until` re-checks its predicate): a test waits for
        # a rejection like for any other change instead of guessing when the gossip arrived.
        self.rejected[reason] += 1
        self._notify()

    def _validator(self, model: str):
        def validate(forwarder: ID, msg) -> bool:
            # Runs before gossipsub forwards a message: invalid ones stop here.
            if self.accept(msg.data, model, "gossip"):
                return True
            self._strike(forwarder)
            return False

        return validate

    def _strike(self, forwarder: ID) -> None:
        now = trio.current_time()
        if not self.invalid.strike(forwarder, now) or self.bans.banned(forwarder, now):
            return
        # The ban disconnects the peer: run it beside, not inside, pubsub handling its message.
        if self._nursery is not None:
            self.rejected["banned"] += 1
            self._nursery.start_soon(self.bans.ban, forwarder, now + GOSSIP_THROTTLE.ban_seconds)

    async def _receive(self, model: str) -> None:
        assert self.pubsub is not None
        sub = await self.pubsub.subscribe(topic_for(model))
        async for _ in sub:
            pass  # accepted (or dropped) by the topic validator already

    async def refresh_from_dht(self, model: str) -> int:
        """Reads the model's announcements from the DHT; returns how many were valid."""
        records = await self.dht.get(model_key(model), quorum=READ_QUORUM)
        now = self.wall_clock()
        # Verified by the DHT node already: merged without a second check.
        return sum(self._merge(r, model, "dht", now) for r in records)

    async def watch(self, model: str) -> None:
        """Follows `model`: its gossip topic, and its DHT key now and every heartbeat."""
        if model in self._watched or self._nursery is None:
            return
        if len(self._watched) >= MAX_WATCHED_MODELS:
            log.warning("not following %s: already following %d models", model, MAX_WATCHED_MODELS)
            return
        self._watched.add(model)
        if self.pubsub is not None:
            self.pubsub.set_topic_validator(topic_for(model), self._validator(model), False)
            self._nursery.start_soon(self._receive, model)
        await self.refresh_from_dht(model)

    async def _discover_models(self) -> None:
        """Follows every model some peer's topics mention, so a bootstrap node and
        `petald status` see the whole swarm without being told its models."""
        assert self.pubsub is not None
        while True:
            for topic in list(self.pubsub.peer_topics):
                # A peer's subscription that is not UTF-8 comes through py-libp2p as bytes.
                if isinstance(topic, str) and topic.startswith(TOPIC_PREFIX):
                    await self.watch(topic[len(TOPIC_PREFIX) :])
            await trio.sleep(min(1.0, self.config.heartbeat))

    # ---- publishing ------------------------------------------------------------------------

    def readdress(self, addrs: tuple[str, ...]) -> None:
        """Our addresses changed (a relay lost or gained): what we announce says so now."""
        if self._info is not None and self._info.addrs != addrs:
            self.announce(replace(self._info, addrs=addrs))

    def announce(self, info: ServerInfo | None) -> None:
        """Sets what this peer serves (None: nothing) and publishes it at once."""
        self._info = info
        self._changed.set()

    async def _publish(self, info: ServerInfo) -> None:
        now = self.wall_clock()
        record = sign_record(
            self.key_pair.private_key, model_key(info.model), info.to_cbor(), now + self.config.ttl
        )
        data = record.to_bytes()
        self.accept(data, info.model, "self")
        await self.watch(info.model)
        try:
            if self.pubsub is not None:
                await self.pubsub.publish(topic_for(info.model), data)
        except Exception as e:  # no peers yet, or a transient send failure: heartbeats retry
            log.debug("gossip publish failed: %s", e)
        # The model key is refreshed every heartbeat: late joiners and gossip's drops read it.
        acked = await self.dht.put(record)
        if acked == 0 and len(self.dht.table) > 0:
            # No peer took the model record (timeouts on a loaded machine): a late joiner would
            # not find us. Try again in a second, not a heartbeat, and do not claim "published".
            self._retry_soon = True
            return
        self.published.set()
        self._last_published = info
        self._publish_done.set()
        self._publish_done = trio.Event()

    async def wait_published(self, info: ServerInfo) -> None:
        """Returns once `info` itself has been gossiped and stored in the DHT (e.g. so that a
        server says it is online only when late joiners can find it). Not bounded: callers
        put a timeout around it."""
        while self._last_published != info:
            await self._publish_done.wait()

    async def _heartbeat(self) -> None:
        while True:
            wait = min(1.0, self.config.heartbeat) if self._retry_soon else self.config.heartbeat
            self._retry_soon = False
            with trio.move_on_after(wait):
                await self._changed.wait()
            self._changed = trio.Event()
            if self._info is not None:
                await self._publish(self._info)
            for model in list(self._watched):
                await self.refresh_from_dht(model)
            if self.view.expire(self.wall_clock()):
                self._notify()

    async def run(
        self, *, task_status: trio.TaskStatus[Announcer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        if self.pubsub is None or self.gossipsub is None:
            await self._run_services(task_status)
            return
        async with background_trio_service(self.pubsub), background_trio_service(self.gossipsub):
            await self.pubsub.wait_until_ready()
            await self._run_services(task_status)

    async def _run_services(self, task_status: trio.TaskStatus[Announcer]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.pubsub is not None:
                nursery.start_soon(self._discover_models)
            nursery.start_soon(self._heartbeat)
            task_status.started(self)
            await trio.sleep_forever()
