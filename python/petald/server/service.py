"""`BlockServer`: what `petald serve` runs once its daemon has joined the swarm. It chooses the
span (`--blocks`, or the least-served `--num-blocks N` from the swarm's announcements), announces
it as joining, starts the compute process that loads it, measures (or reads the cached)
throughput, registers the block RPCs and announces online. With `--num-blocks` it re-checks the
swarm's balance every `rebalance_period` and moves — after draining its sessions — when another
place helps the swarm clearly more (petald.server.placement). `drain()` is the SIGTERM path:
announce draining, refuse new work, let active work finish or time out.

Entry point: `await nursery.start(BlockServer(config, stack, reachability).run)`."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from petald import __version__
from petald.errors import PeerUnavailable
from petald.notify import notifier
from petald.server import throughput
from petald.server.allow import AllowListHost
from petald.server.executor import TRAINING, Executor, WorkerProcess
from petald.server.handlers import BlockHandlers, Limits
from petald.server.inference import InferenceSessions
from petald.server.memory import CacheBudget, default_budget
from petald.server.metering import MeteredHost
from petald.server.placement import choose_span, should_move
from petald.server.push import PUSH_OPEN_TIMEOUT
from petald.server.serve_config import ServeConfig, worker_spec
from petald.server.startup import stamp
from petald.stack import MAX_ANNOUNCED_ADDRS, Stack
from petald.types import MAX_WEIGHT_HASHES, BlockRange, ServerInfo

if TYPE_CHECKING:
    from petald.metrics import Metrics

log = logging.getLogger(__name__)

# Seconds a stopping server waits for its "draining" announcement to go out (gossip and DHT).
DRAINING_PUBLISH_TIMEOUT = 5.0


class BlockServer:
    def __init__(
        self,
        config: ServeConfig,
        stack: Stack,
        reachability: str,
        worker: WorkerProcess | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        # --metrics: requests counted at the handlers' edge (MeteredHost), state and KV cache
        # read at scrape time.
        self.metrics = metrics
        if metrics is not None:
            metrics.watch_blocks(self._readings)
        # The compute process of `config.blocks`, started by the CLI before the daemon joined.
        self._early_worker = worker
        self.stack = stack
        self.reachability = reachability
        self.handlers: BlockHandlers | None = None
        self._moves = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serves until cancelled; `started()` once online."""
        span = self.config.blocks or await self._choose()
        while True:
            async with trio.open_nursery() as nursery:
                await self._start_span(nursery, span)
                if self._moves == 0:
                    task_status.started()
                span_next = await self._rebalance_loop(span)
                nursery.cancel_scope.cancel()  # stops the compute process of the old span
            log.info("moving from blocks %s to %s", span, span_next)
            span, self._moves = span_next, self._moves + 1

    async def drain(self) -> None:
        """Announce draining, refuse new work, wait for the active work (bounded)."""
        if self.handlers is None:
            return
        h = self.handlers
        notifier().status(f"draining: {h.active} requests and sessions active")
        draining = self._announce(h, "draining")
        done = await h.drain(self.config.drain_timeout)
        log.info("drained (%s)", "all work finished" if done else f"{h.active} still active")
        # With no work in progress the drain ends at once and the daemon exits: without this
        # wait its "draining" never left, and peers listed it online until it expired (95 s).
        assert self.stack.announcer is not None
        with trio.move_on_after(DRAINING_PUBLISH_TIMEOUT):
            await self.stack.announcer.wait_published(draining)

    # ---- start-up ---------------------------------------------------------------------------

    async def _choose(self) -> BlockRange:
        from petald.server.model_config import num_blocks

        notifier().status("choosing the blocks the swarm serves least")
        n_blocks = await trio.to_thread.run_sync(num_blocks, self.config.source)
        want = self.config.num_blocks or n_blocks
        if not 1 <= want <= n_blocks:
            raise ValueError(f"--num-blocks must be 1..{n_blocks} for this model")
        coverage = await self._coverage(n_blocks, exclude_self=False)
        span = choose_span(coverage, want)
        log.info("the swarm serves blocks %s least: taking them", span)
        return span

    async def _coverage(self, n_blocks: int, *, exclude_self: bool) -> list[float]:
        announcer = self.stack.announcer
        assert announcer is not None
        with trio.move_on_after(10):  # the DHT answers late joiners; gossip fills in later
            await announcer.refresh_from_dht(self.config.model)
        me = self.stack.host.host.get_id().to_base58()
        cover = [0.0] * n_blocks
        for e in announcer.view.servers(self.config.model, now=time.time()):
            if e.info.state != "online" or (exclude_self and e.peer_id == me):
                continue
            for b in range(e.info.blocks.start, min(e.info.blocks.end, n_blocks)):
                cover[b] += max(e.info.throughput, 1e-9)  # unmeasured servers still count
        return cover

    async def _start_span(self, nursery: trio.Nursery, span: BlockRange) -> None:
        c = self.config
        spec = worker_spec(c, span)
        process, self._early_worker = self._early_worker, None
        if process is not None and process.spec != spec:
            process.close()  # started for another span
            process = None
        executor = Executor(spec, process)
        self._announce_joining(span)
        notify = notifier()  # systemd's STATUS line (petald.notify): the compute process adds
        notify.status(f"loading blocks {span} of {c.model}")  # its progress through the relay
        t0 = trio.current_time()
        worker = await nursery.start(executor.run)
        stamp("daemon.worker_loaded")
        notify.clear("load")
        notify.status(f"loaded blocks {span}")
        log.info(
            "loaded blocks %s in %.1f s: %.0f MiB of weights",
            span,
            trio.current_time() - t0,
            worker["weight_bytes"] / 2**20,
        )
        budget = CacheBudget(c.cache_tokens or self._default_budget(worker))
        handlers = BlockHandlers(executor, c.model, budget, limits=Limits())
        handlers.throughput = await self._throughput(executor, worker)
        stamp("daemon.throughput")
        sessions = InferenceSessions(handlers, self._open_to_server)
        host: Any = self.stack.host.host
        if self.metrics is not None:  # inside the allow list: its refusals are counted too
            host = MeteredHost(host, self.metrics)
        if c.allow_peers is not None:
            host = AllowListHost(host, c.allow_peers, self._is_announced_server)
        handlers.register(host)
        sessions.register(host)
        handlers.state = "online"
        self.handlers = handlers
        notify.status(f"announcing blocks {span} online")
        online = self._announce(handlers, "online")
        stamp("daemon.announced")
        with trio.move_on_after(30):  # the DHT put is what late joiners read
            assert self.stack.announcer is not None
            await self.stack.announcer.wait_published(online)
        stamp("daemon.published")
        log.info("online: %s blocks %s, %.0f tokens/s", c.model, span, handlers.throughput)
        notify.status(f"online: {c.model} blocks {span}, {handlers.throughput:.0f} tokens/s")

    def _readings(self) -> tuple[str, int, int]:
        """(state, KV-cache tokens in use, budget) for the metrics."""
        h = self.handlers
        if h is None:
            return "joining", 0, 0
        return h.state, h.budget.used_tokens, h.budget.total_tokens

    def _is_announced_server(self, peer_id: str) -> bool:
        """Whether `peer_id`'s signed announcement is live in our swarm view."""
        announcer = self.stack.announcer
        entry = announcer.view.get(peer_id) if announcer is not None else None
        return entry is not None and entry.expires_at > time.time()

    async def _open_to_server(self, peer_id: str, protocol: TProtocol) -> INetStream:
        """A stream to another server, for pushes: only to a server this one knows from the
        swarm's signed announcements, at the addresses it announced (a client names the peer;
        it cannot make us dial an address of its choosing)."""
        announcer = self.stack.announcer
        entry = announcer.view.get(peer_id) if announcer is not None else None
        if entry is None:
            raise PeerUnavailable(f"{peer_id} is not a server of this swarm", peer=peer_id)
        return await self.stack.dialer.open_stream(
            peer_id, entry.info.addrs, protocol, timeout=PUSH_OPEN_TIMEOUT
        )

    @staticmethod
    def _default_budget(worker: dict) -> int:
        return default_budget(worker["kv_bytes_per_token"], worker.get("device_free_bytes"))

    async def _throughput(self, executor: Executor, worker: dict) -> float:
        mode = self.config.throughput
        if mode not in ("auto", "eval"):
            return float(mode)
        key = throughput.cache_key(self.config.model, worker)
        cached = throughput.load_cached(key) if mode == "auto" else None
        if cached is not None:
            return cached
        notifier().status("measuring throughput")
        reply, _ = await executor.call(
            {"op": "measure", "tokens": throughput.TOKENS}, priority=TRAINING
        )
        value = float(reply["tokens_per_s"])
        throughput.store(key, value)
        return value

    # ---- announcing and balance -----------------------------------------------------------

    def _info(self, span: BlockRange, state: str, n_blocks: int = 0, **kw: object) -> ServerInfo:
        return ServerInfo(
            model=self.config.model,
            blocks=span,
            n_blocks=n_blocks,
            state=state,  # type: ignore[arg-type]
            relayed=self.reachability == "private",
            public_name=self.config.public_name,
            addrs=tuple(self.stack.host.addrs()[:MAX_ANNOUNCED_ADDRS]),
            version=__version__,
            **kw,  # type: ignore[arg-type]
        )

    def _announce_joining(self, span: BlockRange) -> None:
        assert self.stack.announcer is not None
        self.stack.announcer.announce(self._info(span, "joining"))

    def _announce(self, h: BlockHandlers, state: str) -> ServerInfo:
        w = h.worker
        info = self._info(
            BlockRange(*w["blocks"]),
            state,
            w["n_blocks"],
            throughput=h.throughput,
            cache_tokens_free=h.budget.free_tokens,
            dtype=w["dtype"],
            quant=w["quant"],
            adapters=tuple(w.get("adapters", ())),
            weight_hashes=_announced(w.get("weight_hashes", [])),
        )
        assert self.stack.announcer is not None
        self.stack.announcer.announce(info)
        return info

    async def _rebalance_loop(self, span: BlockRange) -> BlockRange:
        """Returns the span to move to (only with --num-blocks); otherwise runs forever."""
        if self.config.blocks is not None or self.config.rebalance_period <= 0:
            await trio.sleep_forever()
        h = self.handlers
        assert h is not None
        while True:
            await trio.sleep(self.config.rebalance_period)
            others = await self._coverage(h.worker["n_blocks"], exclude_self=True)
            target = should_move(others, span, max(h.throughput, 1e-9))
            if target is not None:
                notifier().status(f"moving to blocks {target}: draining blocks {span}")
                self._announce(h, "draining")
                await h.drain(self.config.drain_timeout)
                return target


def _announced(hashes: list[bytes]) -> tuple[bytes, ...]:
    """The compute process's weight hashes (petald.server.weights), or none for a span longer
    than an announcement holds (then clients treat us as an older server)."""
    return tuple(hashes) if len(hashes) <= MAX_WEIGHT_HASHES else ()
