"""Sub-batch splitting and the slicing of fine-tuning tensors (petald.client.tuning), and how
the autograd side puts sub-batch and per-hop gradients back together."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from petald.client.autograd import _accumulate
from petald.client.tuning import Tuning, row_chunks
from petald.types import BlockRange


@given(
    batch=st.integers(1, 300),
    seq=st.integers(1, 600),
    max_batch=st.integers(1, 64),
    max_tokens=st.integers(600, 8192),
)
def test_row_chunks_cover_the_batch_within_the_limits(batch, seq, max_batch, max_tokens) -> None:
    chunks = row_chunks(batch, seq, max_batch, max_tokens)
    assert chunks[0].start == 0 and chunks[-1].stop == batch
    assert all(a.stop == b.start for a, b in pairwise(chunks))
    sizes = [c.stop - c.start for c in chunks]
    assert all(0 < n <= max_batch and n * seq <= max_tokens for n in sizes)
    assert max(sizes) - min(sizes) <= 1  # even: sub-batches cost about the same
    per = min(max_batch, max_tokens // seq)
    assert len(chunks) == -(-batch // per)  # as few as the limits allow


def test_row_chunks_refuse_a_sequence_over_the_token_limit() -> None:
    with pytest.raises(ValueError, match="9000 tokens is over the servers' limit of 8192"):
        row_chunks(1, 9000, 64, 8192)
    assert row_chunks(5, 10, 2, 8192) == [slice(0, 2), slice(2, 4), slice(4, 5)]


def tuning(batch_prompts: int = 1) -> Tuning:
    prompts = torch.randn(4, batch_prompts, 2, 8)  # blocks 3..6
    lora = {"self_attn.q_proj": (torch.randn(4, 2, 8), torch.randn(4, 8, 2))}
    return Tuning.build(3, prompts=prompts, lora=lora, lora_scale=0.5, active_adapter=None)


def test_tuning_names_header_and_block_slices() -> None:
    t = tuning()
    assert t.names == ["prompts", "lora.self_attn.q_proj.A", "lora.self_attn.q_proj.B"]
    assert t.header() == {"named": t.names, "lora_scale": 0.5}
    hop = t.for_blocks(BlockRange(4, 6))
    assert hop.start == 4 and all(x.shape[0] == 2 for x in hop.tensors)
    assert torch.equal(hop.named["prompts"], t.named["prompts"][1:3])
    with pytest.raises(ValueError, match="covers blocks 3:7, not all of 2:5"):
        t.for_blocks(BlockRange(2, 5))
    assert not Tuning.build(0) and Tuning.build(0, active_adapter="x").header() == {
        "active_adapter": "x"
    }
    assert t.without_prompts().names == t.names[1:] and t.pre_seq_len == 2


def test_tuning_refuses_mismatched_blocks_and_bad_targets() -> None:
    with pytest.raises(ValueError, match="one row per block"):
        Tuning.build(0, prompts=torch.zeros(2, 1, 1, 8), lora={"a": (torch.zeros(3, 1, 8),) * 2})
    with pytest.raises(ValueError, match="bad LoRA target"):
        Tuning.build(0, lora={"a;b": (torch.zeros(1, 1, 1),) * 2})


def test_sub_batch_and_hop_gradients_are_put_back_in_place() -> None:
    """Per-sequence prompts: each sub-batch writes its own sequences; shared tensors (LoRA,
    prompts for all sequences) add up over the sub-batches; each hop writes its blocks."""
    for batch_prompts in (1, 3):
        t = tuning(batch_prompts)
        into = [torch.zeros_like(x) for x in t.tensors]
        for rows in (slice(0, 2), slice(2, 3)):
            part = t.for_rows(rows, 3)
            for blocks in (BlockRange(3, 5), BlockRange(5, 7)):
                hop = part.for_blocks(blocks)
                _accumulate(t, 3, rows, [(blocks, [torch.ones_like(x) for x in hop.tensors])], into)
        prompts, a, _ = into
        assert torch.equal(a, torch.full_like(a, 2.0))  # shared: one per sub-batch
        assert torch.equal(prompts, torch.full_like(prompts, 2.0 if batch_prompts == 1 else 1.0))
