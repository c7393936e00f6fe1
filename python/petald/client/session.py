"""`InferenceSession`: token-by-token inference through a remote block range, one streaming
session (`/petald/inference/1.0.0`, KV cache on the server) per hop of a latency-optimal route.

Failover: the session keeps, for every hop boundary of its route, the inputs of every cached
token (hidden states; and the attention mask and position ids of all tokens). When a server
fails (disconnect, timeout, an error reply that is not about our input, a reply that does not
fit), it is banned, its hop's blocks are planned again (possibly over several servers), the new
servers' caches are rebuilt by replaying that history as one prefill, and the step goes on from
that hop: outputs equal an uninterrupted run's up to float rounding. Each failover's stall (time
lost) is logged at INFO and kept in `stats`. A session is used from one thread at a time.

Verified computation (petald.client.verify; `ClientConfig.verify_fraction`): sampled steps are
re-run on other servers before they are committed; a server found computing wrong outputs is
banned, its part replayed elsewhere, the later hops' caches rebuilt and the step redone.

Servers passing activations on (petald.server.push; `ClientConfig.pass_activations`): a step is
sent to every server of the route at once, the hidden state only to the first; each server
pushes its output into the next one's session and answers us too (that answer is the next
hop's history). Where a server did not push (or failed), the client sends the next one its
input itself, superseding the wait, and goes on as above. Entry point:
`RemoteSequential.inference_session`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import trio

from petald.client.history import History
from petald.client.routing import Hop
from petald.client.rpc import InferenceStream, is_server_failure
from petald.client.runtime import SwarmClient
from petald.client.tuning import Tuning, adapter_of
from petald.client.verify import Detection, Verifier
from petald.errors import RoutingError, SessionClosed
from petald.types import BlockRange
from petald.wire import trace

log = logging.getLogger(__name__)


def check_inputs(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    positions: torch.Tensor | None,
    batch: int,
    position: int,
) -> None:
    """Caller errors are ValueErrors raised here, before any server sees them."""
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3 or 0 in hidden.shape:
        raise ValueError("hidden states must be a non-empty (batch, seq, hidden) tensor")
    if not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden states must be floating point, not {hidden.dtype}")
    if hidden.shape[0] != batch:
        raise ValueError(f"a batch of {hidden.shape[0]} sequences; this session has {batch}")
    n = hidden.shape[1]
    if mask is not None and tuple(mask.shape) != (batch, position + n):
        raise ValueError(f"attention_mask {tuple(mask.shape)}: expected {(batch, position + n)}")
    if positions is not None and (
        positions.ndim != 2 or positions.shape[0] not in (1, batch) or positions.shape[1] != n
    ):
        raise ValueError(f"position_ids {tuple(positions.shape)}: expected ({batch}, {n})")


def _reasons(refused: dict[str, Exception]) -> str:
    """What the servers that failed to open answered, e.g. "busy, retry after 300 s"."""
    parts = []
    for peer, e in refused.items():
        retry = getattr(e, "retry_after", None)
        after = f", retry after {retry:.0f} s" if isinstance(retry, float) else ""
        parts.append(f"{peer[:16]}: {e}{after}")
    return "servers refused: " + "; ".join(parts)


def _overlaps(a: BlockRange, b: BlockRange) -> bool:
    return a.start < b.end and b.start < a.end


@dataclass
class Failover:
    peer_id: str
    blocks: BlockRange
    position: int  # tokens replayed into the replacement
    replacement: list[Hop]
    stall: float  # seconds from the failed call to the rebuilt caches
    error: str


@dataclass
class SessionStats:
    steps: int = 0
    passed_on: int = 0  # hops whose input the previous server pushed (the client relayed none)
    failovers: list[Failover] = field(default_factory=list)
    # Verified computation (petald.client.verify): hops checked against a second opinion,
    # those that disagreed, those no other server holds, disagreements nothing decided, and
    # each server caught (and banned).
    verify_checks: int = 0
    verify_mismatches: int = 0
    verify_skipped: int = 0
    verify_unresolved: int = 0
    verify_detections: list[Detection] = field(default_factory=list)

    @property
    def banned_for_mismatch(self) -> list[str]:
        return [d.peer for d in self.verify_detections]

    @property
    def stall_seconds(self) -> float:
        return sum(f.stall for f in self.failovers)


@dataclass
class _Link:
    hop: Hop
    stream: InferenceStream


@dataclass
class _Run:
    """One step's state through the route: what `_run_hops` reads and fills in."""

    step_id: int
    pos: int
    extras: Callable[[_Link], dict]
    inputs: dict[int, torch.Tensor]  # by boundary
    outputs: dict[int, torch.Tensor]  # by link identity
    in_flight: set[int]
    waiting: set[int]
    attempts: int


class InferenceSession:
    def __init__(
        self,
        client: SwarmClient,
        model: str,
        blocks: BlockRange,
        max_length: int,
        batch: int,
        *,
        tuning: Tuning | None = None,
    ) -> None:
        if not (max_length > 0 and batch > 0):
            raise ValueError("max_length and batch must be positive")
        if tuning:
            tuning.check_blocks(blocks)
        self.client, self.model, self.blocks = client, model, blocks
        # Sent with every step (and replayed on failover), as the servers keep none of it.
        self.tuning = tuning
        self.max_length, self.batch = max_length, batch
        self.stats = SessionStats()
        self._links: list[_Link] = []
        self._position = 0
        self._step_id = 0
        self._closed = False
        # Inputs of the cached tokens at each hop boundary: (batch, position, hidden).
        self._history = History()
        self._mask: torch.Tensor | None = None  # (batch, position); None: all ones
        self._positions: torch.Tensor | None = None  # (batch, position); None: 0..position-1
        self.verifier = Verifier(self)

    @property
    def position(self) -> int:
        """Tokens the session holds; the next step starts here."""
        return self._position

    @property
    def route(self) -> list[Hop]:
        return [link.hop for link in self._links]

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def step(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        reorder: torch.Tensor | list[int] | None = None,
    ) -> torch.Tensor:
        """Runs `hidden` (batch, n, hidden) for the tokens at [position, position + n);
        `attention_mask` is (batch, position + n): all tokens so far. `reorder` (batch,)
        first reorders the cached sequences (beam search): sequence i becomes the former
        sequence reorder[i], on the servers and in the history replayed on failover."""
        if self._closed:
            raise SessionClosed("this inference session is closed")
        check_inputs(hidden, attention_mask, position_ids, self.batch, self._position)
        if self._position + hidden.shape[1] > self.max_length:
            raise ValueError(f"{self._position} + {hidden.shape[1]} tokens exceed max_length")
        order = None if reorder is None else self._check_reorder(reorder)
        if not trace.ENABLED:
            return self.client.run(self._step, hidden.detach(), attention_mask, position_ids, order)
        # s: called (caller's thread), on the loop, done on the loop, returned (caller's thread).
        stamps = [trace.now()]
        out = self.client.run(
            self._step, hidden.detach(), attention_mask, position_ids, order, stamps
        )
        trace.RECORDS.append(
            {"kind": "step", "tokens": hidden.shape[1], "s": [*stamps, trace.now()]}
        )
        return out

    def _check_reorder(self, reorder: torch.Tensor | list[int]) -> list[int]:
        order = torch.as_tensor(reorder).tolist()
        if not (
            isinstance(order, list)
            and len(order) == self.batch
            and all(type(i) is int and 0 <= i < self.batch for i in order)
        ):
            raise ValueError(f"reorder must list {self.batch} indices in [0, {self.batch})")
        return order

    def rollback(self, position: int) -> None:
        """Forgets the tokens at `position` and after; the servers roll back on the next step."""
        if not 0 <= position <= self._position:
            raise ValueError(f"cannot roll back to {position}: the session holds {self._position}")
        self._position = position
        self.verifier.rollback(position)
        self._history.truncate(position)
        if self._mask is not None:
            self._mask = self._mask[:, :position]
        if self._positions is not None:
            self._positions = self._positions[:, :position]

    def close(self) -> None:
        """Ends every server's session (their cache tokens are freed). Idempotent."""
        if self._closed:
            return
        self._closed = True
        links, self._links = self._links, []
        links += [link for w in self.verifier.witnesses.values() for link in w.links]
        self.verifier.witnesses = {}
        if links:
            # SessionClosed: the client is gone, and the streams with it.
            with contextlib.suppress(SessionClosed):
                self.client.run(self._close_links, links)

    # ---- on the client's loop --------------------------------------------------------------

    async def _close_links(self, links: list[_Link]) -> None:
        async with trio.open_nursery() as nursery:
            for link in links:
                nursery.start_soon(link.stream.close)

    def _full_inputs(
        self, n: int, mask: torch.Tensor | None, positions: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The mask and position ids of all tokens after this step, materialised only once
        some step gave them (until then the servers' defaults are exact)."""
        pos, end = self._position, self._position + n
        if mask is None and self._mask is not None:
            mask = torch.cat([self._mask, torch.ones(self.batch, n, dtype=self._mask.dtype)], 1)
        if positions is not None or self._positions is not None:
            old = self._positions
            if old is None:
                old = torch.arange(pos).expand(self.batch, pos)
            new = torch.arange(pos, end) if positions is None else positions.to(torch.int64)
            positions = torch.cat([old, new.expand(self.batch, n)], 1)
        return mask, positions

    def _next_id(self) -> int:
        self._step_id += 1
        return self._step_id

    def _reorder_history(self, order: list[int]) -> None:
        """The history in the new batch order, as the servers' caches will hold it: a link
        replaced during this step is rebuilt from it and needs no reorder of its own."""
        index = torch.tensor(order)
        self._history.reorder(index)
        if self._mask is not None:
            self._mask = self._mask.index_select(0, index)
        if self._positions is not None:
            self._positions = self._positions.index_select(0, index)

    async def _step(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        order: list[int] | None = None,
        stamps: list[int] | None = None,
    ) -> torch.Tensor:
        if stamps is not None:
            stamps.append(trace.now())
        pos, n = self._position, hidden.shape[1]
        identity = order is None or order == list(range(self.batch))
        if not identity and pos:
            assert order is not None
            self._reorder_history(order)
            self.verifier.rollback(0)  # witnesses' caches are in the old order
        # Links open before this step get the reorder; replacements are replayed reordered.
        to_reorder = set() if identity or not pos else {id(link) for link in self._links}
        full_mask, full_positions = self._full_inputs(n, mask, position_ids)
        step_positions = full_positions[:, pos:] if full_positions is not None else None
        if not self._links:
            self._links = await self._open(self.blocks)
        attempts = self.client.config.max_attempts
        inputs: dict[int, torch.Tensor] = {}
        step_id = self._next_id()
        request = {"mask": full_mask, "positions": step_positions}

        def extras(link: _Link) -> dict:
            return request | {
                "reorder": order if id(link) in to_reorder else None,
                "tuning": self._tuning_for(link.hop.blocks, pos),
            }

        # Links whose server has this step's hidden state coming (sent by us, or pushed by the
        # previous server); the others are sent it when their turn comes.
        in_flight: set[int] = set()
        waiting: set[int] = set()  # sent the step without it, to take the previous one's push
        if self._passes_on():
            in_flight, waiting = await self._send_passing_on(step_id, pos, hidden, extras)
        outputs: dict[int, torch.Tensor] = {}  # by link identity
        run = _Run(step_id, pos, extras, inputs, outputs, in_flight, waiting, attempts)
        x = await self._run_hops(run, hidden, 0)
        if self.verifier.sample():
            x = await self._verify(run, full_mask, full_positions, to_reorder, x)
        # Commit: the history grows by this step's inputs at every boundary of the route.
        self._history.append(inputs)
        self._mask, self._positions = full_mask, full_positions
        self._position = pos + n
        self.stats.steps += 1
        if stamps is not None:
            stamps.append(trace.now())
        return x

    async def _run_hops(self, run: _Run, x: torch.Tensor, i: int) -> torch.Tensor:
        """Runs the step through links i, i+1, ... from `x`, the input of link i; a server
        that fails is replaced (failover) and its hop run again. Returns the last output."""
        while i < len(self._links):  # advances i or spends an attempt: bounded
            link = self._links[i]
            run.inputs[link.hop.blocks.start] = x
            t0 = trio.current_time()
            try:
                if id(link) not in run.in_flight:
                    await link.stream.send_step(run.step_id, run.pos, x, **run.extras(link))
                y, pushed = await link.stream.receive_step(run.step_id, run.pos, x)
            except Exception as e:
                if not is_server_failure(e):
                    raise
                run.attempts -= 1
                if run.attempts <= 0:
                    raise RoutingError(f"giving up after repeated failures; last: {e}") from e
                await self._failover(i, e, t0)
                continue
            self.client.bans.succeeded(link.hop.peer_id)
            self.stats.passed_on += i > 0 and id(link) in run.in_flight
            run.outputs[id(link)] = y
            x, i = y, i + 1
            if pushed and i < len(self._links) and id(self._links[i]) in run.waiting:
                run.in_flight.add(id(self._links[i]))
        return x

    async def _verify(
        self, run: _Run, mask, positions, to_reorder: set[int], x: torch.Tensor
    ) -> torch.Tensor:
        """Checks this step (petald.client.verify); if a server computed it wrong (it is banned
        by then), replaces it, rebuilds the later hops' caches and redoes the step from its
        hop: returns the step's output."""
        found = await self.verifier.check(run.pos, run.inputs, run.outputs, mask, positions)
        if found is None:
            return x
        i, error = found
        start = self._links[i].hop.blocks.start
        t0 = trio.current_time()
        await self._rebuild_from(i, error, t0)
        # Redo the step from the replaced hop, each input sent by us: the later servers roll
        # their caches back to this step's position first. No reorder: done already.
        to_reorder.clear()
        run.step_id, run.in_flight, run.waiting = self._next_id(), set(), set()
        return await self._run_hops(run, run.inputs[start], i)

    async def _rebuild_from(self, i: int, error: Exception, t0: float) -> None:
        """Replaces link i (its server computed wrong outputs) and rebuilds every later link's
        cache from the corrected outputs: their cached tokens were computed from wrong inputs."""
        before = len(self._links)
        x = await self._failover(i, error, t0)
        j = i + 1 + len(self._links) - before  # the first link after the replacement
        end = self._links[j - 1].hop.blocks.end
        self.verifier.invalidate_after(end)
        pos = self._position
        while x is not None and j < len(self._links):  # advances j or raises: bounded
            link = self._links[j]
            self._history.set(link.hop.blocks.start, x)
            try:
                x = await self._replay_link(link, pos, x)
            except Exception as e:
                if not is_server_failure(e):
                    raise
                before = len(self._links)
                x = await self._failover(j, e, trio.current_time())  # from the corrected history
                j += 1 + len(self._links) - before
                continue
            j += 1

    def _passes_on(self) -> bool:
        """Whether servers pass this step's activations on: a route of several hops whose
        servers all take pushes, unless the client is configured to relay every hop."""
        links = self._links
        return (
            self.client.config.pass_activations
            and len(links) > 1
            and all(link.stream.token is not None for link in links)
        )

    async def _send_passing_on(
        self, step_id: int, pos: int, hidden: torch.Tensor, extras: Callable[[_Link], dict]
    ) -> tuple[set[int], set[int]]:
        """Sends the step to every server of the route: the hidden state to the first, to the
        others only the rest (each takes its input from the previous one's push), and each
        but the last the next one's session to push into. Returns (in flight, waiting) by link
        identity. A server that cannot be sent to is left out of both: the receive loop sends
        it the step itself (and fails over if need be)."""
        in_flight: set[int] = set()
        waiting: set[int] = set()
        links = self._links
        for i, link in enumerate(links):
            upstream = links[i - 1].hop.peer_id if i else None
            next_hop = links[i + 1].stream if i + 1 < len(links) else None
            try:
                await link.stream.send_step(
                    step_id,
                    pos,
                    None if i else hidden,
                    upstream=upstream,
                    next_hop=next_hop,
                    **extras(link),
                )
            except Exception as e:
                if not is_server_failure(e):
                    raise
                continue
            (waiting if i else in_flight).add(id(link))
        return in_flight, waiting

    def _tuning_for(self, blocks: BlockRange, position: int) -> Tuning | None:
        """This session's tuning over one hop, detached; deep prompts only while the step
        starts inside the prompt positions (later tokens are not changed by them)."""
        if not self.tuning:
            return None
        tuning = self.tuning.for_blocks(blocks)
        if position >= tuning.pre_seq_len:
            tuning = tuning.without_prompts()
        return tuning.with_tensors([t.detach() for t in tuning.tensors])

    async def _open(self, blocks: BlockRange, exclude: frozenset[str] = frozenset()) -> list[_Link]:
        """Plans a route through `blocks` (avoiding `exclude`) and opens a session on each
        hop's server (at once); a server that fails to open is banned and the route planned
        again."""
        client = self.client
        refused: dict[str, Exception] = {}  # why servers failed to open, for the final error
        for _ in range(client.config.max_attempts):
            client.check_adapter(self.model, adapter_of(self.tuning))
            servers = client.live_servers(self.model, adapter_of(self.tuning))
            banned = client.route_bans(self.model, adapter_of(self.tuning)) | exclude
            candidates = client.planner.eligible(servers, self.model, banned)
            wanted = [e.peer_id for e in candidates if _overlaps(e.info.blocks, blocks)]
            await client.probe(wanted)
            try:
                route = client.planner.plan_inference(
                    servers,
                    self.model,
                    blocks,
                    rtts=client.rtts,
                    banned=banned,
                    cache_tokens=self.batch * self.max_length,
                )
            except RoutingError as e:
                if not refused:
                    raise
                raise RoutingError(f"{e}; {_reasons(refused)}") from e
            opened, failed = await self._open_all(route)
            if not failed:
                return [_Link(hop, opened[i]) for i, hop in enumerate(route)]
            for hop, e in failed:
                client.ban(hop.peer_id, e)
                refused[hop.peer_id] = e
            await self._close_links([_Link(route[i], s) for i, s in opened.items()])
        raise RoutingError(
            f"could not open sessions through {self.model} blocks {blocks}; {_reasons(refused)}"
        )

    async def _open_all(
        self, route: list[Hop]
    ) -> tuple[dict[int, InferenceStream], list[tuple[Hop, Exception]]]:
        """Opens a session on every hop's server at once: the opened streams by hop index, and
        the hops whose server failed."""
        client = self.client
        opened: dict[int, InferenceStream] = {}
        failed: list[tuple[Hop, Exception]] = []

        async def open_one(i: int, hop: Hop) -> None:
            try:
                opened[i] = await InferenceStream.open(
                    client.open_stream,
                    hop.peer_id,
                    hop.blocks,
                    max_length=self.max_length,
                    batch=self.batch,
                    codec=client.config.codec,
                    timeout=client.config.step_timeout,
                )
            except Exception as e:  # sorted below, so the caller never sees an exception group
                failed.append((hop, e))

        async with trio.open_nursery() as nursery:
            for i, hop in enumerate(route):
                nursery.start_soon(open_one, i, hop)
        ours = [e for _, e in failed if not is_server_failure(e)]
        if ours:  # e.g. max_length over the servers' limit: no other server would take it
            await self._close_links([_Link(route[i], s) for i, s in opened.items()])
            raise ours[0]
        return opened, failed

    async def _reopen(self, blocks: BlockRange, failed: str) -> list[_Link]:
        """`_open` for a failover: the server that just failed is the last choice. Its ban
        alone does not keep it out when every other holder of these blocks is banned too
        (SwarmClient.route_bans lets them all back), and it may be cut off still."""
        try:
            return await self._open(blocks, exclude=frozenset({failed}))
        except RoutingError:  # no other server holds these blocks: the failed one, once more
            return await self._open(blocks)

    async def _failover(self, i: int, error: Exception, t0: float) -> torch.Tensor | None:
        """Replaces link `i` by a new route through its blocks whose caches hold the session's
        tokens again (replayed from the history), so the current step can go on from there.
        Returns the replayed tokens' outputs (None when the session held none)."""
        failed = self._links[i]
        self.client.ban(failed.hop.peer_id, error)
        await failed.stream.close(reset=True)
        pos = self._position
        for _ in range(self.client.config.max_attempts):
            links = await self._reopen(failed.hop.blocks, failed.hop.peer_id)
            try:
                out = await self._replay(links, pos)
            except Exception as e:
                if not is_server_failure(e):
                    raise
                self.client.ban(getattr(e, "peer", ""), e)
                await self._close_links(links)
                continue
            break
        else:
            raise RoutingError(f"could not rebuild the session through {failed.hop.blocks}")
        self._links[i : i + 1] = links
        # Boundaries no longer in the route (none today: a hop is replaced over its own range)
        # would only hold memory.
        starts = {link.hop.blocks.start for link in self._links}
        self._history.keep(starts)
        stall = trio.current_time() - t0
        new_route = [link.hop for link in links]
        self.stats.failovers.append(
            Failover(failed.hop.peer_id, failed.hop.blocks, pos, new_route, stall, str(error))
        )
        log.info(
            "failover: %s (blocks %s) failed at position %d (%s); replaced by %s, replayed %d "
            "tokens, stall %.3f s",
            failed.hop.peer_id,
            failed.hop.blocks,
            pos,
            error,
            ", ".join(map(str, new_route)),
            pos,
            stall,
        )
        return out

    async def _replay(self, links: list[_Link], pos: int) -> torch.Tensor | None:
        """Feeds the `pos` cached tokens through the new links as one prefill, recording the
        inputs at boundaries the old route did not have; returns the last link's outputs."""
        if pos == 0:
            return None
        x = self._history.get(links[0].hop.blocks.start)
        for link in links:
            start = link.hop.blocks.start
            if start in self._history:
                x = self._history.get(start)
            else:
                self._history.set(start, x)
            x = await self._replay_link(link, pos, x)
        return x

    async def _replay_link(self, link: _Link, pos: int, x: torch.Tensor) -> torch.Tensor:
        """The `pos` cached tokens' inputs `x` through one link, as a prefill at position 0
        (the server drops what its cache held)."""
        mask = self._mask[:, :pos] if self._mask is not None else None
        positions = self._positions[:, :pos] if self._positions is not None else None
        tuning = self._tuning_for(link.hop.blocks, 0)
        return await link.stream.step(
            self._next_id(), 0, x, mask=mask, positions=positions, tuning=tuning
        )
