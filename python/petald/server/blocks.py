"""A loaded span of transformer blocks and how it runs: `Span.forward` pushes hidden states
through any sub-range of the span (training and one-shot inference; autograd gives input
gradients), `Span.new_cache` + `Span.step` run it token by token with a KV cache that covers only
the span's blocks, and `SpanCache.rollback` rewinds a session to an earlier position. The blocks
are the model family's own transformers decoder layers (built by `petald.server.loading`), run
through the family's own base forward (`petald.server.families.Runner`), so a span reproduces the
full transformers model's hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from petald.hf_internals import cache_view, crop_layer, reorder_layer, span_cache
from petald.server.adapters import LoRA, applied
from petald.server.checkpoint import LoadStats
from petald.server.families import Runner, Unsupported
from petald.types import BlockRange


@dataclass
class SpanCache:
    """The KV cache of one inference session through blocks `blocks` of a span. `position` is
    the number of tokens it holds. Sliding-window layers keep their whole history too (the window
    is applied by the mask, which is exact), so that rollback to any earlier position works.
    `kv` holds one layer per block of `blocks`; `view` is what the model's forward sees: one
    layer per model block, the blocks outside `blocks` (and those without attention) standing
    in with an alias of the first one, so that the forward sizes its masks and reads the
    sequence length as it would on a whole-model cache. Aliases are never written."""

    kv: DynamicCache
    view: DynamicCache
    blocks: BlockRange
    batch_size: int
    max_length: int
    position: int = 0

    def reorder(self, indices: torch.Tensor) -> None:
        """Reorders the cached sequences along the batch (beam search keeps the best beams):
        sequence i becomes the former sequence indices[i]."""
        if indices.shape != (self.batch_size,) or not bool(
            ((indices >= 0) & (indices < self.batch_size)).all()
        ):
            raise ValueError(f"reorder needs {self.batch_size} indices in [0, {self.batch_size})")
        for layer in self.kv.layers:
            reorder_layer(layer, indices)

    def rollback(self, position: int) -> None:
        """Forget every token at `position` and after (e.g. rejected speculative tokens)."""
        if not 0 <= position <= self.position:
            held = self.position
            raise ValueError(f"cannot roll back to {position}: the cache holds {held} tokens")
        # Per layer, so that a step that failed halfway through the blocks is undone as well.
        for layer in self.kv.layers:
            crop_layer(layer, position)
        self.position = position


@dataclass
class StepInput:
    """One session's step, checked and on the span's device: hidden (batch, seq, hidden), the
    cache rolled back to `position`, mask (batch, position + seq) or None, positions
    (batch|1, seq)."""

    hidden: torch.Tensor
    cache: SpanCache
    position: int
    mask: torch.Tensor | None
    positions: torch.Tensor


class Span(nn.Module):
    """Blocks [blocks.start, blocks.end) of a model, ready to run. Hidden states are
    (batch, seq, hidden_size); they are cast to the span's dtype and device on the way in."""

    def __init__(
        self,
        runner: Runner,
        blocks: BlockRange,
        layers: nn.ModuleList,
        dtype: torch.dtype,
        device: torch.device,
        load_stats: LoadStats,
        quant: str = "none",
    ) -> None:
        super().__init__()
        self.runner = runner
        self.family = runner.family
        self.config = runner.family.config
        self.blocks = blocks
        self.layers = layers
        self.dtype = dtype
        self.device = device
        self.load_stats = load_stats
        self.quant = quant  # how the layers' Linear weights are stored: petald.server.quant

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        start_block: int | None = None,
        end_block: int | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        all_hidden: bool = False,
        prompts: torch.Tensor | None = None,
        lora: LoRA | None = None,
    ) -> torch.Tensor:
        """Run blocks [start_block, end_block) (default: the whole span) without a cache.
        `attention_mask` is (batch, seq) with 1 for real tokens and 0 for padding;
        `position_ids` defaults to 0..seq-1, as in the transformers model's forward.
        `all_hidden`: return every block's output, stacked: (blocks, batch, seq, hidden).
        `prompts` (blocks, batch|1, p, hidden) are added to each block's input at positions
        [0, p); `lora` adds low-rank deltas to the blocks' linear layers for this call
        (petald.server.adapters)."""
        sub = self._sub_range(start_block, end_block)
        hidden = self._input(hidden_states)
        batch, seq, _ = hidden.shape
        mask = self._mask(attention_mask, batch, seq)
        positions = self._positions(position_ids, batch, 0, seq)
        outputs: list[torch.Tensor] | None = [] if all_hidden else None
        out = self._run(hidden, sub, mask, positions, None, prompts, lora, 0, outputs)
        return torch.stack(outputs) if outputs is not None else out

    def new_cache(
        self,
        batch_size: int,
        max_length: int,
        *,
        start_block: int | None = None,
        end_block: int | None = None,
    ) -> SpanCache:
        """An empty KV cache for `step`, holding at most `max_length` tokens per sequence."""
        if not (isinstance(batch_size, int) and batch_size > 0):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not (isinstance(max_length, int) and max_length > 0):
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        sub = self._sub_range(start_block, end_block)
        kv = span_cache(len(sub))  # layer i: block sub.start + i
        kinds = self.family.cache_kinds
        own = [i for i in range(sub.start, sub.end) if kinds[i] != "dummy"] or [sub.start]
        alias = kv.layers[own[0] - sub.start]
        layers = [kv.layers[i - sub.start] if i in own else alias for i in range(len(kinds))]
        return SpanCache(kv, cache_view(layers), sub, batch_size, max_length)

    @torch.no_grad()
    def step(
        self,
        hidden_states: torch.Tensor,
        cache: SpanCache,
        position: int,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        lora: LoRA | None = None,
    ) -> torch.Tensor:
        """Run the cache's blocks on the tokens at [position, position + seq), attending to the
        `position` tokens already cached. A `position` below `cache.position` first rolls the
        cache back to it. `attention_mask` is (batch, position + seq): all tokens so far."""
        step = self.prepare_step(hidden_states, cache, position, attention_mask, position_ids)
        return self.run_step(step, prompts, lora)

    def prepare_step(
        self,
        hidden_states: torch.Tensor,
        cache: SpanCache,
        position: int,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> StepInput:
        """Checks a step's inputs against its cache (ValueError, the cache untouched), then
        rolls the cache back to `position`: what `step` and a batched step
        (petald.server.batched) run."""
        if not (self.blocks.start <= cache.blocks.start and cache.blocks.end <= self.blocks.end):
            raise ValueError(f"the cache is for blocks {cache.blocks}, not in span {self.blocks}")
        hidden = self._input(hidden_states)
        batch, seq, _ = hidden.shape
        if batch != cache.batch_size:
            raise ValueError(f"batch of {batch} sequences, the cache is for {cache.batch_size}")
        if not 0 <= position <= cache.position:
            raise ValueError(f"position {position} is past the {cache.position} cached tokens")
        if position + seq > cache.max_length:
            limit = cache.max_length
            raise ValueError(f"{position} + {seq} tokens exceed the cache's max_length {limit}")
        mask = self._mask(attention_mask, batch, position + seq)
        positions = self._positions(position_ids, batch, position, seq)
        cache.rollback(position)
        return StepInput(hidden, cache, position, mask, positions)

    @torch.no_grad()
    def run_step(
        self, step: StepInput, prompts: torch.Tensor | None = None, lora: LoRA | None = None
    ) -> torch.Tensor:
        """Runs a prepared step alone; on failure the cache forgets whatever it stored."""
        cache, position = step.cache, step.position
        try:
            out = self._run(
                step.hidden, cache.blocks, step.mask, step.positions, cache, prompts, lora, position
            )
        except BaseException:
            cache.rollback(position)  # blocks that already stored this step's keys forget them
            raise
        cache.position = position + step.hidden.shape[1]
        return out

    @torch.no_grad()
    def probe(self) -> None:
        """Runs the span on made-up hidden states (stateless, its last block alone, and a cached
        prefill and step) with `Runner.run(probe=True)`; raises ValueError for a family whose
        forward does not treat its layers as self-contained blocks: it fails without the
        embeddings, passes the layers inputs computed from outside the blocks, or changes the
        hidden state between them."""
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 3, self.config.hidden_size, generator=gen)
        x = x.to(device=self.device, dtype=self.dtype)
        start, end = self.blocks.start, self.blocks.end
        positions = torch.arange(3, device=self.device)[None]
        try:
            for first in dict.fromkeys((start, end - 1)):
                self.runner.run(
                    x, first, end, attention_mask=None, position_ids=positions, cache=None,
                    probe=True,
                )  # fmt: skip
            cache = self.new_cache(1, 3)
            for pos, seq in ((0, 2), (2, 1)):
                self.runner.run(
                    x[:, pos : pos + seq], start, end, attention_mask=None,
                    position_ids=positions[:, pos : pos + seq], cache=cache.view, probe=True,
                )  # fmt: skip
        except Unsupported:
            raise
        except (MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as e:
            raise Unsupported(
                f"unsupported architecture {self.family.name}: its forward fails on a span of "
                f"its blocks ({type(e).__name__}: {e})"
            ) from e

    def _run(
        self,
        hidden: torch.Tensor,
        sub: BlockRange,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        cache: SpanCache | None,
        prompts: torch.Tensor | None,
        lora: LoRA | None,
        position: int,
        outputs: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        first = sub.start - self.blocks.start
        # Not self.layers[a:b]: slicing a ModuleList builds a new one (microseconds per step).
        with applied(list(self.layers)[first : first + len(sub)], lora):
            return self.runner.run(
                hidden,
                sub.start,
                sub.end,
                attention_mask=mask,
                position_ids=positions,
                cache=cache.view if cache is not None else None,
                prompts=prompts,
                position=position,
                outputs=outputs,
            )

    def _sub_range(self, start: int | None, end: int | None) -> BlockRange:
        start = self.blocks.start if start is None else start
        end = self.blocks.end if end is None else end
        if not (self.blocks.start <= start < end <= self.blocks.end):
            raise ValueError(f"blocks {start}:{end} are not a non-empty part of span {self.blocks}")
        return BlockRange(start, end)

    def _input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 3:
            raise ValueError("hidden_states must be a (batch, seq, hidden_size) tensor")
        if hidden_states.shape[-1] != self.config.hidden_size or 0 in hidden_states.shape:
            raise ValueError(
                f"hidden_states of shape {tuple(hidden_states.shape)}: expected a non-empty "
                f"(batch, seq, {self.config.hidden_size}) tensor"
            )
        return hidden_states.to(device=self.device, dtype=self.dtype)

    def _mask(self, mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
        if mask is None:
            return None
        if tuple(mask.shape) != (batch, length):
            shape = tuple(mask.shape)
            raise ValueError(f"attention_mask of shape {shape}: expected ({batch}, {length})")
        return mask.to(self.device)

    def _positions(
        self, ids: torch.Tensor | None, batch: int, start: int, seq: int
    ) -> torch.Tensor:
        if ids is None:
            return torch.arange(start, start + seq, device=self.device).unsqueeze(0)  # (1, seq)
        if ids.ndim != 2 or ids.shape[1] != seq or ids.shape[0] not in (1, batch):
            raise ValueError(f"position_ids of shape {tuple(ids.shape)}: expected ({batch}, {seq})")
        return ids.to(self.device)
