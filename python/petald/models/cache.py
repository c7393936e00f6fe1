"""`RemoteCache`: a transformers `Cache` whose keys and values stay on the servers. It wraps one
`petald.client.InferenceSession` (opened lazily on the first step, when the batch size is
known), so that `generate()` and a model's `forward(past_key_values=...)` drive a remote KV cache
with transformers' own bookkeeping: `get_seq_length()` is the session's position (from which
generate slices the new tokens and its position ids), `reorder_cache(beam_idx)` is sent with the
next step (beam search), `crop()` rolls the session back (assisted decoding).

It also remembers the token ids it holds, so that a later `generate()` given the whole
conversation reuses the longest common prefix and rolls back the rest (`sync_prefix`): this is
how `model.inference_session(...)` carries a multi-turn chat across generate() calls. Entry
points: `DistributedModelForCausalLM.inference_session`, or generate() which makes its own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import Cache

from petald.client import InferenceSession, RemoteSequential, SessionStats

UNKNOWN_TOKEN = -1  # held positions whose token id is unknown (fed as embeddings)


class RemoteCache(Cache):
    """The servers' KV cache for one session. `max_length`: tokens per sequence it may hold
    (None: set by the generate() call that made it); `batch`: None takes the first step's."""

    def __init__(
        self,
        blocks: RemoteSequential,
        *,
        max_length: int | None = None,
        batch: int | None = None,
        on_close: Callable[[RemoteCache], None] | None = None,
    ) -> None:
        super().__init__(layers=[])
        self._on_close = on_close
        self.blocks = blocks
        self.max_length = max_length
        self.batch = batch
        self.session: InferenceSession | None = None
        self.token_ids: torch.Tensor | None = (
            None  # (batch, position), UNKNOWN_TOKEN if fed as embeds
        )
        self._reorder: torch.Tensor | None = None  # applied with the next step
        # Tokens held that the next step feeds again (see `replay_held`); 0: none.
        self._replayed = 0
        self._closed = False

    # ---- what transformers asks of a Cache --------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        held = self.session.position if self.session is not None else 0
        return held - self._replayed

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_length if self.max_length is not None else -1

    @property
    def is_compileable(self) -> bool:  # nothing to compile: the layers run on the servers
        return False

    @property
    def is_initialized(self) -> bool:
        return self.session is not None

    @property
    def is_croppable(self) -> bool:
        return True

    # What the remote layers are, as generate() asks of a cache's layers: attention with the
    # whole history (not linear/SSM state, not a sliding window that forgets). With no local
    # layers, the base class would answer with empty lists, and since transformers 5.24
    # generate() takes `all([])` for "linear attention" and stops slicing the tokens the
    # session already holds.
    @property
    def is_linear(self) -> list[bool]:
        return [False]

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_dummy(self) -> list[bool]:
        return [False]

    @property
    def batch_size(self) -> int:
        return self.session.batch if self.session is not None else -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: sequence i continues the former sequence beam_idx[i]. Kept until the
        next step, which carries it to the servers (no round trip of its own)."""
        index = beam_idx.detach().to("cpu", torch.long)
        self._reorder = index if self._reorder is None else self._reorder[index]
        if self.token_ids is not None:
            self.token_ids = self.token_ids.index_select(0, index)

    def crop(self, max_length: int) -> None:
        """Drops `-max_length` tokens from the end when negative; keeps the first `max_length`
        when positive; 0 changes nothing. Transformers >= 5.23 calls `crop(-n)` with n the
        draft tokens to drop after assisted decoding's verification, n = 0 included (all
        accepted): reading 0 as "keep nothing" emptied the session and the next tokens were
        computed without their context. Positive sizes are the older convention."""
        if max_length == 0:
            return
        position = self.get_seq_length()
        keep = position + max_length if max_length < 0 else min(max_length, position)
        self.rollback(max(keep, 0))

    def reset(self) -> None:
        self.rollback(0)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a remote cache keeps its batch size; open it with the batch")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a remote cache keeps its batch size; open it with the batch")

    # ---- the session ------------------------------------------------------------------------

    @property
    def position(self) -> int:
        return self.get_seq_length()

    @property
    def stats(self) -> SessionStats:
        return self.session.stats if self.session is not None else SessionStats()

    def rollback(self, position: int) -> None:
        """Forgets the tokens at `position` and after (the servers follow on the next step)."""
        self._replayed = 0
        if self.session is None:
            if position:
                raise ValueError(f"cannot roll back to {position}: the session holds nothing")
            return
        self.session.rollback(position)
        if self.token_ids is not None:
            self.token_ids = self.token_ids[:, :position]

    def step(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        input_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """`hidden` (batch, n, hidden) for the next n tokens through the remote blocks; the
        mask covers all tokens so far (batch, position + n). Returns the last block's output
        on `hidden`'s device and dtype."""
        session = self._open(hidden.shape[0])
        if self._replayed:
            return self._step_past_held(hidden, attention_mask, position_ids, input_ids)
        position, n = session.position, hidden.shape[1]
        if attention_mask is not None and attention_mask.shape[-1] != position + n:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} tokens; the session holds "
                f"{position} and this step adds {n}: pass the mask of all {position + n}"
            )
        mask, positions = _unless_default(attention_mask, position_ids, position, n)
        out = session.step(hidden.to("cpu"), mask, positions, reorder=self._reorder)
        self._reorder = None
        ids = input_ids.to("cpu") if input_ids is not None else None
        if ids is None:
            ids = torch.full((hidden.shape[0], n), UNKNOWN_TOKEN, dtype=torch.long)
        old = self.token_ids if self.token_ids is not None else ids[:, :0]
        self.token_ids = torch.cat([old, ids.to(torch.long)], 1)
        return out.to(hidden.device, hidden.dtype)

    def replay_held(self) -> None:
        """The next step feeds every token held again, then new ones (transformers' assisted
        generation prefills the whole input on its first step, whatever the cache holds):
        until then the cache reports itself empty (so positions and masks are computed from
        0), and that step sends only the new tokens to the servers."""
        self._replayed = self.position

    def _step_past_held(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        input_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """A step that starts with the `_replayed` tokens held: the rest goes to the servers;
        the held tokens' outputs, which no one reads (assisted generation takes the logits of
        the new tokens only), are zeros. Tokens that are not the ones held roll back."""
        k, self._replayed = self._replayed, 0
        n = hidden.shape[1]
        held = self.token_ids
        if (
            input_ids is None
            or held is None
            or n <= k
            or not torch.equal(input_ids[:, :k].to("cpu"), held[:, :k])
        ):
            self.rollback(0)  # not the held tokens after all: compute everything
            return self.step(hidden, attention_mask, position_ids, input_ids)
        tail_positions = position_ids[..., k:] if position_ids is not None else None
        if tail_positions is None:
            tail_positions = torch.arange(k, n).expand(hidden.shape[0], n - k)
        out = self.step(hidden[:, k:], attention_mask, tail_positions, input_ids[:, k:])
        return torch.cat([out.new_zeros(out.shape[0], k, out.shape[2]), out], 1)

    def sync_prefix(self, input_ids: torch.Tensor | None) -> None:
        """Before generate() on the whole sequence so far: keeps the longest prefix the session
        holds that `input_ids` starts with (over every row), rolls back the rest, and keeps at
        least one token to compute, as generate() needs the logits of the last one."""
        if self.session is None or input_ids is None or self.token_ids is None:
            return
        held = self.token_ids
        if input_ids.shape[0] != held.shape[0]:
            raise ValueError(
                f"this session holds a batch of {held.shape[0]} sequences; generate() was given "
                f"{input_ids.shape[0]} (beam search needs batch x num_beams)"
            )
        n = min(held.shape[1], input_ids.shape[1] - 1)
        same = (held[:, :n] == input_ids[:, :n].to("cpu")).all(0)
        keep = int(same.long().cumprod(0).sum()) if n > 0 else 0
        if keep < self.position:
            self.rollback(keep)

    def _open(self, batch: int) -> InferenceSession:
        if self._closed:
            raise ValueError("this inference session is closed")
        if self.session is None:
            if self.max_length is None:
                raise ValueError("give the session a max_length (tokens per sequence)")
            if self.batch is not None and self.batch != batch:
                raise ValueError(f"a batch of {batch} sequences; this session is for {self.batch}")
            self.session = self.blocks.inference_session(self.max_length, batch)
        return self.session

    def close(self) -> None:
        """Frees the servers' caches. Idempotent."""
        self._closed = True
        if self.session is not None:
            self.session.close()
        if self._on_close is not None:
            self._on_close(self)

    def __enter__(self) -> RemoteCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteCache(position={self.position}, max_length={self.max_length})"


def _unless_default(
    mask: torch.Tensor | None, positions: torch.Tensor | None, position: int, n: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The mask and position ids for the wire (on the CPU), or None where they are the
    servers' defaults (no padding; positions position..position+n-1): generate() passes both
    on every step, and without padding they only cost bytes and a materialised mask."""
    if mask is not None:
        mask = mask.to("cpu")
        if bool(mask.all()):
            mask = None
    if positions is not None:
        positions = positions.to("cpu")
        if torch.equal(positions, torch.arange(position, position + n).expand_as(positions)):
            positions = None
    return mask, positions
