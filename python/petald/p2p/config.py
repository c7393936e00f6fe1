"""`P2PConfig`: everything the libp2p layer takes from the command line, validated once so a bad
flag is a clear error at start-up rather than a failure deep inside py-libp2p."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import multiaddr
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

# Tests pass 127.0.0.1 port 0; a home server listens on every interface, port chosen by the OS.
DEFAULT_LISTEN = ("/ip4/0.0.0.0/tcp/0",)
# auto: ask connected peers to dial us back after joining (petald.p2p.dialback); public/private:
# trust the operator (e.g. a known port forward, or a host known to be behind a NAT).
REACHABILITY_MODES = ("auto", "public", "private")


def parse_multiaddr(text: str, *, what: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(text)
    except Exception as e:  # multiaddr raises a family of unrelated exception types
        raise ValueError(
            f"{what} {text!r} is not a multiaddr ({e}); e.g. /ip4/1.2.3.4/tcp/31337"
        ) from e


def parse_peer_addr(text: str) -> PeerInfo:
    addr = parse_multiaddr(text, what="initial peer")
    try:
        return info_from_p2p_addr(addr)
    except Exception as e:
        raise ValueError(
            f"initial peer {text!r} has no peer id; give the full address a daemon prints, "
            f"ending in /p2p/<peer id>"
        ) from e


@dataclass(frozen=True)
class P2PConfig:
    listen: tuple[str, ...] = DEFAULT_LISTEN
    announce: tuple[str, ...] = ()
    initial_peers: tuple[str, ...] = ()
    new_swarm: bool = False
    identity: Path | None = None
    # Seconds to reach at least one initial peer before giving up at start-up.
    connect_timeout: float = 15.0
    reachability: str = "auto"
    # Offer circuit relay (HOP) service to private peers while we are publicly reachable.
    relay: bool = True
    # A private swarm's pre-shared key file (petald.p2p.pnet): only peers with the same key
    # can connect to us, or we to them.
    swarm_key: Path | None = None

    def __post_init__(self) -> None:
        if not self.listen:
            raise ValueError("give at least one --listen address")
        for a in self.listen:
            addr = parse_multiaddr(a, what="listen address")
            if "tcp" not in [p.name for p in addr.protocols()]:
                raise ValueError(f"listen address {a!r} is not TCP; petald listens on TCP only")
        for a in self.announce:
            parse_multiaddr(a, what="announce address")
        for a in self.initial_peers:
            parse_peer_addr(a)
        if self.new_swarm and self.initial_peers:
            raise ValueError("--new-swarm starts a swarm with no peers; drop --initial-peers or it")
        if not self.new_swarm and not self.initial_peers:
            raise ValueError(
                "no swarm to join: give --initial-peers MULTIADDR... or start one with --new-swarm"
            )
        if self.reachability not in REACHABILITY_MODES:
            raise ValueError(f"--reachability must be one of {', '.join(REACHABILITY_MODES)}")
        if self.connect_timeout <= 0:
            raise ValueError("connect timeout must be positive")
        self.swarm_key_bytes()  # a missing or malformed key file is an error at start-up

    def swarm_key_bytes(self) -> bytes | None:
        from petald.p2p.pnet import load_key

        return None if self.swarm_key is None else load_key(self.swarm_key)

    def listen_addrs(self) -> list[multiaddr.Multiaddr]:
        return [parse_multiaddr(a, what="listen address") for a in self.listen]

    def announce_addrs(self) -> list[multiaddr.Multiaddr]:
        return [parse_multiaddr(a, what="announce address") for a in self.announce]

    def initial_peer_infos(self) -> list[PeerInfo]:
        return [parse_peer_addr(a) for a in self.initial_peers]
