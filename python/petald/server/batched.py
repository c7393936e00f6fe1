"""Continuous batching in the compute process: steps of different inference sessions (own KV
caches of different lengths, own masks and positions) run as one forward through the span.
Entry points: `run_steps(span, steps)` runs a list of prepared steps (`Span.prepare_step`) and
gives each its output or its own error; `batching_exact(span)` says at load time whether this
span's family batches exactly (else the server runs every step alone).

How a batch is packed: steps are grouped by (blocks, new tokens); within a group every
session's cache is left-padded to the longest one, layer by layer, into one batched cache
(batch = the sum of the sessions' batches); the 2D attention mask is zero over each row's
padding and the session's own mask (or ones) after it; position ids are each session's own
(explicit, so padding never shifts a rotary position). The family's forward builds its 4D mask
from these, exactly as for a left-padded batch in transformers' `generate`. Afterwards each
session's cache becomes its rows of the batched one, padding cut off (a view: the batched
tensors live until the sessions' next steps replace them), and its output its rows.

Isolation, the choice made here: every step is checked alone before it joins a batch
(`Span.prepare_step`, in the worker), so a bad request is refused without touching the others;
and should the batched forward itself raise, nothing was written to any session's cache yet, so
each member is retried alone and only the one that fails again gets the error. Steps with client
tuning (LoRA, deep prompts, a server adapter) never join a batch: each runs alone, so one
session's adapter can never touch another's rows."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from petald.server.adapters import LoRA
from petald.server.blocks import Span, StepInput

log = logging.getLogger(__name__)

# The load-time probe's bound on |batched - alone| relative to the outputs' scale: rounding
# stays far below it (1e-6 in fp32), a wrong mask or position is of the order of the values.
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4}
PROBE_TOLERANCE_HALF = 3e-2


@dataclass
class BatchStep:
    """One session's step in a batch request: its prepared input and its client tuning (a step
    with either runs alone)."""

    step: StepInput
    prompts: torch.Tensor | None = None
    lora: LoRA | None = None
    out_dtype: torch.dtype = torch.float32  # the client's: its output goes back in it

    @property
    def batchable(self) -> bool:
        return self.prompts is None and self.lora is None

    def key(self) -> tuple[int, int, int]:
        """Steps with the same key can share a forward: same blocks, same new tokens."""
        blocks = self.step.cache.blocks
        return blocks.start, blocks.end, self.step.hidden.shape[1]


def run_steps(
    span: Span, steps: list[BatchStep], *, batching: bool = True
) -> tuple[list[torch.Tensor | ValueError], list[int]]:
    """Runs prepared steps, batching those that can share a forward: (for each step its output
    or the ValueError it failed with, in order; the number of sessions in each forward run)."""
    results: list[torch.Tensor | ValueError] = [ValueError("not run")] * len(steps)
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, s in enumerate(steps):
        groups.setdefault(s.key() if batching and s.batchable else (-1, i, 0), []).append(i)
    sizes = []
    for members in groups.values():
        if len(members) > 1:
            try:
                outs = step_batch(span, [steps[i].step for i in members])
            except Exception as e:  # one bad member must not fail the others: each alone
                log.warning("a batch of %d steps failed (%s); running them alone", len(members), e)
            else:
                sizes.append(len(members))
                for i, out in zip(members, outs, strict=True):
                    results[i] = out
                continue
        for i in members:
            sizes.append(1)
            try:
                results[i] = span.run_step(steps[i].step, steps[i].prompts, steps[i].lora)
            except ValueError as e:
                results[i] = e
            except Exception as e:  # a failure of this session's forward is its own
                results[i] = ValueError(f"the step failed: {type(e).__name__}: {e}")
    return results, sizes


@torch.no_grad()
def step_batch(span: Span, steps: list[StepInput]) -> list[torch.Tensor]:
    """One forward for prepared steps of the same blocks and number of new tokens; each
    output equals (to rounding) what `span.run_step` gives the step alone. Raises without
    having changed any session's cache."""
    caches = [s.cache for s in steps]
    blocks, seq = caches[0].blocks, steps[0].hidden.shape[1]
    if any(c.blocks != blocks for c in caches) or any(s.hidden.shape[1] != seq for s in steps):
        raise ValueError("a batch needs steps of the same blocks and length")
    lengths = [s.position for s in steps]
    longest = max(lengths)
    rows = [c.batch_size for c in caches]
    packed = span.new_cache(
        sum(rows), longest + seq, start_block=blocks.start, end_block=blocks.end
    )
    for j, layer in enumerate(packed.kv.layers):
        kv = _padded([c.kv.layers[j] for c in caches], lengths, rows, longest)
        if kv is not None:
            layer.update(*kv)  # an empty layer takes them as its whole content
    packed.position = longest
    mask = None
    if any(s.mask is not None for s in steps) or len(set(lengths)) > 1:
        mask = torch.cat(
            [_row_mask(s, longest, seq, r) for s, r in zip(steps, rows, strict=True)]
        )  # (batch, longest + seq)
    positions = torch.cat([s.positions.expand(r, seq) for s, r in zip(steps, rows, strict=True)])
    hidden = torch.cat([s.hidden for s in steps])  # (batch, seq, hidden)
    out = span.run_step(StepInput(hidden, packed, longest, mask, positions))
    # Nothing below can fail halfway: the sessions' caches change only from here on.
    outs, first = [], 0
    for s, n, r in zip(steps, lengths, rows, strict=True):
        for own, layer in zip(s.cache.kv.layers, packed.kv.layers, strict=True):
            _take(own, layer, first, r, longest - n)
        s.cache.position = n + seq
        outs.append(out[first : first + r])
        first += r
    return outs


def _padded(layers: list, lengths: list[int], rows: list[int], longest: int) -> tuple | None:
    """(keys, values) of cache layers left-padded with zeros to `longest` tokens and stacked
    along the batch; None when no session has anything cached in this layer."""
    held = [_held(x) for x in layers]
    ref = next((x for x in held if x is not None), None)
    if ref is None:
        return None
    out = []
    for which in (0, 1):
        like = ref[which]  # (batch, heads, tokens, head_dim)
        parts = [
            kv[which] if kv is not None else like.new_zeros((r, like.shape[1], 0, like.shape[3]))
            for kv, r in zip(held, rows, strict=True)
        ]
        out.append(
            torch.cat([torch.nn.functional.pad(t, (0, 0, longest - t.shape[2], 0)) for t in parts])
        )
    return tuple(out)


def _held(layer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A cache layer's (keys, values), or None if it holds no token."""
    if not layer.is_initialized or not layer.keys.numel():
        return None
    return layer.keys, layer.values


def _take(own, layer, first: int, rows: int, pad: int) -> None:
    """Session cache layer `own` becomes rows [first, first + rows) of the batched `layer`,
    without the `pad` padding tokens."""
    if _held(layer) is None:
        return
    keys = layer.keys[first : first + rows, :, pad:]
    values = layer.values[first : first + rows, :, pad:]
    if not own.is_initialized:
        own.lazy_initialization(keys, values)
    own.keys, own.values = keys, values


def _row_mask(step: StepInput, longest: int, seq: int, rows: int) -> torch.Tensor:
    """The session's rows of the batched 2D mask: zeros over its padding, then its own mask
    (or ones) over its cached and new tokens."""
    n = step.position
    own = step.mask
    if own is None:
        own = torch.ones(rows, n + seq, dtype=torch.long, device=step.hidden.device)
    return torch.nn.functional.pad(own.to(torch.long), (longest - n, 0))


def batching_exact(span: Span) -> str | None:
    """None if steps of different sessions batch exactly on this span, else why not, from a
    probe on made-up hidden states: two sessions of different lengths, batched against alone,
    two steps so that the split-back caches are checked too. (Every family petald's tests run
    passes, sliding and chunked attention included: transformers offsets windows and chunks by
    the left padding. A family that derived positions from the cache index, not position_ids,
    would not.) Run once, on the first batch: it costs a few small forwards."""
    gen = torch.Generator().manual_seed(0)
    lengths, steps = (3, 1), 2
    inputs = [torch.randn(1, n + steps, span.config.hidden_size, generator=gen) for n in lengths]
    with torch.no_grad():
        alone, caches = [], []
        for x, n in zip(inputs, lengths, strict=True):
            cache = span.new_cache(1, n + steps)
            span.step(x[:, :n], cache, 0)
            alone.append([span.step(x[:, n + k : n + k + 1], cache, n + k) for k in range(steps)])
            cache = span.new_cache(1, n + steps)
            span.step(x[:, :n], cache, 0)
            caches.append(cache)
        for k in range(steps):
            prepared = [
                span.prepare_step(x[:, n + k : n + k + 1], c, n + k)
                for x, n, c in zip(inputs, lengths, caches, strict=True)
            ]
            for want, got in zip(alone, step_batch(span, prepared), strict=True):
                error = float((want[k] - got).abs().max())
                scale = max(1.0, float(want[k].abs().max()))
                if not error <= PROBE_TOLERANCE.get(span.dtype, PROBE_TOLERANCE_HALF) * scale:
                    return f"batched steps differ from steps alone by {error:.2g} (probe)"
    return None
