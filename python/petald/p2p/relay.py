"""Circuit relay v2 (libp2p spec `relay/circuit-v2.md`) for petald: `RelayService` owns the
py-libp2p relay protocol on our host. When we are publicly reachable and relaying is on, it
offers the HOP service under the explicit limits below; when we are private it reserves slots
on 1-2 relays among our connected peers, refreshes them at 80% of their lifetime and reports our
`/p2p-circuit` addresses. Its `transport` dials circuit addresses (see `petald.p2p.dialer`).
Start with `await nursery.start(relay.run)`, then `await relay.adopt(reachability)`."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.relay.circuit_v2.utils import (
    maybe_consume_signed_record,
    read_delimited_msg,
    write_delimited_msg,
)
from libp2p.tools.anyio_service import background_trio_service

log = logging.getLogger(__name__)

RELAY_LIMITS = RelayLimits(
    # Seconds one relayed connection may live. Relaying is a fallback until a direct connection
    # is possible; a client whose circuit is cut off dials a new one.
    duration=30 * 60,
    # Bytes per circuit, both directions together: well above one inference session's
    # activations, small enough that one client cannot make us carry a model download.
    data=256 << 20,
    # Concurrent circuits to one reserved peer.
    max_circuit_conns=8,
    # Peers we hold a slot for at once; each slot costs only bookkeeping until used.
    max_reservations=32,
    # Seconds a reservation lasts; the holder refreshes it (at 80%) to keep its address.
    reservation_ttl=3600,
)
# Seconds a peer has to send its HOP request once it opened the stream, and to read our answer
# to a RESERVE: one small message each way. Upstream waits 30 s per read and never closes the
# stream after an error, so a peer that sent half a message held a task and a stream for good.
HOP_REQUEST_TIMEOUT = 10.0
# Seconds a whole STOP exchange may take (request, answer, the relayed connection's upgrade);
# the circuit it opens then lives in the swarm, not in this handler.
STOP_TIMEOUT = 20.0
# Relays a private peer reserves on: two, so losing one relay does not make it unreachable.
RESERVATIONS_WANTED = 2
RESERVE_TIMEOUT = 10.0
# Refresh when this fraction of the reservation's lifetime has passed.
REFRESH_AT = 0.8
# A failed refresh is retried this often until the reservation expires.
REFRESH_RETRY = 30.0

log_protocol = logging.getLogger("libp2p.relay.circuit_v2.protocol")


def is_circuit_addr(addr: multiaddr.Multiaddr | str) -> bool:
    return "/p2p-circuit" in str(addr)


def is_relayed(conn: INetConn | object) -> bool:
    """True when a (muxed) connection runs through a relay: its transport address is
    `/p2p/<relay>/p2p-circuit/...` instead of an IP address."""
    try:
        return any(is_circuit_addr(a) for a in conn.get_transport_addresses())  # type: ignore[attr-defined]
    except Exception:  # a connection that is closing has no addresses any more
        return False


class SafeRelayProtocol(CircuitV2Protocol):
    """py-libp2p's relay protocol with our own HOP and STOP handlers around its request logic.

    HOP: one request per stream, as go-libp2p serves it (upstream loops reading more, 30 s
    each, and never closes the stream when it stops), read under `HOP_REQUEST_TIMEOUT`; the
    stream is closed or reset when the request is done, except a CONNECT that became a circuit
    (upstream's `_handle_connect` owns that stream, under its circuit limits). Refused once
    `hop_enabled` is off (we found we are private: relaying through us cannot work). RESERVE:
    upstream reserves for `msg.peer.id` when present, which any peer can set to someone else's
    id (slot exhaustion, and the relay would then accept CONNECTs for a peer that never asked);
    the spec's RESERVE carries no peer, so we drop it and upstream falls back to the
    Noise-authenticated remote peer. STOP: the whole exchange under `STOP_TIMEOUT`."""

    hop_enabled = True

    async def _handle_reserve(self, stream: INetStream, msg: HopMessage) -> None:
        if msg.HasField("peer"):
            msg.ClearField("peer")
        await super()._handle_reserve(stream, msg)

    async def _handle_hop_stream(self, stream: INetStream) -> None:
        if not self.hop_enabled or is_relayed(stream.muxed_conn):  # spec: no HOP over a relay
            await _reset(stream)
            return
        try:
            with trio.fail_after(HOP_REQUEST_TIMEOUT):
                msg = await read_delimited_msg(stream, HopMessage)
                if msg.HasField("senderRecord") and not maybe_consume_signed_record(
                    msg, self.host, stream.muxed_conn.peer_id
                ):
                    raise ValueError("invalid sender record")
                if msg.type == HopMessage.CONNECT:
                    ID(msg.peer.id)  # upstream parses it outside its error handling
                elif msg.type == HopMessage.RESERVE:
                    await self._handle_reserve(stream, msg)
                else:
                    await self._send_status(stream, StatusCode.MALFORMED_MESSAGE, "bad type")
        except Exception as e:  # incomplete, garbage, too slow: this peer's stream only
            log.debug("HOP request from %s refused: %r", stream.muxed_conn.peer_id, e)
            await _reset(stream)
            return
        if msg.type == HopMessage.CONNECT:
            # Deadlines of its own (15 s to reach the destination), then the circuit's limits;
            # it resets the stream on failure and closes it when the circuit ends.
            await self._handle_connect(stream, msg)
        else:
            await self._close_stream(stream)

    async def _handle_stop_stream(self, stream: INetStream) -> None:
        with trio.move_on_after(STOP_TIMEOUT) as scope:
            await super()._handle_stop_stream(stream)
        if scope.cancelled_caught:
            await _reset(stream)


async def _reset(stream: INetStream) -> None:
    with contextlib.suppress(Exception):  # the peer may have reset it already
        await stream.reset()


@dataclass(frozen=True)
class Reservation:
    relay: ID
    expire: float  # unix time
    addrs: tuple[str, ...]  # our circuit addresses through this relay, ending in /p2p/<us>
    took_ms: float = 0.0  # RESERVE round trip, for the logs


async def reserve(host: IHost, relay: ID) -> Reservation:
    """Sends RESERVE on a fresh HOP stream. Our own ~10 lines instead of the library's
    `_make_reservation`, which drops the relay addresses the answer carries. Raises on refusal."""
    t0 = time.perf_counter()
    stream = await host.new_stream(relay, [HOP_PROTOCOL_ID])
    try:
        with trio.fail_after(RESERVE_TIMEOUT):
            await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
            answer = await read_delimited_msg(stream, HopMessage)
    finally:
        with contextlib.suppress(Exception):
            await stream.close()
    status = StatusCode(answer.status) if answer.HasField("status") else StatusCode.OK
    if status != StatusCode.OK or not answer.HasField("reservation"):
        raise ConnectionError(f"relay {relay} refused the reservation: {status.name}")
    me = host.get_id()
    addrs = []
    for raw in answer.reservation.addrs[:8]:  # a relay's answer is untrusted input
        try:
            a = multiaddr.Multiaddr(raw)
        except Exception:
            continue
        base = str(a).split("/p2p/")[0]
        if "/tcp/" in base and not is_circuit_addr(base):
            addrs.append(f"{base}/p2p/{relay}/p2p-circuit/p2p/{me}")
    took_ms = (time.perf_counter() - t0) * 1e3
    return Reservation(relay, float(answer.reservation.expire), tuple(addrs), took_ms)


class RelayService:
    """Relay roles of one host. `on_addrs_changed` receives our circuit addresses whenever the
    set of reservations changes (the daemon advertises them)."""

    def __init__(
        self,
        host: IHost,
        *,
        offer_hop: bool,
        on_addrs_changed: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.host = host
        self.protocol = SafeRelayProtocol(host, limits=RELAY_LIMITS, allow_hop=offer_hop)
        # STOP role only: with the default roles (STOP | CLIENT) every relayed *dial* also sends
        # a RESERVE, using up a slot on the relay for nothing.
        self.transport = CircuitV2Transport(host, self.protocol, RelayConfig(roles=RelayRole.STOP))
        self.reservations: dict[ID, Reservation] = {}
        self._on_addrs_changed = on_addrs_changed
        self._nursery: trio.Nursery | None = None
        self._private = False  # adopt("private") ran: we hold reservations and keep them up
        self._refreshing: set[ID] = set()  # relays with a `_refresh` task

    @property
    def offers_hop(self) -> bool:
        return self.protocol.allow_hop and self.protocol.hop_enabled

    def circuit_addrs(self) -> list[str]:
        return [a for r in self.reservations.values() for a in r.addrs]

    def reservations_for_others(self) -> int:
        """Live slots we hold as a relay for private peers (for metrics; py-libp2p keeps them
        in its resource manager and drops expired ones only when it next reserves)."""
        held = getattr(self.protocol.resource_manager, "_reservations", {})
        now = time.time()
        return sum(1 for r in held.values() if getattr(r, "expires_at", 0) > now)

    async def run(
        self, *, task_status: trio.TaskStatus[RelayService] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # Upstream logs an empty ERROR each time a circuit or HOP stream ends (EOF): noise.
        log_protocol.setLevel(max(log_protocol.level, logging.CRITICAL))
        async with background_trio_service(self.protocol), trio.open_nursery() as nursery:
            await self.protocol.event_started.wait()  # HOP (if offered) and STOP registered
            self._nursery = nursery
            self.host.get_network().register_notifee(_RelayWatch(self))
            task_status.started(self)
            await trio.sleep_forever()

    def stop_offering_hop(self) -> None:
        if self.protocol.allow_hop and self.protocol.hop_enabled:
            self.protocol.hop_enabled = False
            self.host.remove_stream_handler(HOP_PROTOCOL_ID)

    async def adopt(self, status: str) -> list[str]:
        """Acts on our reachability: private → no HOP, reserve on connected relays; returns our
        circuit addresses (empty when public, or when no connected peer would relay for us)."""
        if status != "private":
            return []
        self.stop_offering_hop()
        self._private = True
        await self._reserve_more()
        if not self.reservations:
            log.warning("we are not directly reachable and no connected peer relays for us")
        return self.circuit_addrs()

    async def _reserve_more(self) -> None:
        """Reserves on connected peers (those that list HOP first) until RESERVATIONS_WANTED
        relays hold a slot for us."""
        candidates = [p for p in self.host.get_connected_peers() if p != self.host.get_id()]
        # Peers whose identify lists HOP first; the others are tried too (identify may lag).
        store = self.host.get_peerstore()

        def offers_hop(p: ID) -> bool:
            with contextlib.suppress(Exception):
                return bool(store.supports_protocols(p, [HOP_PROTOCOL_ID]))
            return False

        candidates.sort(key=lambda p: not offers_hop(p))
        for relay in candidates:
            if len(self.reservations) >= RESERVATIONS_WANTED:
                break
            if relay in self.reservations:
                continue
            try:
                r = await reserve(self.host, relay)
                log.info("reserved on %s in %.1f ms: %s", relay, r.took_ms, list(r.addrs))
                self._add(r)
            except Exception as e:  # no HOP protocol, limit reached, or gone
                log.info("no reservation on %s: %s", relay, e)

    def lost(self, relay: ID) -> None:
        """Our last connection to `relay` closed: its circuit address no longer reaches us.
        Withdrawn at once (peers would dial it in vain until the reservation expired, an hour),
        and another connected relay is asked for a slot."""
        if self.reservations.pop(relay, None) is None:
            return
        log.warning("lost relay %s: its circuit address withdrawn", relay)
        self._changed()
        if self._private and self._nursery is not None:
            self._nursery.start_soon(self._reserve_more)

    def _add(self, r: Reservation) -> None:
        self.reservations[r.relay] = r
        self._changed()
        assert self._nursery is not None, "RelayService.run must be started first"
        if r.relay not in self._refreshing:  # a relay lost and regained keeps its one task
            self._refreshing.add(r.relay)
            self._nursery.start_soon(self._refresh, r.relay)

    def _changed(self) -> None:
        if self._on_addrs_changed is not None:
            self._on_addrs_changed(self.circuit_addrs())

    async def _refresh(self, relay: ID) -> None:
        """Keeps the reservation on `relay` alive; drops it (and its addresses) once it expires
        without a successful refresh. Cancelled with the service."""
        try:
            await self._keep(relay)
        finally:
            self._refreshing.discard(relay)

    async def _keep(self, relay: ID) -> None:
        while (r := self.reservations.get(relay)) is not None:
            left = r.expire - time.time()
            await trio.sleep(max(1.0, left * REFRESH_AT))
            while relay in self.reservations:
                try:
                    self._update(await reserve(self.host, relay))
                    break
                except Exception as e:
                    current = self.reservations.get(relay)
                    if current is None:  # lost meanwhile (RelayService.lost)
                        return
                    if current.expire - time.time() <= REFRESH_RETRY:
                        log.warning("reservation on %s expired: %s", relay, e)
                        del self.reservations[relay]
                        self._changed()
                        return
                    await trio.sleep(REFRESH_RETRY)

    def _update(self, r: Reservation) -> None:
        old = self.reservations.get(r.relay)
        self.reservations[r.relay] = r
        if old is None or old.addrs != r.addrs:
            self._changed()


class _RelayWatch(INotifee):
    """Tells the service when the last connection to a relay we hold a slot on closes."""

    def __init__(self, service: RelayService) -> None:
        self.service = service

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        with contextlib.suppress(Exception):  # a connection torn down half-made has no peer
            peer = conn.muxed_conn.peer_id
            if peer in self.service.reservations and not any(
                not c.is_closed for c in network.get_connections(peer)
            ):
                self.service.lost(peer)

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass
