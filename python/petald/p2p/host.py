"""`P2PHost`: a trio service around a py-libp2p host with exactly the stack petald speaks —
TCP, Noise (no plaintext, TLS or secio: py-libp2p accepts all of them by default), yamux,
identify and ping — joined to the swarm through the initial peers.

Run it with `await nursery.start(host.run)` (started once listening), start the services that
must see every connection, then `await host.join()` to connect to the initial peers. When we
turn out to be private, `set_circuit_addrs` adds our relay addresses to what we advertise."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import multiaddr
import trio
from libp2p import create_yamux_muxer_option, new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from petald.errors import PeerUnavailable, SwarmKeyMismatch
from petald.p2p.config import P2PConfig
from petald.p2p.limits import StreamLimits
from petald.p2p.pnet import Protector, protect, refusal_error

log = logging.getLogger(__name__)

# py-libp2p waits for up to max_connections_per_peer connections on connect(); with 1 a connect
# takes ~5 ms instead of ~250 ms (shared/notes/py-libp2p.md).
MAX_CONNECTIONS_PER_PEER = 1


def build_host(key_pair: KeyPair, config: P2PConfig) -> IHost:
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    return new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt=create_yamux_muxer_option(),
        listen_addrs=config.listen_addrs(),
        announce_addrs=config.announce_addrs() or None,
        connection_config=ConnectionConfig(max_connections_per_peer=MAX_CONNECTIONS_PER_PEER),
        enable_mDNS=False,  # no LAN discovery: a private swarm stays private
        enable_upnp=False,
    )


class P2PHost:
    """Owns the libp2p host for the daemon's lifetime."""

    def __init__(self, key_pair: KeyPair, config: P2PConfig) -> None:
        self.config = config
        self.host = build_host(key_pair, config)
        # Private swarms (and, without a key, telling a private swarm's peer from a dead one).
        self.pnet: Protector = protect(self.host, config.swarm_key_bytes())
        # Per-peer inbound stream cap and a guard around every handler, registered before any
        # service adds its own (petald.p2p.limits).
        self.stream_limits = StreamLimits(self.host).install()
        self._circuit_addrs: list[multiaddr.Multiaddr] = []
        # Identify (and so the DHT's peer records) advertises host.get_addrs(); our relay
        # addresses must be in it. new_host's addrs_factory cannot carry them: BasicHost strips
        # the first /p2p/ component of each address, which in a circuit address is the relay's.
        listen_addrs = self.host.get_addrs

        def advertised() -> list[multiaddr.Multiaddr]:
            return [*self._circuit_addrs, *listen_addrs()]

        self.host.get_addrs = advertised  # type: ignore[method-assign]

    def set_circuit_addrs(self, addrs: Sequence[str]) -> None:
        """Advertises our /p2p-circuit addresses (first: when we are private they are the ones
        that work) beside the listen addresses. Peers connected already learn them with the next
        identify (`push_addrs`)."""
        self._circuit_addrs = [multiaddr.Multiaddr(a) for a in addrs]

    async def push_addrs(self, *, timeout: float = 10.0) -> None:
        """Identify-push to every connected peer, so they learn address changes now."""
        from libp2p.identity.identify_push.identify_push import push_identify_to_peers

        with trio.move_on_after(timeout):
            try:
                await push_identify_to_peers(self.host)
            except Exception as e:  # a peer that left mid-push; the others got it
                log.debug("identify push: %s", e)

    @property
    def peer_id(self) -> str:
        return str(self.host.get_id())

    def addrs(self) -> list[str]:
        """Full multiaddrs others can dial, each ending in /p2p/<peer id>."""
        return [str(a) for a in self.host.get_addrs()]

    async def connect(self, peer: PeerInfo, *, timeout: float) -> None:
        """Connects to `peer` or raises `PeerUnavailable` (`SwarmKeyMismatch` when the peer is
        on the other side of a swarm key). Cancel-safe."""
        try:
            with trio.fail_after(timeout):
                await self.host.connect(peer)
        except trio.TooSlowError as e:
            self._raise_if_mismatch(peer, e)
            raise PeerUnavailable(f"{peer.peer_id}: no connection within {timeout:.0f} s") from e
        except (OSError, trio.BrokenResourceError) as e:
            self._raise_if_mismatch(peer, e)
            raise PeerUnavailable(f"{peer.peer_id}: {e}") from e
        except Exception as e:  # py-libp2p wraps dial errors in its own (and in groups)
            self._raise_if_mismatch(peer, e)
            raise PeerUnavailable(f"{peer.peer_id}: {e}") from e

    def _raise_if_mismatch(self, peer: PeerInfo, e: BaseException) -> None:
        error = refusal_error(self.host, peer)
        if error is not None:
            raise error from e

    async def _join(self, peers: Sequence[PeerInfo]) -> int:
        """Connects to the initial peers concurrently; returns how many answered."""
        ok = 0
        self._mismatched: list[SwarmKeyMismatch] = []

        async def one(p: PeerInfo) -> None:
            nonlocal ok
            try:
                await self.connect(p, timeout=self.config.connect_timeout)
                ok += 1
            except SwarmKeyMismatch as e:
                self._mismatched.append(e)
            except PeerUnavailable as e:
                log.warning("initial peer unreachable: %s", e)

        async with trio.open_nursery() as nursery:
            for p in peers:
                nursery.start_soon(one, p)
        return ok

    async def join(self) -> None:
        """Connects to the initial peers; raises `PeerUnavailable` if none answers. Separate
        from `run` so services that must see every connection (gossipsub) start in between."""
        peers = self.config.initial_peer_infos()
        if peers and await self._join(peers) == 0:
            if self._mismatched:  # the one-line error of the side that tried to connect
                raise self._mismatched[0]
            raise PeerUnavailable(
                "none of the initial peers answered; check the addresses, or start a new "
                "swarm with --new-swarm"
            )

    async def run(
        self, *, task_status: trio.TaskStatus[P2PHost] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listens until cancelled; reports started once listening (not yet joined)."""
        listen: list[multiaddr.Multiaddr] = self.config.listen_addrs()
        async with self.host.run(listen_addrs=listen):
            task_status.started(self)
            await trio.sleep_forever()
