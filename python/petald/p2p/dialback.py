"""The `/petald/dialback/1.0.0` protocol: "am I directly dialable?", answered by peers we already
know, with no central service. `DialBackService` is the helper side (every daemon runs it);
`check_reachability(host, helpers)` is the asking side and returns a `Reachability`.

Why not AutoNAT v1 from py-libp2p: its server dials back with `host.connect()`, which returns at
once because the requester is already connected to it, so it reports closed ports as reachable.
Here the helper dials from a throw-away *prober* host with its own peer id, so a success means a
Noise handshake authenticated the requester's peer id at that address.

Wire: the requester writes one JSON line `{"addrs": [multiaddr, ...]}`; the helper answers one
JSON line `{"observed": "ip:port", "results": {addr: "ok" | "failed" | "refused_..."}}`."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Literal

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from petald.p2p.pnet import protect
from petald.p2p.relay import is_circuit_addr, is_relayed

log = logging.getLogger(__name__)

PROTOCOL_ID = TProtocol("/petald/dialback/1.0.0")
# A request is a short JSON line; anything longer is not ours and is cut off.
MAX_REQUEST_BYTES = 4096
MAX_RESPONSE_BYTES = 16384
# Addresses probed per request: bounds the work one request can make us do (4 x PROBE_TIMEOUT).
MAX_ADDRS = 4
# Seconds for one dial-back (TCP + Noise + yamux). A reachable peer answers in milliseconds.
PROBE_TIMEOUT = 3.0
# Whole request, queueing for the probe lock included; slow-loris requesters are cut off.
REQUEST_TIMEOUT = PROBE_TIMEOUT * MAX_ADDRS + 5.0
# Seconds a successful probe connection stays open: the requester opens identify and gossipsub
# streams on every new connection, and logs errors for each one if we hang up mid-handshake.
PROBE_LINGER = 0.3
# Seconds between two requests served to the same peer: a peer cannot make us dial in a loop.
MIN_INTERVAL_PER_PEER = 5.0
MAX_TRACKED_PEERS = 1024
# Helpers asked per check; the first answers decide.
MAX_HELPERS = 3

Status = Literal["public", "private", "unknown"]


@dataclass(frozen=True)
class Reachability:
    """`public`: a helper reached us at `dialable` addrs. `private`: every helper that answered
    failed (or refused: our address is not the one it sees us from). `unknown`: nobody answered."""

    status: Status
    dialable: tuple[str, ...] = ()
    helpers: int = 0
    observed: tuple[str, ...] = field(default=())


def _prober_host(swarm_key: bytes | None = None) -> IHost:
    """A non-listening host with a fresh identity, Noise + yamux only, and no dial retries: one
    failed attempt is the answer, retrying only delays it (~0.7 s of backoff by default). In a
    private swarm it has the swarm key, or it could reach no one."""
    kp = create_new_key_pair()
    noise = NoiseTransport(kp, noise_privkey=create_x25519_key_pair().private_key)
    host = new_host(
        key_pair=kp,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        enable_mDNS=False,
        enable_upnp=False,
    )
    host.get_network().retry_config = RetryConfig(max_retries=0)  # type: ignore[attr-defined]
    protect(host, swarm_key)
    return host


async def _read_line(stream: INetStream, limit: int) -> bytes:
    buf = bytearray()
    while b"\n" not in buf:
        chunk = await stream.read(limit - len(buf))
        if not chunk:
            break
        buf += chunk
        if len(buf) >= limit and b"\n" not in buf:
            raise ValueError(f"line longer than {limit} bytes")
    return bytes(buf).split(b"\n", 1)[0]


class DialBackService:
    """Helper side. Refuses requests over relayed connections (the observed address would be
    the relay's), dials only addresses whose IP is the one the request came from (so we cannot
    be used to attack third parties), one probe at a time, one request per peer per
    MIN_INTERVAL_PER_PEER. Start with `await nursery.start(service.run)`."""

    def __init__(self, host: IHost, swarm_key: bytes | None = None) -> None:
        self.host = host
        self._prober = _prober_host(swarm_key)
        self._lock = trio.Lock()
        self._last_served: dict[ID, float] = {}
        self.served = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._prober.run(listen_addrs=[]):
            self.host.set_stream_handler(PROTOCOL_ID, self._on_stream)
            task_status.started()
            await trio.sleep_forever()

    def _rate_limited(self, peer: ID) -> bool:
        now = trio.current_time()
        last = self._last_served.get(peer)
        if last is not None and now - last < MIN_INTERVAL_PER_PEER:
            return True
        if len(self._last_served) >= MAX_TRACKED_PEERS:
            self._last_served = {
                p: t for p, t in self._last_served.items() if now - t < MIN_INTERVAL_PER_PEER
            }
        self._last_served[peer] = now
        return False

    async def _on_stream(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                if is_relayed(stream.muxed_conn):
                    response: dict = {"error": "refused: request over a relayed connection"}
                elif self._rate_limited(peer):
                    response = {"error": "refused: too many requests"}
                else:
                    request = json.loads(await _read_line(stream, MAX_REQUEST_BYTES))
                    addrs = request.get("addrs") if isinstance(request, dict) else None
                    if not isinstance(addrs, list):
                        raise ValueError("no addrs list")
                    observed = stream.get_remote_address()
                    results = {}
                    async with self._lock:
                        for a in addrs[:MAX_ADDRS]:
                            results[str(a)[:200]] = await self._probe(peer, a, observed)
                    self.served += 1
                    response = {
                        "observed": f"{observed[0]}:{observed[1]}" if observed else None,
                        "results": results,
                    }
                await stream.write((json.dumps(response) + "\n").encode())
                await stream.close()
        except Exception as e:  # a bad request must never take the daemon down
            log.debug("dial-back request from %s failed: %s", peer, e)
            with contextlib.suppress(Exception):
                await stream.reset()

    async def _probe(self, peer: ID, addr: object, observed: tuple[str, int] | None) -> str:
        try:
            ma = multiaddr.Multiaddr(str(addr))
            ip = ma.value_for_protocol("ip4")
            ma.value_for_protocol("tcp")
        except Exception:
            return "bad_addr"
        if is_circuit_addr(ma):
            return "refused_circuit_addr"
        if observed is None or ip != observed[0]:
            return "refused_ip_mismatch"
        try:
            with trio.fail_after(PROBE_TIMEOUT):
                await self._prober.connect(PeerInfo(peer, [ma]))
            await trio.sleep(PROBE_LINGER)
            return "ok"
        except trio.TooSlowError:
            return "failed"
        except Exception:  # dial errors come in many py-libp2p types and exception groups
            return "failed"
        finally:
            with contextlib.suppress(Exception):
                await self._prober.disconnect(peer)
            # A failed dial puts the peer in the prober's 60 s negative cache: the next
            # request (a peer whose address changed) must really be dialed again.
            self._prober.get_network().unblock_peer(peer)


def own_dialable_addrs(host: IHost) -> list[str]:
    """Our TCP addresses worth testing, without /p2p (announced and listen ones, no wildcards,
    no circuits)."""
    out: list[str] = []
    for a in [*host.get_addrs(), *host.get_transport_addrs()]:
        if is_circuit_addr(a):
            continue
        text = str(a).split("/p2p/")[0]
        if "/ip4/0.0.0.0/" in text or "/tcp/" not in text or text in out:
            continue
        out.append(text)
    return out[:MAX_ADDRS]


async def ask_helper(host: IHost, helper: ID, addrs: list[str]) -> dict:
    stream = await host.new_stream(helper, [PROTOCOL_ID])
    try:
        with trio.fail_after(REQUEST_TIMEOUT + 2):
            await stream.write((json.dumps({"addrs": addrs}) + "\n").encode())
            answer = json.loads(await _read_line(stream, MAX_RESPONSE_BYTES))
        if not isinstance(answer, dict) or not isinstance(answer.get("results"), dict):
            raise ValueError(f"helper {helper} answered {str(answer)[:200]!r}")
        return answer
    finally:
        with contextlib.suppress(Exception):
            await stream.close()


async def check_reachability(host: IHost, helpers: list[ID]) -> Reachability:
    """Asks up to MAX_HELPERS of `helpers` (connected peers) concurrently to dial us back.
    One helper reaching us is enough for public (it authenticated our peer id at that address);
    private needs at least one answer and no success. Cancel-safe."""
    addrs = own_dialable_addrs(host)
    answers: list[dict] = []

    async def one(helper: ID) -> None:
        try:
            answers.append(await ask_helper(host, helper, addrs))
        except Exception as e:  # an old peer without the protocol, or one that left
            log.debug("dial-back helper %s: %s", helper, e)

    if not addrs:
        return Reachability("unknown")
    async with trio.open_nursery() as nursery:
        for h in helpers[:MAX_HELPERS]:
            nursery.start_soon(one, h)
    ok = sorted({a for r in answers for a, v in r["results"].items() if v == "ok"})
    observed = tuple(sorted({str(r.get("observed")) for r in answers}))
    if ok:
        return Reachability("public", tuple(ok), len(answers), observed)
    if answers:
        return Reachability("private", (), len(answers), observed)
    return Reachability("unknown")


async def determine_reachability(host: IHost, mode: str) -> Reachability:
    """`--reachability`: `auto` asks our connected peers (call it after joining); `public` and
    `private` are the operator's word and are not checked."""
    if mode in ("public", "private"):
        return Reachability(mode)  # type: ignore[arg-type]
    helpers = [p for p in host.get_connected_peers() if p != host.get_id()]
    return await check_reachability(host, helpers)
