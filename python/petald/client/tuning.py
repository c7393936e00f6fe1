"""What a client adds to the served blocks for one request (fine-tuning through the swarm):
`Tuning`, the named tensors of the wire protocol (deep "prompts" added to each block's input,
a client LoRA's "lora.<target>.A/B") plus the `lora_scale` and `active_adapter` header fields,
sliced per hop (`for_blocks`) and per sub-batch (`for_rows`); and `row_chunks`, how a batch is
split so that no request exceeds the servers' limits (`max_batch` sequences, `max_tokens`
batch x seq). Pure code: the RPC layer (`petald.client.rpc`) sends what this describes.

The tensors' first dimension is the block: row j belongs to block `start + j` (absolute), so a
hop through blocks [a, b) takes rows [a - start, b - start). The server's wire contract is in
`petald.server.adapters`; the client repeats none of its checks but the block count, which it
needs to slice."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from petald.types import BlockRange

# Servers accept requests up to these unless their `info` says otherwise (petald.server.handlers
# Limits; repeated here as client/ does not import server/).
DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_TOKENS = 8192
_TARGET = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclass(frozen=True)
class Tuning:
    """Named tensors (in wire order) over blocks [start, start + rows); header fields."""

    start: int
    named: Mapping[str, torch.Tensor] = field(default_factory=dict)
    lora_scale: float = 1.0
    active_adapter: str | None = None

    @classmethod
    def build(
        cls,
        start: int,
        *,
        prompts: torch.Tensor | None = None,
        lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        lora_scale: float = 1.0,
        active_adapter: str | None = None,
    ) -> Tuning:
        """`prompts` (blocks, batch|1, pre_seq_len, hidden); `lora[target]` = (A (blocks,
        rank, in), B (blocks, out, rank)) for a linear layer inside a block, e.g.
        "self_attn.q_proj"."""
        named: dict[str, torch.Tensor] = {}
        if prompts is not None:
            if prompts.dim() != 4:
                raise ValueError("prompts must be (blocks, batch|1, pre_seq_len, hidden)")
            named["prompts"] = prompts
        for target, (a, b) in (lora or {}).items():
            if not _TARGET.match(target):
                raise ValueError(f"bad LoRA target {target!r}: a layer path like self_attn.q_proj")
            named[f"lora.{target}.A"], named[f"lora.{target}.B"] = a, b
        rows = {t.shape[0] for t in named.values()}
        if len(rows) > 1:
            raise ValueError(f"every tuning tensor needs one row per block; got {sorted(rows)}")
        if active_adapter is not None and not 0 < len(active_adapter) <= 128:
            raise ValueError("active_adapter must be an adapter's name")
        return cls(start, named, float(lora_scale), active_adapter)

    @property
    def names(self) -> list[str]:
        return list(self.named)

    @property
    def tensors(self) -> list[torch.Tensor]:
        return list(self.named.values())

    @property
    def pre_seq_len(self) -> int:
        """Prompt positions of the deep prompts (0: none)."""
        p = self.named.get("prompts")
        return 0 if p is None else p.shape[2]

    def __bool__(self) -> bool:
        return bool(self.named) or self.active_adapter is not None

    def header(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.named:
            out["named"] = self.names
            if self.lora_scale != 1.0:
                out["lora_scale"] = self.lora_scale
        if self.active_adapter is not None:
            out["active_adapter"] = self.active_adapter
        return out

    def with_tensors(self, tensors: list[torch.Tensor]) -> Tuning:
        """The same names over new values (e.g. detached copies)."""
        return replace(self, named=dict(zip(self.named, tensors, strict=True)))

    def check_blocks(self, blocks: BlockRange) -> None:
        for name, t in self.named.items():
            if not (self.start <= blocks.start and blocks.end <= self.start + t.shape[0]):
                have = BlockRange(self.start, self.start + t.shape[0])
                raise ValueError(f"{name} covers blocks {have}, not all of {blocks}")

    def for_blocks(self, blocks: BlockRange) -> Tuning:
        """The rows of `blocks` (absolute indices), starting at blocks.start."""
        self.check_blocks(blocks)
        a, b = blocks.start - self.start, blocks.end - self.start
        sliced = {k: t[a:b] for k, t in self.named.items()}
        return replace(self, start=blocks.start, named=sliced)

    def for_rows(self, rows: slice, batch: int) -> Tuning:
        """The part of a sub-batch: per-sequence prompts (batch dim == `batch`) are sliced."""
        p = self.named.get("prompts")
        if p is None or not sliced_by_rows("prompts", p, batch):
            return self
        return replace(self, named={**self.named, "prompts": p[:, rows]})

    def without_prompts(self) -> Tuning:
        """For inference steps past the prompt positions: the prompts would change nothing."""
        if "prompts" not in self.named:
            return self
        return replace(self, named={k: t for k, t in self.named.items() if k != "prompts"})


def adapter_of(tuning: Tuning | None) -> str | None:
    """The server adapter a request needs (routes go only through servers announcing it)."""
    return tuning.active_adapter if tuning is not None else None


def row_chunks(batch: int, seq: int, max_batch: int, max_tokens: int) -> list[slice]:
    """Consecutive row ranges covering `batch` sequences of `seq` tokens, each within both
    limits (as few and as even as possible, so sub-batches cost about the same)."""
    if batch < 1 or seq < 1:
        raise ValueError("an empty batch has nothing to split")
    if seq > max_tokens:
        raise ValueError(
            f"a sequence of {seq} tokens is over the servers' limit of {max_tokens} tokens per "
            "request: shorten it"
        )
    per = max(1, min(max_batch, max_tokens // seq))
    n = -(-batch // per)  # ceil
    size, extra = divmod(batch, n)
    out, a = [], 0
    for i in range(n):
        b = a + size + (1 if i < extra else 0)
        out.append(slice(a, b))
        a = b
    return out


def sliced_by_rows(name: str, tensor: torch.Tensor, batch: int) -> bool:
    """Whether `for_rows` slices this named tensor along the batch (per-sequence prompts)."""
    return name == "prompts" and tensor.shape[1] != 1 and tensor.shape[1] == batch
