"""A served span reproduces the same blocks of the transformers model, for every family: padded
batches, sub-ranges, step-by-step inference with the KV cache (and after a rollback), and input
gradients. Tolerance: 1e-5 absolute in float32 (observed differences are ~1e-7 or exactly 0)."""

from __future__ import annotations

import pytest
import torch

from petald.server import load_span

ATOL = 1e-5
START, END = 1, 3  # of 4 blocks: neither the first nor the last


def close(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> None:
    """Compare real (unpadded) tokens only: padded positions are don't-care in transformers too."""
    real = mask.bool()
    torch.testing.assert_close(actual[real], expected[real], atol=ATOL, rtol=0)


def test_forward_matches_transformers_on_padded_batch(family, saved_model, hidden_of, batch):
    model, path = saved_model(family)
    ids, mask = batch
    hs = hidden_of(model, ids, mask)
    span = load_span(path, (START, END), progress=False)
    with torch.no_grad():
        close(span(hs[START], attention_mask=mask), hs[END], mask)
        # Any sub-range of the span, e.g. what a client routes through one block at a time.
        for block in range(START, END):
            out = span(hs[block], start_block=block, end_block=block + 1, attention_mask=mask)
            close(out, hs[block + 1], mask)


def test_forward_without_mask(family, saved_model, hidden_of, batch):
    model, path = saved_model(family)
    ids, _ = batch
    hs = hidden_of(model, ids)
    span = load_span(path, (START, END), progress=False)
    with torch.no_grad():
        close(span(hs[START]), hs[END], torch.ones(ids.shape))


def test_step_by_step_matches_full_forward_and_rollback(family, saved_model, hidden_of, batch):
    model, path = saved_model(family)
    ids, mask = batch
    hs = hidden_of(model, ids, mask)
    span = load_span(path, (START, END), progress=False)
    cache = span.new_cache(batch_size=3, max_length=16)
    # A prefill of 4 tokens, then one token at a time.
    outs = [span.step(hs[START][:, :4], cache, 0, attention_mask=mask[:, :4])]
    for pos in range(4, 7):
        x = hs[START][:, pos : pos + 1]
        outs.append(span.step(x, cache, pos, attention_mask=mask[:, : pos + 1]))
    assert cache.position == 7
    close(torch.cat(outs, dim=1), hs[END], mask)

    # Roll back to 5 and continue with other tokens: the result is that of the other sequence.
    other = ids.clone()
    other[:, 5:] = (ids[:, 5:] + 1) % ids.max()
    hs_other = hidden_of(model, other, mask)
    out = span.step(hs_other[START][:, 5:], cache, 5, attention_mask=mask)
    close(out, hs_other[END][:, 5:], mask[:, 5:])
    assert cache.position == 7

    cache.rollback(6)  # the explicit form of the same thing
    out = span.step(hs_other[START][:, 6:], cache, 6, attention_mask=mask)
    close(out, hs_other[END][:, 6:], mask[:, 6:])


def test_cache_of_a_sub_range(family, saved_model, hidden_of, batch):
    model, path = saved_model(family)
    ids, mask = batch
    hs = hidden_of(model, ids, mask)
    span = load_span(path, (START, END), progress=False)
    cache = span.new_cache(3, 8, start_block=END - 1, end_block=END)
    outs = [
        span.step(hs[END - 1][:, pos : pos + 1], cache, pos, attention_mask=mask[:, : pos + 1])
        for pos in range(7)
    ]
    close(torch.cat(outs, dim=1), hs[END], mask)


def test_backward_gives_the_reference_input_gradients(family, saved_model, batch):
    model, path = saved_model(family)
    ids, mask = batch
    weights = torch.randn(
        3, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(2)
    )
    weights = weights * mask[..., None]  # the loss ignores padded positions

    # Reference: autograd through the transformers model's own blocks START..END-1, with the
    # input of block START replaced by a leaf tensor.
    with torch.no_grad():
        first = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[START]
    x_ref = first.clone().requires_grad_(True)

    def swap_input(module, args, kwargs):
        return (x_ref, *args[1:]), kwargs

    blocks = model.base_model.get_submodule("h" if hasattr(model.base_model, "h") else "layers")
    hook = blocks[START].register_forward_pre_hook(swap_input, with_kwargs=True)
    try:
        hs = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    finally:
        hook.remove()
    (hs[END] * weights).sum().backward()

    span = load_span(path, (START, END), progress=False)
    x = first.clone().requires_grad_(True)
    with torch.enable_grad():
        (span(x, attention_mask=mask) * weights).sum().backward()
    assert x.grad is not None and x_ref.grad is not None
    close(x.grad, x_ref.grad, mask)
    assert all(p.grad is None for p in span.parameters())  # servers never train the weights


def test_step_rejects_bad_positions_and_shapes(saved_model):
    _, path = saved_model("llama")
    span = load_span(path, (START, END), progress=False)
    cache = span.new_cache(2, 4)
    x = torch.zeros(2, 2, 64)
    span.step(x, cache, 0)
    with pytest.raises(ValueError, match="past the 2 cached tokens"):
        span.step(x, cache, 3)
    with pytest.raises(ValueError, match="max_length"):
        span.step(torch.zeros(2, 3, 64), cache, 2)
    with pytest.raises(ValueError, match="batch"):
        span.step(torch.zeros(1, 1, 64), cache, 2)
    with pytest.raises(ValueError, match=r"expected a non-empty \(batch, seq, 64\)"):
        span.step(torch.zeros(2, 1, 32), cache, 2)
    with pytest.raises(ValueError, match="attention_mask"):
        span.step(torch.zeros(2, 1, 64), cache, 2, attention_mask=torch.ones(2, 1))
    with pytest.raises(ValueError, match="roll back"):
        cache.rollback(3)
    assert cache.position == 2  # failed calls leave the cache as it was
    with pytest.raises(ValueError, match="not a non-empty part"):
        span(x, start_block=0, end_block=2)
    with pytest.raises(ValueError, match="not a non-empty part"):
        span.new_cache(1, 4, start_block=2, end_block=2)
    with pytest.raises(ValueError, match="max_length"):
        span.new_cache(1, 0)


def test_all_hidden_returns_every_block_output(family, saved_model, hidden_of, batch):
    model, path = saved_model(family)
    ids, mask = batch
    hs = hidden_of(model, ids, mask)
    span = load_span(path, (START, END), progress=False)
    with torch.no_grad():
        stacked = span(hs[START], attention_mask=mask, all_hidden=True)
    assert stacked.shape == (END - START, *hs[START].shape)
    for i, block in enumerate(range(START, END)):
        close(stacked[i], hs[block + 1], mask)


def test_reorder_moves_cached_sequences_like_beam_search(family, saved_model, hidden_of, batch):
    """After reorder([2, 0, 0]) the cache holds sequences 2, 0, 0: the next step's outputs are
    those of a session that had been fed the sequences in that order from the start."""
    model, path = saved_model(family)
    ids, mask = batch
    hs = hidden_of(model, ids, mask)
    span = load_span(path, (START, END), progress=False)
    order = torch.tensor([2, 0, 0])
    cache = span.new_cache(3, 16)
    span.step(hs[START][:, :6], cache, 0, attention_mask=mask[:, :6])
    cache.reorder(order)
    x = hs[START][order, 6:7]
    out = span.step(x, cache, 6, attention_mask=mask[order, :7])
    close(out, hs[END][order, 6:7], mask[order, 6:7])
    with pytest.raises(ValueError, match="reorder needs 3 indices"):
        cache.reorder(torch.tensor([0, 3, 1]))
