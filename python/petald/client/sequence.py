"""`RemoteSequential`: blocks [start, end) of a model served by the swarm, used like a local
stack of decoder layers (sync, torch in and out). `forward` plans a load-spreading route and
calls each hop in turn; a server that fails is banned (exponential backoff) and its part is
retried on another, a bounded number of times. `inference_session` opens a
`petald.client.session.InferenceSession` (token-by-token with server-side KV caches).

For training, `forward_traced` also returns each hop's input (`ForwardTrace`), and
`backward(hidden, grad_out, trace=...)` walks the hops in reverse calling the backward RPC, which
needs exactly those inputs; `petald.client.autograd` wraps the two (with sub-batches and the
fine-tuning tensors of a `Tuning`, sliced per hop) into a torch.autograd.Function."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from petald.client.rpc import call_backward, call_forward, is_server_failure
from petald.client.runtime import SwarmClient
from petald.client.session import InferenceSession, check_inputs
from petald.client.tuning import Tuning, adapter_of
from petald.errors import RoutingError
from petald.types import BlockRange

# Gradients of a backward's named tensors, per hop: (the hop's blocks, one per name in order).
HopGrads = list[tuple[BlockRange, list[torch.Tensor]]]


@dataclass
class ForwardTrace:
    """What a forward went through: each hop's blocks and input hidden states, in order."""

    hops: list[tuple[BlockRange, torch.Tensor]] = field(default_factory=list)


class _Attempts:
    """Failed server calls allowed for one user call, shared by all its hops."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def spend(self, error: BaseException) -> None:
        self.left -= 1
        if self.left <= 0:
            msg = f"giving up after repeated server failures; last: {error}"
            raise RoutingError(msg) from error


class RemoteSequential:
    def __init__(
        self,
        client: SwarmClient,
        model: str,
        n_blocks: int,
        *,
        start: int = 0,
        end: int | None = None,
    ) -> None:
        end = n_blocks if end is None else end
        if not 0 <= start < end <= n_blocks:
            raise ValueError(f"blocks {start}:{end} are not a non-empty part of 0:{n_blocks}")
        self.client = client
        self.model = model
        self.n_blocks = n_blocks
        self.blocks = BlockRange(start, end)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int | slice) -> RemoteSequential:
        """A sub-range, in this sequence's own indices (research "custom paths")."""
        if isinstance(index, int):
            i = index + len(self) if index < 0 else index
            if not 0 <= i < len(self):
                raise IndexError(f"block {index} of a sequence of {len(self)}")
            index = slice(i, i + 1)
        a, b, step = index.indices(len(self))
        if step != 1:
            raise ValueError("a remote sequence is sliced contiguously: a step of 1 only")
        if a >= b:
            raise ValueError(f"slice {index} of a sequence of {len(self)} blocks is empty")
        s = self.blocks.start
        return RemoteSequential(self.client, self.model, self.n_blocks, start=s + a, end=s + b)

    def __repr__(self) -> str:
        return f"RemoteSequential({self.model!r}, blocks {self.blocks})"

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        all_hidden: bool = False,
        tuning: Tuning | None = None,
    ) -> torch.Tensor:
        """`hidden` (batch, seq, hidden) through the blocks; `attention_mask` (batch, seq) with 1
        for real tokens, `position_ids` (batch or 1, seq). With `all_hidden`, every block's
        output stacked: (blocks, batch, seq, hidden) (`output_hidden_states`). `tuning`: deep
        prompts, LoRA or a server adapter (no gradients here: `petald.client.autograd`)."""
        if not all_hidden:
            return self.forward_traced(hidden, attention_mask, position_ids, tuning=tuning)[0]
        check_inputs(hidden, attention_mask, position_ids, hidden.shape[0] if hidden.ndim else 0, 0)
        attempts = _Attempts(self.client.config.max_attempts)
        args = (self.blocks, hidden.detach(), attention_mask, position_ids, attempts, True)
        return self.client.run(self._forward_range, *args, self._detached(tuning))[0]

    __call__ = forward

    def forward_traced(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        tuning: Tuning | None = None,
    ) -> tuple[torch.Tensor, ForwardTrace]:
        check_inputs(hidden, attention_mask, position_ids, hidden.shape[0] if hidden.ndim else 0, 0)
        attempts = _Attempts(self.client.config.max_attempts)
        args = (self.blocks, hidden.detach(), attention_mask, position_ids, attempts, False)
        return self.client.run(self._forward_range, *args, self._detached(tuning))

    def _detached(self, tuning: Tuning | None) -> Tuning | None:
        if not tuning:
            return None
        tuning.check_blocks(self.blocks)
        self.client.run(self._check_adapter, adapter_of(tuning))
        return tuning.with_tensors([t.detach() for t in tuning.tensors])

    async def _check_adapter(self, adapter: str | None) -> None:
        self.client.check_adapter(self.model, adapter)

    def backward(
        self,
        hidden: torch.Tensor,
        grad_out: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        trace: ForwardTrace | None = None,
    ) -> torch.Tensor:
        """The gradient of the loss w.r.t. `hidden`, given `grad_out` for the output. Servers
        keep no activations, so each hop's input is needed: from `trace` (the forward's) or, if
        not given, from a new forward."""
        if grad_out.shape != hidden.shape:
            raise ValueError(f"grad_out {tuple(grad_out.shape)} must match {tuple(hidden.shape)}")
        if trace is None:
            trace = self.forward_traced(hidden, attention_mask, position_ids)[1]
        attempts = _Attempts(self.client.config.max_attempts)
        args = (trace, grad_out.detach(), attention_mask, position_ids, attempts)
        return self.client.run(self._backward_trace, *args)[0]

    def inference_session(
        self, max_length: int, batch: int = 1, *, tuning: Tuning | None = None
    ) -> InferenceSession:
        """A token-by-token session through these blocks holding up to `max_length` tokens
        per sequence; `tuning` (deep prompts, LoRA, a server adapter) applies to every step.
        Use it as a context manager (it frees the servers' caches on exit)."""
        return InferenceSession(
            self.client, self.model, self.blocks, max_length, batch, tuning=tuning
        )

    # ---- on the client's loop --------------------------------------------------------------

    async def _forward_range(
        self,
        blocks: BlockRange,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor | None,
        attempts: _Attempts,
        all_hidden: bool = False,
        tuning: Tuning | None = None,
    ) -> tuple[torch.Tensor, ForwardTrace]:
        """The output of `blocks` (with `all_hidden`: every block's, stacked) and the trace."""
        client, trace = self.client, ForwardTrace()
        outputs: list[torch.Tensor] = []  # with all_hidden: (hop blocks, batch, seq, hidden) each
        a = blocks.start
        while a < blocks.end:  # every round advances a or spends an attempt: bounded
            route = client.planner.plan_forward(
                client.live_servers(self.model, adapter_of(tuning)),
                self.model,
                BlockRange(a, blocks.end),
                banned=client.route_bans(self.model, adapter_of(tuning)),
            )
            for hop in route:
                try:
                    y = await call_forward(
                        client.open_stream,
                        hop.peer_id,
                        hop.blocks,
                        x,
                        mask=mask,
                        positions=positions,
                        all_hidden=all_hidden,
                        tuning=tuning.for_blocks(hop.blocks) if tuning else None,
                        timeout=client.config.request_timeout,
                    )
                except Exception as e:
                    if not is_server_failure(e):
                        raise
                    client.ban(hop.peer_id, e)
                    attempts.spend(e)
                    break  # plan again from `a` without that server
                client.bans.succeeded(hop.peer_id)
                trace.hops.append((hop.blocks, x))
                if all_hidden:
                    outputs.append(y)
                    y = y[-1]
                x, a = y, hop.blocks.end
        return (torch.cat(outputs) if all_hidden else x), trace

    async def _backward_trace(
        self,
        trace: ForwardTrace,
        grad: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor | None,
        attempts: _Attempts,
        tuning: Tuning | None = None,
    ) -> tuple[torch.Tensor, HopGrads]:
        """The input gradient, and the named tensors' gradients of every hop."""
        named: HopGrads = []
        for blocks, x in reversed(trace.hops):
            grad, hop_named = await self._backward_hop(
                blocks, x, grad, mask, positions, attempts, tuning
            )
            named.extend(hop_named)
        return grad, named

    async def _backward_hop(
        self,
        blocks: BlockRange,
        x: torch.Tensor,
        grad: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor | None,
        attempts: _Attempts,
        tuning: Tuning | None = None,
    ) -> tuple[torch.Tensor, HopGrads]:
        client = self.client
        while True:  # each round returns or spends an attempt: bounded
            route = client.planner.plan_forward(
                client.live_servers(self.model, adapter_of(tuning)),
                self.model,
                blocks,
                banned=client.route_bans(self.model, adapter_of(tuning)),
            )
            if len(route) > 1:
                # No single server holds these blocks any more: recompute the inputs of the
                # hops they are split into, then go backward through those.
                args = (mask, positions, attempts)
                _, sub = await self._forward_range(blocks, x, *args, tuning=tuning)
                return await self._backward_trace(sub, grad, *args, tuning)
            peer = route[0].peer_id
            hop_tuning = tuning.for_blocks(blocks) if tuning else None
            try:
                out, named = await call_backward(
                    client.open_stream,
                    peer,
                    blocks,
                    x,
                    grad,
                    mask=mask,
                    positions=positions,
                    tuning=hop_tuning,
                    timeout=client.config.request_timeout,
                )
            except Exception as e:
                if not is_server_failure(e):
                    raise
                client.ban(peer, e)
                attempts.spend(e)
                continue
            client.bans.succeeded(peer)
            return out, ([(blocks, named)] if named else [])
