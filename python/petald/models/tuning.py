"""`RemoteTuning`: everything a distributed model trains on the client for its remote blocks, and
how it reaches them. Prompt tuning (`tuning_mode="ptune"`): `pre_seq_len` trainable embeddings
prepended to every sequence (attention mask 1 there, positions 0..pre_seq_len-1 before the
tokens', their outputs dropped before the norm and head, so logits and labels keep the input's
length). `"deep_ptune"` adds a trainable prompt per block, added to each block's input at those
positions (zero at first, as in P-Tuning v2 / Petals), sent as the "prompts" named tensor. A
client LoRA (`petald.models.lora.RemoteLoRA`) and a server adapter's name (`active_adapter`)
ride along the same way (`petald.client.Tuning`).

`run_blocks` is the model's stateless pass through the blocks (differentiable:
`petald.client.autograd.remote_forward`); `TunedRemoteCache` is the generate() side: it prepends
the prompts on the session's first step and hides their positions from transformers (so
generate()'s own bookkeeping of lengths and positions is untouched). Entry points: the model's
`enable_prompt_tuning`, `add_remote_lora`, `active_adapter` (`petald.models.finetune`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from petald.client import RemoteSequential, Tuning, remote_forward
from petald.models.cache import UNKNOWN_TOKEN, RemoteCache
from petald.models.lora import RemoteLoRA

TUNING_MODES = ("ptune", "deep_ptune")
MAX_PRE_SEQ_LEN = 1024  # prompts this long are no longer "a few virtual tokens"


class RemoteTuning(nn.Module):
    def __init__(self, n_blocks: int, hidden_size: int) -> None:
        super().__init__()
        self.n_blocks, self.hidden_size = n_blocks, hidden_size
        self.mode: str | None = None
        self.prompts: nn.Parameter | None = None  # (pre_seq_len, hidden), prepended
        self.deep_prompts: nn.Parameter | None = None  # (blocks, pre_seq_len, hidden)
        self.lora: RemoteLoRA | None = None
        self.active_adapter: str | None = None

    @property
    def pre_seq_len(self) -> int:
        return 0 if self.prompts is None else self.prompts.shape[0]

    def enable_prompts(self, mode: str, pre_seq_len: int, init_from: torch.Tensor) -> None:
        """Trainable prompts, initialised from random rows of `init_from` (the token embedding
        matrix): a prompt that starts as real tokens trains faster than noise, whose scale
        would be nothing like the embeddings'."""
        if mode not in TUNING_MODES:
            raise ValueError(f"tuning_mode must be one of {TUNING_MODES}, not {mode!r}")
        if not (isinstance(pre_seq_len, int) and 0 < pre_seq_len <= MAX_PRE_SEQ_LEN):
            raise ValueError(f"{mode} needs pre_seq_len in 1..{MAX_PRE_SEQ_LEN} (prompt length)")
        rows = torch.randint(0, init_from.shape[0], (pre_seq_len,))
        self.mode = mode
        self.prompts = nn.Parameter(init_from.detach()[rows].clone())
        if mode == "deep_ptune":
            shape = (self.n_blocks, pre_seq_len, self.hidden_size)
            self.deep_prompts = nn.Parameter(init_from.new_zeros(shape))

    def wire(self) -> Tuning | None:
        """What requests through all the model's blocks carry (the parameters themselves,
        so autograd reaches them)."""
        deep = None if self.deep_prompts is None else self.deep_prompts.unsqueeze(1)
        lora = self.lora.weights() if self.lora is not None else None
        if deep is None and lora is None and self.active_adapter is None:
            return None
        scale = self.lora.scale if self.lora is not None else 1.0
        return Tuning.build(
            0, prompts=deep, lora=lora, lora_scale=scale, active_adapter=self.active_adapter
        )

    def extend(
        self, x: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Prepends the prompts: x (batch, p + seq, hidden), the mask with ones for them, the
        position ids (if given) shifted by p after 0..p-1."""
        p, batch = self.pre_seq_len, x.shape[0]
        if not p:
            return x, mask, positions
        assert self.prompts is not None
        prompts = self.prompts.to(x.dtype).unsqueeze(0).expand(batch, p, -1)
        x = torch.cat([prompts.to(x.device), x], 1)
        if mask is not None:
            mask = torch.cat([mask.new_ones(batch, p), mask], 1)
        if positions is not None:
            rows = positions.shape[0]
            head = torch.arange(p, device=positions.device).expand(rows, p)
            positions = torch.cat([head, positions + p], 1)
        return x, mask, positions

    def run_blocks(
        self,
        blocks: RemoteSequential,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor | None,
        every: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The model's stateless pass (`_run_blocks`) with the tuning: the last block's output
        (batch, seq, hidden) without the prompt positions; with `every`, also the embeddings
        and every block's output (no gradients through those)."""
        p = self.pre_seq_len
        x_in, mask, positions = self.extend(x, mask, positions)
        wire = self.wire()
        if every:
            if torch.is_grad_enabled() and any(t.requires_grad for t in self.parameters()):
                raise ValueError(
                    "output_hidden_states returns no gradients through the remote blocks; "
                    "call the model under torch.no_grad() for them, or without them to train"
                )
            cpu = [None if t is None else t.to("cpu") for t in (mask, positions)]
            stacked = blocks.forward(x_in.to("cpu"), *cpu, all_hidden=True, tuning=wire)
            stacked = stacked.to(x.device, x.dtype)[:, :, p:]  # (blocks, batch, seq, hidden)
            return stacked[-1], (x, *stacked.unbind(0))
        out = remote_forward(blocks, x_in, mask, positions, tuning=wire)
        return out.to(x.dtype)[:, p:], None

    def new_cache(self, blocks: RemoteSequential, **kwargs: Any) -> TunedRemoteCache:
        return TunedRemoteCache(blocks, self, **kwargs)


class TunedRemoteCache(RemoteCache):
    """A `RemoteCache` whose session carries the model's tuning on every step and holds the
    prompt (prepended on its first step) before the tokens. Lengths it reports to transformers
    count tokens only; the session's positions are those plus `pre_seq_len`."""

    def __init__(self, blocks: RemoteSequential, tuning: RemoteTuning, **kwargs: Any) -> None:
        super().__init__(blocks, **kwargs)
        self.tuning = tuning
        self.p = tuning.pre_seq_len

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(super().get_seq_length(layer_idx) - self.p, 0)

    def rollback(self, position: int) -> None:
        if self.session is None or self.session.position == 0:
            super().rollback(position)
            return
        if not 0 <= position <= self.get_seq_length():
            raise ValueError(f"cannot roll back to {position}: the session holds fewer tokens")
        self.session.rollback(position + self.p)  # the prompt stays
        if self.token_ids is not None:
            self.token_ids = self.token_ids[:, :position]

    def _open(self, batch: int) -> Any:
        if self.session is None and not self._closed:
            if self.max_length is None:
                raise ValueError("give the session a max_length (tokens per sequence)")
            if self.batch is not None and self.batch != batch:
                raise ValueError(f"a batch of {batch} sequences; this session is for {self.batch}")
            wire = self.tuning.wire()
            self.session = self.blocks.inference_session(
                self.max_length + self.p, batch, tuning=wire
            )
        return super()._open(batch)

    def step(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        input_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        batch, n = hidden.shape[0], hidden.shape[1]
        first = self._open(batch).position == 0
        if input_ids is None:  # token ids are only kept for the tokens, not the prompt
            input_ids = torch.full((batch, n), UNKNOWN_TOKEN, dtype=torch.long)
        if self.p:
            if first:
                with torch.no_grad():
                    hidden, attention_mask, position_ids = self.tuning.extend(
                        hidden, attention_mask, position_ids
                    )
            else:
                ones = torch.ones(batch, self.p, dtype=torch.long)
                if attention_mask is not None:
                    attention_mask = torch.cat([ones.to(attention_mask), attention_mask], 1)
                if position_ids is not None:
                    position_ids = position_ids + self.p
        out = super().step(hidden, attention_mask, position_ids, input_ids)
        return out[:, self.p :] if first else out
