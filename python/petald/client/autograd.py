"""Remote blocks inside torch autograd: `remote_forward(blocks, hidden, ..., tuning=...)` runs a
`RemoteSequential` as a `torch.autograd.Function` whose backward calls the servers' backward
RPC. The blocks stay frozen on the servers; what the client owns gets gradients: the input
hidden states (so embeddings, prepended prompts, anything before) and the named tensors of the
`Tuning` (deep prompts, client LoRA A/B), which the servers differentiate and send back.

A batch is split into sub-batches within every server's limits (`max_batch`, `max_tokens`;
read from their `info`, which the first call asks for), run concurrently and joined. The
forward keeps each sub-batch's per-hop inputs (`ForwardTrace`) for its backward, since servers
keep no activations; a server that fails during backward is replaced by re-running that hop's
forward on another (`RemoteSequential._backward_hop`), a bounded number of times per call."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import torch
import trio
from torch.autograd.function import once_differentiable

from petald.client.sequence import ForwardTrace, HopGrads, RemoteSequential, _Attempts
from petald.client.session import check_inputs
from petald.client.tuning import Tuning, adapter_of, row_chunks, sliced_by_rows

# Sub-batches of one call in flight at once: enough to keep a pipeline of servers busy, well
# under the servers' per-peer bound on requests in flight (8).
MAX_CHUNKS_IN_FLIGHT = 4


def remote_forward(
    blocks: RemoteSequential,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    tuning: Tuning | None = None,
) -> torch.Tensor:
    """`hidden` (batch, seq, hidden) through `blocks`, differentiable w.r.t. `hidden` and
    `tuning`'s tensors (whose rows cover `blocks`). Same shape out, on `hidden`'s device."""
    check_inputs(hidden, attention_mask, position_ids, hidden.shape[0] if hidden.ndim else 0, 0)
    if tuning:
        tuning.check_blocks(blocks.blocks)
    tensors = tuning.tensors if tuning else []
    call = _Call(blocks, attention_mask, position_ids, tuning)
    return _RemoteBlocks.apply(call, hidden, *tensors)


class _Call:
    """One differentiable call: its arguments, and what its forward leaves for its backward."""

    def __init__(
        self,
        blocks: RemoteSequential,
        mask: torch.Tensor | None,
        positions: torch.Tensor | None,
        tuning: Tuning | None,
    ) -> None:
        self.blocks = blocks
        self.mask = None if mask is None else mask.to("cpu")
        self.positions = None if positions is None else positions.to("cpu")
        self.tuning = tuning
        self.chunks: list[slice] = []
        self.traces: list[ForwardTrace] = []

    def rows(self, rows: slice, batch: int) -> tuple[Any, ...]:
        """(mask, positions, tuning) of one sub-batch."""
        pos = self.positions
        if pos is not None and pos.shape[0] == batch:
            pos = pos[rows]
        mask = None if self.mask is None else self.mask[rows]
        tuning = self.tuning.for_rows(rows, batch) if self.tuning else None
        return mask, pos, tuning


class _RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, call: _Call, hidden: torch.Tensor, *named: torch.Tensor) -> torch.Tensor:
        if call.tuning:
            call.tuning = call.tuning.with_tensors([t.detach().to("cpu") for t in named])
        x = hidden.detach().to("cpu")
        out = call.blocks.client.run(_forward_chunks, call, x)
        ctx.call = call
        ctx.devices = [t.device for t in (hidden, *named)]
        ctx.save_for_backward(*named)  # for autograd's check that they were not changed since
        return out.to(hidden.device)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        call: _Call = ctx.call
        grad, named = call.blocks.client.run(_backward_chunks, call, grad_out.to("cpu"))
        grads = [g.to(d) for g, d in zip([grad, *named], ctx.devices, strict=True)]
        ctx.call = None  # the traces hold every hop's input: free them with the graph
        return (None, *grads)


async def _forward_chunks(call: _Call, x: torch.Tensor) -> torch.Tensor:
    seq, client = call.blocks, call.blocks.client
    client.check_adapter(seq.model, adapter_of(call.tuning))
    peers = [e.peer_id for e in client.live_servers(seq.model, adapter_of(call.tuning))]
    await client.probe(peers)
    max_batch, max_tokens = client.request_limits(peers)
    batch = x.shape[0]
    call.chunks = row_chunks(batch, x.shape[1], max_batch, max_tokens)
    attempts = _Attempts(client.config.max_attempts)

    def job(rows: slice) -> Callable[[], Awaitable[tuple[torch.Tensor, ForwardTrace]]]:
        mask, pos, tuning = call.rows(rows, batch)
        return lambda: seq._forward_range(seq.blocks, x[rows], mask, pos, attempts, tuning=tuning)

    results = await _concurrently([job(rows) for rows in call.chunks])
    call.traces = [trace for _, trace in results]
    return torch.cat([out for out, _ in results])


async def _backward_chunks(
    call: _Call, grad_out: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    seq = call.blocks
    attempts = _Attempts(seq.client.config.max_attempts)
    batch = grad_out.shape[0]

    def job(rows: slice, trace: ForwardTrace) -> Callable[[], Awaitable[Any]]:
        mask, pos, tuning = call.rows(rows, batch)
        return lambda: seq._backward_trace(trace, grad_out[rows], mask, pos, attempts, tuning)

    jobs = [job(r, t) for r, t in zip(call.chunks, call.traces, strict=True)]
    results = await _concurrently(jobs)
    grad = torch.cat([g for g, _ in results])
    named: list[torch.Tensor] = []
    if call.tuning:
        named = [torch.zeros_like(t) for t in call.tuning.tensors]
        for rows, (_, hop_grads) in zip(call.chunks, results, strict=True):
            _accumulate(call.tuning, batch, rows, hop_grads, named)
    return grad, named


def _accumulate(
    tuning: Tuning, batch: int, rows: slice, hop_grads: HopGrads, into: list[torch.Tensor]
) -> None:
    """Adds one sub-batch's per-hop gradients into the full named tensors' gradients: each hop
    wrote the rows of its blocks; per-sequence prompts also only the sub-batch's sequences,
    everything else is shared by all sequences (so the sub-batches' gradients add up)."""
    for blocks, grads in hop_grads:
        a, b = blocks.start - tuning.start, blocks.end - tuning.start
        for (name, t), g, acc in zip(tuning.named.items(), grads, into, strict=True):
            if sliced_by_rows(name, t, batch):
                acc[a:b, rows] += g
            else:
                acc[a:b] += g


async def _concurrently(jobs: Sequence[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Runs the jobs at once (at most MAX_CHUNKS_IN_FLIGHT in flight) and returns their results
    in order; the first error cancels the rest and is raised as is (not in a group)."""
    if len(jobs) == 1:
        return [await jobs[0]()]
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []
    limiter = trio.CapacityLimiter(MAX_CHUNKS_IN_FLIGHT)

    async def one(i: int, nursery: trio.Nursery) -> None:
        async with limiter:
            try:
                results[i] = await jobs[i]()
            except Exception as e:
                errors.append(e)
                nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for i in range(len(jobs)):
            nursery.start_soon(one, i, nursery)
    if errors:
        raise errors[0]
    return results
