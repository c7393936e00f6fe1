"""`Dialer.ensure_connected(peer)`: the one way petald code gets a connection to a peer by id,
direct when possible and through a circuit relay otherwise. Everything that opens streams to a
peer by id (DHT RPCs, echo/ping) calls it first, then `host.new_stream`, which reuses the
connection.

Order: an existing connection (direct or relayed) is reused; else the peer's direct addresses
are dialed under a short bound; else its `/p2p-circuit` addresses through the relay transport
(py-libp2p's swarm skips circuit addresses: it has no relay transport registered).

Upgrading relayed → direct: py-libp2p's `host.connect()` never replaces an existing connection,
so with `run` started the dialer does it itself. Whenever it hands out a relayed connection it
(at most once a minute per peer) dials the peer's direct addresses, learned from identify over
the relayed connection, with `network.dial_addr`, which opens a second connection; new streams
prefer the direct one (`connection()`), and the relayed one is closed. A peer that really is
behind a NAT costs one bounded failed dial a minute. DCUtR hole punching is not used (untested
in py-libp2p 0.8.1)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.relay.circuit_v2.transport import CircuitV2Transport

from petald.errors import PeerUnavailable, SwarmKeyMismatch
from petald.p2p.pnet import refusal_error
from petald.p2p.relay import is_circuit_addr, is_relayed

log = logging.getLogger(__name__)

# Seconds for the direct attempt: a reachable peer answers in milliseconds; an unreachable one
# costs ~0.7 s of retry backoff (no route) or this whole bound (packets silently dropped).
DIRECT_DIAL_TIMEOUT = 3.0
# Seconds per circuit attempt: connect to the relay, HOP CONNECT, STOP, Noise + yamux inside.
CIRCUIT_DIAL_TIMEOUT = 10.0
# Circuit addresses tried per peer (a private peer has one per reservation).
MAX_CIRCUIT_ADDRS = 4
# Seconds between attempts to replace a peer's relayed connection by a direct one.
UPGRADE_RETRY = 60.0
# Seconds to wait for identify to tell us a relayed peer's direct addresses after a circuit dial.
IDENTIFY_WAIT = 5.0
# Peers whose upgrade attempts we remember (bounded: entries past their retry time are dropped).
MAX_UPGRADE_PEERS = 1024


def _closed(conn: INetConn) -> bool:
    """Whether `conn` (a py-libp2p SwarmConn) or its muxer has closed or is shutting down."""
    muxed = getattr(conn, "muxed_conn", None)
    return bool(
        getattr(conn, "is_closed", False)
        or getattr(muxed, "is_closed", False)
        or getattr(getattr(muxed, "event_shutting_down", None), "is_set", lambda: False)()
    )


def _with_peer(addr: multiaddr.Multiaddr, peer: ID) -> multiaddr.Multiaddr:
    """Circuit addresses must end in /p2p/<destination> for the relay transport."""
    text = str(addr)
    return addr if text.endswith(f"/p2p/{peer}") else multiaddr.Multiaddr(f"{text}/p2p/{peer}")


class Dialer:
    """Connection policy for one host; `transport` is `RelayService.transport` (None: direct
    only). Concurrent calls for the same peer share one dial."""

    def __init__(self, host: IHost, transport: CircuitV2Transport | None) -> None:
        self.host = host
        self.transport = transport
        self._locks: dict[ID, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self._next_upgrade: dict[ID, float] = {}
        self._upgraded: dict[ID, trio.Event] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background upgrades of relayed connections; without it the dialer never upgrades."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def _direct_addrs(self, peer: ID) -> list[multiaddr.Multiaddr]:
        with contextlib.suppress(Exception):  # a peer we never heard of has no entry
            return [a for a in self.host.get_peerstore().addrs(peer) if not is_circuit_addr(a)]
        return []

    def _maybe_upgrade(self, peer: ID, conn: INetConn) -> None:
        if self._nursery is None or not is_relayed(conn):
            return
        now = trio.current_time()
        if self._next_upgrade.get(peer, 0.0) > now:
            return
        if len(self._next_upgrade) >= MAX_UPGRADE_PEERS:
            self._next_upgrade = {p: t for p, t in self._next_upgrade.items() if t > now}
            if len(self._next_upgrade) >= MAX_UPGRADE_PEERS:
                return
        self._next_upgrade[peer] = now + UPGRADE_RETRY
        self._nursery.start_soon(self._upgrade, peer, conn)

    async def _upgrade(self, peer: ID, relayed: INetConn) -> None:
        # Identify over a new relayed connection brings the peer's listen addresses a moment
        # later; py-libp2p has no event for it, so look a few times within a bound.
        direct: list[multiaddr.Multiaddr] = []
        with trio.move_on_after(IDENTIFY_WAIT):
            while not (direct := self._direct_addrs(peer)):
                await trio.sleep(0.1)
        network = self.host.get_network()
        for addr in direct[:4]:
            try:
                with trio.fail_after(DIRECT_DIAL_TIMEOUT):
                    await network.dial_addr(addr, peer)
            except trio.Cancelled:
                raise
            except Exception as e:  # still unreachable: stay relayed, try again later
                log.debug("direct dial to relayed %s at %s failed: %s", peer, addr, e)
                # A failed dial puts the peer in the swarm's negative cache, which would make
                # new streams over the working relayed connection fail: lift it.
                network.unblock_peer(peer)
                continue
            log.info("connection to %s upgraded from relayed to direct (%s)", peer, addr)
            with contextlib.suppress(Exception):
                await relayed.close()
            self._upgraded.setdefault(peer, trio.Event()).set()
            return

    async def wait_direct(self, peer: ID, *, timeout: float) -> INetConn:
        """Waits until we have a direct connection to `peer` (after an upgrade, say); raises
        `trio.TooSlowError` after `timeout` seconds."""
        with trio.fail_after(timeout):
            while True:
                conn = self.connection(peer)
                if conn is not None and not is_relayed(conn):
                    return conn
                event = self._upgraded.get(peer)
                if event is None or event.is_set():
                    event = self._upgraded[peer] = trio.Event()
                await event.wait()

    def _connections(self, peer: ID) -> list[INetConn]:
        return list(self.host.get_network().get_connections(peer))

    def connection(self, peer: ID) -> INetConn | None:
        """An open connection to `peer`, direct ones first. The swarm keeps listing a
        connection that has closed (a circuit whose relay died) until its cleanup runs; it
        refuses streams on it, so it is no connection for us."""
        conns = [c for c in self.host.get_network().get_connections(peer) if not _closed(c)]
        conns.sort(key=is_relayed)
        return conns[0] if conns else None

    async def ensure_connected(
        self, peer: ID, addrs: Sequence[multiaddr.Multiaddr] = ()
    ) -> INetConn:
        """Returns a connection to `peer`, dialing `addrs` and the peerstore's addresses if
        there is none. Raises `PeerUnavailable`. Cancel-safe (a half-made dial is dropped)."""
        if (conn := self.connection(peer)) is not None:
            self._maybe_upgrade(peer, conn)
            return conn
        lock = self._locks.setdefault(peer, trio.Lock())
        try:
            async with lock:
                if (conn := self.connection(peer)) is None:
                    conn = await self._dial(peer, addrs)
                self._maybe_upgrade(peer, conn)
                return conn
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._locks.pop(peer, None)

    async def open_stream(
        self, peer_id: str, announced: Sequence[str], protocol: TProtocol, *, timeout: float
    ) -> INetStream:
        """A new stream to `peer_id`, dialing its `announced` addresses (as in its signed
        announcement) if need be; raises `PeerUnavailable` within `timeout`. Clients open
        their streams to servers this way, and servers theirs to the next server."""
        addrs = []
        for a in announced:
            # Direct addresses are dialed without the /p2p/ suffix servers announce them with;
            # circuit addresses keep it (the relay transport needs the destination).
            text = a if "/p2p-circuit" in a else a.removesuffix(f"/p2p/{peer_id}")
            try:
                addrs.append(multiaddr.Multiaddr(text))
            except Exception:  # an announced address we cannot parse: skip it
                continue
        try:
            peer = ID.from_base58(peer_id)
            with trio.fail_after(timeout):
                await self.ensure_connected(peer, addrs)
                before = self._connections(peer)
                try:
                    return await self.host.new_stream(peer, [protocol])
                except Exception:
                    # The stream went out on a connection that was closing (a duplicate the
                    # swarm pruned, a connection the peer dropped): its closed state shows
                    # only now. A healthy peer is not given up for that; one stream on a live
                    # or new connection. Failures on a live connection are the peer's own.
                    if not any(_closed(c) for c in before):
                        raise
                    log.debug("stream to %s failed on a closing connection; redialing", peer)
                await self.ensure_connected(peer, addrs)
                return await self.host.new_stream(peer, [protocol])
        except trio.TooSlowError:
            raise PeerUnavailable(
                f"{peer_id}: no stream within {timeout:.0f} s", peer=peer_id
            ) from None
        except PeerUnavailable as e:
            raise PeerUnavailable(str(e), peer=peer_id) from None
        except Exception as e:  # py-libp2p dial and negotiation errors come in many types
            raise PeerUnavailable(f"{peer_id}: {type(e).__name__}: {e}", peer=peer_id) from None

    async def _dial(self, peer: ID, given: Sequence[multiaddr.Multiaddr]) -> INetConn:
        store = self.host.get_peerstore()
        known: list[multiaddr.Multiaddr] = []
        with contextlib.suppress(Exception):  # a peer we never heard of has no entry
            known = list(store.addrs(peer))
        candidates = list(dict.fromkeys([*given, *known]))
        direct = [a for a in candidates if not is_circuit_addr(a)]
        circuit = [_with_peer(a, peer) for a in candidates if is_circuit_addr(a)]
        errors: list[str] = []
        if direct:
            try:
                with trio.fail_after(DIRECT_DIAL_TIMEOUT):
                    await self.host.connect(PeerInfo(peer, direct))
            except trio.Cancelled:
                raise
            except Exception as e:  # dial errors come in many py-libp2p types and groups
                if (mismatch := refusal_error(self.host, PeerInfo(peer, direct))) is not None:
                    raise mismatch from e  # a private swarm's boundary: no relay helps
                errors.append(f"direct: {type(e).__name__}")
                if circuit:
                    self._forget_failed_direct(peer, direct, keep=circuit)
            else:
                if (conn := self.connection(peer)) is not None:
                    return conn
                # connect() returned at once because the swarm still lists a connection that
                # is closing (a pruned duplicate): open a new one ourselves. A peer with
                # circuit addresses is private: those are tried below instead.
                if not circuit:
                    if (conn := await self._dial_anew(peer, direct)) is not None:
                        return conn
                    errors.append("direct: only a closing connection, and no new one")
        if circuit and self.transport is not None:
            for addr in circuit[:MAX_CIRCUIT_ADDRS]:
                try:
                    with trio.fail_after(CIRCUIT_DIAL_TIMEOUT):
                        return await self._dial_circuit(peer, addr)
                except trio.Cancelled:
                    raise
                except SwarmKeyMismatch:
                    raise
                except Exception as e:
                    errors.append(f"{addr}: {type(e).__name__}: {str(e)[:120]}")
                    self.host.get_network().unblock_peer(peer)
        if not direct and not circuit:
            raise PeerUnavailable(f"{peer}: no known address")
        raise PeerUnavailable(f"{peer}: unreachable ({'; '.join(errors) or 'no relay transport'})")

    async def _dial_anew(self, peer: ID, direct: list[multiaddr.Multiaddr]) -> INetConn | None:
        network = self.host.get_network()
        for addr in direct[:4]:
            try:
                with trio.fail_after(DIRECT_DIAL_TIMEOUT):
                    await network.dial_addr(addr, peer)
            except trio.Cancelled:
                raise
            except Exception as e:
                log.debug("new connection to %s at %s failed: %s", peer, addr, e)
                network.unblock_peer(peer)  # the negative cache would refuse a later dial
                continue
            if (conn := self.connection(peer)) is not None:
                return conn
        return None

    async def _dial_circuit(self, peer: ID, addr: multiaddr.Multiaddr) -> INetConn:
        """Connects to the relay first (reusing a connection we have), and records `addr` in
        the peerstore: the relay transport looks there before anything else."""
        assert self.transport is not None
        relay = info_from_p2p_addr(addr.decapsulate(multiaddr.Multiaddr("/p2p-circuit")))
        try:
            await self.host.connect(relay)
        except Exception as e:
            if (mismatch := refusal_error(self.host, relay)) is not None:
                raise mismatch from e  # the relay is on the other side of a swarm key
            raise
        self.host.get_peerstore().add_addrs(peer, [addr], 3600)
        return await self.transport.dial(addr)

    def _forget_failed_direct(
        self, peer: ID, direct: list[multiaddr.Multiaddr], *, keep: list[multiaddr.Multiaddr]
    ) -> None:
        """After a failed direct dial the swarm puts `peer` in its 60 s negative cache, and
        `host.new_stream` checks that cache *before* looking for connections, so even a working
        circuit would be refused: unblock it. The dead direct addresses are dropped so nothing
        retries them (identify or the DHT will tell us again if they come back)."""
        self.host.get_network().unblock_peer(peer)
        store = self.host.get_peerstore()
        with contextlib.suppress(Exception):
            store.clear_addrs(peer)
            store.add_addrs(peer, keep, 3600)
        log.debug("direct dial to %s failed (%s); trying circuits", peer, direct)
