"""`SwarmClient`: a client-mode peer for synchronous code. Research scripts and HF `generate()`
are synchronous, so the client runs one trio loop in a background thread that owns the peer's
stack (DHT client mode, listening to announcements into a `SwarmView`, announcing nothing);
the caller's thread hands coroutines to it with `run(...)` and blocks on a lock for the answer
(the GIL is released while it waits; nothing polls). It also keeps what every route planned
through it shares: the bans of peers that failed, measured round-trip times, the planner.

    with SwarmClient(["/ip4/.../p2p/Qm..."]) as client:
        client.wait_for_blocks("tiny-llama", 4, timeout=30)
        seq = RemoteSequential(client, "tiny-llama", 4)"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from petald.client.routing import PeerBans, RoutePlanner, RoutingPolicy, missing_blocks
from petald.client.rpc import call_info
from petald.client.trust import WEIGHTS_POLICIES, TrustedWeights, WeightsFilter, WeightsPolicy
from petald.client.tuning import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS
from petald.dht.node import DhtConfig
from petald.errors import PeerUnavailable, PetaldError, RoutingError, SessionClosed
from petald.p2p.config import P2PConfig
from petald.p2p.pnet import load_key
from petald.p2p.swarm_view import ServerEntry, SwarmView
from petald.stack import Stack, build_stack
from petald.types import BlockRange

log = logging.getLogger(__name__)
T = TypeVar("T")

# While waiting for blocks, the DHT is re-read this often (seconds): gossip can drop messages
# and a client that joined after a server's last gossip only learns of it from the DHT.
DHT_REREAD = 1.0
# Peers probed at once when measuring round trips (each probe is one `info` stream).
PROBE_CONCURRENCY = 8


@dataclass(frozen=True)
class ClientConfig:
    initial_peers: tuple[str, ...]
    # A client is never dialed back (it announces nothing), so loopback is enough by default.
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    start_timeout: float = 30.0  # seconds to join the swarm
    connect_timeout: float = 10.0  # seconds to reach a peer and open a stream
    request_timeout: float = 60.0  # seconds for one forward/backward answer
    step_timeout: float = 30.0  # seconds for one inference step's answer
    max_attempts: int = 6  # servers tried for one hop before giving up
    codec: str = "none"  # how servers encode their answers
    # Inference steps through several servers: each server pushes its output straight to the
    # next one (petald.server.push), one network leg per hop instead of two; False: the client
    # relays every hop's output itself (as servers that take no pushes are always used).
    pass_activations: bool = True
    policy: RoutingPolicy = field(default_factory=RoutingPolicy)
    # A private swarm's pre-shared key file (petald.p2p.pnet), as `--swarm-key` takes it.
    swarm_key: Path | None = None
    # Verified computation (petald.client.verify): the fraction of inference steps re-run on a
    # second server (0: off, the default: a check costs another server's compute and shows it
    # your activations too; 0.05-0.1 on a public swarm), the seed of which steps, and K in the
    # comparison tolerance K * eps(dtype) * max|output| * sqrt(blocks).
    verify_fraction: float = 0.0
    verify_seed: int | None = None
    verify_k: float = 8.0
    # Weight hashes (petald.client.trust): "off", "majority" or "trusted"; None: "trusted" when
    # a `trusted_weights` file (`petald weights-hash`) is given, else "off".
    weights_policy: WeightsPolicy | None = None
    trusted_weights: Path | None = None

    def __post_init__(self) -> None:
        if not self.initial_peers:
            raise ValueError("give the multiaddr of at least one swarm peer (initial_peers)")
        if self.swarm_key is not None:
            load_key(self.swarm_key)  # a missing or malformed key file fails here, not later
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0.0 <= self.verify_fraction <= 1.0:  # NaN fails too
            raise ValueError(f"verify_fraction {self.verify_fraction}: give a fraction in [0, 1]")
        if not 0.0 < self.verify_k < math.inf:
            raise ValueError("verify_k must be a positive number")
        if self.weights_policy is not None and self.weights_policy not in WEIGHTS_POLICIES:
            raise ValueError(
                f"weights policy {self.weights_policy!r}: use one of {', '.join(WEIGHTS_POLICIES)}"
            )
        self.weights_filter()  # a missing or malformed trusted weights file fails here

    def weights_filter(self) -> WeightsFilter:
        """The filter of servers by announced weight hashes this config asks for."""
        trusted = TrustedWeights.load(self.trusted_weights) if self.trusted_weights else None
        policy = self.weights_policy or ("trusted" if trusted else "off")
        return WeightsFilter(policy, trusted)


def serial_torch_in_this_thread() -> bool:
    """Makes torch run single-threaded in the calling thread only (its OpenMP `nthreads` ICV, which
    is per thread); other threads keep their setting. Returns False where the OpenMP runtime's
    `omp_set_num_threads` is not reachable (then nothing changed).

    Why the client's loop thread needs it: the loop decodes answers, concatenates the session
    history and encodes requests with torch. Once one of those ops is big enough to go parallel
    (over 32768 elements, e.g. the history of ~57 tokens of SmolLM2), GNU OpenMP gives this thread
    a thread team of its own, beside the one of the thread that runs the user's model. The
    process then manages more OpenMP threads than it has CPUs, and libgomp cuts every team's
    spin-wait to 100 iterations (`gomp_throttled_spin_count_var`, libgomp/env.c): each parallel
    region then wakes sleeping threads with a futex, and a local model in the same process
    decoded at 18 instead of 32 tokens/s until the loop thread ended. Not `torch.set_num_threads`:
    it also sets the default of every thread started later in the process (the user's)."""
    torch.get_num_threads()  # torch's lazy per-thread init sets the ICV: let it run first
    setter = getattr(ctypes.CDLL(None), "omp_set_num_threads", None)
    if setter is None:
        return False
    setter(1)
    return torch.get_num_threads() == 1


def _leaf(error: BaseException) -> BaseException:
    """trio wraps a start-up failure in exception groups; the caller wants the one error."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


class SwarmClient:
    def __init__(
        self,
        initial_peers: Sequence[str] = (),
        *,
        config: ClientConfig | None = None,
        key_pair: KeyPair | None = None,
    ) -> None:
        self.config = config or ClientConfig(initial_peers=tuple(initial_peers))
        self.key_pair = key_pair or create_new_key_pair()
        self.planner = RoutePlanner(self.config.policy)
        self.bans = PeerBans()  # loop thread only, like everything below
        self.weights = self.config.weights_filter()
        self.rtts: dict[str, float] = {}
        # (max_batch, max_tokens) per request, from each probed peer's `info`.
        self.limits: dict[str, tuple[int, int]] = {}
        self.stack: Stack | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._closed = False
        self._lock = threading.Lock()

    # ---- lifecycle (caller's thread) -------------------------------------------------------

    def start(self) -> SwarmClient:
        """Joins the swarm; raises what stopped it (e.g. `PeerUnavailable`) within
        `start_timeout`."""
        with self._lock:
            if self._thread is not None or self._closed:
                raise SessionClosed("a SwarmClient starts once; make a new one")
            # A daemon thread: a client someone forgot to close must not keep the process alive
            # at exit (close() or the with-block is the way to leave the swarm cleanly).
            self._thread = threading.Thread(
                target=self._thread_main, name="petald-client", daemon=True
            )
            self._thread.start()
        # The loop bounds its own start-up by start_timeout; the margin covers its teardown.
        if not self._ready.wait(self.config.start_timeout + 10) or self._token is None:
            self.close()
            raise self._error or PeerUnavailable("the client did not start in time")
        return self

    def close(self) -> None:
        """Leaves the swarm and stops the loop thread. Idempotent; safe after a failed start."""
        with self._lock:
            self._closed = True
            thread, token, stop = self._thread, self._token, self._stop
        if token is not None and stop is not None:
            with contextlib.suppress(trio.RunFinishedError):  # the loop has ended already
                trio.from_thread.run_sync(stop.set, trio_token=token)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)

    def __enter__(self) -> SwarmClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _thread_main(self) -> None:
        serial_torch_in_this_thread()
        try:
            trio.run(self._main)
        except BaseException as e:  # reported to start(); after start, calls see the loop end
            self._error = _leaf(e)
            if self._token is not None:
                log.warning("client loop ended: %r", self._error)
        finally:
            self._ready.set()

    async def _main(self) -> None:
        p2p = P2PConfig(
            listen=self.config.listen,
            initial_peers=self.config.initial_peers,
            swarm_key=self.config.swarm_key,
        )
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            stack = build_stack(self.key_pair, p2p, dht_config=DhtConfig(client_mode=True))
            try:
                with trio.fail_after(self.config.start_timeout):
                    self.stack = await stack.start(nursery)
            except trio.TooSlowError:
                limit = self.config.start_timeout
                raise PeerUnavailable(f"could not join the swarm within {limit:.0f} s") from None
            self._stop = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Runs `await fn(*args)` on the client's loop and returns its result (or raises)."""
        if self._closed or self._token is None:
            raise SessionClosed("the SwarmClient is not running (start it, or it was closed)")
        try:
            return trio.from_thread.run(fn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            raise SessionClosed(f"the client's loop has stopped ({self._error!r})") from None

    # ---- the swarm (caller's thread) -------------------------------------------------------

    def servers(self, model: str) -> list[ServerEntry]:
        """The live servers of `model` this client knows of."""
        return self.run(self._servers_async, model)

    async def _servers_async(self, model: str) -> list[ServerEntry]:
        return self.live_servers(model)

    def wait_for_blocks(self, model: str, n_blocks: int, timeout: float = 30.0) -> None:
        """Returns once online servers of `model` cover blocks [0, n_blocks); raises
        `RoutingError` naming the missing blocks after `timeout` seconds."""
        if n_blocks < 1 or timeout < 0:
            raise ValueError("n_blocks must be >= 1 and timeout >= 0")
        self.run(self._wait_for_blocks, model, BlockRange(0, n_blocks), timeout)

    # ---- loop side: used by RemoteSequential and InferenceSession --------------------------

    @property
    def view(self) -> SwarmView:
        assert self.stack is not None and self.stack.announcer is not None
        return self.stack.announcer.view

    def live_servers(self, model: str, adapter: str | None = None) -> list[ServerEntry]:
        """`model`'s servers in the view; with `adapter`, only those that announce it."""
        servers = self.weights(self.view.servers(model, now=time.time()))
        if adapter is None:
            return servers
        return [e for e in servers if adapter in e.info.adapters]

    def banned(self) -> set[str]:
        return self.bans.banned(trio.current_time())

    def route_bans(self, model: str, adapter: str | None = None) -> set[str]:
        """The peers a route must avoid: the banned ones, except a peer banned merely for
        failing (not for wrong outputs, not busy: PeerBans.firm) that is the only online server
        of one of its blocks. With no other server to go to, a peer that failed once (its relay
        lost, a dropped connection) is worth another try; without this its blocks had no route
        until the ban ended."""
        banned = self.banned()
        if not banned:
            return banned
        servers = self.live_servers(model, adapter)
        covered = {
            b
            for e in self.planner.eligible(servers, model, banned)
            for b in range(e.info.blocks.start, e.info.blocks.end)
        }
        back = {
            e.peer_id
            for e in self.planner.eligible(servers, model, self.bans.firm(trio.current_time()))
            if e.peer_id in banned
            and any(b not in covered for b in range(e.info.blocks.start, e.info.blocks.end))
        }
        if back:
            log.info("trying banned %s again: no other online server holds its blocks", back)
        return banned - back

    def ban(
        self, peer: str, error: BaseException, *, at_least: float = 0.0, hard: float = 0.0
    ) -> None:
        """Leaves `peer` out of routes for a while (PeerBans), at least `at_least` s and at
        least the `retry_after` a busy server asked for (bounded by the bans' cap: it is the
        peer's word), and at least `hard` s (not bounded: our own verdict)."""
        retry = getattr(error, "retry_after", None)
        if isinstance(retry, float) and math.isfinite(retry):
            at_least = max(at_least, retry)
        seconds = self.bans.ban(peer, trio.current_time(), at_least=at_least, hard=hard)
        self.rtts.pop(peer, None)
        log.info("banned %s for %.0f s: %s", peer, seconds, error)
        if getattr(error, "stalled", False) and self._nursery is not None:
            # A connection that stopped answering may be dead with neither side told (a
            # partition): streams opened on it later would stall too, even after the network
            # heals. Close it; the next stream dials a new one.
            self._nursery.start_soon(self._disconnect, peer)

    async def _disconnect(self, peer: str) -> None:
        assert self.stack is not None
        with trio.move_on_after(self.config.connect_timeout), contextlib.suppress(Exception):
            await self.stack.host.host.disconnect(ID.from_base58(peer))

    async def watch(self, model: str) -> None:
        assert self.stack is not None and self.stack.announcer is not None
        await self.stack.announcer.watch(model)

    async def _wait_for_blocks(self, model: str, blocks: BlockRange, timeout: float) -> None:
        announcer = self.stack.announcer if self.stack else None
        assert announcer is not None

        def missing(_: SwarmView | None = None) -> list[tuple[int, int]]:
            usable = self.planner.eligible(self.live_servers(model), model, self.banned())
            return missing_blocks(usable, blocks)

        with trio.move_on_after(timeout):
            await self.watch(model)
            while missing():  # each round waits for a change or DHT_REREAD: bounded by timeout
                try:
                    await announcer.wait_until(lambda v: not missing(v), timeout=DHT_REREAD)
                except trio.TooSlowError:
                    await announcer.refresh_from_dht(model)
        if gaps := missing():
            text = ", ".join(f"{a}:{b}" for a, b in gaps)
            raise RoutingError(
                f"{model}: after {timeout:.0f} s no online server holds blocks {text}",
                missing=tuple(gaps),
            )

    async def open_stream(self, peer_id: str, protocol: TProtocol) -> Any:
        """A new stream to `peer_id` (dialing its announced addresses if need be); raises
        `PeerUnavailable` within `connect_timeout`."""
        assert self.stack is not None
        entry = self.view.get(peer_id)
        addrs = entry.info.addrs if entry else ()
        return await self.stack.dialer.open_stream(
            peer_id, addrs, protocol, timeout=self.config.connect_timeout
        )

    def check_adapter(self, model: str, adapter: str | None) -> None:
        """Raises `RoutingError` saying which adapters `model`'s servers have when none of them
        announces `adapter` (requests that name it are routed only through those that do)."""
        if adapter is None or self.live_servers(model, adapter):
            return
        have = sorted({a for e in self.live_servers(model) for a in e.info.adapters})
        raise RoutingError(
            f"no server of {model} announces the adapter {adapter!r}; they have {have or 'none'}"
        )

    def request_limits(self, peers: Sequence[str]) -> tuple[int, int]:
        """(max_batch, max_tokens) that every one of `peers` accepts: the smallest their
        `info` announced (probe them first), the protocol's defaults for those not probed."""
        known = [self.limits.get(p, (DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS)) for p in peers]
        known = known or [(DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS)]
        return min(b for b, _ in known), min(t for _, t in known)

    async def probe(self, peers: Sequence[str], *, timeout: float = 3.0) -> None:
        """Measures the round trip (an `info` request on a new stream) to each of `peers` not
        measured yet; a peer that does not answer is banned."""
        limiter = trio.CapacityLimiter(PROBE_CONCURRENCY)

        async def one(peer: str) -> None:
            async with limiter:
                t0 = trio.current_time()
                try:
                    info = await call_info(self.open_stream, peer, timeout=timeout)
                except PetaldError as e:
                    self.ban(peer, e)
                    return
                self.rtts[peer] = trio.current_time() - t0
                limits = info.get("limits")
                if isinstance(limits, dict):
                    batch, tokens = limits.get("max_batch"), limits.get("max_tokens")
                    if type(batch) is int and type(tokens) is int and batch > 0 and tokens > 0:
                        self.limits[peer] = (batch, tokens)

        async with trio.open_nursery() as nursery:
            for peer in dict.fromkeys(peers):
                if peer not in self.rtts:
                    nursery.start_soon(one, peer)
